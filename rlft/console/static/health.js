/* rlft console, training health: the findings strip at the top of the run page (one chip per
 * finding: severity, title, the numbers, the advice; a click opens the train tab on the chart
 * and steps that triggered it), the step windows the charts shade, and the findings cell of the
 * compare page. The findings come from /api/runs/<id>/health (rlft.health; docs/health.md).
 * Left out: computing anything (the server does). */
"use strict";

RL.health = { cache: {} };

RL.health.load = async function (runId) {
  const data = await RL.api("/api/runs/" + encodeURIComponent(runId) + "/health");
  RL.health.cache[runId] = data.findings || [];
  return RL.health.cache[runId];
};

RL.health.steps = (f) => (f.window[0] === f.window[1] ? "step " + f.window[0] : "steps " + f.window[0] + "–" + f.window[1]);

/* the train-tab address of a finding: #/run/<id>/train/<chart key>@<first>-<last> */
RL.health.href = (runId, f) => "#/run/" + encodeURIComponent(runId) + "/train/" + encodeURIComponent(f.chart + "@" + f.window[0] + "-" + f.window[1]);

/* "key@lo-hi" -> {key, lo, hi} (null when the argument is something else) */
RL.health.parseFocus = function (arg) {
  const m = /^(.+)@(-?\d+)-(-?\d+)$/.exec(arg || "");
  return m ? { key: m[1], lo: Number(m[2]), hi: Number(m[3]) } : null;
};

RL.health.chip = function (runId, f) {
  return RL.el("a", { class: "finding sev-" + f.severity, href: RL.health.href(runId, f), dataset: { finding: f.name },
    title: f.advice },
    RL.el("span", { class: "sev" }, f.severity), " ", RL.el("strong", {}, f.title),
    RL.el("span", { class: "muted" }, " · " + RL.health.steps(f) + " · " + f.chart));
};

RL.health.strip = function (runId, findings) {
  const box = RL.el("div", { class: "health-strip", id: "health-strip" });
  if (!findings.length) {
    return RL.append(box, [RL.el("span", { class: "finding sev-ok" }, "no health findings"),
      RL.el("span", { class: "muted small" }, " (checks and thresholds: docs/health.md)")]);
  }
  for (const f of findings) {
    box.appendChild(RL.el("div", { class: "finding-row" }, RL.health.chip(runId, f),
      RL.el("div", { class: "finding-text" }, f.summary), RL.el("div", { class: "finding-advice muted" }, "→ " + f.advice)));
  }
  return box;
};

/* the windows a chart over `keys` shades: the findings whose evidence or chart is one of them */
RL.health.bands = function (findings, keys) {
  const ks = new Set(keys);
  return (findings || []).filter((f) => ks.has(f.chart) || (f.evidence || []).some((e) => ks.has(e.key)))
    .map((f) => ({ lo: f.window[0], hi: f.window[1], severity: f.severity, name: f.name }));
};
