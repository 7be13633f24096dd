// patchcore console: plain DOM, no framework. Data arrives by Server-Sent Events (/api/events);
// actions POST JSON with the session's CSRF token. Text is always set with textContent (never HTML).
"use strict";

const state = {user: null, csrf: null, login: false, banks: null, deadletters: null, marks: null, alarms: new Map(),
  snapshot: null, panel: null};
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.setAttribute("class", v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const fmt = (x, digits = 2) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const when = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "–");

function say(text, error = false) {
  const box = document.getElementById("message");
  box.textContent = text;
  box.className = error ? "error" : "ok";
  clearTimeout(say.timer);
  say.timer = setTimeout(() => { box.textContent = ""; box.className = ""; }, 6000);
}

async function getJSON(url) {
  const response = await fetch(url, {credentials: "same-origin"});
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  return response.json();
}

async function post(url, body = {}) {
  const response = await fetch(url, {
    method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-CSRF-Token": state.csrf || ""},
    body: JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    say(data.error || `refused (${response.status})`, true);
    if (response.status === 401) await loadSession();
    return null;
  }
  return data;
}

// session and login
async function loadSession() {
  const s = await getJSON("/api/session");
  Object.assign(state, {user: s.user, csrf: s.csrf, login: s.login});
  document.body.classList.toggle("operator", Boolean(s.user));
  document.getElementById("who").textContent = s.user ? `operator ${s.user}` : (s.login ? "read-only" : "read-only console");
  document.getElementById("login").hidden = Boolean(s.user) || !s.login;
  document.getElementById("logout").hidden = !s.user;
}

document.addEventListener("DOMContentLoaded", async () => {
  document.getElementById("login").addEventListener("submit", async (event) => {
    event.preventDefault();
    const password = document.getElementById("login-password");
    const done = await post("/api/login", {user: document.getElementById("login-user").value, password: password.value});
    password.value = "";
    if (done) { await loadSession(); say(`logged in as ${done.user}`); renderAll(); }
  });
  document.getElementById("logout").addEventListener("click", async () => {
    if (await post("/api/logout")) { await loadSession(); renderAll(); }
  });
  setupPanel();
  window.addEventListener("hashchange", showTab);
  showTab();
  await loadSession();
  await Promise.all([loadAlarms(), loadBanks(), loadDeadletters()]);
  connect();
});

function showTab() {
  const tab = (location.hash || "#cameras").slice(1);
  for (const section of document.querySelectorAll("section.tab")) section.hidden = section.id !== tab;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.tab === tab);
  if (tab === "audit") loadAudit();
}

function renderAll() {
  renderAlarms();
  renderPanel();
  if ((location.hash || "").slice(1) === "audit") loadAudit();
  if (state.banks) renderBanks(state.banks);
  if (state.deadletters) renderDeadletters(state.deadletters);
}

// live updates
function connect() {
  const newest = state.alarms.keys().next().value;  // loadAlarms keeps the server's order: newest first
  const source = new EventSource(newest ? `/api/events?after=${encodeURIComponent(newest)}` : "/api/events");
  source.addEventListener("cameras", (event) => onSnapshot(JSON.parse(event.data)));
  source.addEventListener("alarms", (event) => {
    for (const alarm of JSON.parse(event.data)) state.alarms.set(alarm.id, alarm);
    renderAlarms();
  });
  source.onerror = () => document.getElementById("system").textContent = "connection lost; reconnecting…";
}

function onSnapshot(snapshot) {
  state.snapshot = snapshot;
  renderCameras(snapshot);
  renderSinks(snapshot.sinks || []);
  renderScoreCheck();
  const banks = JSON.stringify(snapshot.banks);
  if (state.banksSeen !== undefined && state.banksSeen !== banks) loadBanks();
  state.banksSeen = banks;
  if (state.deadletterSeen !== undefined && state.deadletterSeen !== snapshot.deadletter) loadDeadletters();
  state.deadletterSeen = snapshot.deadletter;
  if (state.marks !== null && state.marks !== snapshot.marks) loadAlarms();
  state.marks = snapshot.marks;
}

// cameras
function sparkline(series, width = 300, height = 60) {
  const svg = el("svg:svg", {viewBox: `0 0 ${width} ${height}`, class: "spark", role: "img"});
  if (!series.length) return svg;
  const t0 = series[0][0], t1 = Math.max(series[series.length - 1][0], t0 + 1);
  const thresholds = series.map((p) => p[2]).filter((v) => v !== null);
  const top = Math.max(...series.map((p) => p[1]), ...thresholds) * 1.1 || 1;
  const x = (t) => ((t - t0) / (t1 - t0)) * (width - 4) + 2;
  const y = (v) => height - 2 - (v / top) * (height - 4);
  svg.append(el("svg:polyline", {class: "score", points: series.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ")}));
  if (thresholds.length) {
    const latest = thresholds[thresholds.length - 1];
    svg.append(el("svg:line", {class: "threshold", x1: 0, x2: width, y1: y(latest), y2: y(latest)}));
  }
  for (const p of series.filter((p) => p[3])) svg.append(el("svg:circle", {class: "over", cx: x(p[0]), cy: y(p[1]), r: 2}));
  svg.append(el("svg:title", {}, `score over the last ${Math.round(t1 - t0)} s; dashed: threshold`));
  return svg;
}

function renderCameras(snapshot) {
  const grid = document.getElementById("camera-grid");
  const workers = Object.entries(snapshot.workers).map(([w, age]) => `${w} (${age.toFixed(0)} s ago)`).join(", ");
  document.getElementById("system").textContent =
    `workers: ${workers || "none"} · dead letters: ${snapshot.deadletter}` +
    (snapshot.redis_faults.length ? ` · REDIS FAULT: ${snapshot.redis_faults.join("; ")}` : "");
  document.getElementById("deadletter-count").textContent = snapshot.deadletter || "";
  const seen = new Set();
  for (const cam of snapshot.cameras) {
    seen.add(cam.camera);
    let card = grid.querySelector(`[data-camera="${CSS.escape(cam.camera)}"]`);
    if (!card) {
      card = el("article", {class: "camera", "data-camera": cam.camera},
        el("h2", {}, cam.camera, " ", el("span", {class: "liveness"}), " ", el("span", {class: "drift", hidden: ""})),
        el("img", {class: "picture", alt: `latest picture of ${cam.camera}`}),
        el("div", {class: "spark-box"}),
        el("dl", {class: "stats"}),
        el("button", {class: "open-settings", type: "button", onclick: () => openPanel(cam.camera)}, "Sensitivity and region"));
      grid.append(card);
    }
    const latest = cam.latest;
    card.classList.toggle("anomalous", latest.anomalous);
    const badge = card.querySelector(".liveness");
    badge.textContent = cam.liveness;
    badge.className = `liveness ${cam.liveness}`;
    badge.title = cam.state + (cam.fault ? ` · fault: ${cam.fault}` : "");
    // drift: the whole scene moved (store.alarms.drift); its alarms are held until `patchcore drift ack` or its return
    const drift = card.querySelector(".drift");
    drift.hidden = cam.drift.status === "normal";
    drift.textContent = cam.drift.status === "drift" ? "DRIFT" : "drift acknowledged";
    drift.className = `drift ${cam.drift.status}`;
    drift.title = cam.drift.status === "drift"
      ? `the scene drifted at frame ${cam.drift.since_seq}: alarms held (${cam.drift.held} in all) until \`patchcore drift ack ${cam.camera}\` or the scene returns`
      : `drift since frame ${cam.drift.since_seq} acknowledged by ${cam.drift.acknowledged_by}`;
    const img = card.querySelector("img");
    const key = cam.image === "overlay" ? `overlay-${latest.seq}` : `frame-${Math.floor(snapshot.now)}`;
    if (cam.image && img.dataset.key !== key) {
      img.dataset.key = key;
      img.dataset.kind = cam.image;
      img.src = `/api/cameras/${encodeURIComponent(cam.camera)}/image.jpg?v=${key}`;
    }
    img.hidden = !cam.image;
    card.querySelector(".spark-box").replaceChildren(sparkline(cam.series));
    const stats = [
      ["score", `${fmt(latest.score)} / ${fmt(latest.threshold)}`], ["bank", latest.bank ? `${latest.bank} v${latest.bank_version}` : "–"],
      ["lag", cam.lag_s === null ? "–" : `${fmt(cam.lag_s, 2)} s`], ["backlog", cam.backlog],
      ["ingested", cam.ingested], ["results", cam.results], ["dropped", cam.dropped],
      ["dead-lettered", cam.deadlettered], ["alarms", cam.alarms], ["alarms held", cam.drift.held],
    ];
    card.querySelector("dl").replaceChildren(...stats.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {"data-stat": k}, v)]));
  }
  for (const card of grid.querySelectorAll("[data-camera]")) if (!seen.has(card.dataset.camera)) card.remove();
  if (!snapshot.cameras.length && !grid.querySelector(".empty")) grid.append(el("p", {class: "empty"}, "no cameras yet"));
  if (snapshot.cameras.length) grid.querySelector(".empty")?.remove();
}

// a camera's settings: sensitivity slider and region-of-interest editor (operators change them, everyone reads)
const cameraUrl = (camera, what) => `/api/cameras/${encodeURIComponent(camera)}/${what}`;

function setupPanel() {
  document.getElementById("panel-close").addEventListener("click", () => { state.panel = null; renderPanel(); });
  const slider = document.getElementById("factor");
  slider.addEventListener("input", () => { renderThreshold(); renderScoreCheck(); });
  document.getElementById("factor-save").addEventListener("click", () => changeSettings({threshold_factor: Number(slider.value)},
    (s) => `threshold factor ${fmt(s.settings?.threshold_factor)}: threshold ${fmt(s.effective_threshold, 3)}`));
  document.getElementById("factor-reset").addEventListener("click", () => changeSettings({reset: "sensitivity"},
    () => "the bank's threshold applies"));
  const frame = document.getElementById("roi-frame");
  frame.addEventListener("load", drawRoi);
  frame.addEventListener("click", (event) => {
    if (!state.user || !state.panel || !frame.naturalWidth) return;
    // the click in the displayed image, scaled to the frame's pixels (the image is shown whole, aspect kept)
    const box = frame.getBoundingClientRect();
    const px = (v, size, shown) => Math.round(Math.min(Math.max(v * size / shown, 0), size) * 10) / 10;
    state.panel.points.push([px(event.clientX - box.left, frame.naturalWidth, box.width),
                             px(event.clientY - box.top, frame.naturalHeight, box.height)]);
    drawRoi();
  });
  document.getElementById("roi-undo").addEventListener("click", () => { state.panel?.points.pop(); drawRoi(); });
  document.getElementById("roi-save").addEventListener("click", () => changeSettings({roi_polygon: state.panel.points},
    (s) => `region of interest saved: ${s.settings.roi_polygon.length} points`));
  document.getElementById("roi-clear").addEventListener("click", () => changeSettings({reset: "roi"},
    () => "region of interest cleared: the bank's applies"));
  document.getElementById("roi-reload").addEventListener("click", loadFrame);
}

async function openPanel(camera) {
  const info = await getJSON(cameraUrl(camera, "settings")).catch((error) => { say(error.message, true); return null; });
  if (!info) return;
  state.panel = {camera, info, points: []};
  document.getElementById("factor").value = info.settings?.threshold_factor ?? 1;
  loadFrame();
  renderPanel();
  document.getElementById("camera-panel").scrollIntoView();
}

function loadFrame() {
  if (state.panel) document.getElementById("roi-frame").src = `${cameraUrl(state.panel.camera, "frame.jpg")}?v=${Date.now()}`;
}

async function changeSettings(body, what) {
  const camera = state.panel?.camera;
  if (!camera) return;
  const done = await post(cameraUrl(camera, "settings"), body);
  if (!done || state.panel?.camera !== camera) return;
  state.panel.info = done;
  if (body.roi_polygon || body.reset) state.panel.points = [];
  say(`${camera}: ${what(done)}`);
  renderPanel();
}

function renderPanel() {
  const panel = document.getElementById("camera-panel");
  panel.hidden = !state.panel;
  if (!state.panel) return;
  const {camera, info} = state.panel;
  document.getElementById("panel-camera").textContent = camera;
  const set = info.settings;
  document.getElementById("panel-state").textContent = (info.refused ? `stored settings refused (${info.refused}); ` : "") +
    (set ? `settings v${set.version} by ${set.set_by} at ${when(set.set_at)}` : "no settings of its own: the bank's threshold and region apply") +
    (state.user ? "" : " · log in as an operator to change them");
  document.getElementById("factor").disabled = !state.user;
  document.getElementById("roi-help").textContent = state.user
    ? "Click on the frame to place the region's corners (3 or more), then save. Green: the region stored now."
    : "Green: the region of interest stored now.";
  renderThreshold();
  renderScoreCheck();
  drawRoi();
}

function chosenThreshold() {
  // what the slider's factor would make the threshold: bank threshold x factor + the stored offset
  const {info} = state.panel;
  if (info.bank_threshold === null) return null;
  return info.bank_threshold * Number(document.getElementById("factor").value) + (info.settings?.threshold_offset ?? 0);
}

function renderThreshold() {
  if (!state.panel) return;
  const {info} = state.panel, factor = Number(document.getElementById("factor").value);
  document.getElementById("factor-value").textContent = factor.toFixed(2);
  const rows = [
    ["bank", info.bank ? `${info.bank} v${info.bank_version}` : "– (no result yet)"],
    ["bank threshold", fmt(info.bank_threshold, 3)],
    ["threshold now", fmt(info.effective_threshold, 3) + (info.settings?.threshold !== null && info.settings?.threshold !== undefined ? " (explicit: a factor replaces it)" : "")],
    ["with this factor", fmt(chosenThreshold(), 3)],
    ["latest score", fmt(info.latest.score, 3)],
  ];
  document.getElementById("threshold-info").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {"data-info": k}, v)]));
}

function renderScoreCheck() {
  const box = document.getElementById("score-check");
  if (!state.panel || !state.snapshot) return;
  const cam = state.snapshot.cameras.find((c) => c.camera === state.panel.camera);
  const threshold = chosenThreshold();
  if (!cam || !cam.series.length || threshold === null) { box.textContent = ""; return; }
  const over = cam.series.filter((p) => p[1] >= threshold).length;
  box.textContent = `${over} of the last ${cam.series.length} scores shown would be at or over ${fmt(threshold, 3)}` +
    ` (${cam.series.filter((p) => p[3]).length} were anomalous)`;
}

function drawRoi() {
  const svg = document.getElementById("roi-svg"), frame = document.getElementById("roi-frame");
  if (!state.panel || !frame.naturalWidth) { svg.replaceChildren(); return; }
  const w = frame.naturalWidth, h = frame.naturalHeight, r = Math.max(w, h) / 150;
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  const points = (list) => list.map(([x, y]) => `${x},${y}`).join(" ");
  const stored = state.panel.info.settings?.roi_polygon;
  const drawn = state.panel.points;
  svg.replaceChildren(
    ...(stored ? [el("svg:polygon", {class: "stored", points: points(stored)})] : []),
    ...(drawn.length ? [el("svg:polyline", {class: "drawing", points: points(drawn.length > 2 ? [...drawn, drawn[0]] : drawn)})] : []),
    ...drawn.map(([x, y]) => el("svg:circle", {class: "vertex", cx: x, cy: y, r})));
}

// sinks: each sink process's health row (runtime.status.sink_health)
function renderSinks(sinks) {
  const body = document.querySelector("#sink-table tbody");
  const age = (s) => (s === null ? "never" : `${s.toFixed(0)} s ago`);
  body.replaceChildren(...(sinks.length ? sinks.map((s) => el("tr", {"data-sink": `${s.sink}/${s.consumer}`},
    el("td", {}, s.sink), el("td", {}, s.consumer), el("td", {}, s.destination),
    el("td", {class: `state ${s.state}`}, s.state), el("td", {}, s.pending), el("td", {}, s.delivered),
    el("td", {}, s.deadlettered), el("td", {}, s.failures), el("td", {class: "error"}, s.last_error || "–"),
    el("td", {}, age(s.age_s))))
    : [el("tr", {}, el("td", {colspan: 10, class: "empty"}, "no sink processes"))]));
}

// alarms
async function loadAlarms() {
  const list = await getJSON("/api/alarms?count=100");
  state.alarms = new Map(list.map((a) => [a.id, a]));
  renderAlarms();
}

function renderAlarms() {
  const feed = document.getElementById("alarm-feed");
  const alarms = [...state.alarms.values()].sort((a, b) => b.raised_at - a.raised_at).slice(0, 200);
  const open = alarms.filter((a) => !a.acknowledged && !a.dismissed).length;
  document.getElementById("alarm-count").textContent = open || "";
  feed.replaceChildren(...(alarms.length ? alarms.map(alarmCard) : [el("p", {class: "empty"}, "no alarms")]));
}

function alarmCard(alarm) {
  const status = alarm.dismissed ? `dismissed as a false alarm by ${alarm.dismissed.by}`
    : alarm.acknowledged ? `acknowledged by ${alarm.acknowledged.by} at ${when(alarm.acknowledged.at)}` : "open";
  const act = async (what) => {
    const done = await post(`/api/alarms/${alarm.id}/${what}`);
    if (done) {
      state.alarms.set(alarm.id, done);
      renderAlarms();
      say(what === "dismiss" ? `dismissed: frame queued for bank ${done.queued_for_bank}` : "acknowledged");
    }
  };
  return el("article", {class: `alarm ${alarm.acknowledged || alarm.dismissed ? "handled" : "open"}`, "data-id": alarm.id},
    alarm.overlay ? el("img", {class: "overlay", src: `/api/alarms/${alarm.id}/overlay.jpg`, alt: `heatmap of ${alarm.camera} frame ${alarm.seq}`}) : el("div", {class: "overlay none"}, "no overlay"),
    el("div", {class: "details"},
      el("h3", {}, `${alarm.camera} · ${alarm.line || "no line"} · frame ${alarm.seq}`),
      el("p", {}, `score ${fmt(alarm.score)} ≥ threshold ${fmt(alarm.threshold)} · bank ${alarm.bank} v${alarm.bank_version}`),
      el("p", {class: "meta"}, `${when(alarm.raised_at)} · ${alarm.rule}`),
      el("p", {class: "status"}, status),
      el("div", {class: "actions operator-only"},
        el("button", {class: "ack", disabled: Boolean(alarm.acknowledged || alarm.dismissed), onclick: () => act("acknowledge")}, "Acknowledge"),
        el("button", {class: "dismiss", disabled: Boolean(alarm.dismissed), onclick: () => act("dismiss")}, "Dismiss as false alarm"))));
}

// banks
async function loadBanks() { state.banks = await getJSON("/api/banks"); renderBanks(state.banks); }

function histogramSvg(calibration, width = 260, height = 70) {
  const svg = el("svg:svg", {viewBox: `0 0 ${width} ${height}`, class: "histogram", role: "img"});
  const {edges, counts} = calibration.histogram;
  if (!counts.length) return el("p", {class: "meta"}, "no good scores stored");
  const top = Math.max(...counts), lo = edges[0], hi = edges[edges.length - 1], span = hi - lo || 1;
  const x = (v) => ((v - lo) / span) * width;
  counts.forEach((c, i) => {
    const h = (c / top) * (height - 12);
    svg.append(el("svg:rect", {x: x(edges[i]) + 0.5, y: height - h, width: Math.max(x(edges[i + 1]) - x(edges[i]) - 1, 1), height: h}));
  });
  if (calibration.threshold !== null && calibration.threshold !== undefined) {
    svg.append(el("svg:line", {class: "threshold", x1: x(calibration.threshold), x2: x(calibration.threshold), y1: 0, y2: height}));
  }
  svg.append(el("svg:title", {}, `${calibration.good_images} good-image scores, ${fmt(lo)}–${fmt(hi)}; line: threshold`));
  return svg;
}

function settingsList(settings) {
  const rows = [];
  const walk = (prefix, value) => {
    if (value && typeof value === "object" && !Array.isArray(value)) for (const [k, v] of Object.entries(value)) walk(prefix ? `${prefix}.${k}` : k, v);
    else rows.push([prefix, Array.isArray(value) ? value.join(", ") : value]);
  };
  walk("", settings);
  return el("dl", {class: "settings"}, rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v === null ? "–" : v)]));
}

function renderBanks(banks) {
  const list = document.getElementById("bank-list");
  list.replaceChildren(...(banks.length ? banks.map((bank) => el("article", {class: "bank", "data-bank": bank.name},
    el("h2", {}, `bank ${bank.name}`, el("span", {class: "meta"}, ` active v${bank.active ?? "–"}`)),
    el("p", {}, "cameras: ", bank.cameras.length ? bank.cameras.map((c) => `${c.camera} (v${c.version})`).join(", ") : "none"),
    el("div", {class: "operator-only"},
      el("button", {class: "rollback", "data-bank": bank.name, disabled: bank.rollback_to === null,
        onclick: async () => {
          const done = await post(`/api/banks/${encodeURIComponent(bank.name)}/rollback`);
          if (done) { say(`bank ${done.name}: v${done.active} active`); loadBanks(); }
        }}, bank.rollback_to === null ? "Roll back (nothing earlier)" : `Roll back to v${bank.rollback_to}`)),
    el("table", {class: "versions"},
      el("thead", {}, el("tr", {}, ["version", "published", "size", "calibration", "settings", ""].map((h) => el("th", {}, h)))),
      el("tbody", {}, bank.versions.map((v) => el("tr", {class: v.version === bank.active ? "active" : "", "data-version": v.version},
        el("td", {}, `v${v.version}`, v.version === bank.active ? el("strong", {}, " active") : "", v.signed ? el("div", {class: "meta"}, "signed") : ""),
        el("td", {}, new Date(v.published_at * 1000).toLocaleString(), el("div", {class: "meta"}, `sha256 ${v.sha256.slice(0, 12)}`)),
        el("td", {}, `${(v.size / 1e6).toFixed(1)} MB`),
        el("td", {}, histogramSvg(v.calibration), el("div", {class: "meta"},
          `threshold ${fmt(v.calibration.threshold)} · ${v.calibration.method || "–"}` +
          (v.calibration.false_alarm_rate ? ` at ${v.calibration.false_alarm_rate} false alarms` : ""))),
        el("td", {}, settingsList(v.settings)),
        el("td", {class: "operator-only"}, v.version === bank.active ? "" : el("button", {class: "activate", "data-version": v.version,
          onclick: async () => {
            const done = await post(`/api/banks/${encodeURIComponent(bank.name)}/activate`, {version: v.version});
            if (done) { say(`bank ${done.name}: v${done.active} active`); loadBanks(); }
          }}, "Activate")))))))) : [el("p", {class: "empty"}, "no banks")]));
}

// audit trail (operators only: the API answers 401 to anyone else)
async function loadAudit() {
  const body = document.querySelector("#audit-table tbody");
  if (!state.user) {
    body.replaceChildren(el("tr", {}, el("td", {colspan: 6, class: "empty"}, "log in to read the audit trail")));
    return;
  }
  const data = await getJSON("/api/audit?count=200").catch(() => null);
  if (!data) return;
  const show = (value) => (value === null ? "–" : JSON.stringify(value));
  body.replaceChildren(...(data.entries.length ? data.entries.slice().reverse().map((e) => el("tr", {"data-id": e.id},
    el("td", {}, new Date(e.at * 1000).toLocaleString()), el("td", {class: "who"}, e.who),
    el("td", {class: "action"}, e.action), el("td", {class: "target"}, e.target),
    el("td", {class: "state"}, show(e.before)), el("td", {class: "state"}, show(e.after))))
    : [el("tr", {}, el("td", {colspan: 6, class: "empty"}, "no changes recorded"))]));
}

// dead letters
async function loadDeadletters() { state.deadletters = await getJSON("/api/deadletters"); renderDeadletters(state.deadletters); }

function renderDeadletters(groups) {
  const body = document.querySelector("#deadletter-table tbody");
  const act = async (what, reason) => {
    const done = await post(`/api/deadletters/${what}`, {reason});
    if (done) { say(`${what}: ${JSON.stringify(done)}`); loadDeadletters(); }
  };
  body.replaceChildren(...(groups.length ? groups.map((g) => el("tr", {"data-reason": g.reason},
    el("td", {class: "reason"}, g.reason), el("td", {}, g.count), el("td", {}, g.replayable),
    el("td", {}, g.cameras.join(", ")), el("td", {}, when(g.newest)),
    el("td", {class: "operator-only"},
      el("button", {class: "replay", disabled: !g.replayable, onclick: () => act("replay", g.reason)}, "Replay"),
      el("button", {class: "purge", onclick: () => act("purge", g.reason)}, "Purge")))) : [el("tr", {}, el("td", {colspan: 6, class: "empty"}, "no dead letters"))]));
}
