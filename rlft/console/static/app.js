/* rlft console, core: the access token, JSON calls, DOM helpers that only ever create text
 * nodes (never HTML from data), formatting, the hash router, polling, the runs list and the run
 * page shell with its tabs. Each tab lives in tabs/<name>.js and registers itself in RL.tabs;
 * charts are in charts.js, the compare page in compare.js; start.js boots the page.
 * Left out: any framework or build step. */
"use strict";

const RL = (window.RL = { tabs: {}, charts: [], info: null, poller: null, cleanup: [] });

/* -- token: taken from ?token= once, kept in sessionStorage, removed from the address bar -- */
(function keepToken() {
  const params = new URLSearchParams(location.search);
  const t = params.get("token");
  if (t) {
    sessionStorage.setItem("rlft_token", t);
    params.delete("token");
    const q = params.toString();
    history.replaceState(null, "", location.pathname + (q ? "?" + q : "") + location.hash);
  }
  RL.token = sessionStorage.getItem("rlft_token");
})();

RL.headers = function (extra) {
  return Object.assign(RL.token ? { "X-RLFT-Token": RL.token } : {}, extra || {});
};

RL.url = function (path, params) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params || {})) {
    if (v === undefined || v === null || v === "") continue;
    if (Array.isArray(v)) v.forEach((x) => url.searchParams.append(k, x));
    else url.searchParams.set(k, String(v));
  }
  return url;
};

RL.api = async function (path, params) {
  const resp = await fetch(RL.url(path, params), { headers: RL.headers() });
  const body = await resp.json().catch(() => ({ error: resp.status + " " + resp.statusText }));
  RL.setConn(resp.ok || resp.status < 500 ? "" : "server error");
  if (!resp.ok) throw new Error((body && body.error) || resp.status + " " + resp.statusText);
  return body;
};

RL.setConn = function (text) {
  const c = document.getElementById("conn");
  if (c) c.textContent = text;
};

/* -- DOM: every string becomes a text node; no HTML is ever parsed from data -- */
function safeHref(v) {
  const s = String(v);
  return s.startsWith("#") ? s : "#";
}

RL.el = function (tag, props, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = String(v);
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (k === "style") Object.assign(e.style, v);
    else if (k === "href") e.setAttribute("href", safeHref(v));
    else if (k.startsWith("on") && typeof v === "function") e.addEventListener(k.slice(2), v);
    else if (/html/i.test(k) || k.startsWith("on") || k === "src" || k === "srcdoc") throw new Error("refused prop " + k);
    else if (k in e && typeof e[k] !== "object") e[k] = v;
    else e.setAttribute(k, String(v));
  }
  RL.append(e, children);
  return e;
};

RL.append = function (parent, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    parent.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return parent;
};

RL.clear = function (node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
};

RL.text = function (v) {
  /* message content may be a string, a list of parts or anything else: always a string */
  if (v === null || v === undefined) return "";
  if (typeof v === "string") return v;
  if (Array.isArray(v)) return v.map((p) => (p && typeof p === "object" ? p.text ?? JSON.stringify(p) : String(p))).join("\n");
  return JSON.stringify(v, null, 2);
};

/* an error: its first line as the headline, further lines (often long) below, then the traceback */
RL.errorBox = function (message, traceback, open) {
  const lines = String(message || "error").split("\n");
  const rest = lines.slice(1).join("\n").trim();
  return RL.el("div", { class: "error-box" },
    RL.el("div", { class: "error-msg" }, lines[0]),
    rest ? RL.el("pre", { class: "error-more" }, rest) : null,
    traceback ? RL.el("details", { open: !!open }, RL.el("summary", {}, "traceback"), RL.el("pre", { class: "tb" }, traceback)) : null);
};

/* -- formatting -- */
RL.fmt = function (v, digits) {
  if (v === null || v === undefined || v === "") return "–";
  if (typeof v !== "number") return String(v);
  if (!isFinite(v)) return String(v);
  const d = digits ?? 3;
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
  if (Number.isInteger(v)) return String(v);
  return v.toFixed(d);
};
RL.time = (ts) => (ts ? new Date(ts * 1000).toLocaleString() : "–");
RL.dur = function (s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return s.toFixed(1) + " s";
  if (s < 3600) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(2) + " h";
};
RL.badge = (status) => RL.el("span", { class: "badge st-" + String(status).replace(/[^a-z]/g, "") }, status);
/* the status, and "with errors (...)" when a completed run's rewards failed on some rollouts */
RL.statusCell = (r) => [RL.badge(r.status), r.status_label && r.status_label !== r.status
  ? RL.el("div", { class: "err small status-label" }, r.status_label.slice(String(r.status).length).trim()) : null];
RL.debounce = function (fn, ms) {
  let t = null;
  return (...a) => { clearTimeout(t); t = setTimeout(() => fn(...a), ms); };
};

/* -- polling: one timer for the current page -- */
RL.poll = function (fn) {
  RL.stopPolling();
  const ms = (RL.info && RL.info.poll_ms) || 2000;
  let busy = false;
  RL.poller = setInterval(async () => {
    if (busy || document.hidden) return;
    busy = true;
    try { await fn(); } catch (e) { RL.setConn("offline: " + e.message); } finally { busy = false; }
  }, ms);
};
RL.stopPolling = function () { if (RL.poller) clearInterval(RL.poller); RL.poller = null; };

/* -- router: #/  #/run/<id>/<tab>[/<rollout>]  #/compare/<a,b> -- */
RL.route = async function () {
  RL.stopPolling();
  RL.cleanup.splice(0).forEach((f) => { try { f(); } catch (e) { /* page already gone */ } });
  RL.charts = RL.charts.filter((c) => document.body.contains(c.u.root));
  const view = RL.clear(document.getElementById("view"));
  const parts = location.hash.replace(/^#\/?/, "").split("/").map((p) => { try { return decodeURIComponent(p); } catch (e) { return p; } });
  document.querySelectorAll("header nav a").forEach((a) => a.classList.remove("active"));
  try {
    if (parts[0] === "run" && parts[1]) await RL.runPage(view, parts[1], parts[2] || "train", parts[3]);
    else if (parts[0] === "compare") { document.getElementById("nav-compare").classList.add("active"); await RL.comparePage(view, (parts[1] || "").split(",").filter(Boolean)); }
    else { document.getElementById("nav-runs").classList.add("active"); await RL.runsPage(view); }
  } catch (e) {
    view.appendChild(RL.errorBox(e.message));
  }
};

/* -- the runs list -- */
const RUN_COLUMNS = [
  ["name", "Run"], ["kind", "Kind"], ["status", "Status"], ["model", "Model"], ["environment", "Environment"], ["step", "Steps"],
  ["reward", "Reward"], ["pass_at_k", "pass@k"], ["created_at", "Started"], ["duration", "Duration"],
];

RL.runsPage = async function (view) {
  const state = RL.runsState || (RL.runsState = { sort: "created_at", desc: true, filter: "", status: "", selected: new Set() });
  const filter = RL.el("input", { type: "search", placeholder: "filter: name, model, environment…", value: state.filter, id: "runs-filter" });
  const statusSel = RL.el("select", { id: "runs-status" }, RL.el("option", { value: "" }, "any status"),
    ["running", "completed", "failed", "stopped", "created"].map((s) => RL.el("option", { value: s }, s)));
  statusSel.value = state.status;
  const compareBtn = RL.el("button", { id: "compare-selected", onclick: () => { location.hash = "#/compare/" + [...state.selected].map(encodeURIComponent).join(","); } }, "Compare selected");
  const count = RL.el("span", { class: "muted", id: "runs-count" });
  const table = RL.el("table", { class: "grid runs", id: "runs-table" });
  view.append(RL.el("h1", {}, "Runs"), RL.el("div", { class: "toolbar" }, filter, statusSel, compareBtn, count), table);
  let runs = [];

  function render() {
    const q = state.filter.toLowerCase();
    const rows = runs.filter((r) => (!state.status || r.status === state.status) &&
      (!q || [r.name, r.id, r.model, r.environment, r.status].some((x) => String(x || "").toLowerCase().includes(q))));
    rows.sort((a, b) => {
      const x = a[state.sort], y = b[state.sort];
      const c = x === y ? 0 : x === null || x === undefined ? 1 : y === null || y === undefined ? -1 : x < y ? -1 : 1;
      return state.desc ? -c : c;
    });
    count.textContent = rows.length + " of " + runs.length + " runs";
    compareBtn.disabled = state.selected.size < 2;
    RL.clear(table);
    table.appendChild(RL.el("thead", {}, RL.el("tr", {}, RL.el("th", {}),
      RUN_COLUMNS.map(([key, label]) => RL.el("th", {
        class: "sortable" + (state.sort === key ? (state.desc ? " desc" : " asc") : ""), dataset: { key },
        onclick: () => { state.desc = state.sort === key ? !state.desc : key !== "name"; state.sort = key; render(); },
      }, label)))));
    const body = RL.el("tbody");
    for (const r of rows) {
      const box = RL.el("input", { type: "checkbox", checked: state.selected.has(r.id), title: "select for comparison",
        onchange: (ev) => { ev.target.checked ? state.selected.add(r.id) : state.selected.delete(r.id); compareBtn.disabled = state.selected.size < 2; } });
      body.appendChild(RL.el("tr", { dataset: { run: r.id } },
        RL.el("td", {}, box),
        RL.el("td", {}, RL.el("a", { href: "#/run/" + encodeURIComponent(r.id) + "/train" }, r.name || r.id),
          r.name !== r.id ? RL.el("div", { class: "muted small" }, r.id) : null,
          r.error ? RL.el("div", { class: "err small failure-reason", title: r.error }, r.error.split("
")[0]) : null),
        RL.el("td", {}, r.kind || "rl"),
        RL.el("td", {}, RL.statusCell(r)),
        RL.el("td", { class: "ellipsis", title: r.model }, r.model),
        RL.el("td", { class: "ellipsis", title: r.environment }, r.environment),
        RL.el("td", { class: "num" }, String(r.step) + (r.steps ? " / " + r.steps : "")),
        RL.el("td", { class: "num" }, r.kind === "sft" ? "loss " + RL.fmt(r.loss) : RL.fmt(r.reward)),
        RL.el("td", { class: "num" }, RL.fmt(r.pass_at_k, 2)),
        RL.el("td", {}, RL.time(r.started_at || r.created_at)),
        RL.el("td", { class: "num" }, RL.dur(r.duration))));
    }
    table.appendChild(body);
    if (!runs.length) table.appendChild(RL.el("caption", {}, RL.info && !RL.info.store_exists
      ? "No run store at " + RL.info.store + " yet: start a run with `rlft train`." : "No runs yet."));
  }

  filter.addEventListener("input", () => { state.filter = filter.value; render(); });
  statusSel.addEventListener("change", () => { state.status = statusSel.value; render(); });
  runs = await RL.api("/api/runs");
  render();
  RL.poll(async () => {
    const fresh = await RL.api("/api/runs");
    if (JSON.stringify(fresh) !== JSON.stringify(runs)) { runs = fresh; render(); }
  });
};

/* -- the run page: header (failure first), tabs, polling while the run changes -- */
const TABS = ["train", "eval", "rollouts", "logs", "config", "chat"];

RL.runHeader = function (run) {
  const stats = [["kind", run.kind || "rl"], ["status", RL.statusCell(run)], ["model", run.model],
    ["environment", run.environment], ["step", String(run.step) + (run.steps ? " / " + run.steps : "")],
    run.kind === "sft" ? ["loss", RL.fmt(run.loss)] : ["reward", RL.fmt(run.reward)],
    ["pass@k", RL.fmt(run.pass_at_k, 2)], ["started", RL.time(run.started_at || run.created_at)],
    ["duration", RL.dur(run.duration)], ["checkpoints", String((run.checkpoints || []).length)]];
  return RL.el("div", { class: "run-header", id: "run-header" },
    RL.el("h1", {}, run.name || run.id, " ", RL.el("span", { class: "muted small" }, run.id)),
    RL.el("dl", { class: "stats" }, stats.map(([k, v]) => RL.el("div", {}, RL.el("dt", {}, k), RL.el("dd", {}, v)))),
    run.error ? RL.el("div", { id: "run-failure" }, RL.el("h2", {}, "This run " + run.status + ": why"),
      RL.errorBox(run.error, run.traceback, true)) : null);
};

RL.runPage = async function (view, ref, tab, arg) {
  if (!TABS.includes(tab)) tab = "train";
  let run = await RL.api("/api/runs/" + encodeURIComponent(ref));
  const header = RL.runHeader(run);
  const nav = RL.el("nav", { class: "tabs", id: "tabs" }, TABS.map((t) =>
    RL.el("a", { href: "#/run/" + encodeURIComponent(run.id) + "/" + t, class: t === tab ? "active" : "", dataset: { tab: t } }, t)));
  const body = RL.el("section", { class: "tab-body", id: "tab-" + tab });
  const strip = RL.health.strip(run.id, await RL.health.load(run.id));
  view.append(header, strip, nav, body);
  const ctx = { run, runId: run.id, body, arg };
  const mod = RL.tabs[tab];
  await mod.mount(ctx);
  let signature = JSON.stringify([run.status, run.step, run.updated_at, run.latest, run.rollouts, run.checkpoints]);
  RL.poll(async () => {
    const fresh = await RL.api("/api/runs/" + encodeURIComponent(run.id));
    const sig = JSON.stringify([fresh.status, fresh.step, fresh.updated_at, fresh.latest, fresh.rollouts, fresh.checkpoints]);
    if (sig === signature) return;
    signature = sig;
    run = ctx.run = fresh;
    const h = document.getElementById("run-header");
    if (h) h.replaceWith(RL.runHeader(fresh));
    const s = document.getElementById("health-strip");
    if (s) s.replaceWith(RL.health.strip(run.id, await RL.health.load(run.id)));
    if (mod.refresh) await mod.refresh(ctx);
  });
};
