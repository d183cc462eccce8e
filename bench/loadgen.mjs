// Load generator for the fan-out and idle-socket benchmarks: many WebSockets in one Node process
// (Node's own WebSocket, no dependencies), speaking either our protocol or Socket.IO's (the peer).
//
//   node --experimental-websocket bench/loadgen.mjs --proto smartsort|socketio \
//        --urls ws://127.0.0.1:8001/ws?token=T,ws://127.0.0.1:8002/ws?token=T --n 1000 --group G
//
// Sockets are spread round-robin over the urls. Prints one JSON line "ready" once every socket
// has joined; then reads commands on stdin, one per line:
//   reset             forget the samples so far
//   report <events> <path>
//                     wait (at most 10 s) until every socket has <events> events since the
//                     reset, write the latencies to <path> (float64s) and print {deliveries,
//                     lost, first, last, cpu} as JSON; bench/fanout.py merges the generators
//   quit
// Latency: each event carries bench_t (publisher wall clock, ms); the receipt time is
// performance.timeOrigin + performance.now() on the same machine.
import { writeFileSync } from "node:fs";
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
    // report <events> <path>: raw samples for bench/fanout.py to merge across generators
    // (latencies as float64s in <path>, first and last per event as pairs).
    const [, , path] = line.trim().split(/\s+/);
    const events = Number(arg);
    const deadline = now() + 10000;
    while (received < events * n && now() < deadline) await new Promise((r) => setTimeout(r, 10));
    const wall = (now() - t0) / 1000;
    const cpu = process.cpuUsage(cpu0);
    let lost = 0;
    for (const c of counts) lost += Math.max(0, events - c);
    writeFileSync(path, Buffer.from(Float64Array.from(latencies).buffer));
    console.log(JSON.stringify({
      deliveries: received,
      lost,
      first: [...first.entries()],
      last: [...last.entries()],
      generator_cpu_s: (cpu.user + cpu.system) / 1e6,
      wall_s: wall,
    }));
  } else if (cmd === "quit") {
    break;
  }
}
for (const ws of sockets) ws.close();
process.exit(0);
