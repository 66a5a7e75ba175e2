// The reelbus dashboard: polls /v1/dashboard/state once a second and draws it (plain DOM and SVG).
// Data is only ever put in the page as text (textContent, attributes), never as HTML.
"use strict";

const POLL_MS = 1000;
const TOKEN_KEY = "reelbus.dashboard.token";
const SVG = "http://www.w3.org/2000/svg";
const PALETTE = ["#4fb0ff", "#3ccf91", "#f2b33d", "#c37bff", "#ff8a5b", "#59d7e6", "#e8e86a", "#ff6fa8"];
const SPARK_POINTS = 60;

const rateHistory = new Map(); // topic -> recent rates, for the sparklines
const topo = { nodes: new Map(), edges: [] }; // what the topology SVG holds, to update in place
let ticks = 0;
let lastOk = 0;

// -- helpers ---------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmtRate(r) {
  if (r === null || r === undefined) return "–";
  if (r >= 100) return r.toFixed(0);
  if (r >= 10) return r.toFixed(1);
  return r.toFixed(2);
}

function fmtInt(n) {
  return n === null || n === undefined ? "–" : n.toLocaleString("en-US");
}

function fmtTime(iso) {
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toISOString().slice(11, 19);
}

function ago(iso) {
  const s = Math.max(0, (Date.now() - new Date(iso).getTime()) / 1000);
  return s < 60 ? `${s.toFixed(0)}s ago` : `${(s / 60).toFixed(0)}m ago`;
}

// -- the token -------------------------------------------------------------------------------

function token() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search); // out of the address bar
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

function askForToken(why) {
  document.getElementById("login").hidden = false;
  document.getElementById("main").hidden = true;
  document.getElementById("login-why").textContent = why || "";
  document.body.dataset.state = "login";
}

class AuthError extends Error {}

async function api(path) {
  const t = token();
  if (!t) throw new AuthError("no token yet");
  const resp = await fetch(path, { headers: { Authorization: `Bearer ${t}` }, cache: "no-store" });
  if (resp.status === 401 || resp.status === 403) {
    let message = `${resp.status}`;
    try { message = (await resp.json()).message; } catch (_) { /* not JSON */ }
    throw new AuthError(message);
  }
  if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
  return resp.json();
}

// -- topology --------------------------------------------------------------------------------

function drawTopology(t) {
  const root = document.getElementById("topology");
  root.replaceChildren();
  topo.nodes.clear();
  topo.edges = [];
  const producers = [...new Set(t.topics.map((x) => x.producer))].sort();
  const consumers = [...new Set(t.topics.flatMap((x) => x.consumers))].sort();
  const topics = t.topics.map((x) => x.name);
  const W = 1200, rowH = 30, boxH = 24, top = 24;
  const cols = { producer: [20, 190], topic: [470, 250], consumer: [990, 190] };
  const rows = Math.max(producers.length, topics.length, consumers.length);
  const H = top + rows * rowH + 6;
  root.setAttribute("viewBox", `0 0 ${W} ${H}`);
  root.setAttribute("height", String(H));
  const place = (names, kind) => {
    const [x, w] = cols[kind];
    const offset = top + ((rows - names.length) * rowH) / 2;
    names.forEach((name, i) => {
      const y = offset + i * rowH;
      topo.nodes.set(`${kind}:${name}`, { x, y, w, h: boxH, name, kind });
    });
  };
  place(producers, "producer");
  place(topics, "topic");
  place(consumers, "consumer");
  for (const [kind, label] of [["producer", "producing services"], ["topic", "topics"], ["consumer", "consuming services"]]) {
    root.append(svg("text", { class: "col", x: cols[kind][0], y: 12 }, label));
  }
  const edgeLayer = svg("g");
  root.append(edgeLayer);
  const link = (a, b, topic) => {
    const x1 = a.x + a.w, y1 = a.y + a.h / 2, x2 = b.x, y2 = b.y + b.h / 2, mx = (x1 + x2) / 2;
    const path = svg("path", { class: "edge", d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`, "data-topic": topic });
    edgeLayer.append(path);
    topo.edges.push({ path, topic });
  };
  for (const x of t.topics) {
    const tnode = topo.nodes.get(`topic:${x.name}`);
    link(topo.nodes.get(`producer:${x.producer}`), tnode, x.name);
    for (const c of x.consumers) link(tnode, topo.nodes.get(`consumer:${c}`), x.name);
  }
  for (const n of topo.nodes.values()) {
    const g = svg("g", { class: `node ${n.kind}`, "data-name": n.name, transform: `translate(${n.x},${n.y})` });
    g.append(svg("rect", { width: n.w, height: n.h, rx: 4 }));
    g.append(svg("text", { x: 8, y: 16 }, n.name === "*" ? "every service (*)" : n.name));
    if (n.kind === "topic") {
      n.rateText = svg("text", { class: "rate", x: n.w - 8, y: 16, "text-anchor": "end" }, "");
      g.append(n.rateText);
    } else if (n.kind === "consumer") {
      n.lagText = svg("text", { class: "lag", x: n.w - 8, y: 16, "text-anchor": "end" }, "");
      g.append(n.lagText);
    }
    n.group = g;
    root.append(g);
  }
}

function updateTopology(state) {
  const rates = new Map(state.topics.map((x) => [x.name, x.rate]));
  for (const n of topo.nodes.values()) {
    if (n.kind === "topic") {
      const r = rates.get(n.name);
      n.rateText.textContent = r ? `${fmtRate(r)}/s` : "";
      n.group.classList.toggle("active", Boolean(r));
    }
  }
  const lags = new Map(state.groups.map((g) => [g.group, g.lag]));
  for (const n of topo.nodes.values()) {
    if (n.kind === "consumer") {
      const lag = lags.get(n.name);
      n.lagText.textContent = lag === undefined ? "" : `lag ${fmtInt(lag)}`;
    }
  }
  for (const e of topo.edges) {
    const r = rates.get(e.topic) || 0;
    e.path.classList.toggle("active", r > 0);
    e.path.style.strokeWidth = String(1.2 + Math.min(5, Math.log10(1 + r) * 2));
  }
}

// -- tables ----------------------------------------------------------------------------------

function spark(values) {
  const s = svg("svg", { class: "spark", viewBox: `0 0 ${SPARK_POINTS} 20`, preserveAspectRatio: "none" });
  const max = Math.max(1e-9, ...values);
  const pts = values.map((v, i) => `${i + SPARK_POINTS - values.length},${(19 - (v / max) * 18).toFixed(2)}`);
  s.append(svg("polyline", { points: pts.join(" ") }));
  return s;
}

function renderTopics(state) {
  document.getElementById("rate-window").textContent = `over the last ${state.rate_window_seconds}s`;
  const rows = [];
  for (const t of state.topics) {
    const h = rateHistory.get(t.name) || [];
    h.push(t.rate || 0);
    if (h.length > SPARK_POINTS) h.shift();
    rateHistory.set(t.name, h);
    const rate = el("td", { class: `num rate${t.rate ? " hot" : ""}`, text: fmtRate(t.rate) });
    const sparkCell = el("td");
    sparkCell.append(spark(h));
    rows.push(el("tr", { "data-topic": t.name, class: t.exists ? "" : "missing" },
      el("td", { text: t.exists ? t.name : `${t.name} (not on the cluster)` }),
      rate, sparkCell,
      el("td", { class: "num messages", text: fmtInt(t.messages) }),
      el("td", { class: "num", text: fmtInt(t.dead_letters) })));
  }
  document.querySelector("#topics tbody").replaceChildren(...rows);
  document.getElementById("total-rate").textContent = fmtRate(state.total_rate);
}

function renderGroups(state) {
  document.getElementById("group-pattern").textContent = `groups matching ${state.group_pattern}`;
  const rows = state.groups.map((g) => el("tr", { "data-group": g.group },
    el("td", { text: g.group }),
    el("td", { text: g.state.toLowerCase() }),
    el("td", { class: `num lag${g.lag > 0 ? " lagging" : ""}`, text: fmtInt(g.lag) }),
    el("td", { class: "dim", text: Object.entries(g.by_topic).map(([k, v]) => `${k} ${fmtInt(v)}`).join(", ") })));
  document.querySelector("#groups tbody").replaceChildren(...rows);
  document.getElementById("groups-empty").hidden = rows.length > 0;
}

function renderDecisions(state) {
  const items = state.scaling_decisions.map((d) => el("li", { "data-service": d.service, "data-event": d.event_id },
    el("span", { class: "when", text: fmtTime(d.at) }),
    el("span", { class: `tag ${d.action}`, text: d.action }),
    el("strong", { text: d.service }),
    document.createTextNode(` ${d.from} → ${d.to} replicas`),
    el("span", { class: "detail", text: d.reason + (Object.keys(d.signals).length ? ` · ${Object.entries(d.signals).map(([k, v]) => `${k}=${v}`).join(" ")}` : "") })));
  document.getElementById("decisions").replaceChildren(...items);
  document.getElementById("decisions-empty").hidden = items.length > 0;
}

function renderAnomalies(state) {
  const items = state.anomalies.map((a) => el("li", { "data-subject": a.subject, "data-event": a.event_id },
    el("span", { class: "when", text: fmtTime(a.at) }),
    el("span", { class: `tag ${a.severity}`, text: a.severity }),
    el("span", { class: "tag", text: a.kind }),
    el("strong", { text: a.subject }),
    document.createTextNode(` score ${a.score} > ${a.threshold}`),
    el("span", { class: "detail", text: `${a.detector} · ${Object.entries(a.evidence).map(([k, v]) => `${k}=${v}`).join(" ")}` })));
  document.getElementById("anomalies").replaceChildren(...items);
  document.getElementById("anomalies-empty").hidden = items.length > 0;
}

function renderTraces(state) {
  const tr = state.traces;
  document.getElementById("traces-source").textContent =
    `Zipkin, service ${tr.service}${tr.fetched_at ? `, fetched ${ago(tr.fetched_at)}` : ""}`;
  const rows = tr.items.map((t) => {
    const link = el("a", { href: t.url, target: "_blank", rel: "noopener", text: t.name, title: t.trace_id });
    return el("tr", { "data-trace": t.trace_id, class: t.error ? "bad" : "" },
      el("td", { text: fmtTime(new Date(t.started_us / 1000).toISOString()) }),
      el("td", {}, link, document.createTextNode(t.status ? ` ${t.status}` : "")),
      el("td", { class: "num", text: t.duration_ms.toFixed(1) }),
      el("td", { class: "num", text: String(t.spans) }),
      el("td", { class: "dim", text: t.services.join(", ") }));
  });
  document.querySelector("#traces tbody").replaceChildren(...rows);
  document.getElementById("traces-empty").hidden = rows.length > 0;
}

// -- the mount-stall chart -------------------------------------------------------------------

function chart(id, series, valueOf, windowMs, newest, opts) {
  const root = document.getElementById(id);
  const [W, H] = root.getAttribute("viewBox").split(" ").slice(2).map(Number);
  const left = 40, right = 6, top = 6, bottom = 14;
  root.replaceChildren();
  let max = 0;
  for (const pts of series.values()) for (const p of pts) max = Math.max(max, valueOf(p));
  max = max > 0 ? max * 1.1 : 1;
  const x = (t) => left + ((t - (newest - windowMs)) / windowMs) * (W - left - right);
  const y = (v) => top + (1 - v / max) * (H - top - bottom);
  root.append(svg("line", { class: "axis", x1: left, y1: H - bottom, x2: W - right, y2: H - bottom }));
  root.append(svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: H - bottom }));
  root.append(svg("text", { class: "label", x: left - 4, y: top + 8, "text-anchor": "end" }, max >= 10 ? max.toFixed(0) : max.toFixed(1)));
  root.append(svg("text", { class: "label", x: left - 4, y: H - bottom, "text-anchor": "end" }, "0"));
  root.append(svg("text", { class: "label", x: left, y: H - 2 }, `-${Math.round(windowMs / 60000)} min`));
  root.append(svg("text", { class: "label", x: W - right, y: H - 2, "text-anchor": "end" }, "now"));
  let i = 0;
  for (const [node, pts] of series) {
    const color = PALETTE[i++ % PALETTE.length];
    const line = svg("polyline", { stroke: color, "data-node": node,
      points: pts.map((p) => `${x(p[0]).toFixed(1)},${y(valueOf(p)).toFixed(1)}`).join(" ") });
    root.append(line);
    if (opts.markStalled) {
      for (const p of pts) if (p[3]) root.append(svg("circle", { class: "stalled", cx: x(p[0]).toFixed(1), cy: y(valueOf(p)).toFixed(1), r: 2.5 }));
    }
  }
}

function renderStall(state) {
  const ms = state.mount_stall;
  const series = new Map(Object.entries(ms.nodes));
  let newest = 0;
  for (const pts of series.values()) for (const p of pts) newest = Math.max(newest, p[0]);
  chart("stall-latency", series, (p) => p[1], ms.window_ms, newest, { markStalled: true });
  chart("stall-table", series, (p) => p[2], ms.window_ms, newest, { markStalled: false });
  let i = 0;
  const legend = [...series.entries()].map(([node, pts]) => {
    const last = pts[pts.length - 1];
    const color = PALETTE[i++ % PALETTE.length];
    const sw = el("span", { class: "swatch" });
    sw.style.background = color;
    return el("li", { "data-node": node }, sw,
      el("span", { text: `${node} ${last[1].toFixed(1)} ms, ${fmtInt(last[2])} mounts${last[3] ? " · STALLED" : ""}`, class: last[3] ? "bad" : "" }));
  });
  document.getElementById("stall-legend").replaceChildren(...legend);
  document.getElementById("stall-empty").hidden = series.size > 0;
}

// -- the loop --------------------------------------------------------------------------------

function render(state) {
  updateTopology(state);
  renderTopics(state);
  renderGroups(state);
  renderStall(state);
  renderDecisions(state);
  renderAnomalies(state);
  renderTraces(state);
  const errors = Object.entries(state.errors).map(([k, v]) => `${k}: ${v}`).join(" · ");
  document.getElementById("errors").textContent = errors;
  const r = state.reader;
  document.getElementById("footer").textContent =
    `sampled ${state.sample_age_seconds ?? "–"}s ago · ${r.records} records read from the viewed topics` +
    (r.bad_records ? `, ${r.bad_records} unreadable` : "") + ` · generated ${state.generated_at}`;
}

async function poll() {
  try {
    const state = await api("/v1/dashboard/state");
    render(state);
    ticks += 1;
    lastOk = Date.now();
    document.body.dataset.ticks = String(ticks);
    document.body.dataset.state = state.sample_age_seconds !== null && state.sample_age_seconds < 5 ? "live" : "stale";
    document.getElementById("updated").textContent = `updated ${new Date().toISOString().slice(11, 19)} UTC`;
  } catch (err) {
    if (err instanceof AuthError) { askForToken(err.message); return; }
    document.body.dataset.state = Date.now() - lastOk > 5000 ? "error" : "stale";
    document.getElementById("updated").textContent = `no answer: ${err.message}`;
  }
  setTimeout(poll, POLL_MS);
}

async function start() {
  try {
    drawTopology(await api("/v1/dashboard/topology"));
  } catch (err) {
    if (err instanceof AuthError) { askForToken(err.message); return; }
    document.getElementById("updated").textContent = `no answer: ${err.message}`;
    setTimeout(start, 2000);
    return;
  }
  document.getElementById("login").hidden = true;
  document.getElementById("main").hidden = false;
  poll();
}

document.getElementById("login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const value = document.getElementById("login-token").value.trim();
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  start();
});

start();
