/* rlft console, chat tab: talk to a checkpoint of this run (its latest by default, or any model
 * the server lists) through the console's /api/chat proxy to `rlft serve`, streaming tokens as
 * they are sampled. The system prompt starts as the one the run's rollouts used. The console
 * runs the environment's tools: each tool call and its result appear in the transcript, then
 * the model's next turn (up to the environment's max_turns). If the environment cannot be
 * loaded the chat is plain and the note says why. Every text goes in with textContent. */
"use strict";

(function () {
  function bubble(role, text) {
    const content = RL.el("pre", { class: "content" }, text || "");
    const node = RL.el("div", { class: "msg role-" + role }, RL.el("div", { class: "msg-head" }, RL.el("span", { class: "role" }, role)), content);
    return { node, content };
  }

  async function readSSE(resp, onEvent) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i).replace(/\r$/, "");
        buf = buf.slice(i + 1);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        try { onEvent(JSON.parse(data)); } catch (e) { if (e instanceof SyntaxError) continue; throw e; }
      }
    }
  }

  RL.tabs.chat = {
    async mount(ctx) {
      const base = "/api/runs/" + encodeURIComponent(ctx.runId);
      const history = (ctx.history = []);
      const model = RL.el("select", { id: "chat-model" });
      const reloadModels = RL.el("button", { title: "list the server's models again" }, "↻");
      const temperature = RL.el("input", { type: "number", id: "chat-temp", min: "0", max: "2", step: "0.1", value: "0.7", class: "short" });
      const maxTokens = RL.el("input", { type: "number", id: "chat-max", min: "1", step: "1", value: "256", class: "short" });
      const system = RL.el("textarea", { id: "chat-system", rows: 2, placeholder: "system prompt (optional)" });
      const log = RL.el("div", { class: "chat-log messages", id: "chat-log" });
      const input = RL.el("textarea", { id: "chat-input", rows: 3, placeholder: "Message the model… (Enter sends, Shift+Enter for a new line)" });
      const send = RL.el("button", { id: "chat-send", class: "primary" }, "Send");
      const stop = RL.el("button", { id: "chat-stop", disabled: true }, "Stop");
      const clear = RL.el("button", { id: "chat-clear" }, "New chat");
      const note = RL.el("div", { id: "chat-note", class: "muted small" });
      const envNote = RL.el("div", { id: "chat-env", class: "muted small" });
      const problem = RL.el("div", { id: "chat-error" });
      ctx.body.append(
        RL.el("div", { class: "toolbar" }, RL.el("label", { class: "field" }, RL.el("span", {}, "model"), model), reloadModels,
          RL.el("label", { class: "field" }, RL.el("span", {}, "temperature"), temperature),
          RL.el("label", { class: "field" }, RL.el("span", {}, "max tokens"), maxTokens)),
        problem, system, log, RL.el("div", { class: "chat-input" }, input, RL.el("div", { class: "col" }, send, stop, clear)), note, envNote);

      async function loadModels() {
        RL.clear(problem);
        try {
          const data = await RL.api("/api/chat/models", { run: ctx.runId });
          RL.clear(model);
          data.models.forEach((m) => model.appendChild(RL.el("option", { value: m }, m)));
          if (data.default) model.value = data.default;
          note.textContent = "server: " + data.serve_url + (data.models.length ? "" : " (it lists no models)");
        } catch (e) {
          problem.appendChild(RL.errorBox("Chat is unavailable: " + e.message));
        }
      }
      reloadModels.addEventListener("click", loadModels);

      let controller = null;
      function assistantBubble() {
        const answer = bubble("assistant", "");
        answer.node.classList.add("streaming");
        log.appendChild(answer.node);
        answer.text = answer.content.appendChild(document.createTextNode(""));
        answer.calls = [];
        return answer;
      }
      function showCall(answer, ev) {
        answer.node.appendChild(RL.el("div", { class: "toolcall" },
          RL.el("div", { class: "tc-name" }, "→ tool call ", RL.el("code", {}, String(ev.name || "")),
            ev.run === false ? " (not executed: no environment)" : ""),
          RL.el("pre", { class: "tc-args" }, String(ev.arguments || ""))));
      }
      function showResult(ev) {
        const b = bubble("tool", String(ev.content || ""));
        b.node.classList.add("tool-result");
        b.node.querySelector(".msg-head").appendChild(RL.el("span", { class: "tc-name" }, " " + String(ev.name || "") + (ev.error ? " · error: " + String(ev.error) : "")));
        log.appendChild(b.node);
      }
      async function ask() {
        const text = input.value;
        if (!text.trim() || controller) return;
        input.value = "";
        RL.clear(problem);
        history.push({ role: "user", content: text });
        log.appendChild(bubble("user", text).node);
        let answer = assistantBubble();
        const messages = (system.value.trim() ? [{ role: "system", content: system.value }] : []).concat(history);
        controller = new AbortController();
        send.disabled = true;
        stop.disabled = false;
        let finish = "", served = "", added = null, stopped = "";
        const turns = [answer];
        try {
          const resp = await fetch("/api/chat", {
            method: "POST", signal: controller.signal, headers: RL.headers({ "Content-Type": "application/json" }),
            body: JSON.stringify({ model: model.value, run: ctx.runId, messages, temperature: Number(temperature.value), max_tokens: Number(maxTokens.value) }),
          });
          if (!resp.ok) {
            const body = await resp.json().catch(() => ({}));
            throw new Error(body.error || resp.status + " " + resp.statusText);
          }
          await readSSE(resp, (ev) => {
            if (ev.error) throw new Error(ev.error.message || JSON.stringify(ev.error));
            if (ev.rlft) {
              const r = ev.rlft;
              if (r.type === "env") envNote.textContent = String(r.message || "");
              else if (r.type === "tool_call") { answer.calls.push(r); showCall(answer, r); }
              else if (r.type === "tool_result") showResult(r);
              else if (r.type === "turn") {
                answer.node.classList.remove("streaming");
                answer = assistantBubble();
                turns.push(answer);
              } else if (r.type === "done") { added = r.messages || []; stopped = r.stopped || ""; }
              log.scrollTop = log.scrollHeight;
              return;
            }
            if (ev.model) served = ev.model;
            const ch = (ev.choices || [])[0];
            if (!ch) return;
            const delta = ch.delta || {};
            if (typeof delta.content === "string") { answer.text.appendData(delta.content); log.scrollTop = log.scrollHeight; }
            for (const tc of delta.tool_calls || []) {
              const fn = tc.function || {};
              const i = tc.index || 0;
              answer.raw = answer.raw || [];
              answer.raw[i] = answer.raw[i] || { name: "", arguments: "" };
              answer.raw[i].name += fn.name || "";
              answer.raw[i].arguments += typeof fn.arguments === "string" ? fn.arguments : "";
            }
            if (ch.finish_reason) finish = ch.finish_reason;
          });
        } catch (e) {
          if (e.name !== "AbortError") problem.appendChild(RL.errorBox("Chat failed: " + e.message));
          else finish = "stopped";
        } finally {
          controller = null;
          send.disabled = false;
          stop.disabled = true;
          turns.forEach((t) => t.node.classList.remove("streaming"));
        }
        // calls the server did not run (no environment) are still shown
        if (!answer.calls.length) (answer.raw || []).filter(Boolean).forEach((c) => showCall(answer, { name: c.name, arguments: c.arguments, run: false }));
        answer.node.appendChild(RL.el("div", { class: "muted small done" }, [served, finish, stopped].filter(Boolean).join(" · ")));
        if (added) added.forEach((m) => history.push(m));
        else history.push({ role: "assistant", content: answer.text.data });
      }
      send.addEventListener("click", ask);
      stop.addEventListener("click", () => controller && controller.abort());
      clear.addEventListener("click", () => { history.length = 0; RL.clear(log); });
      input.addEventListener("keydown", (ev) => { if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); ask(); } });
      RL.cleanup.push(() => controller && controller.abort());

      await loadModels();
      try {  // start from the system prompt the run's rollouts used
        const page = await RL.api(base + "/rollouts", { split: "all", limit: 1 });
        if (page.items.length) {
          const r = await RL.api(base + "/rollouts/" + Number(page.items[0].id));
          const first = (r.messages || [])[0];
          if (first && first.role === "system" && !system.value) system.value = RL.text(first.content);
        }
      } catch (e) { /* no rollouts yet */ }
    },
  };
})();
