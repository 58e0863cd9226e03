/* rlft console, config tab: the run's resolved config (every key, as the trainer saw it), its
 * checkpoints, and the snapshot of the environment file's source taken when the run started. */
"use strict";

(function () {
  RL.tabs.config = {
    async mount(ctx) {
      const data = await RL.api("/api/runs/" + encodeURIComponent(ctx.runId) + "/config");
      const keys = Object.keys(data.config).sort();
      const filter = RL.el("input", { type: "search", id: "config-filter", placeholder: "filter keys" });
      const table = RL.el("table", { class: "grid config", id: "config-table" }, RL.el("tbody", {}, keys.map((k) =>
        RL.el("tr", { dataset: { key: k } }, RL.el("td", {}, RL.el("code", {}, k)),
          RL.el("td", {}, RL.el("code", {}, JSON.stringify(data.config[k])))))));
      filter.addEventListener("input", () => table.querySelectorAll("tr").forEach((tr) => {
        tr.hidden = !tr.dataset.key.includes(filter.value.trim());
      }));
      const lines = data.env_source ? data.env_source.split("\n") : [];
      const source = RL.el("pre", { class: "source", id: "env-source" }, lines.map((l, i) =>
        RL.el("span", { class: "line" }, RL.el("span", { class: "ln" }, String(i + 1).padStart(4) + "  "), l + "\n")));
      ctx.body.append(
        RL.el("div", { class: "two-col" },
          RL.el("div", { class: "panel" }, RL.el("h2", {}, "Resolved config"), filter, table),
          RL.el("div", { class: "panel" }, RL.el("h2", {}, "Checkpoints"),
            data.checkpoints.length ? RL.el("table", { class: "grid", id: "checkpoints" }, RL.el("tbody", {}, data.checkpoints.map((c) =>
              RL.el("tr", {}, RL.el("td", { class: "num" }, "step " + c.step), RL.el("td", {}, RL.el("code", {}, c.path)),
                RL.el("td", { class: "small" }, Object.entries(c.metrics || {}).map(([k, v]) => k + " " + RL.fmt(v)).join(" · ")))))) : RL.el("p", { class: "muted" }, "none yet"),
            RL.el("h2", {}, "Environment source" + (data.environment ? " · " + data.environment : "")),
            lines.length ? source : RL.el("p", { class: "muted" }, "No source snapshot: the environment was passed as an object, not a file."))));
    },
  };
})();
