/* rlft console, rollouts tab: browse rollouts by step with full-text search and filters (reward
 * range, a reward component's range, termination reason, example, errors), open a transcript
 * (system, user, assistant and tool messages, tool-call arguments and results, rewards per
 * component, errors with tracebacks, environment logs, the dataset row), and a per-example
 * heatmap of mean reward across steps (click a cell to filter). Every text is a text node.
 * The heatmap asks the server for the cells on screen only: at most HEAT_COLS columns (steps
 * binned when there are more) and HEAT_ROWS examples a page; a live run fetches only the columns
 * from its last one on. */
"use strict";

(function () {
  const PAGE = 50;
  const HEAT_COLS = 200, HEAT_ROWS = 64;

  function componentsOf(run) {
    return Object.keys(run.latest || {}).filter((k) => k.startsWith("reward/") && !["reward/mean", "reward/std", "reward/max"].includes(k)).map((k) => k.slice(7));
  }

  function field(label, input) { return RL.el("label", { class: "field" }, RL.el("span", {}, label), input); }

  /* -- the transcript -- */
  function args(a) {
    if (typeof a === "string") { try { return JSON.stringify(JSON.parse(a), null, 2); } catch (e) { return a; } }
    return JSON.stringify(a, null, 2);
  }

  function message(m) {
    const role = String(m.role || "?");
    const head = RL.el("div", { class: "msg-head" }, RL.el("span", { class: "role" }, role),
      m.name ? RL.el("span", { class: "muted" }, " · " + m.name) : null,
      m.tool_call_id ? RL.el("span", { class: "muted" }, " · result of " + m.tool_call_id) : null);
    const content = RL.text(m.content);
    const calls = (m.tool_calls || []).map((tc) => {
      const fn = tc.function || tc;
      return RL.el("div", { class: "toolcall" }, RL.el("div", { class: "tc-name" }, "→ tool call ", RL.el("code", {}, String(fn.name || "?")),
        tc.id ? RL.el("span", { class: "muted" }, " (" + tc.id + ")") : null),
        RL.el("pre", { class: "tc-args" }, args(fn.arguments)));
    });
    return RL.el("div", { class: "msg role-" + role.replace(/[^a-z]/g, "") },
      head, content || !calls.length ? RL.el("pre", { class: "content" }, content) : null, calls);
  }

  function fromFirstTurn(messages) {
    const i = messages.findIndex((m) => m.role === "assistant");
    return i < 0 ? [] : messages.slice(i);
  }

  function transcript(r) {
    const comps = Object.entries(r.rewards || {});
    return RL.el("div", { class: "transcript", id: "transcript", dataset: { rollout: r.id } },
      RL.el("h2", {}, "Rollout " + r.id + " · step " + r.step + " · example " + r.example_id + " · sample " + r.group_index),
      RL.el("dl", { class: "stats" },
        [["reward", RL.fmt(r.reward)], ["advantage", RL.fmt(r.advantage)], ["termination", r.termination],
          ["turns", r.turns], ["tool calls", r.tool_calls], ["prompt tokens", r.num_prompt_tokens],
          ["sampled tokens", r.num_sampled_tokens], ["policy version", r.policy_version]]
          .map(([k, v]) => RL.el("div", {}, RL.el("dt", {}, k), RL.el("dd", {}, v === null || v === undefined ? "–" : String(v))))),
      r.termination_doc ? RL.el("p", { class: "muted small" }, r.termination + ": " + r.termination_doc) : null,
      comps.length ? RL.el("table", { class: "grid components" }, RL.el("tbody", {},
        comps.map(([k, v]) => RL.el("tr", {}, RL.el("td", {}, k), RL.el("td", { class: "num" }, RL.fmt(v)))))) : null,
      (r.errors || []).length ? RL.el("div", { class: "errors" }, RL.el("h3", {}, "Errors"),
        r.errors.map((e) => RL.errorBox((e.where ? e.where + ": " : "") + e.message, e.traceback, true))) : null,
      r.prompt_text ? RL.el("details", { open: true, class: "rendered-prompt", id: "rendered-prompt" },
        RL.el("summary", {}, "prompt as the model saw it (chat template, system prompt, tool schemas)"),
        RL.el("pre", { class: "content" }, r.prompt_text)) : null,
      // with the rendered prompt shown, the messages start at the model's first turn
      RL.el("div", { class: "messages" }, (r.prompt_text ? fromFirstTurn(r.messages || []) : r.messages || []).map(message)),
      (r.logs || []).length ? RL.el("details", { open: true }, RL.el("summary", {}, "environment log"), RL.el("pre", {}, r.logs.join("\n"))) : null,
      RL.el("details", {}, RL.el("summary", {}, "dataset row"), RL.el("pre", {}, JSON.stringify(r.example, null, 2))));
  }

  /* -- the heatmap (canvas; rows examples, columns steps) -- */
  function color(t) {
    const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
    const x = Math.min(Math.max(t, 0), 1) * (stops.length - 1), i = Math.min(Math.floor(x), stops.length - 2), f = x - i;
    const c = stops[i].map((v, j) => Math.round(v + f * (stops[i + 1][j] - v)));
    return "rgb(" + c.join(",") + ")";
  }

  function heatmap(h, onPick) {
    const vals = h.values.flat().filter((v) => v !== null);
    const box = RL.el("div", { class: "heatmap", id: "heatmap" });
    if (!vals.length) return RL.append(box, [RL.el("p", { class: "muted" }, "No rollouts yet.")]);
    const lo = Math.min(...vals), hi = Math.max(...vals);
    const cw = Math.max(4, Math.min(28, Math.floor(900 / h.steps.length))), ch = Math.max(3, Math.min(16, Math.floor(360 / h.examples.length)));
    const cols = (j) => (h.bin > 1 ? "steps " + h.steps[j] + "–" + (h.steps[j] + h.bin - 1) : "step " + h.steps[j]);
    const canvas = RL.el("canvas", { width: cw * h.steps.length, height: ch * h.examples.length, dataset: { cells: vals.length } });
    const g = canvas.getContext("2d");
    h.values.forEach((row, i) => row.forEach((v, j) => {
      g.fillStyle = v === null ? "#eee" : color(hi > lo ? (v - lo) / (hi - lo) : 0.5);
      g.fillRect(j * cw, i * ch, cw - (cw > 5 ? 1 : 0), ch - (ch > 5 ? 1 : 0));
    }));
    const at = (ev) => {
      const r = canvas.getBoundingClientRect();
      const j = Math.floor((ev.clientX - r.left) / cw), i = Math.floor((ev.clientY - r.top) / ch);
      return i >= 0 && j >= 0 && i < h.examples.length && j < h.steps.length ? { i, j } : null;
    };
    canvas.addEventListener("mousemove", (ev) => {
      const p = at(ev);
      canvas.title = p ? "example " + h.examples[p.i] + ", " + cols(p.j) + ": mean reward " + RL.fmt(h.values[p.i][p.j]) +
        (h.counts ? " (" + h.counts[p.i][p.j] + " rollouts)" : "") : "";
    });
    // a column of several steps filters by the example only
    canvas.addEventListener("click", (ev) => { const p = at(ev); if (p) onPick(h.examples[p.i], h.bin > 1 ? "" : h.steps[p.j]); });
    // column labels: the step of each column (every n-th when the columns are narrow)
    const every = Math.ceil(24 / cw);
    const axis = RL.el("div", { class: "heat-axis", id: "heat-axis", style: { width: canvas.width + "px" } },
      h.steps.map((s, j) => RL.el("span", { style: { left: j * cw + "px", width: cw * every + "px" } }, j % every ? "" : String(s))));
    const total = h.examples_total ?? h.examples.length, first = (h.examples_offset || 0) + 1;
    return RL.append(box, [RL.el("div", { class: "muted small" }, h.split + " rollouts: " +
      (total > h.examples.length ? "examples " + first + "–" + (first + h.examples.length - 1) + " of " + total : h.examples.length + " examples") +
      " (rows) × " + h.steps.length + (h.bin > 1 ? " columns of " + h.bin + " steps" : " steps (columns)") +
      "; mean reward from " + RL.fmt(lo) + " (dark) to " + RL.fmt(hi) + " (light); click a cell to list its rollouts"),
      canvas, axis, RL.el("div", { class: "muted small" }, "step")]);
  }

  RL.tabs.rollouts = {
    async mount(ctx) {
      const base = "/api/runs/" + encodeURIComponent(ctx.runId);
      const f = ctx.filters = { split: "train", step: "", example: "", search: "", min_reward: "", max_reward: "", termination: "", component: "", cmin: "", cmax: "", errors: "", offset: 0 };
      const inputs = {
        split: RL.el("select", { id: "f-split" }, ["train", "eval"].map((s) => RL.el("option", { value: s }, s))),
        step: RL.el("select", { id: "f-step" }),
        search: RL.el("input", { type: "search", id: "f-search", placeholder: "full-text search" }),
        example: RL.el("input", { type: "number", id: "f-example", min: "0", class: "short" }),
        min_reward: RL.el("input", { type: "number", id: "f-min", step: "any", class: "short" }),
        max_reward: RL.el("input", { type: "number", id: "f-max", step: "any", class: "short" }),
        termination: RL.el("select", { id: "f-term" }, RL.el("option", { value: "" }, "any"),
          Object.entries(RL.info.terminations).map(([t, doc]) => RL.el("option", { value: t, title: doc }, t))),
        component: RL.el("select", { id: "f-comp" }, RL.el("option", { value: "" }, "–"), componentsOf(ctx.run).map((c) => RL.el("option", { value: c }, c))),
        cmin: RL.el("input", { type: "number", id: "f-cmin", step: "any", class: "short" }),
        cmax: RL.el("input", { type: "number", id: "f-cmax", step: "any", class: "short" }),
        errors: RL.el("select", { id: "f-errors" }, [["", "any"], ["true", "with errors"], ["false", "without"]].map(([v, l]) => RL.el("option", { value: v }, l))),
      };
      const count = RL.el("span", { class: "muted", id: "rollout-count" });
      const prev = RL.el("button", { onclick: () => { f.offset = Math.max(0, f.offset - PAGE); load(); } }, "‹ prev");
      const next = RL.el("button", { onclick: () => { f.offset += PAGE; load(); } }, "next ›");
      const list = RL.el("table", { class: "grid rollouts", id: "rollout-list" });
      const detail = RL.el("div", { class: "detail", id: "rollout-detail" }, RL.el("p", { class: "muted" }, "Click a rollout to read its transcript."));
      const heatSplit = RL.el("select", { id: "heat-split", onchange: () => { heatOffset = 0; loadHeat(false); } },
        [["auto", "split with data across steps"], ["train", "train"], ["eval", "eval (held-out)"]].map(([v, l]) => RL.el("option", { value: v }, l)));
      let heatOffset = 0, heatData = null;
      const heatPrev = RL.el("button", { id: "heat-prev", onclick: () => { heatOffset = Math.max(0, heatOffset - HEAT_ROWS); loadHeat(); } }, "‹ examples");
      const heatNext = RL.el("button", { id: "heat-next", onclick: () => { heatOffset += HEAT_ROWS; loadHeat(); } }, "examples ›");
      const heat = RL.el("details", { open: true, class: "panel" }, RL.el("summary", {}, "Reward per example across steps"), heatSplit, " ", heatPrev, heatNext);
      ctx.body.append(
        RL.el("div", { class: "filters" }, field("split", inputs.split), field("step", inputs.step), field("search", inputs.search),
          field("example", inputs.example), field("reward ≥", inputs.min_reward), field("reward ≤", inputs.max_reward),
          field("termination", inputs.termination), field("component", inputs.component), field("≥", inputs.cmin), field("≤", inputs.cmax),
          field("errors", inputs.errors), RL.el("button", { id: "f-reset", onclick: reset }, "reset")),
        heat, RL.el("div", { class: "toolbar" }, count, prev, next), RL.el("div", { class: "split-view" }, RL.el("div", { class: "list-box" }, list), detail));

      async function loadSteps() {
        const steps = await RL.api(base + "/steps", { split: f.split });
        RL.clear(inputs.step);
        RL.append(inputs.step, [RL.el("option", { value: "" }, "all"), steps.map((s) => RL.el("option", { value: String(s) }, String(s)))]);
        inputs.step.value = steps.includes(Number(f.step)) ? f.step : "";
        f.step = inputs.step.value;
      }
      /* the cells on screen; live (`newer`): only the columns from the last one shown on, merged */
      async function loadHeat(newer) {
        // the split whose examples were sampled at several steps, unless one is picked here
        const q = { split: heatSplit.value, max_cols: HEAT_COLS, examples_offset: heatOffset, examples_limit: HEAT_ROWS };
        const old = heatData;
        if (newer && old && old.last_step !== null) Object.assign(q, { split: old.split, since_step: old.last_step, bin: old.bin });
        let h = await RL.api(base + "/heatmap", q);
        if (h.since_step !== undefined) {
          if (JSON.stringify(h.examples) !== JSON.stringify(old.examples)) return loadHeat(false);  // new examples in this page
          const keep = old.steps.filter((s) => s < h.since_step).length;
          h = Object.assign({}, h, { steps: old.steps.slice(0, keep).concat(h.steps),
            values: old.values.map((row, i) => row.slice(0, keep).concat(h.values[i])),
            counts: old.counts.map((row, i) => row.slice(0, keep).concat(h.counts[i])) });
        }
        heatData = h;
        heatPrev.disabled = heatOffset === 0;
        heatNext.disabled = heatOffset + HEAT_ROWS >= (h.examples_total || 0);
        if (heatSplit.value === "auto") heatSplit.dataset.shown = h.split;
        heat.querySelectorAll(".heatmap").forEach((n) => n.remove());
        heat.appendChild(heatmap(h, (example, step) => { inputs.example.value = example; inputs.step.value = String(step); apply(); }));
      }
      async function load() {
        const q = Object.assign({}, f, { limit: PAGE });
        const page = await RL.api(base + "/rollouts", q);
        count.textContent = page.total + " rollouts" + (page.total > PAGE ? " · showing " + (f.offset + 1) + "–" + Math.min(f.offset + PAGE, page.total) : "") + (page.truncated ? " (scan limit reached)" : "");
        prev.disabled = f.offset === 0;
        next.disabled = f.offset + PAGE >= page.total;
        RL.clear(list);
        list.appendChild(RL.el("thead", {}, RL.el("tr", {}, ["id", "step", "example", "#", "reward", "components", "termination", "turns", "tools", "errors", "answer"].map((h) => RL.el("th", {}, h)))));
        const body = RL.el("tbody");
        for (const r of page.items) {
          body.appendChild(RL.el("tr", { class: "clickable" + (r.errors ? " has-errors" : ""), dataset: { rollout: r.id }, onclick: () => open(r.id) },
            RL.el("td", { class: "num" }, r.id), RL.el("td", { class: "num" }, r.step), RL.el("td", { class: "num" }, r.example_id),
            RL.el("td", { class: "num" }, r.group_index), RL.el("td", { class: "num" }, RL.fmt(r.reward)),
            RL.el("td", { class: "small" }, Object.entries(r.rewards || {}).map(([k, v]) => k + " " + RL.fmt(v, 2)).join(" · ")),
            RL.el("td", { title: RL.info.terminations[r.termination] || "" }, r.termination || "–"),
            RL.el("td", { class: "num" }, r.turns), RL.el("td", { class: "num" }, r.tool_calls),
            RL.el("td", { class: "num" }, r.errors || ""), RL.el("td", { class: "preview" }, r.answer)));
        }
        list.appendChild(body);
      }
      async function open(id) {
        list.querySelectorAll("tr.selected").forEach((tr) => tr.classList.remove("selected"));
        const tr = list.querySelector('tr[data-rollout="' + Number(id) + '"]');
        if (tr) tr.classList.add("selected");
        const r = await RL.api(base + "/rollouts/" + Number(id));
        RL.clear(detail).appendChild(transcript(r));
        history.replaceState(null, "", "#/run/" + encodeURIComponent(ctx.runId) + "/rollouts/" + Number(id));
      }
      async function apply() {
        const splitChanged = f.split !== inputs.split.value;
        for (const k of Object.keys(inputs)) f[k] = inputs[k].value.trim();
        f.offset = 0;
        if (splitChanged) { await loadSteps(); heatOffset = 0; await loadHeat(); }
        await load();
      }
      function reset() {
        for (const [k, el] of Object.entries(inputs)) el.value = k === "split" ? "train" : "";
        apply();
      }
      const soon = RL.debounce(apply, 300);
      Object.values(inputs).forEach((el) => el.addEventListener(el.tagName === "SELECT" ? "change" : "input", el.tagName === "SELECT" ? apply : soon));
      ctx.reload = async (live) => { await loadSteps(); await loadHeat(live); await load(); };
      await ctx.reload(false);
      if (ctx.arg && /^\d+$/.test(ctx.arg)) await open(Number(ctx.arg));
    },

    async refresh(ctx) {
      await ctx.reload(true);
    },
  };
})();
