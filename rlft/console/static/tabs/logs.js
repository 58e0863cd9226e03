/* rlft console, logs tab: the run's failure (if any), counts of rollouts by termination reason
 * (train and eval, with what each reason means), rollouts that recorded errors (click to read
 * the transcript), and the log stream (level filter, text filter, tracebacks), tailed while
 * the run trains. */
"use strict";

(function () {
  function counts(title, byReason, id) {
    const total = Object.values(byReason).reduce((a, b) => a + b, 0);
    const rows = Object.entries(byReason).sort((a, b) => b[1] - a[1]);
    return RL.el("div", { class: "panel" }, RL.el("h3", {}, title + " (" + total + " rollouts)"),
      rows.length ? RL.el("table", { class: "grid bars", id }, RL.el("tbody", {}, rows.map(([reason, n]) =>
        RL.el("tr", { dataset: { reason: String(reason) } },
          RL.el("td", { title: RL.info.terminations[reason] || "" }, String(reason === "null" ? "(none)" : reason)),
          RL.el("td", { class: "bar-col" }, RL.el("div", { class: "bar a", style: { width: (100 * n / total).toFixed(1) + "%" } })),
          RL.el("td", { class: "num" }, n + " (" + (100 * n / total).toFixed(0) + "%)"),
          RL.el("td", { class: "muted small" }, RL.info.terminations[reason] || ""))))) : RL.el("p", { class: "muted" }, "none"));
  }

  function logRow(l) {
    return RL.el("div", { class: "log lv-" + String(l.level).replace(/[^a-z]/g, ""), dataset: { id: l.id } },
      RL.el("div", { class: "log-head" }, RL.el("span", { class: "lv" }, l.level), " ",
        RL.el("span", { class: "muted" }, RL.time(l.ts) + (l.step !== null && l.step !== undefined ? " · step " + l.step : "") + (l.source ? " · " + l.source : ""))),
      RL.el("pre", { class: "log-msg" }, l.message),
      l.traceback ? RL.el("details", { open: l.level === "error" || l.level === "critical" }, RL.el("summary", {}, "traceback"), RL.el("pre", { class: "tb" }, l.traceback)) : null);
  }

  RL.tabs.logs = {
    async mount(ctx) {
      const base = "/api/runs/" + encodeURIComponent(ctx.runId);
      const level = RL.el("select", { id: "log-level" }, ["", "info", "warning", "error"].map((l) => RL.el("option", { value: l }, l || "all levels")));
      const text = RL.el("input", { type: "search", id: "log-filter", placeholder: "filter log text" });
      const termBox = RL.el("div", { class: "two-col", id: "terminations" });
      const errBox = RL.el("div", { class: "panel", id: "rollout-errors" });
      const stream = RL.el("div", { class: "logs", id: "log-list" });
      ctx.body.append(termBox, errBox, RL.el("h2", {}, "Log"), RL.el("div", { class: "toolbar" }, level, text), stream);
      let lastId = 0;
      const visible = (row) => !text.value || row.textContent.toLowerCase().includes(text.value.toLowerCase());
      text.addEventListener("input", () => stream.querySelectorAll(".log").forEach((r) => { r.hidden = !visible(r); }));

      async function summary() {
        const data = await RL.api(base + "/logs", { limit: 1 });
        RL.clear(termBox).append(counts("Train rollouts by termination", data.terminations.train, "term-train"),
          counts("Eval rollouts by termination", data.terminations.eval, "term-eval"));
        const bad = await RL.api(base + "/rollouts", { split: "all", errors: "true", limit: 20 });
        RL.clear(errBox).append(RL.el("h3", {}, "Rollouts with errors (" + bad.total + ")"),
          bad.items.length ? RL.el("ul", { class: "plain" }, bad.items.map((r) => RL.el("li", {},
            RL.el("a", { href: "#/run/" + encodeURIComponent(ctx.runId) + "/rollouts/" + Number(r.id) },
              r.split + " step " + r.step + ", example " + r.example_id + " #" + r.group_index),
            " · " + (r.termination || "") + " · " + r.errors + " error(s)"))) : RL.el("p", { class: "muted" }, "none"));
      }
      async function tail(reset) {
        if (reset) { lastId = 0; RL.clear(stream); }
        const data = await RL.api(base + "/logs", { level: level.value, after_id: lastId, limit: 1000 });
        for (const l of data.logs) {
          const row = logRow(l);
          row.hidden = !visible(row);
          stream.appendChild(row);
          lastId = Math.max(lastId, l.id);
        }
        if (!stream.children.length) stream.appendChild(RL.el("p", { class: "muted empty" }, "No log lines."));
        else stream.querySelectorAll(".empty").forEach((n) => n.remove());
      }
      level.addEventListener("change", () => tail(true));
      ctx.reload = async () => { await summary(); await tail(false); };
      await summary();
      await tail(true);
    },

    async refresh(ctx) { await ctx.reload(); },
  };
})();
