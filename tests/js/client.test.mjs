// The JavaScript client against a real server, which this test starts (and restarts) itself.
// Run by tests/test_js_client.py, which prepares the database and passes the environment.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { connect, SmartSortError } from "../../client_demo/smartsort.js";

const env = process.env;
const GROUP = env.TEST_GROUP;
const OTHER = env.TEST_OTHER_GROUP;
const USER = env.TEST_USER;
const PORT = Number(env.TEST_PORT);
const URL = `ws://127.0.0.1:${PORT}/ws`;

function b64url(data) {
  return Buffer.from(data).toString("base64").replace(/=+$/, "").replace(/\+/g, "-").replace(/\//g, "_");
}
function token(user, ttlS = 3600) {
  const now = Math.floor(Date.now() / 1000);
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify({ sub: user, iat: now, exp: now + ttlS }));
  const sig = b64url(createHmac("sha256", env.SMARTSORT_JWT_SECRET).update(`${head}.${body}`).digest());
  return `${head}.${body}.${sig}`;
}

let server;
function startServer() {
  return new Promise((resolve, reject) => {
    server = spawn(env.TEST_PYTHON, ["-m", "server", "serve", "--port", String(PORT), "--workers", "1"], {
      cwd: env.TEST_ROOT,
      env: { ...env, SMARTSORT_STEP_DELAY_S: "0.15", SMARTSORT_ANALYSIS_BATCH_SIZE: "2", SMARTSORT_ANALYSIS_CONCURRENCY: "1" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "";
    const onData = (chunk) => {
      out += chunk;
      if (out.includes("listening on")) resolve();
    };
    server.stdout.on("data", onData);
    server.stderr.on("data", (chunk) => { out += chunk; });
    server.on("exit", (code) => { if (!out.includes("listening on")) reject(new Error(`server exited ${code}:\n${out}`)); });
  });
}
function stopServer() {
  return new Promise((resolve) => {
    server.on("exit", resolve);
    server.kill("SIGTERM");
  });
}
function until(emitter, type, pred = () => true, ms = 20000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { off(); reject(new Error(`timed out waiting for ${type}`)); }, ms);
    const off = emitter.on(type, (ev) => {
      if (pred(ev)) { clearTimeout(timer); off(); resolve(ev); }
    });
  });
}

before(startServer);
after(stopServer);

test("sort resolves with the job and every event arrives once, in order", async () => {
  const client = connect({ url: URL, getToken: async () => token(USER) });
  const group = client.group(GROUP);
  const seen = [];
  group.on("event", (ev) => { if (ev.seq !== undefined) seen.push(ev); });
  await until(group, "state", (s) => s.state === "live");
  const done = until(group, "completed");
  const { job, deduplicated } = await group.sort();
  assert.equal(deduplicated, false);
  const completed = await done;
  assert.equal(completed.job.id, job.id);
  const seqs = seen.map((e) => e.seq);
  assert.deepEqual(seqs, seqs.map((_, i) => seqs[0] + i));
  const partial = seen.filter((e) => e.type === "job.partial").flatMap((e) => e.songs);
  assert.equal(partial.length, 6);
  client.close();
});

test("an error frame rejects the request's promise", async () => {
  const client = connect({ url: URL, token: token(USER) });
  await assert.rejects(client.group(OTHER).sort(), (err) => err instanceof SmartSortError && err.code === "forbidden");
  await assert.rejects(client.request({ type: "job.get", job: "nope" }), (err) => err.code === "not_found");
  client.close();
});

test("repeated seqs are dropped", async () => {
  const client = connect({ url: URL, token: token(USER) });
  const group = client.group(GROUP);
  await until(group, "state", (s) => s.state === "live");
  const events = [];
  group.on("event", (ev) => events.push(ev));
  const frame = { type: "playlist.updated", group: GROUP, seq: group.seq + 1, ts: "t", version: 1, change: "song_added" };
  client._onFrame(frame);
  client._onFrame({ ...frame });
  client._onFrame({ ...frame, seq: frame.seq - 1 });
  assert.equal(events.length, 1);
  client.close();
});

test("a resume the server cannot honour emits gap-reload with the snapshot", async () => {
  const client = connect({ url: URL, token: token(USER), backoffMs: 10 });
  const group = client.group(GROUP);
  await until(group, "state", (s) => s.state === "live");
  group.seq = 10 ** 9; // as if the server's store had been reset since we last saw it
  const reload = until(group, "state", (s) => s.state === "gap-reload");
  client.ws.close();
  const ev = await reload;
  assert.ok(ev.snapshot && Array.isArray(ev.snapshot.online));
  assert.ok(group.seq < 10 ** 9);
  client.close();
});

test("a client resumes across a server restart and misses nothing", async () => {
  const client = connect({ url: URL, getToken: async () => token(USER), backoffMs: 50, maxBackoffMs: 200 });
  const states = [];
  client.on("state", (s) => states.push(s.state));
  const group = client.group(GROUP);
  const seen = [];
  group.on("event", (ev) => { if (ev.seq !== undefined) seen.push(ev); });
  await until(group, "state", (s) => s.state === "live");
  const firstPartial = until(group, "partial");
  const { job } = await group.sort({}, `restart-${Date.now()}`);
  await firstPartial;
  const reconnecting = until(client, "state", (s) => s.state === "reconnecting");
  await stopServer();
  await reconnecting;
  const resumed = until(group, "state", (s) => s.state === "resumed");
  const done = until(group, "completed", (e) => e.job.id === job.id, 60000);
  await startServer();
  await resumed.catch((err) => { throw new Error(`${err.message}; client states: ${states.join(" ")}`); });
  await done;
  const seqs = seen.map((e) => e.seq);
  assert.deepEqual(seqs, seqs.map((_, i) => seqs[0] + i));
  assert.equal(seen.filter((e) => e.type === "job.completed" && e.job.id === job.id).length, 1);
  client.close();
});
