"use strict";
// Everything a frame changes is state; the DOM is redrawn from it at most 4 times a second
// (`render`), so the page keeps up with tens of thousands of events per second.
const $ = (id) => document.getElementById(id);
const TYPES = ["capability_invoked", "capability_result", "capability_error", "policy_violation",
  "approval_requested", "approval_resolved", "session_started", "session_ended",
  "rate_limit_hit", "write_buffered", "health_alert"];
const COLOURS = ["#5aa9ff", "#7bd88f", "#ff6b6b", "#ff9f43", "#ffc857", "#5fd38d", "#b48eff",
  "#8e7bff", "#f78fb3", "#4dd0e1", "#e0e0e0"];
const SEVERITY = { critical: 0, error: 1, warning: 2, info: 3 };
const KEEP = { recent: 2000, rows: 200, listed: 50, pending: 1000, agents: 1000 };

const params = new URLSearchParams(location.search);
// The credential: from a link's fragment (`/#access_token=…`, never sent to a server; the
// relay redirects old `?access_token=` links there), else what this tab signed in with
// (sessionStorage: gone with the tab). The fragment leaves the address once read.
const fragment = new URLSearchParams(location.hash.slice(1));
const cred = {
  token: fragment.get("access_token") || sessionStorage.getItem("krux-token") || "",
  passphrase: fragment.get("access_token") ? "" : sessionStorage.getItem("krux-passphrase") || "",
};
if (location.hash) history.replaceState(null, "", location.pathname + location.search);
function remember() {
  sessionStorage.setItem("krux-token", cred.token);
  sessionStorage.setItem("krux-passphrase", cred.passphrase);
}
function forget() { sessionStorage.removeItem("krux-token"); sessionStorage.removeItem("krux-passphrase"); }
for (const k of ["agent", "type", "session"]) if (params.get(k)) $("f-" + k).value = params.get(k);
const startSince = /^\d+$/.test(params.get("since") || "") ? Number(params.get("since")) : null;

// ---- state ---------------------------------------------------------------------------
const stats = { received: 0, frames: 0, renders: 0, renderMs: 0, reconnects: 0, gaps: 0 };
window.kruxStats = stats; // read by the browser tests
let mainSeq = null;                 // last seq the unfiltered connection delivered
const recent = [];                  // its last KEEP.recent events (to prefill a new filter)
const pending = new Map();          // approval_id -> approval_requested event
const violations = [];             // newest last
const health = new Map();           // component -> { e: latest alert, count }
let healthAlerts = 0;
const agents = new Map();           // name -> row state
const typeRates = TYPES.map(() => new Buckets());
const dirty = new Set();
const stream = { rows: [], last: null, fresh: 0, paused: false, client: null, filters: {} };
let main = null;

// Per-second counts over the last 60 s, in O(1) per event.
function Buckets() { this.count = new Uint32Array(60); this.sec = new Float64Array(60).fill(-1); }
Buckets.prototype.add = function (sec) {
  const i = sec % 60;
  if (this.sec[i] !== sec) { this.sec[i] = sec; this.count[i] = 0; }
  this.count[i]++;
};
Buckets.prototype.at = function (sec) { const i = sec % 60; return this.sec[i] === sec ? this.count[i] : 0; };
Buckets.prototype.sum = function (now) {
  let n = 0;
  for (let i = 0; i < 60; i++) if (now - this.sec[i] < 60) n += this.count[i];
  return n;
};

function sessionOf(e) { return e.session_id ?? e.data?.session_id ?? null; }
function list(s) { return s ? s.split(",").map((x) => x.trim()).filter(Boolean) : null; }
// The relay's own filter rule (docs/protocol.md): AND of the three, any of each list.
function matches(e, f) {
  const a = list(f.agent), t = list(f.type), s = list(f.session);
  return (!a || a.includes(e.agent)) && (!t || t.includes(e.type)) && (!s || s.includes(sessionOf(e)));
}
function pushBounded(arr, x, max) { arr.push(x); if (arr.length > max * 1.5) arr.splice(0, arr.length - max); }

// ---- what each event changes ------------------------------------------------------------
function onMainEvent(e) {
  stats.received++;
  mainSeq = e.seq;
  const now = Date.now(), sec = Math.floor(now / 1000);
  e.receivedAt = now;
  pushBounded(recent, e, KEEP.recent);
  const ti = TYPES.indexOf(e.type);
  if (ti >= 0) typeRates[ti].add(sec);
  const d = e.data || {};
  if (e.agent) noteAgent(e, d, now, sec);
  switch (e.type) {
    case "approval_requested":
      if (d.approval_id) { pending.set(keyOf(d.approval_id), e); trimPending(); dirty.add("pending"); }
      break;
    case "approval_resolved":
      if (pending.delete(keyOf(d.approval_id))) dirty.add("pending");
      break;
    case "policy_violation": case "capability_error":
      pushBounded(violations, e, KEEP.listed); dirty.add("violations");
      break;
    case "health_alert": {
      // One row per component: its latest alert and how many it raised.
      const key = keyOf(d.component ?? "?");
      const h = health.get(key);
      if (h) { health.delete(key); h.e = e; h.count++; health.set(key, h); } else health.set(key, { e, count: 1 });
      if (health.size > KEEP.listed) health.delete(health.keys().next().value);
      healthAlerts++; dirty.add("health");
      break;
    }
  }
  dirty.add("header");
  if (!stream.client && !stream.paused) toStream(e);
}

function noteAgent(e, d, now, sec) {
  const name = keyOf(e.agent);
  let a = agents.get(name);
  if (!a) {
    a = { name, session: null, last: null, at: 0, rate: new Buckets(), errors: 0, violations: 0 };
    agents.set(name, a);
    if (agents.size > KEEP.agents * 1.2) forgetQuietAgents();
  }
  a.last = e.type; a.at = now; a.rate.add(sec);
  if (e.type === "session_ended") a.session = null;
  else if (sessionOf(e)) a.session = shown(sessionOf(e));
  if (e.type === "capability_error") a.errors++;
  if (e.type === "policy_violation") a.violations++;
  dirty.add("agents");
}

function forgetQuietAgents() {
  const byAge = [...agents.values()].sort((x, y) => y.at - x.at);
  for (const a of byAge.slice(KEEP.agents)) agents.delete(a.name);
}

function trimPending() {
  // A Map iterates in insertion order: the first entries are the oldest requests.
  for (const id of pending.keys()) { if (pending.size <= KEEP.pending) break; pending.delete(id); }
}

function toStream(e) {
  if (stream.last !== null && e.seq <= stream.last) return; // already shown (hand-over)
  stream.last = e.seq;
  pushBounded(stream.rows, e, KEEP.recent);
  stream.fresh++;
  dirty.add("stream");
}

function showGap(n) {
  stats.gaps++;
  const d = n.data || {};
  $("gap-text").textContent = `Replay gap: the relay no longer holds the events after #${d.since} and before` +
    ` #${d.oldest} (the oldest it has), so they are not on this page.`;
  $("gap-notice").hidden = false;
}

// ---- connections ----------------------------------------------------------------------
const relayUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}`;

function client(opts) { return new KruxClient({ url: relayUrl, token: cred.token, passphrase: cred.passphrase, ...opts }); }

function connect() {
  if (main) { main.opts.onStatus = () => {}; main.close(); }
  main = client({
    since: mainSeq ?? startSince,
    onEvent: onMainEvent,
    onNotice: showGap,
    onStatus: (s) => {
      if (s.startsWith("reconnecting")) stats.reconnects++;
      const st = $("status");
      st.textContent = s;
      st.className = s === "live" ? "live" : s.startsWith("stopped") || s === "done" ? "down" : "";
      $("reconnects").textContent = stats.reconnects;
      if (s === "live") remember();
      if (s.startsWith("stopped")) { forget(); $("login").hidden = false; }
    },
  });
  $("login").hidden = true;
  $("token").value = $("passphrase").value = "";
  if (Object.values(currentFilters()).some(Boolean)) applyFilters();
}

function currentFilters() {
  return { agent: $("f-agent").value.trim(), type: $("f-type").value.trim(), session: $("f-session").value.trim() };
}

// The stream reads the unfiltered connection unless it is filtered (its own connection, the
// relay filtering) or catching up after a pause (its own connection with `since`, until it
// reaches the unfiltered one).
function openStream(since) {
  if (stream.client) { stream.client.close(); stream.client = null; }
  const f = stream.filters;
  const filtered = Object.values(f).some(Boolean);
  if (!filtered && (since === null || since === mainSeq)) return;
  const c = client({
    filters: f, since,
    onNotice: showGap,
    onEvent: (e) => {
      toStream(e);
      if (!filtered && e.seq >= mainSeq && stream.client === c) { c.close(); stream.client = null; dirty.add("stream"); }
    },
    onStatus: () => dirty.add("stream"),
  });
  stream.client = c;
}

function applyFilters() {
  stream.filters = currentFilters();
  stream.rows = recent.filter((e) => matches(e, stream.filters));
  stream.last = mainSeq ?? startSince;
  stream.fresh = KEEP.rows;
  $("events").querySelector("tbody").textContent = "";
  if (!stream.paused) openStream(stream.last);
  dirty.add("stream"); dirty.add("agents");
}

function togglePause() {
  stream.paused = !stream.paused;
  if (stream.paused) {
    if (stream.client) { stream.client.close(); stream.client = null; }
    if (stream.last === null) stream.last = mainSeq;
  } else {
    openStream(stream.last);
  }
  $("pause").textContent = stream.paused ? "Resume" : "Pause";
  dirty.add("stream");
}

// ---- rendering ------------------------------------------------------------------------
// Event text is data of any type and size: whatever a field holds is shown as text that
// cannot throw (an object whose `toString` is not a function makes `String(x)` throw),
// cut for display (a 1 MB field in a table cell stalls the page; the JSON view has it all),
// with bidi overrides and invisible characters escaped as `tail` escapes them.
const CELL_MAX = 200, TITLE_MAX = 2000;
const INVISIBLE = /[\u0000-\u001f\u007f-\u009f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]/g;
function shown(v, max = CELL_MAX) {
  if (v === undefined || v === null) return v;
  let s;
  if (typeof v === "string") s = v;
  else if (typeof v === "number" || typeof v === "boolean") s = String(v);
  else { try { s = JSON.stringify(v); } catch { s = "[unprintable]"; } }
  if (s.length > max) s = s.slice(0, max) + `… (${s.length.toLocaleString("en")} characters)`;
  return s.replace(INVISIBLE, (c) => "\\u{" + c.codePointAt(0).toString(16) + "}");
}
// A value as a Map key: the whole text, never a throw.
function keyOf(v) { return typeof v === "string" ? v : shown(v, Infinity) ?? ""; }
function el(tag, text, cls) {
  const x = document.createElement(tag);
  if (text !== undefined && text !== null) x.textContent = shown(text);
  if (cls) x.className = cls;
  return x;
}
function row(cells, cls) {
  const tr = el("tr", null, cls);
  for (const c of cells) {
    const td = c instanceof Node ? wrap(c) : el("td", c ?? "–");
    if (typeof c === "string" && c.length > 24) td.title = shown(c, TITLE_MAX); // more on hover
    tr.appendChild(td);
  }
  return tr;
}
// One row per item; an item that cannot be drawn becomes a row that says so, and the
// panel goes on with the others.
function rowsOf(items, build, cols) {
  return items.map((x) => {
    try { return build(x); } catch (err) {
      const td = el("td", `(an event this panel cannot show: ${shown(err && err.message)})`, "empty");
      td.colSpan = cols;
      const tr = el("tr"); tr.appendChild(td); return tr;
    }
  });
}
function wrap(node) { const td = el("td"); td.appendChild(node); return td; }
function fill(panel, rows, emptyText, cols) {
  const body = $(panel).querySelector("tbody");
  body.textContent = "";
  if (!rows.length) { const td = el("td", emptyText, "empty"); td.colSpan = cols; body.appendChild(el("tr")).appendChild(td); }
  for (const r of rows) body.appendChild(r);
}
function ago(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
  return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
}
function when(e) { const t = Date.parse(e.timestamp); return Number.isFinite(t) ? t : e.receivedAt; }
function hhmmss(e) { return (e.timestamp || "").slice(11, 19); }

function renderPending(now) {
  const rows = rowsOf([...pending.values()].sort((x, y) => when(x) - when(y)).slice(0, KEEP.listed), (e) => {
    const d = e.data || {}, waited = now - when(e);
    const tr = row([ago(waited), e.agent, d.capability, d.reason, el("span", d.approval_id, "mono")], waited > 300000 ? "old" : "");
    tr.dataset.approval = keyOf(d.approval_id);
    return tr;
  }, 5);
  $("pending-count").textContent = pending.size;
  fill("pending-approvals", rows, "Nothing is waiting for a decision.", 5);
}

function renderViolations() {
  const rows = rowsOf(violations.slice(-KEEP.listed).reverse(), (e) => {
    const d = e.data || {};
    const kind = e.type === "policy_violation" ? "violation" : "error";
    const [what, why] = e.type === "policy_violation" ? [d.rule, d.reason] : [d.error_type, d.message];
    return row([hhmmss(e), el("span", kind, "tag crit"), e.agent, d.capability,
      `${shown(what) ?? ""}: ${shown(why) ?? ""}`], e.type);
  }, 5);
  $("violations-count").textContent = violations.length > KEEP.listed ? KEEP.listed + "+" : violations.length;
  fill("violations", rows, "No violations or errors seen.", 5);
}

function renderHealth() {
  const rank = (e) => SEVERITY[e.data?.severity] ?? 4;
  const rows = rowsOf([...health.values()].sort((x, y) => rank(x.e) - rank(y.e) || when(y.e) - when(x.e)), ({ e, count }) => {
    const d = e.data || {}, sev = shown(d.severity ?? "unknown");
    const cls = rank(e) <= 1 ? "crit" : rank(e) === 2 ? "warn" : "info";
    return row([el("span", sev, "tag " + cls), d.component, d.message, "×" + count, hhmmss(e)], "sev-" + cls);
  }, 5);
  $("health-count").textContent = healthAlerts;
  fill("health", rows, "No health alerts.", 5);
}

function renderAgents(now) {
  const sec = Math.floor(now / 1000);
  const chosen = list(stream.filters.agent) || [];
  // The ones that misbehave most come first; the rest by name, so rows do not jump around.
  const rows = rowsOf([...agents.values()].sort((x, y) => y.violations - x.violations || y.errors - x.errors ||
    x.name.localeCompare(y.name)).slice(0, 200), (a) => {
    const tr = row([a.name, a.session, a.last, ago(now - a.at), String(a.rate.sum(sec)),
      String(a.errors), String(a.violations)], chosen.includes(a.name) ? "chosen" : "");
    tr.dataset.agent = a.name;
    if (a.errors || a.violations) tr.cells[a.errors ? 5 : 6].style.color = "var(--red)";
    return tr;
  }, 7);
  $("agents-count").textContent = agents.size;
  fill("agents", rows, "No agent seen yet.", 7);
}

function renderRates(now) {
  // The last complete second is the newest point; the one in progress would read low.
  const sec = Math.floor(now / 1000) - 1;
  const series = typeRates.map((b, i) => ({ i, pts: Array.from({ length: 60 }, (_, k) => b.at(sec - 59 + k)) }))
    .filter((s) => s.pts.some((v) => v > 0));
  const max = Math.max(1, ...series.flatMap((s) => s.pts));
  const svg = $("rates-chart");
  svg.textContent = "";
  for (const s of series) {
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", s.pts.map((v, k) => `${k * 10.17},${118 - (v / max) * 110}`).join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", COLOURS[s.i]);
    line.setAttribute("stroke-width", "1.5");
    line.setAttribute("vector-effect", "non-scaling-stroke");
    svg.appendChild(line);
  }
  const legend = $("rates-legend");
  legend.textContent = "";
  let total = 0;
  for (const s of series) {
    const v = s.pts[59]; total += v;
    const item = el("span", `${TYPES[s.i]} ${v}/s`);
    const swatch = el("i"); swatch.style.background = COLOURS[s.i];
    item.prepend(swatch);
    legend.appendChild(item);
  }
  $("rate-total").textContent = `${total}/s · peak ${max}/s`;
}

function renderStream() {
  const body = $("events").querySelector("tbody");
  const fresh = stream.rows.slice(-Math.min(stream.fresh, KEEP.rows));
  stream.fresh = 0;
  const frag = document.createDocumentFragment();
  const build = (e) => {
    const d = e.data || {};
    const summary = d.capability || d.component || d.capability_pattern || d.service || d.session_id || "";
    const tr = row([hhmmss(e), el("span", e.type, "tag"), e.agent, sessionOf(e), summary, String(e.seq)], e.type);
    tr.dataset.seq = e.seq;
    return tr;
  };
  for (const tr of rowsOf(fresh.slice().reverse(), build, 6)) frag.appendChild(tr);
  body.prepend(frag);
  while (body.rows.length > KEEP.rows) body.deleteRow(-1);
  $("stream-count").textContent = body.rows.length;
  const f = Object.entries(stream.filters).filter(([, v]) => v).map(([k, v]) => `${k}=${v}`).join(" ");
  const st = $("stream-state");
  st.className = stream.paused ? "paused" : "";
  st.textContent = stream.paused ? `paused after #${stream.last ?? "–"}; resume loses nothing`
    : stream.client && !f ? `catching up from #${stream.last ?? "–"}` : f ? `filtered: ${f}` : "live";
}

function render() {
  const now = Date.now(), t0 = performance.now();
  stats.renders++;
  if (dirty.has("header")) {
    $("received").textContent = stats.received.toLocaleString("en");
    $("last-seq").textContent = mainSeq ?? "–";
  }
  // One panel that fails to draw never stops the others.
  const each = (f) => { try { f(now); } catch (err) { console.error("render:", err); } };
  if (dirty.has("violations")) each(renderViolations);
  if (dirty.has("health")) each(renderHealth);
  if (dirty.has("stream")) each(renderStream);
  dirty.clear();
  // Waiting times, agents' "ago" and the chart move with the clock: redrawn every time.
  each(renderPending);
  each(renderAgents);
  each(renderRates);
  stats.renderMs += performance.now() - t0;
}
setInterval(render, 250);
(function frame() { stats.frames++; requestAnimationFrame(frame); })();

// ---- controls -------------------------------------------------------------------------
$("login").onsubmit = (ev) => {
  ev.preventDefault();
  cred.token = $("token").value.trim();
  cred.passphrase = cred.token ? "" : $("passphrase").value;
  if (cred.token || cred.passphrase) connect();
};
$("filters").onsubmit = (ev) => { ev.preventDefault(); applyFilters(); };
$("clear").onclick = () => { for (const k of ["agent", "type", "session"]) $("f-" + k).value = ""; applyFilters(); };
$("pause").onclick = togglePause;
$("gap-dismiss").onclick = () => { $("gap-notice").hidden = true; };
$("agents").querySelector("tbody").onclick = (ev) => {
  const tr = ev.target.closest("tr[data-agent]");
  if (!tr) return;
  $("f-agent").value = $("f-agent").value === tr.dataset.agent ? "" : tr.dataset.agent;
  applyFilters();
};
$("events").querySelector("tbody").onclick = (ev) => {
  const tr = ev.target.closest("tr[data-seq]");
  if (!tr) return;
  const e = stream.rows.find((x) => String(x.seq) === tr.dataset.seq);
  const { receivedAt, ...wire } = e || {};
  for (const x of tr.parentNode.querySelectorAll("tr.selected")) x.classList.remove("selected");
  tr.classList.add("selected");
  $("detail-title").textContent = `event #${tr.dataset.seq}, as the relay sent it`;
  $("detail").textContent = e ? JSON.stringify(wire, null, 2) : "(no longer held by the page)";
  $("detail-box").hidden = false;
};
$("detail-close").onclick = () => { $("detail-box").hidden = true; };
for (const panel of ["violations", "health", "stream", "header"]) dirty.add(panel);
render(); // the empty panels say so from the start
if (cred.token || cred.passphrase) connect(); else $("status").textContent = "enter a token to connect";
