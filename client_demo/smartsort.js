// Smart Sort Live client: one dependency-free ES module for browsers and Node >= 20
// (Node 20 needs `node --experimental-websocket`, or pass `WebSocket` in the options).
//
//   import { connect } from "./smartsort.js";
//   const client = connect({ url: "ws://localhost:8080/ws", getToken: async () => token });
//   const demo = client.group("demo");
//   demo.on("progress", (ev) => console.log(ev.percent));
//   const { job } = await demo.sort();
//
// It reconnects with backoff and jitter, rejoins every group with `since` = the last seq it saw,
// drops repeated seqs, and emits `state` "gap-reload" (with the snapshot) when the server could
// not replay what was missed, so the UI can refetch the playlist.

const EVENTS = {
  "job.queued": "queued",
  "job.started": "started",
  "job.progress": "progress",
  "job.partial": "partial",
  "job.retrying": "retrying",
  "job.completed": "completed",
  "job.failed": "failed",
  "job.cancelled": "cancelled",
  "playlist.updated": "playlist",
  "presence.joined": "presence",
  "presence.left": "presence",
};
const NO_RECONNECT = new Set([1008, 1009]); // policy and too-big: looping would not help
const TOKEN_EXPIRED = 4401;

function freshKey() {
  // randomUUID exists only in secure contexts (https, localhost); elsewhere 122 random bits.
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  return Array.from({ length: 4 }, () => Math.random().toString(36).slice(2, 10)).join("-");
}

export class SmartSortError extends Error {
  constructor(code, message, frame) {
    super(message);
    this.name = "SmartSortError";
    this.code = code;
    this.frame = frame;
  }
}

class Emitter {
  constructor() {
    this._handlers = new Map();
  }
  on(type, fn) {
    if (!this._handlers.has(type)) this._handlers.set(type, new Set());
    this._handlers.get(type).add(fn);
    return () => this.off(type, fn);
  }
  off(type, fn) {
    this._handlers.get(type)?.delete(fn);
  }
  emit(type, value) {
    for (const fn of [...(this._handlers.get(type) || [])]) {
      try {
        fn(value);
      } catch (err) {
        console.error(`smartsort: a "${type}" handler threw`, err);
      }
    }
  }
}

export class Group extends Emitter {
  constructor(client, id) {
    super();
    this.client = client;
    this.id = id;
    this.seq = null; // the last durable seq seen: where a reconnect resumes
    this.snapshot = null;
    this.joined = false;
  }
  /**
   * Start (or join) the group's sort. Resolves with {job, deduplicated}. A fresh idempotency
   * key is used when none is given, so a request re-sent after a reconnect never starts a
   * second job.
   */
  sort(options = {}, idempotencyKey = freshKey()) {
    return this.client.request({ type: "sort", group: this.id, options, idempotency_key: idempotencyKey });
  }
  cancel(jobId) {
    return this.client.request({ type: "cancel", job: jobId }).then((r) => r.job);
  }
  job(jobId) {
    return this.client.request({ type: "job.get", job: jobId }).then((r) => r.job);
  }
  leave() {
    this.client.groups.delete(this.id);
    return this.client.request({ type: "leave", group: this.id });
  }
  _join() {
    const frame = { type: "join", group: this.id };
    if (this.seq !== null) frame.since = this.seq;
    const resuming = this.seq !== null;
    return this.client.request(frame).then((joined) => {
      this.joined = true;
      this.snapshot = joined.snapshot;
      if (resuming && !joined.recovered) {
        // The server could not replay what we missed: the snapshot is the truth.
        this.seq = joined.seq;
        this.emit("state", { state: "gap-reload", snapshot: joined.snapshot });
      } else {
        if (this.seq === null) this.seq = joined.seq;
        this.emit("state", { state: resuming ? "resumed" : "live", snapshot: joined.snapshot });
      }
      return joined;
    });
  }
  _event(frame) {
    if (frame.seq !== undefined) {
      if (this.seq !== null && frame.seq <= this.seq) return; // already seen: drop
      this.seq = frame.seq;
    }
    const name = EVENTS[frame.type];
    if (name) this.emit(name, frame);
    this.emit("event", frame);
  }
}

export class Client extends Emitter {
  constructor(options) {
    super();
    this.url = options.url;
    this.token = options.token;
    this.getToken = options.getToken;
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    if (!this.WebSocket) throw new Error("no WebSocket: use Node >= 22, `node --experimental-websocket`, or pass one");
    this.requestTimeoutMs = options.requestTimeoutMs ?? 10000;
    this.backoffMs = options.backoffMs ?? 250;
    this.maxBackoffMs = options.maxBackoffMs ?? 10000;
    this.groups = new Map();
    this.pending = new Map();
    this.nextRef = 1;
    this.attempt = 0;
    this.closed = false;
    this.ws = null;
    this.hello = null;
    this._open();
  }

  group(id) {
    if (!this.groups.has(id)) {
      const g = new Group(this, id);
      this.groups.set(id, g);
      if (this.hello) g._join().catch((err) => g.emit("error", err));
    }
    return this.groups.get(id);
  }

  /** Send a frame with a fresh ref; resolve with the reply, reject on an error frame or timeout. */
  request(frame) {
    const ref = String(this.nextRef++);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(ref);
        reject(new SmartSortError("timeout", `no reply to ${frame.type} within ${this.requestTimeoutMs} ms`));
      }, this.requestTimeoutMs);
      this.pending.set(ref, { resolve, reject, timer, frame });
      this._send({ ...frame, ref });
    });
  }

  /** Close the socket for good (until reopen()); the groups keep their place. */
  close() {
    clearTimeout(this._timer);
    this.closed = true;
    this._setState("closed");
    this.ws?.close(1000);
  }

  /** Connect again after close(), rejoining every group from where it stopped. */
  reopen() {
    if (!this.closed) return;
    this.closed = false;
    this.attempt = 0;
    this._open();
  }

  _send(frame) {
    if (this.ws && this.ws.readyState === 1 && this.hello) {
      this.ws.send(JSON.stringify(frame));
    } // otherwise it goes out from _flush() once the socket is back
  }

  _flush() {
    for (const [ref, p] of this.pending) {
      if (p.frame.type !== "join") this.ws.send(JSON.stringify({ ...p.frame, ref }));
    }
  }

  _setState(state) {
    this.state = state;
    this.emit("state", { state });
    for (const g of this.groups.values()) g.emit("state", { state });
  }

  async _open() {
    if (this.closed) return;
    if (this.attempt === 0) this._setState("connecting"); // _retry already said "reconnecting"
    let token = this.token;
    try {
      if (this.getToken && (!token || this._tokenExpired)) token = this.token = await this.getToken();
    } catch (err) {
      return this._retry(err);
    }
    this._tokenExpired = false;
    const sep = this.url.includes("?") ? "&" : "?";
    const ws = new this.WebSocket(`${this.url}${sep}token=${encodeURIComponent(token)}`);
    this.ws = ws;
    ws.onmessage = (msg) => this._onFrame(JSON.parse(typeof msg.data === "string" ? msg.data : String(msg.data)));
    // Node 20's WebSocket reports a refused connection with "error" alone (no "close"), so
    // both lead here, once per socket.
    const lost = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      // Refused before hello: perhaps the token (browsers cannot see the 401), so ask for a
      // fresh one next time when we can.
      if (!this.hello && this.getToken) this._tokenExpired = true;
      this.hello = null;
      for (const g of this.groups.values()) g.joined = false;
      // Requests in flight on this socket will be re-sent; joins are redone by the rejoin.
      for (const [ref, p] of this.pending) if (p.frame.type === "join") { clearTimeout(p.timer); this.pending.delete(ref); }
      if (this.closed) return;
      if (ev.code === TOKEN_EXPIRED) {
        if (!this.getToken) return this._stop("token expired and no getToken to refresh it");
        this._tokenExpired = true;
      } else if (NO_RECONNECT.has(ev.code)) {
        return this._stop(`closed by the server (${ev.code}${ev.reason ? ": " + ev.reason : ""})`);
      }
      this._retry();
    };
    ws.onclose = lost;
    ws.onerror = () => {
      if (ws.readyState === 0) lost({ code: 1006, reason: "" });
    };
  }

  _stop(why) {
    this.closed = true;
    this._setState("closed");
    for (const [ref, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new SmartSortError("closed", why));
      this.pending.delete(ref);
    }
  }

  _retry() {
    const delay = Math.min(this.maxBackoffMs, this.backoffMs * 2 ** this.attempt++) * (0.5 + Math.random() / 2);
    this._setState("reconnecting");
    this._timer = setTimeout(() => this._open(), delay);
  }

  _onFrame(frame) {
    if (frame.type === "hello") {
      this.hello = frame;
      this.attempt = 0;
      this._setState("live");
      this._flush();
      for (const g of this.groups.values()) g._join().catch((err) => g.emit("error", err));
      return;
    }
    if (frame.ref !== undefined && this.pending.has(frame.ref)) {
      const p = this.pending.get(frame.ref);
      this.pending.delete(frame.ref);
      clearTimeout(p.timer);
      if (frame.type === "error") p.reject(new SmartSortError(frame.code, frame.message, frame));
      else p.resolve(frame);
      return;
    }
    if (frame.type === "error") return this.emit("error", new SmartSortError(frame.code, frame.message, frame));
    if (frame.group !== undefined && this.groups.has(frame.group)) this.groups.get(frame.group)._event(frame);
  }
}

export function connect(options) {
  return new Client(options);
}
