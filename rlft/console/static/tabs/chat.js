/* rlft console, chat tab: talk to a checkpoint of this run (its latest by default, or any model
 * the server lists) through the console's /api/chat proxy to `rlft serve`, streaming tokens as
 * they are sampled. The system prompt starts as the one the run's rollouts used. Tool calls the
 * model makes are shown, not executed (the console does not load the environment). */
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
      const problem = RL.el("div", { id: "chat-error" });
      ctx.body.append(
        RL.el("div", { class: "toolbar" }, RL.el("label", { class: "field" }, RL.el("span", {}, "model"), model), reloadModels,
          RL.el("label", { class: "field" }, RL.el("span", {}, "temperature"), temperature),
          RL.el("label", { class: "field" }, RL.el("span", {}, "max tokens"), maxTokens)),
        problem, system, log, RL.el("div", { class: "chat-input" }, input, RL.el("div", { class: "col" }, send, stop, clear)), note);

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
      async function ask() {
        const text = input.value;
        if (!text.trim() || controller) return;
        input.value = "";
        RL.clear(problem);
        history.push({ role: "user", content: text });
        log.appendChild(bubble("user", text).node);
        const answer = bubble("assistant", "");
        answer.node.classList.add("streaming");
        log.appendChild(answer.node);
        const textNode = answer.content.appendChild(document.createTextNode(""));
        const messages = (system.value.trim() ? [{ role: "system", content: system.value }] : []).concat(history);
        controller = new AbortController();
        send.disabled = true;
        stop.disabled = false;
        let finish = "", served = "";
        const calls = [];
        try {
          const resp = await fetch("/api/chat", {
            method: "POST", signal: controller.signal, headers: RL.headers({ "Content-Type": "application/json" }),
            body: JSON.stringify({ model: model.value, messages, temperature: Number(temperature.value), max_tokens: Number(maxTokens.value) }),
          });
          if (!resp.ok) {
            const body = await resp.json().catch(() => ({}));
            throw new Error(body.error || resp.status + " " + resp.statusText);
          }
          await readSSE(resp, (ev) => {
            if (ev.error) throw new Error(ev.error.message || JSON.stringify(ev.error));
            if (ev.model) served = ev.model;
            const ch = (ev.choices || [])[0];
            if (!ch) return;
            const delta = ch.delta || {};
            if (typeof delta.content === "string") { textNode.appendData(delta.content); log.scrollTop = log.scrollHeight; }
            for (const tc of delta.tool_calls || []) {
              const fn = tc.function || {};
              const i = tc.index || 0;
              calls[i] = calls[i] || { name: "", arguments: "" };
              calls[i].name += fn.name || "";
              calls[i].arguments += fn.arguments || "";
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
          answer.node.classList.remove("streaming");
        }
        calls.filter(Boolean).forEach((c) => answer.node.appendChild(RL.el("div", { class: "toolcall" },
          RL.el("div", { class: "tc-name" }, "→ tool call ", RL.el("code", {}, c.name), " (not executed in the console)"),
          RL.el("pre", { class: "tc-args" }, c.arguments))));
        answer.node.appendChild(RL.el("div", { class: "muted small done" }, [served, finish].filter(Boolean).join(" · ")));
        history.push({ role: "assistant", content: textNode.data });
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
