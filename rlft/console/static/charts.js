/* rlft console, charts: line charts over steps with the vendored uPlot, aligned series, EMA
 * smoothing, and resizing with their container. Downsampled series ([step, mean, min, max] per
 * bucket of steps) draw the mean as the line and min..max as a shaded band, so spikes stay
 * visible; dragging across a chart zooms in and opts.onZoom(lo, hi) may return the range at
 * full resolution (double-click goes back). Every chart is kept in RL.charts (the browser tests
 * read u.data from there). Left out: zoom persistence across refreshes. */
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

/* per list, [min, max] at each of `steps` for downsampled points ([step, mean, min, max]), or
 * null for a list of plain points */
RL.envelopes = function (lists, steps) {
  const index = new Map(steps.map((s, i) => [s, i]));
  return lists.map((pts) => {
    if (!pts.some((p) => p.length >= 4)) return null;
    const a = new Array(steps.length).fill(null);
    for (const p of pts) if (p.length >= 4 && p[2] !== null && p[3] !== null) a[index.get(p[0])] = [p[2], p[3]];
    return a;
  });
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

/* y range with room around a flat line (uPlot's default for all-zero data is 0..100), widened
 * to the min..max bands of downsampled series */
function yRange(u, min, max) {
  for (const e of (u.rlEnv || [])) for (const r of e || []) {
    if (!r) continue;
    if (min === null || r[0] < min) min = r[0];
    if (max === null || r[1] > max) max = r[1];
  }
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
/* the min..max band of each downsampled series, under its line */
function drawEnvelopes(u) {
  const ctx = u.ctx, xs = u.data[0], { left, top, width, height } = u.bbox;
  (u.rlEnv || []).forEach((env, si) => {
    if (!env || !u.series[si + 1].show) return;
    const lo = [], hi = [];
    env.forEach((r, i) => {
      if (!r) return;
      const x = u.valToPos(xs[i], "x", true);
      hi.push([x, u.valToPos(r[1], "y", true)]);
      lo.push([x, u.valToPos(r[0], "y", true)]);
    });
    if (!hi.length) return;
    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top, width, height);
    ctx.clip();
    ctx.globalAlpha = 0.16;
    ctx.fillStyle = RL.COLORS[si % RL.COLORS.length];
    ctx.beginPath();
    hi.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    for (let i = lo.length - 1; i >= 0; i--) ctx.lineTo(lo[i][0], lo[i][1]);
    ctx.closePath();
    ctx.fill();
    ctx.restore();
  });
}

RL.lineChart = function (parent, title, labels, lists, alpha, opts) {
  opts = opts || {};
  const box = RL.el("div", { class: "chart", dataset: { chart: title } });
  parent.appendChild(box);
  const raw = RL.align(lists);
  const smooth = (data, a) => [data[0], ...data.slice(1).map((ys) => RL.ema(ys, a))];
  const many = raw[0].length > 60;
  const chart = { title, labels, raw, env: RL.envelopes(lists, raw[0]), bands: opts.bands || [], zoomed: false, alpha };
  let zoomTicket = 0;
  const u = new uPlot({
    hooks: {
      drawClear: [drawBands(chart)], drawAxes: [drawEnvelopes],
      setSelect: [(u) => {  // a drag zooms in: ask for that range at full resolution
        if (!opts.onZoom || u.select.width < 2) return;
        const lo = Math.floor(u.posToVal(u.select.left, "x")), hi = Math.ceil(u.posToVal(u.select.left + u.select.width, "x"));
        const ticket = ++zoomTicket;
        Promise.resolve(opts.onZoom(lo, hi)).then((zoomLists) => {
          if (!zoomLists || ticket !== zoomTicket || !chart.alive) return;
          chart.zoomed = true;
          const data = RL.align(zoomLists);
          u.rlEnv = RL.envelopes(zoomLists, data[0]);
          u.setData(smooth(data, chart.alpha), false);
          u.setScale("x", { min: lo, max: hi });
          box.classList.add("zoomed");
        }).catch(() => { /* the overview stays */ });
      }],
    },
    title, width: Math.max(box.clientWidth || 420, 280), height: opts.height || 210,
    scales: { x: { time: false }, y: { range: yRange } },
    legend: { live: true },
    cursor: {
      drag: { x: true, y: false },
      bind: { dblclick: (u, targ, handler) => (e) => {  // back from a zoom: the overview again
        if (!chart.zoomed) return handler(e);
        zoomTicket++;
        chart.zoomed = false;
        box.classList.remove("zoomed");
        u.rlEnv = chart.env;
        u.setData(smooth(chart.raw, chart.alpha), true);
        return null;
      } },
    },
    axes: [{ label: opts.xLabel || "step", size: 36, incrs: STEP_INCRS, values: (u, splits) => splits.map(RL.tick) },
      { size: 56, values: (u, splits) => splits.map(RL.tick) }],
    series: [{ label: opts.xLabel || "step", value: (u, v, si, idx) => (idx === null ? "latest" : String(v)) },
      ...labels.map((l, i) => ({
        label: l, stroke: RL.COLORS[i % RL.COLORS.length], width: 1.6, spanGaps: true,
        points: { show: !many, size: 4 },
        value: (u, v, si, idx) => RL.fmt(idx === null ? lastValue(u.data[si]) : v),
      }))],
  }, smooth(raw, alpha), box);
  u.rlEnv = chart.env;
  u.redraw(false);
  chart.u = u;
  chart.setBands = function (bands) {
    chart.bands = bands || [];
    box.classList.toggle("has-bands", chart.bands.length > 0);
    u.redraw(false);
  };
  box.classList.toggle("has-bands", chart.bands.length > 0);
  chart.update = function (newLists, a) {
    if (newLists) {
      chart.raw = RL.align(newLists);
      chart.env = RL.envelopes(newLists, chart.raw[0]);
    }
    if (a !== undefined) chart.alpha = a;
    if (chart.zoomed) return;  // the zoomed range stays until a double-click
    u.rlEnv = chart.env;
    u.setData(smooth(chart.raw, chart.alpha));
  };
  const ro = new ResizeObserver(() => {
    const w = box.clientWidth;
    if (w && Math.abs(w - u.width) > 4) u.setSize({ width: w, height: u.height });
  });
  ro.observe(box);
  chart.alive = true;
  chart.destroy = function () {
    if (!chart.alive) return;
    chart.alive = false;
    ro.disconnect();
    u.destroy();
    box.remove();
    RL.charts = RL.charts.filter((c) => c !== chart);
  };
  RL.cleanup.push(chart.destroy);
  RL.charts.push(chart);
  return chart;
};
