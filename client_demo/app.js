// The demo page: one pane per member, each on its own WebSocket, resuming with `since`.
const panes = document.getElementById("panes");
const template = document.getElementById("pane-template");
const GROUP = new URLSearchParams(location.search).get("group") || "demo";
const wsBase = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;

async function tokenFor(user) {
  const resp = await fetch("/api/demo/token", { method: "POST", body: JSON.stringify({ user }) });
  const data = await resp.json();
  if (!resp.ok) throw new Error(data.error || "could not get a token");
  return data.token;
}

class Pane {
  constructor(user) {
    this.user = user;
    this.el = template.content.firstElementChild.cloneNode(true);
    this.$ = (sel) => this.el.querySelector(sel);
    this.$(".who").textContent = user;
    this.seq = null;        // last durable seq seen: resume point
    this.job = null;        // the job being watched
    this.titles = new Map(); // song id -> "title — artist"
    this.retries = 0;
    this.closedByUs = false;
    this.$(".sort").onclick = () => this.send({ type: "sort", group: GROUP, ref: "sort" });
    this.$(".cancel").onclick = () => this.job && this.send({ type: "cancel", job: this.job, ref: "cancel" });
    this.$(".kill").onclick = () => this.ws && this.ws.close(4000, "killed from the demo page");
    this.$(".remove").onclick = () => { this.closedByUs = true; this.ws && this.ws.close(); this.el.remove(); };
    panes.append(this.el);
    this.loadPlaylist().then(() => this.connect());
  }

  setState(state) {
    const s = this.$(".state");
    s.textContent = state;
    s.className = `state ${state.split(" ")[0]}`;
  }

  notice(text, kind = "") {
    const n = this.$(".notice");
    n.textContent = text;
    n.className = `notice ${kind}`;
  }

  log(frame) {
    const li = document.createElement("li");
    if (frame.seq) li.value = frame.seq;
    li.textContent = `${frame.type}${frame.stage ? " " + frame.stage : ""}${frame.message ? " — " + frame.message : ""}`;
    const log = this.$(".log");
    log.append(li);
    while (log.children.length > 200) log.firstChild.remove();
    log.scrollTop = log.scrollHeight;
  }

  async connect() {
    this.setState(this.seq === null ? "connecting" : "reconnecting");
    let token;
    try {
      token = await tokenFor(this.user);
    } catch (err) {
      this.notice(err.message, "error");
      return this.retry();
    }
    const since = this.seq === null ? "" : `&since=${this.seq}`;
    const ws = new WebSocket(`${wsBase}?token=${encodeURIComponent(token)}&group=${GROUP}${since}`);
    this.ws = ws;
    ws.onmessage = (msg) => this.onFrame(JSON.parse(msg.data));
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.setState("closed");
      if (!this.closedByUs && ev.code !== 1008) this.retry();
    };
  }

  retry() {
    const delay = Math.min(5000, 250 * 2 ** this.retries++) * (0.5 + Math.random() / 2);
    this.setState("reconnecting");
    setTimeout(() => this.connect(), delay);
  }

  send(frame) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(frame));
  }

  onFrame(f) {
    if (f.seq !== undefined && f.type !== "joined") {
      if (this.seq !== null && f.seq <= this.seq) return; // already seen
      this.seq = f.seq;
    }
    this.log(f);
    switch (f.type) {
      case "joined":
        this.retries = 0;
        this.setState(this.seq === null ? "live" : f.recovered ? "resumed" : "live (reloaded)");
        if (this.seq === null || !f.recovered) {
          this.seq = f.seq;
          this.loadPlaylist();
        }
        this.$(".online").textContent = `Online: ${f.snapshot.online.join(", ")}`;
        if (f.snapshot.job && ["queued", "running", "retrying"].includes(f.snapshot.job.status)) this.watch(f.snapshot.job);
        break;
      case "presence.joined":
      case "presence.left": {
        const list = new Set(this.$(".online").textContent.replace("Online: ", "").split(", ").filter(Boolean));
        f.type === "presence.joined" ? list.add(f.user) : list.delete(f.user);
        this.$(".online").textContent = `Online: ${[...list].sort().join(", ")}`;
        break;
      }
      case "sort.accepted":
        this.watch(f.job);
        this.notice(f.deduplicated ? "A sort is already running — watching it." : "Smart sort started…");
        break;
      case "job.queued": this.watch(f.job); break;
      case "job.started": this.watch(f.job); this.notice(f.attempt > 1 ? `Attempt ${f.attempt}…` : "Sorting…"); break;
      case "job.progress": this.progress(f); break;
      case "job.partial": this.partial(f.songs); break;
      case "job.retrying": this.notice(`${f.error.message} — retrying in ${f.retry_in_s}s`, "error"); break;
      case "job.completed":
        this.finish(`Sorted ${f.job.result.order.length} songs into ${f.job.result.categories.length} categories.`, "ok");
        this.render(f.job.result.categories, f.job.result.order);
        break;
      case "job.failed": this.finish(`Smart sort failed: ${f.job.error.message}`, "error"); break;
      case "job.cancelled": this.finish(`Cancelled by ${f.by}.`, ""); break;
      case "playlist.updated": if (f.change !== "sorted") this.loadPlaylist(); break;
      case "error": this.notice(`${f.code}: ${f.message}`, "error"); break;
    }
  }

  watch(job) {
    this.job = job.id;
    this.$(".progress").hidden = false;
    this.$(".cancel").disabled = false;
    this.$(".sort").disabled = true;
  }

  progress(f) {
    this.$(".progress").hidden = false;
    this.$("progress").value = f.percent;
    const eta = f.eta_s ? `, about ${Math.ceil(f.eta_s)}s left` : "";
    this.$(".progress-text").textContent = `${f.stage}: ${f.done}/${f.total} (${f.percent}%)${eta} — ${f.message}`;
  }

  partial(songs) {
    const box = this.$(".playlist");
    for (const s of songs) {
      let list = box.querySelector(`ol[data-category="${CSS.escape(s.category)}"]`);
      if (!list) {
        const h = document.createElement("h3");
        h.textContent = s.category;
        list = document.createElement("ol");
        list.dataset.category = s.category;
        box.append(h, list);
      }
      const li = document.createElement("li");
      li.className = "fresh";
      li.textContent = this.titles.get(s.song) || s.song;
      list.append(li);
    }
  }

  finish(text, kind) {
    this.notice(text, kind);
    this.$(".progress-text").textContent = text;
    this.$(".cancel").disabled = true;
    this.$(".sort").disabled = false;
    this.$("progress").value = 100;
    this.job = null;
  }

  render(categories, order) {
    const box = this.$(".playlist");
    box.replaceChildren();
    for (const c of categories) {
      const h = document.createElement("h3");
      h.textContent = `${c.name} (${c.songs.length})`;
      const ol = document.createElement("ol");
      for (const id of c.songs) {
        const li = document.createElement("li");
        li.textContent = this.titles.get(id) || id;
        ol.append(li);
      }
      box.append(h, ol);
    }
    box.dataset.order = order.join(",");
  }

  async loadPlaylist() {
    try {
      const token = await tokenFor(this.user);
      const resp = await fetch(`/api/groups/${GROUP}/playlist`, { headers: { Authorization: `Bearer ${token}` } });
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

const members = (new URLSearchParams(location.search).get("members") || "alice,bob,carol").split(",");
members.forEach((m) => new Pane(m.trim()));
document.getElementById("add-member").onsubmit = (ev) => {
  ev.preventDefault();
  const name = document.getElementById("member-name").value.trim();
  if (name) new Pane(name);
};
window.smartsortPanes = panes;
