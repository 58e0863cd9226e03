/* rlft console, eval tab: the run's evals per checkpoint (base at step 0 onwards) as a chart
 * and a table, and a side-by-side comparison of any two evals (base, checkpoints, external
 * models evaluated with `rlft eval`) with a bar per metric and reward component and the delta,
 * coloured by whether the change is good (less truncation is green), and the health findings of
 * external evals. */
"use strict";

(function () {
  const MAIN = ["reward/mean", "pass@k", "max@k", "solve_rate"];

  function components(rows) {
    const ks = new Set();
    rows.forEach((r) => Object.keys(r.metrics || {}).forEach((k) => {
      if (k.startsWith("reward/") && !["reward/mean", "reward/std", "reward/max"].includes(k)) ks.add(k);
    }));
    return [...ks].sort();
  }

  function labelOf(e) {
    return (e.run_id ? (e.step !== null && e.step !== undefined ? "step " + e.step + (e.step === 0 ? " (base)" : "") : "eval") : "external") + " · " + e.model;
  }

  /* whether a change of a metric is good: +1 higher is better, -1 lower is better, 0 neither
   * (length, time, cost and counts are trade-offs, not goals) */
  function direction(k) {
    if (/truncated_ratio|rollout\/errors|^termination\/(?!finished)|zero_variance/.test(k)) return -1;
    if (/^(reward\/(?!std)|pass@k|max@k|solve_rate|termination\/finished)/.test(k)) return 1;
    return 0;
  }

  function bars(a, b, keys) {
    const table = RL.el("table", { class: "grid bars", id: "eval-compare" });
    table.appendChild(RL.el("thead", {}, RL.el("tr", {}, RL.el("th", {}, "metric"), RL.el("th", {}, "A: " + labelOf(a)),
      RL.el("th", {}, "B: " + labelOf(b)), RL.el("th", {}, "Δ (B − A)"))));
    const body = RL.el("tbody");
    for (const k of keys) {
      const va = (a.metrics || {})[k], vb = (b.metrics || {})[k];
      const scale = Math.max(Math.abs(va || 0), Math.abs(vb || 0), 1e-9);
      const bar = (v, cls) => RL.el("div", { class: "bar-cell" },
        RL.el("div", { class: "bar " + cls, style: { width: (100 * Math.abs(v || 0) / scale).toFixed(1) + "%" } }),
        RL.el("span", { class: "num" }, RL.fmt(v)));
      const d = va === undefined || vb === undefined || va === null || vb === null ? null : vb - va;
      const dir = direction(k), verdict = !d || !dir ? "" : d * dir > 0 ? "good" : "bad";
      body.appendChild(RL.el("tr", { dataset: { metric: k } }, RL.el("td", {}, k), RL.el("td", {}, bar(va, "a")), RL.el("td", {}, bar(vb, "b")),
        RL.el("td", { class: "num delta " + verdict, title: dir > 0 ? "higher is better" : dir < 0 ? "lower is better" : "neither direction is better" },
          d === null ? "–" : (d > 0 ? "+" : "") + RL.fmt(d))));
    }
    table.appendChild(body);
    return table;
  }

  RL.tabs.eval = {
    async mount(ctx) {
      ctx.sel = {};
      await this.refresh(ctx);
    },

    async refresh(ctx) {
      const data = await RL.api("/api/runs/" + encodeURIComponent(ctx.runId) + "/evals");
      const rows = data.run.concat(data.external);
      RL.charts.filter((c) => c.tab === "eval").forEach((c) => c.destroy());
      RL.clear(ctx.body);
      if (!rows.length) {
        ctx.body.appendChild(RL.el("p", { class: "muted" }, "No evals yet: the trainer evaluates at step 0, every eval_every steps and at the end; `rlft eval` adds checkpoints and external models."));
        return;
      }
      const comps = components(rows);
      const stepped = data.run.filter((e) => e.step !== null && e.step !== undefined);
      if (stepped.length) {
        const chartBox = RL.el("div", { class: "charts" });
        ctx.body.appendChild(chartBox);
        const keys = MAIN.concat(comps);
        const lists = keys.map((k) => stepped.filter((e) => (e.metrics || {})[k] !== undefined).map((e) => [e.step, e.metrics[k]]));
        const c = RL.lineChart(chartBox, "Eval metrics per checkpoint", keys, lists, 0, { xLabel: "checkpoint step" });
        c.tab = "eval";
      }
      const ids = rows.map((e) => e.id);
      if (!ids.includes(ctx.sel.a)) ctx.sel.a = (stepped[0] || rows[0]).id;
      if (!ids.includes(ctx.sel.b)) ctx.sel.b = (stepped.at(-1) || rows.at(-1)).id;
      const cmpBox = RL.el("div", { class: "panel" });
      const redraw = () => {
        RL.clear(cmpBox);
        const a = rows.find((e) => e.id === ctx.sel.a), b = rows.find((e) => e.id === ctx.sel.b);
        cmpBox.append(RL.el("h2", {}, "Compare two evals"), bars(a, b, MAIN.concat(comps, ["response/length", "response/truncated_ratio"])));
      };
      const table = RL.el("table", { class: "grid", id: "eval-table" });
      table.appendChild(RL.el("thead", {}, RL.el("tr", {}, ["A", "B", "step", "model", "k", "split"].concat(MAIN, comps).map((h) => RL.el("th", {}, h)))));
      const body = RL.el("tbody");
      for (const e of rows) {
        const radio = (which) => RL.el("input", { type: "radio", name: "eval-" + which, checked: ctx.sel[which] === e.id,
          onchange: () => { ctx.sel[which] = e.id; redraw(); } });
        body.appendChild(RL.el("tr", { dataset: { eval: e.id }, class: e.run_id ? "" : "external" },
          RL.el("td", {}, radio("a")), RL.el("td", {}, radio("b")),
          RL.el("td", { class: "num" }, e.run_id ? RL.fmt(e.step) : "external"),
          RL.el("td", { class: "ellipsis", title: e.model }, e.model), RL.el("td", { class: "num" }, RL.fmt(e.k)),
          RL.el("td", {}, e.split),
          MAIN.concat(comps).map((k) => RL.el("td", { class: "num" }, RL.fmt((e.metrics || {})[k])))));
        if ((e.findings || []).length) {
          body.appendChild(RL.el("tr", { class: "eval-findings" }, RL.el("td", { colspan: String(6 + MAIN.length + comps.length) },
            e.findings.map((f) => RL.el("div", { class: "finding-line sev-" + f.severity }, f.severity + ": " + f.title + " · " + f.summary + " → " + f.advice)))));
        }
      }
      table.appendChild(body);
      ctx.body.append(cmpBox, RL.el("h2", {}, "All evals"), table);
      redraw();
    },
  };
})();
