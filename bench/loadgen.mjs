// Load generator for the fan-out and idle-socket benchmarks: many WebSockets in one Node process
// (Node's own WebSocket, no dependencies), speaking either our protocol or Socket.IO's (the peer).
//
//   node --experimental-websocket bench/loadgen.mjs --proto smartsort|socketio \
//        --urls ws://127.0.0.1:8001/ws?token=T,ws://127.0.0.1:8002/ws?token=T --n 1000 --group G
//
// Sockets are spread round-robin over the urls. Prints one JSON line "ready" once every socket
// has joined; then reads commands on stdin, one per line:
//   reset             forget the samples so far
//   report <events>   wait (at most 10 s) until every socket has <events> events since the
//                     reset, then print {deliveries, lost, latency percentiles, cpu} as JSON
//   quit
// Latency: each event carries bench_t (publisher wall clock, ms); the receipt time is
// performance.timeOrigin + performance.now() on the same machine.
import { createInterface } from "node:readline";

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith("--") ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const proto = args.proto || "smartsort";
const urls = args.urls.split(",");
const n = Number(args.n || 1000);
const group = args.group;
const now = () => performance.timeOrigin + performance.now();

let latencies = [];
let received = 0;
let counts = new Uint32Array(n); // events per socket since the last reset
const sockets = [];
let joined = 0;
let failed = 0;

let first = new Map();
let last = new Map();
function onEvent(i, sentAt) {
  const latency = now() - sentAt;
  latencies.push(latency);
  if (!first.has(sentAt)) first.set(sentAt, latency);
  last.set(sentAt, latency);
  counts[i] += 1;
  received += 1;
}

function openSmartSort(i, url) {
  const ws = new WebSocket(url);
  ws.onopen = () => ws.send(JSON.stringify({ type: "join", group, ref: "j" }));
  ws.onmessage = (msg) => {
    const text = msg.data;
    // The hot path reads bench_t without parsing the whole frame, so the generator's own cost
    // per delivery stays small (it is what would otherwise be measured).
    const k = text.indexOf('"bench_t":');
    if (k >= 0) return onEvent(i, parseFloat(text.slice(k + 10)));
    const f = JSON.parse(text);
    if (f.ref === "j") {
      if (f.type === "joined") joined += 1;
      else failed += 1;
    }
  };
  ws.onerror = () => { failed += 1; };
  return ws;
}

function openSocketIO(i, url) {
  const ws = new WebSocket(url);
  ws.onmessage = (msg) => {
    const text = msg.data;
    if (text === "2") return ws.send("3"); // engine.io ping -> pong
    if (text[0] === "0") return ws.send("40"); // engine.io open -> connect the namespace
    if (text.startsWith("40")) return ws.send(`421${JSON.stringify(["join", group])}`);
    if (text.startsWith("431")) { joined += 1; return; }
    if (text.startsWith("42")) {
      const k = text.indexOf('"bench_t":');
      if (k >= 0) onEvent(i, parseFloat(text.slice(k + 10)));
    }
  };
  ws.onerror = () => { failed += 1; };
  return ws;
}

const open = proto === "socketio" ? openSocketIO : openSmartSort;
const BATCH = 200; // connect in waves so the accept queues are not the thing measured
for (let i = 0; i < n; i += 1) {
  sockets.push(open(i, urls[i % urls.length]));
  if (i % BATCH === BATCH - 1) {
    const target = i + 1;
    while (joined + failed < target) await new Promise((r) => setTimeout(r, 5));
  }
}
while (joined + failed < n) await new Promise((r) => setTimeout(r, 5));
console.log(JSON.stringify({ ready: true, joined, failed }));

function pct(sorted, p) {
  if (!sorted.length) return null;
  return Math.round(sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] * 100) / 100;
}

let cpu0 = process.cpuUsage();
let t0 = now();
const rl = createInterface({ input: process.stdin });
for await (const line of rl) {
  const [cmd, arg] = line.trim().split(/\s+/);
  if (cmd === "reset") {
    latencies = [];
    first = new Map();
    last = new Map();
    received = 0;
    counts = new Uint32Array(n);
    cpu0 = process.cpuUsage();
    t0 = now();
    console.log(JSON.stringify({ reset: true }));
  } else if (cmd === "report") {
    const events = Number(arg);
    const deadline = now() + 10000;
    while (received < events * n && now() < deadline) await new Promise((r) => setTimeout(r, 10));
    const wall = (now() - t0) / 1000;
    const cpu = process.cpuUsage(cpu0);
    let lost = 0;
    for (const c of counts) lost += Math.max(0, events - c);
    const sorted = Float64Array.from(latencies).sort();
    console.log(JSON.stringify({
      deliveries: received,
      lost,
      p50_ms: pct(sorted, 50),
      p99_ms: pct(sorted, 99),
      max_ms: pct(sorted, 100),
      first_p50_ms: pct(Float64Array.from(first.values()).sort(), 50),
      last_p50_ms: pct(Float64Array.from(last.values()).sort(), 50),
      last_p99_ms: pct(Float64Array.from(last.values()).sort(), 99),
      generator_cpu_s: (cpu.user + cpu.system) / 1e6,
      wall_s: wall,
    }));
  } else if (cmd === "quit") {
    break;
  }
}
for (const ws of sockets) ws.close();
process.exit(0);
