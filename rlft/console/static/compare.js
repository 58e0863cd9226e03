/* rlft console, compare page: several runs overlaid on the same charts (one chart per metric,
 * one line per run, EMA smoothing), their latest values side by side, and the config keys
 * whose values differ between them, and each run's health findings side by side. Runs are picked here or with "Compare selected" on the
 * runs list; the choice lives in the address (#/compare/a,b). */
"use strict";

(function () {
  const MAX_POINTS = 300;  // per run and metric: the series come downsampled (mean, min, max per bucket)
  const DEFAULT_KEYS = ["reward/mean", "pass@k", "max@k", "response/length", "loss/policy", "loss/kl", "policy/entropy", "optim/grad_norm", "eval/reward/mean"];

  RL.comparePage = async function (view, ids) {
    const runs = await RL.api("/api/runs");
    const picked = new Set(ids);
    const picker = RL.el("div", { class: "picker", id: "compare-picker" }, runs.map((r) => RL.el("label", {},
      RL.el("input", { type: "checkbox", value: r.id, checked: picked.has(r.id), onchange: (ev) => {
        ev.target.checked ? picked.add(r.id) : picked.delete(r.id);
        location.hash = "#/compare/" + [...picked].map(encodeURIComponent).join(",");
      } }), " ", r.name || r.id, " ", RL.badge(r.status))));
    view.append(RL.el("h1", {}, "Compare runs"), picker);
    if (picked.size < 1) {
      view.appendChild(RL.el("p", { class: "muted" }, "Pick runs to overlay their metrics."));
      return;
    }
    // only the charted metrics' series are fetched (downsampled); the reply names every metric
    const saved = JSON.parse(localStorage.getItem("rlft_compare_keys") || "null");
    const fetchData = (keys) => RL.api("/api/compare", { runs: [...picked].join(","), max_points: MAX_POINTS, keys: [...keys].join(",") || "-" });
    let data = await fetchData(saved || DEFAULT_KEYS);
    const names = data.runs.map((r) => r.name || r.id);
    const allKeys = [...new Set(Object.values(data.keys).flat())].sort();
    const chosen = new Set((saved || DEFAULT_KEYS).filter((k) => allKeys.includes(k)));
    if (!chosen.size) {
      allKeys.slice(0, 4).forEach((k) => chosen.add(k));
      data = await fetchData(chosen);
    }
    const keySel = RL.el("select", { id: "compare-add" }, RL.el("option", { value: "" }, "add a metric…"), allKeys.map((k) => RL.el("option", { value: k }, k)));
    const grid = RL.el("div", { class: "charts", id: "compare-charts" });
    let charts = [];
    const smooth = RL.smoothing((a) => charts.forEach((c) => c.update(null, a)));

    function draw() {
      charts.forEach((c) => c.destroy());
      RL.clear(grid);
      charts = [...chosen].map((k) => {
        const c = RL.lineChart(grid, k, names, data.runs.map((r) => data.metrics[r.id][k] || []), smooth.value());
        c.box = c.u.root.parentNode;
        c.box.appendChild(RL.el("button", { class: "close", title: "remove this chart", onclick: () => { chosen.delete(k); save(); draw(); } }, "×"));
        return c;
      });
    }
    function save() { localStorage.setItem("rlft_compare_keys", JSON.stringify([...chosen])); }
    keySel.addEventListener("change", async () => {
      if (!keySel.value) return;
      chosen.add(keySel.value);
      keySel.value = "";
      save();
      data.metrics = (await fetchData(chosen)).metrics;
      draw();
    });

    const latestKeys = ["reward/mean", "pass@k", "max@k", "solve_rate", "eval/reward/mean", "eval/pass@k", "response/length"]
      .filter((k) => data.runs.some((r) => r.latest[k] !== undefined));
    const summary = RL.el("table", { class: "grid", id: "compare-summary" },
      RL.el("thead", {}, RL.el("tr", {}, RL.el("th", {}, ""), data.runs.map((r) => RL.el("th", {}, RL.el("a", { href: "#/run/" + encodeURIComponent(r.id) + "/train" }, r.name || r.id))))),
      RL.el("tbody", {}, [["status", (r) => RL.statusCell(r)],
        ["health", (r) => RL.el("div", { class: "findings-cell", dataset: { run: r.id } }, (r.findings || []).length
          ? r.findings.map((f) => RL.health.chip(r.id, f)) : RL.el("span", { class: "finding sev-ok" }, "no findings"))], ["model", (r) => r.model], ["environment", (r) => r.environment], ["step", (r) => String(r.step)],
        ...latestKeys.map((k) => [k, (r) => RL.fmt(r.latest[k])])].map(([label, f]) => RL.el("tr", {}, RL.el("td", {}, label), data.runs.map((r) => RL.el("td", {}, f(r)))))));
    const diffKeys = Object.keys(data.config_diff);
    const diff = RL.el("table", { class: "grid", id: "config-diff" },
      RL.el("thead", {}, RL.el("tr", {}, RL.el("th", {}, "config key"), names.map((n) => RL.el("th", {}, n)))),
      RL.el("tbody", {}, diffKeys.map((k) => RL.el("tr", { dataset: { key: k } }, RL.el("td", {}, RL.el("code", {}, k)),
        data.runs.map((r) => RL.el("td", {}, RL.el("code", {}, JSON.stringify(data.config_diff[k][r.id]))))))));
    view.append(RL.el("div", { class: "toolbar" }, keySel, smooth.node), grid,
      RL.el("div", { class: "two-col" },
        RL.el("div", { class: "panel" }, RL.el("h2", {}, "Latest values"), summary),
        RL.el("div", { class: "panel" }, RL.el("h2", {}, "Config differences (" + diffKeys.length + ")"), diffKeys.length ? diff : RL.el("p", { class: "muted" }, "same config"))));
    draw();
    RL.poll(async () => {
      if (!data.runs.some((r) => r.status === "running" || r.status === "created")) return;
      const fresh = await fetchData(chosen);
      if (JSON.stringify(fresh.metrics) === JSON.stringify(data.metrics)) return;
      data.metrics = fresh.metrics;
      data.runs.forEach((r, i) => { r.status = fresh.runs[i].status; });
      charts.forEach((c, i) => c.update(data.runs.map((r) => data.metrics[r.id][c.title] || []), smooth.value()));
    });
  };
})();
