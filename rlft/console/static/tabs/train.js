/* rlft console, train tab: every training metric as a chart over steps, grouped (reward,
 * pass@k/max@k/solve rate, each reward component, length and truncation, turns and tool calls,
 * loss, KL, entropy, clip ratio, grad norm, lr, time per phase, tokens/s, SFT loss and eval
 * loss, held-out eval, the rest by prefix), with EMA smoothing and live updates while the run trains.
 * Series come downsampled to about MAX_POINTS points (buckets of steps: mean, min, max; the
 * bucket fixed by the run's planned steps, so a live run only fetches its newest buckets); a
 * zoomed chart fetches its range at full resolution. */
"use strict";

(function () {
  const BASE = new Set(["reward/mean", "reward/std", "reward/max"]);
  const GROUPS = [
    { title: "Reward (mean, max)", keys: ["reward/mean", "reward/max"] },
    { title: "Reward std (within the batch)", keys: ["reward/std"] },
    { title: "pass@k · max@k · solve rate", keys: ["pass@k", "max@k", "solve_rate"] },
    { title: "Reward components", match: (k) => k.startsWith("reward/") && !BASE.has(k) },
    { title: "Response length (sampled tokens)", keys: ["response/length"] },
    { title: "Truncated share", keys: ["response/truncated_ratio"] },
    { title: "Turns and tool calls", keys: ["rollout/turns", "rollout/tool_calls"] },
    { title: "Rollouts with errors (share)", keys: ["rollout/errors"] },
    { title: "Termination reasons (share)", match: (k) => k.startsWith("termination/"), zero: true },
    { title: "Policy loss", keys: ["loss/policy"] },
    { title: "KL", keys: ["loss/kl"] },
    { title: "Entropy", keys: ["policy/entropy"] },
    { title: "Clip ratio", keys: ["policy/clip_ratio"] },
    { title: "Grad norm", keys: ["optim/grad_norm"] },
    { title: "Learning rate", keys: ["optim/lr"] },
    { title: "Time per phase (s)", match: (k) => k.startsWith("time/") },
    { title: "Throughput (sampled tokens/s)", keys: ["throughput/tokens_per_s"] },
    { title: "SFT loss (train, held-out)", keys: ["sft/loss", "eval/loss"] },
    { title: "SFT throughput (tokens/s)", keys: ["sft/tokens_per_s"] },
    { title: "Held-out eval", keys: ["eval/reward/mean", "eval/pass@k", "eval/max@k", "eval/solve_rate"] },
  ];
  const LISTED = new Set(GROUPS.flatMap((g) => g.keys || []));

  /* [{title, keys}] for the keys present; the rest grouped by their first path part */
  function layout(keys) {
    const left = new Set(keys.filter((k) => !k.startsWith("eval/") || LISTED.has(k)));
    const out = [];
    for (const g of GROUPS) {
      const ks = g.keys ? g.keys.filter((k) => left.has(k)) : [...left].filter(g.match).sort();
      ks.forEach((k) => left.delete(k));
      if (ks.length) out.push({ title: g.title, keys: ks, zero: !!g.zero });
    }
    const byPrefix = {};
    for (const k of [...left].sort()) (byPrefix[k.split("/")[0]] ||= []).push(k);
    for (const [p, ks] of Object.entries(byPrefix)) out.push({ title: p, keys: ks });
    return out;
  }

  /* the lists of a group; for shares (zero: true) a key absent at a step counts as 0 there */
  function lists(g, series) {
    const ls = g.keys.map((k) => series[k]);
    if (!g.zero) return ls;
    const steps = [...new Set(ls.flat().map((p) => p[0]))].sort((a, b) => a - b);
    return ls.map((pts) => { const m = new Map(pts); return steps.map((s) => [s, m.has(s) ? m.get(s) : 0]); });
  }

  const MAX_POINTS = 200;

  const label = (k) => (k.startsWith("termination/") ? k.slice(12) : k.startsWith("reward/") ? k.slice(7) : k);

  RL.tabs.train = {
    async mount(ctx) {
      ctx.focus = RL.health.parseFocus(ctx.arg);
      const grid = RL.el("div", { class: "charts", id: "train-charts" });
      const live = RL.el("span", { class: "muted", id: "train-live" });
      ctx.smooth = RL.smoothing((a) => ctx.charts.forEach((c) => c.update(null, a)));
      ctx.body.append(RL.el("div", { class: "toolbar" }, ctx.smooth.node, live), grid);
      ctx.grid = grid;
      ctx.live = live;
      ctx.charts = [];
      await this.refresh(ctx);
    },

    /* Fetches only the buckets from the one holding the last seen step on (a step's eval
     * metrics may arrive after its training metrics, a bucket fills over several steps); a run
     * that went back (resumed) or outgrew its planned steps is fetched whole again. */
    async fetchSeries(ctx) {
      const url = "/api/runs/" + encodeURIComponent(ctx.runId) + "/metrics";
      const last = ctx.lastStep;
      // steps per point from the planned steps, doubled only when the run goes past twice as many
      // points: a live run keeps its buckets, and polls fetch only the newest
      let bucket = Math.max(1, Math.ceil(Math.max(ctx.run.steps || 0, 1) / MAX_POINTS));
      while (Math.ceil((ctx.run.step || 0) / bucket) > 2 * MAX_POINTS) bucket *= 2;
      if (last === undefined || ctx.run.step < last || bucket !== ctx.bucket) {
        ctx.bucket = bucket;
        ctx.series = await RL.api(url, { bucket });
      } else {
        const from = Math.floor(last / bucket) * bucket;
        const fresh = await RL.api(url, { bucket, after_step: from - 1 });
        for (const [k, pts] of Object.entries(fresh)) {
          ctx.series[k] = (ctx.series[k] || []).filter((p) => p[0] < from).concat(pts);
        }
      }
      ctx.lastStep = Object.values(ctx.series).reduce((m, pts) => (pts.length ? Math.max(m, pts[pts.length - 1][0]) : m), 0);
      return ctx.series;
    },

    async refresh(ctx) {
      const series = await this.fetchSeries(ctx);
      const groups = layout(Object.keys(series));
      const shape = JSON.stringify(groups);
      const alpha = ctx.smooth.value();
      const findings = RL.health.cache[ctx.runId] || (await RL.health.load(ctx.runId));
      if (shape === ctx.shape) {
        groups.forEach((g, i) => ctx.charts[i].update(lists(g, series), alpha));
      } else {
        ctx.charts.forEach((c) => c.destroy());
        RL.clear(ctx.grid);
        const url = "/api/runs/" + encodeURIComponent(ctx.runId) + "/metrics";
        const zoom = (g) => async (lo, hi) => {  // the dragged range at full resolution (up to MAX_POINTS buckets)
          const part = await RL.api(url, { keys: g.keys.join(","), first_step: lo, last_step: hi, max_points: MAX_POINTS });
          return lists(g, Object.fromEntries(g.keys.map((k) => [k, part[k] || []])));
        };
        ctx.charts = groups.map((g) => Object.assign(RL.lineChart(ctx.grid, g.title, g.keys.map(label), lists(g, series), alpha,
          { onZoom: zoom(g) }), { keys: g.keys }));
        ctx.shape = shape;
      }
      // health findings: each chart shades the step windows of the findings about its metrics
      ctx.charts.forEach((c) => c.setBands(RL.health.bands(findings, c.keys)));
      if (ctx.focus) {  // opened from the findings strip: scroll to that chart and mark it
        const target = ctx.charts.find((c) => c.keys.includes(ctx.focus.key));
        if (target) {
          const box = target.u.root.parentNode;
          box.classList.add("focused");
          box.id = "focused-chart";
          box.scrollIntoView({ block: "center" });
        }
        ctx.focus = null;
      }
      if (!groups.length) ctx.grid.appendChild(RL.el("p", { class: "muted" }, "No metrics logged yet."));
      const running = ctx.run.status === "running";
      ctx.live.textContent = running ? "live: updating every " + (RL.info.poll_ms / 1000) + " s" : "";
    },
  };
})();
