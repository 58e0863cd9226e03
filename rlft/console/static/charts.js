/* rlft console, charts: line charts over steps with the vendored uPlot, aligned series, EMA
 * smoothing, and resizing with their container. Every chart is kept in RL.charts (the browser
 * tests read u.data from there). Left out: zoom persistence across refreshes. */
"use strict";

RL.COLORS = ["#2f6fde", "#e4572e", "#17a398", "#f2a541", "#8c5bd6", "#d6338a", "#5c946e", "#7a7a7a", "#1b998b", "#c1292e"];

/* [[step, value], ...] lists -> uPlot data [xs, ys1, ys2, ...] over the union of steps */
RL.align = function (lists) {
  const steps = [...new Set(lists.flatMap((pts) => pts.map((p) => p[0])))].sort((a, b) => a - b);
  const index = new Map(steps.map((s, i) => [s, i]));
  const ys = lists.map((pts) => {
    const a = new Array(steps.length).fill(null);
    for (const [s, v] of pts) a[index.get(s)] = v;
    return a;
  });
  return [steps, ...ys];
};

/* exponential moving average, debiased (as TensorBoard's smoothing); nulls stay null */
RL.ema = function (ys, alpha) {
  if (!alpha) return ys;
  let last = 0, n = 0;
  return ys.map((v) => {
    if (v === null || v === undefined) return null;
    n += 1;
    last = last * alpha + (1 - alpha) * v;
    return last / (1 - Math.pow(alpha, n));
  });
};

RL.smoothing = function (onChange) {
  const saved = Number(localStorage.getItem("rlft_ema") || 0);
  const label = RL.el("span", { class: "num" }, saved.toFixed(2));
  const input = RL.el("input", { type: "range", min: "0", max: "0.99", step: "0.01", value: String(saved), id: "ema" });
  input.addEventListener("input", () => {
    label.textContent = Number(input.value).toFixed(2);
    localStorage.setItem("rlft_ema", input.value);
    onChange(Number(input.value));
  });
  return { node: RL.el("label", { class: "smoothing" }, "smoothing (EMA) ", input, " ", label), value: () => Number(input.value) };
};

/* axis ticks: short, never "0" for small non-zero values */
RL.tick = function (v) {
  if (v === null || v === undefined) return "";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1);
  return String(+v.toPrecision(4));
};

const STEP_INCRS = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10000, 20000, 50000, 100000];

function lastValue(ys) {
  for (let i = ys.length - 1; i >= 0; i--) if (ys[i] !== null && ys[i] !== undefined) return ys[i];
  return null;
}

/* y range with room around a flat line (uPlot's default for all-zero data is 0..100) */
function yRange(u, min, max) {
  if (min === null || max === null) return [0, 1];
  if (min === max) { const pad = Math.abs(min) * 0.1 || 1; return [min - pad, max + pad]; }
  return uPlot.rangeNum(min, max, 0.1, true);
}

const BAND_FILL = { critical: "rgba(214, 40, 40, 0.13)", warning: "rgba(230, 150, 20, 0.15)", info: "rgba(47, 111, 222, 0.10)" };

/* shades chart.bands ([{lo, hi, severity}]: the step windows of health findings) under the lines */
function drawBands(chart) {
  return (u) => {
    const ctx = u.ctx, { top, height } = u.bbox;
    for (const b of chart.bands || []) {
      const x0 = u.valToPos(b.lo, "x", true), x1 = u.valToPos(b.hi, "x", true);
      const w = Math.max(x1 - x0, 4 * devicePixelRatio);
      ctx.save();
      ctx.fillStyle = BAND_FILL[b.severity] || BAND_FILL.info;
      ctx.fillRect(x0 - (x1 - x0 < 4 ? w / 2 : 0), top, w, height);
      ctx.restore();
    }
  };
}

/* A chart: title, series labels and [[step, value]] lists; chart.update(lists, alpha) redraws.
 * The legend shows the value under the cursor, or the latest value when the cursor is away.
 * opts.bands: step windows to shade (health findings); chart.setBands(bands) changes them. */
RL.lineChart = function (parent, title, labels, lists, alpha, opts) {
  opts = opts || {};
  const box = RL.el("div", { class: "chart", dataset: { chart: title } });
  parent.appendChild(box);
  const raw = RL.align(lists);
  const smooth = (data, a) => [data[0], ...data.slice(1).map((ys) => RL.ema(ys, a))];
  const many = raw[0].length > 60;
  const chart = { title, labels, raw, bands: opts.bands || [] };
  const u = new uPlot({
    hooks: { drawClear: [drawBands(chart)] },
    title, width: Math.max(box.clientWidth || 420, 280), height: opts.height || 210,
    scales: { x: { time: false }, y: { range: yRange } },
    legend: { live: true },
    cursor: { drag: { x: true, y: false } },
    axes: [{ label: opts.xLabel || "step", size: 36, incrs: STEP_INCRS, values: (u, splits) => splits.map(RL.tick) },
      { size: 56, values: (u, splits) => splits.map(RL.tick) }],
    series: [{ label: opts.xLabel || "step", value: (u, v, si, idx) => (idx === null ? "latest" : String(v)) },
      ...labels.map((l, i) => ({
        label: l, stroke: RL.COLORS[i % RL.COLORS.length], width: 1.6, spanGaps: true,
        points: { show: !many, size: 4 },
        value: (u, v, si, idx) => RL.fmt(idx === null ? lastValue(u.data[si]) : v),
      }))],
  }, smooth(raw, alpha), box);
  chart.u = u;
  chart.setBands = function (bands) {
    chart.bands = bands || [];
    box.classList.toggle("has-bands", chart.bands.length > 0);
    u.redraw(false);
  };
  box.classList.toggle("has-bands", chart.bands.length > 0);
  chart.update = function (newLists, a) {
    if (newLists) chart.raw = RL.align(newLists);
    u.setData(smooth(chart.raw, a));
  };
  const ro = new ResizeObserver(() => {
    const w = box.clientWidth;
    if (w && Math.abs(w - u.width) > 4) u.setSize({ width: w, height: u.height });
  });
  ro.observe(box);
  let alive = true;
  chart.destroy = function () {
    if (!alive) return;
    alive = false;
    ro.disconnect();
    u.destroy();
    box.remove();
    RL.charts = RL.charts.filter((c) => c !== chart);
  };
  RL.cleanup.push(chart.destroy);
  RL.charts.push(chart);
  return chart;
};
