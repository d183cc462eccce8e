// The demo page: one pane per member, each its own client (its own WebSocket), all built on
// smartsort.js, which does the reconnecting, resuming with `since` and dropping of repeats.
import { connect } from "./smartsort.js";

const panes = document.getElementById("panes");
const template = document.getElementById("pane-template");
const params = new URLSearchParams(location.search);
const DEFAULT_GROUP = params.get("group") || "demo";
const WS_URL = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
const ACTIVE = new Set(["queued", "running", "retrying"]);

async function tokenFor(user) {
  const resp = await fetch("/api/demo/token", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ user }),
  });
  const data = await resp.json();
  if (!resp.ok) throw new Error(data.error || "could not get a token");
  return data.token;
}

function el(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  Object.assign(node, attrs);
  return node;
}

function seconds(s) {
  if (s < 60) return `${Math.ceil(s)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

class Pane {
  constructor(user, group) {
    this.user = user;
    this.groupId = group;
    this.node = template.content.firstElementChild.cloneNode(true);
    this.node.dataset.user = user;
    this.node.dataset.group = group;
    this.$ = (sel) => this.node.querySelector(sel);
    this.$(".who").textContent = user;
    this.$(".group-name").textContent = group;
    this.titles = new Map(); // song id -> "title — artist"
    this.online = new Set();
    this.jobId = null;
    this.placed = 0;

    this.client = connect({ url: WS_URL, getToken: () => tokenFor(user) });
    this.group = this.client.group(group);
    this.wire();
    this.$(".sort").onclick = () => this.sort();
    this.$(".cancel").onclick = () => this.jobId && this.group.cancel(this.jobId).catch((e) => this.notice(e.message, "error"));
    this.$(".kill").onclick = () => this.client.ws?.close(4000, "killed from the demo page");
    this.$(".toggle").onclick = () => this.toggle();
    this.$(".remove").onclick = () => {
      this.client.close();
      this.node.remove();
    };
    panes.append(this.node);
    this.loadPlaylist();
  }

  wire() {
    const g = this.group;
    g.on("state", (s) => this.onState(s));
    g.on("presence", (e) => {
      e.type === "presence.joined" ? this.online.add(e.user) : this.online.delete(e.user);
      this.showOnline();
    });
    g.on("queued", (e) => this.watch(e.job, "Queued — a worker will pick it up in a moment."));
    g.on("started", (e) => this.watch(e.job, e.attempt > 1 ? `Attempt ${e.attempt} started.` : "Sorting…"));
    g.on("progress", (e) => this.progress(e));
    g.on("partial", (e) => this.partial(e.songs));
    g.on("retrying", (e) => {
      this.setStatus("retrying");
      this.notice(`${e.error.message} Trying again in ${seconds(e.retry_in_s)} (attempt ${e.attempt}).`, "warn");
    });
    g.on("completed", (e) => {
      const r = e.job.result;
      this.finish("completed", `Sorted ${r.order.length} songs into ${r.categories.length} categories.`, "ok");
      this.render(r.categories, r.order);
    });
    g.on("failed", (e) => this.finish("failed", `Smart sort failed: ${e.job.error.message}`, "error"));
    g.on("cancelled", (e) => this.finish("cancelled", `Cancelled by ${e.by}.`, ""));
    g.on("playlist", (e) => { if (e.change !== "sorted") this.loadPlaylist(); });
    g.on("event", (e) => this.log(e));
    g.on("error", (err) => {
      this.notice(`${err.code}: ${err.message}`, "error");
      if (err.code === "forbidden" || err.code === "not_found") {
        // The join was refused: say so rather than showing a live badge.
        this.$(".state").textContent = "refused";
        this.$(".state").className = "state closed";
        this.node.dataset.state = "refused";
        this.$(".sort").disabled = true;
      }
    });
  }

  onState(s) {
    let label = s.state;
    if (s.state === "reconnecting" && this.group.seq !== null) label = `reconnecting (since ${this.group.seq})`;
    if (s.state === "gap-reload") label = "live (reloaded)";
    const badge = this.$(".state");
    badge.textContent = label;
    badge.className = `state ${s.state}`;
    this.node.dataset.state = s.state;
    this.$(".toggle").textContent = s.state === "closed" ? "Reconnect" : "Disconnect";
    if (!s.snapshot) return;
    this.online = new Set(s.snapshot.online);
    this.showOnline();
    const job = s.snapshot.job;
    if (s.state === "gap-reload") this.loadPlaylist();
    if (job && ACTIVE.has(job.status)) {
      this.watch(job);
      if (job.progress.total) this.progress({ stage: job.stage || job.status, ...job.progress, message: "" });
    }
  }

  toggle() {
    if (this.client.closed) this.client.reopen();
    else this.client.close();
  }

  async sort() {
    this.$(".sort").disabled = true;
    try {
      const { job, deduplicated } = await this.group.sort();
      this.watch(job, deduplicated ? "A sort is already running — watching it." : "Smart sort started…");
    } catch (err) {
      this.$(".sort").disabled = false;
      this.notice(err.code === "rate_limited" ? `Slow down: ${err.message}` : err.message, "error");
    }
  }

  setStatus(status) {
    this.node.dataset.status = status;
  }

  notice(text, kind = "") {
    const n = this.$(".notice");
    n.textContent = text;
    n.className = `notice ${kind}`;
  }

  showOnline() {
    this.$(".online").textContent = `Online: ${[...this.online].sort().join(", ") || "nobody"}`;
  }

  log(frame) {
    const li = el("li", `${frame.type}${frame.stage ? " " + frame.stage : ""}${frame.user ? " " + frame.user : ""}`);
    if (frame.seq !== undefined) {
      li.value = frame.seq;
      li.dataset.seq = frame.seq;
    }
    li.dataset.type = frame.type;
    const log = this.$(".log");
    log.append(li);
    while (log.children.length > 300) log.firstChild.remove();
    this.$(".log-count").textContent = `(${log.children.length}, last seq ${this.group.seq ?? "–"})`;
  }

  watch(job, message) {
    if (this.jobId !== job.id) {
      this.jobId = job.id;
      this.placed = 0;
      this.$(".partial").replaceChildren();
    }
    this.setStatus(job.status);
    this.$(".progress").hidden = false;
    this.$(".cancel").disabled = false;
    this.$(".sort").disabled = true;
    if (message) this.notice(message);
  }

  progress(e) {
    this.setStatus("running");
    this.$(".progress").hidden = false;
    const bar = this.$("progress");
    bar.value = e.percent;
    bar.setAttribute("aria-valuetext", `${e.stage} ${e.percent}%`);
    const eta = e.eta_s ? ` · about ${seconds(e.eta_s)} left` : "";
    this.$(".progress-text").textContent = `${e.stage}: ${e.done} of ${e.total} (${Math.round(e.percent)}%)${eta}`;
    this.node.dataset.percent = e.percent;
  }

  partial(songs) {
    const box = this.$(".partial");
    for (const s of songs) {
      let list = box.querySelector(`ul[data-category="${CSS.escape(s.category)}"]`);
      if (!list) {
        list = el("ul");
        list.dataset.category = s.category;
        box.append(el("h4", s.category), list);
      }
      list.append(el("li", this.titles.get(s.song) || s.song, { className: "fresh" }));
      this.placed += 1;
    }
    this.$(".partial-count").textContent = `${this.placed} placed so far`;
  }

  finish(status, text, kind) {
    this.setStatus(status);
    this.notice(text, kind);
    this.$(".progress-text").textContent = status === "completed" ? "Done." : "";
    if (status === "completed") this.$("progress").value = 100;
    this.$(".cancel").disabled = true;
    this.$(".sort").disabled = false;
    this.$(".partial").replaceChildren();
    this.$(".partial-count").textContent = "";
    this.jobId = null;
  }

  render(categories, order) {
    const box = this.$(".playlist");
    box.replaceChildren();
    for (const c of categories) {
      const ol = el("ol");
      for (const id of c.songs) ol.append(el("li", this.titles.get(id) || id));
      box.append(el("h3", `${c.name} (${c.songs.length})`), ol);
    }
    const flow = el("ol", undefined, { className: "order" });
    for (const id of order) flow.append(el("li", this.titles.get(id) || id));
    const details = el("details");
    details.append(el("summary", `Play order (${order.length} songs, a flowing energy arc)`), flow);
    box.append(details);
    box.dataset.order = order.join(",");
  }

  async loadPlaylist() {
    try {
      const token = await tokenFor(this.user);
      const resp = await fetch(`/api/groups/${encodeURIComponent(this.groupId)}/playlist`, {
        headers: { Authorization: `Bearer ${token}` },
      });
      const data = await resp.json();
      if (!resp.ok) return this.notice(data.error, "error");
      for (const s of data.songs) this.titles.set(s.id, `${s.title} — ${s.artist}`);
      if (data.categories.length) {
        this.render(data.categories, data.songs.map((s) => s.id));
      } else {
        this.$(".playlist").textContent = `${data.songs.length} songs, not sorted yet.`;
      }
    } catch (err) {
      this.notice(`Could not load the playlist: ${err.message}`, "error");
    }
  }
}

// ?members=alice,bob,carol,erin@night-owls — a name alone is a member of ?group= (demo).
const members = (params.get("members") || "alice,bob,carol,erin@night-owls").split(",");
for (const m of members) {
  const [user, group] = m.trim().split("@");
  if (user) new Pane(user, group || DEFAULT_GROUP);
}
document.getElementById("add-member").onsubmit = (ev) => {
  ev.preventDefault();
  const name = document.getElementById("member-name").value.trim();
  const group = document.getElementById("member-group").value.trim() || DEFAULT_GROUP;
  if (name) new Pane(name, group);
};
