"""The built-in trace adapters: OpenAI chat completions, OpenAI Responses, Anthropic Messages.

Each turns one logged record (one JSONL line) into OpenAI-format transcripts
(``rlft.sft.Transcript``). A record is ``{"request": ..., "response": ...}`` or flat (the request's
fields and the response's side by side, or a chat whose last message is the assistant's); the
shapes are those the SDKs' own types dump (``ChatCompletion``, ``Response``, ``Message``, and
the request params), ``None`` fields included. Conversions:

Every adapter writes a tool-call-only assistant turn with ``content: ""`` (templates concatenate it).

- OpenAI chat: ``developer`` -> ``system``; text content parts are joined; the final assistant
  message is the response's ``choices[0].message`` (a refusal counts as its text).
- OpenAI Responses: ``instructions`` -> system; ``message`` items -> messages; consecutive
  ``function_call`` items join the assistant message before them as ``tool_calls``;
  ``function_call_output`` -> ``tool`` messages; ``reasoning`` items are dropped.
- Anthropic: ``system`` -> system; ``text`` blocks joined; ``tool_use`` -> ``tool_calls``
  (``input`` as JSON text); each ``tool_result`` -> a ``tool`` message (before the user's text
  in the same message); ``thinking`` blocks dropped; ``input_schema`` -> ``parameters``.

Left out, with a :class:`TraceError` naming the field: images, audio, files, hosted/server
tools (web search, code interpreter, ...), custom (free-text) tools, legacy ``function_call``.
Tool definitions of hosted tools are dropped silently (the transcript never calls them).
"""

from __future__ import annotations

import json
from typing import Any

from rlft.sft.transcripts import Transcript


class TraceError(ValueError):
    """A record an adapter cannot convert; the message names the field and why."""


def _clean(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def split_record(record: dict) -> tuple[dict, dict]:
    """(request, response) of a logged call; a flat record is both. A batch-API response keeps
    the completion under ``body``."""
    if isinstance(record.get("request"), dict) or isinstance(record.get("response"), dict):
        req, resp = record.get("request") or {}, record.get("response") or {}
        if isinstance(resp.get("body"), dict):
            resp = resp["body"]
        return req, resp
    return record, record


def _join_text(content: Any, where: str, text_types: tuple[str, ...]) -> str | None:
    """Content as one string: a string, None, or a list of text parts (joined, as the APIs do)."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise TraceError(f"{where}: expected a string or a list of content parts, got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in text_types:
            raise TraceError(f"{where}[{j}]: {kind!r} content cannot be trained on by a text model; only text")
        texts.append(part.get("text") or part.get("refusal") or "")
    return "".join(texts)


def _function_tool(name: Any, description: Any, parameters: Any) -> dict:
    return {"type": "function",
            "function": _clean({"name": name, "description": description, "parameters": parameters})}


def _meta(adapter: str, req: dict, resp: dict) -> dict:
    return _clean({"format": adapter, "id": resp.get("id"), "model": resp.get("model") or req.get("model")})


# -- OpenAI chat completions ------------------------------------------------------------------


class OpenAIChatAdapter:
    name = "openai-chat"
    _TEXT = ("text", "refusal")

    def matches(self, record: dict) -> bool:
        req, resp = split_record(record)
        return isinstance(req.get("messages"), list) or isinstance(resp.get("choices"), list)

    def _message(self, m: Any, where: str) -> dict:
        if not isinstance(m, dict):
            raise TraceError(f"{where}: expected a message object, got {type(m).__name__}")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant", "tool"):
            raise TraceError(f"{where}.role: {m.get('role')!r} is not supported "
                             "(system, developer, user, assistant, tool)")
        if m.get("function_call"):
            raise TraceError(f"{where}.function_call: legacy function calls are not supported; log tool_calls")
        out: dict[str, Any] = {"role": role, "content": _join_text(m.get("content"), f"{where}.content", self._TEXT)}
        if role == "assistant":
            if out["content"] is None and m.get("refusal"):
                out["content"] = m["refusal"]
            calls = []
            for j, tc in enumerate(m.get("tool_calls") or []):
                if tc.get("type", "function") != "function":
                    raise TraceError(f"{where}.tool_calls[{j}]: {tc.get('type')!r} tool calls are not supported")
                calls.append({"id": tc.get("id"), "type": "function",
                              "function": {"name": tc["function"].get("name"),
                                           "arguments": tc["function"].get("arguments")}})
            if calls:
                out["tool_calls"] = calls
        if role == "tool":
            out["tool_call_id"] = m.get("tool_call_id")
        if out["content"] is None:  # "" rather than absent: templates concatenate content
            out["content"] = ""
        return _clean(out)

    def to_transcripts(self, record: dict) -> list[Transcript]:
        req, resp = split_record(record)
        messages = [self._message(m, f"messages[{i}]") for i, m in enumerate(req.get("messages") or [])]
        choices = resp.get("choices") or []
        if choices:  # the response's reply (a flat record may instead end its messages with it)
            messages.append(self._message(choices[0].get("message"), "response.choices[0].message"))
        tools = [_function_tool(t["function"].get("name"), t["function"].get("description"),
                                t["function"].get("parameters"))
                 for t in req.get("tools") or []
                 if t.get("type", "function") == "function" and isinstance(t.get("function"), dict)]
        return [Transcript(messages, tools or None, _meta(self.name, req, resp))]


# -- OpenAI Responses -------------------------------------------------------------------------


class OpenAIResponsesAdapter:
    name = "openai-responses"
    _TEXT = ("input_text", "output_text", "text", "refusal")

    def matches(self, record: dict) -> bool:
        req, resp = split_record(record)
        return resp.get("object") == "response" or isinstance(resp.get("output"), list) or "input" in req

    def _items(self, items: list, where: str, messages: list[dict]) -> None:
        for i, item in enumerate(items):
            at = f"{where}[{i}]"
            if not isinstance(item, dict):
                raise TraceError(f"{at}: expected an item object, got {type(item).__name__}")
            kind = item.get("type", "message" if "role" in item else None)
            if kind == "message":
                role = {"developer": "system"}.get(item.get("role"), item.get("role"))
                if role not in ("system", "user", "assistant"):
                    raise TraceError(f"{at}.role: {item.get('role')!r} is not supported")
                messages.append({"role": role,
                                 "content": _join_text(item.get("content"), f"{at}.content", self._TEXT) or ""})
            elif kind == "function_call":
                call = {"id": item.get("call_id"), "type": "function",
                        "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":  # one model turn: text, then its calls
                    last.setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            elif kind == "function_call_output":
                output = _join_text(item.get("output"), f"{at}.output", self._TEXT)
                messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": output or ""})
            elif kind == "reasoning":
                continue  # summaries of hidden reasoning are not what the model emitted
            else:
                raise TraceError(f"{at}.type: {kind!r} items are not supported (hosted tools, images, references)")

    def to_transcripts(self, record: dict) -> list[Transcript]:
        req, resp = split_record(record)
        messages: list[dict] = []
        instructions = resp.get("instructions") or req.get("instructions")
        if isinstance(instructions, str):
            messages.append({"role": "system", "content": instructions})
        elif isinstance(instructions, list):
            self._items(instructions, "instructions", messages)
        inp = req.get("input")
        if isinstance(inp, str):
            messages.append({"role": "user", "content": inp})
        elif isinstance(inp, list):
            self._items(inp, "input", messages)
        self._items(resp.get("output") or [], "response.output", messages)
        tools = [_function_tool(t.get("name"), t.get("description"), t.get("parameters"))
                 for t in (resp.get("tools") or req.get("tools") or []) if t.get("type") == "function"]
        return [Transcript(messages, tools or None, _meta(self.name, req, resp))]


# -- Anthropic Messages -----------------------------------------------------------------------


class AnthropicAdapter:
    name = "anthropic"
    _TEXT = ("text",)

    def matches(self, record: dict) -> bool:
        req, resp = split_record(record)
        if resp.get("type") == "message" and isinstance(resp.get("content"), list):
            return True
        if any(isinstance(t, dict) and "input_schema" in t for t in req.get("tools") or []):
            return True
        blocks = [b for m in req.get("messages") or [] if isinstance(m, dict) and isinstance(m.get("content"), list)
                  for b in m["content"] if isinstance(b, dict)]
        return "system" in req or any(b.get("type") in ("tool_use", "tool_result", "thinking") for b in blocks)

    def _assistant(self, content: Any, where: str) -> dict:
        if isinstance(content, str):
            return {"role": "assistant", "content": content}
        texts, calls = [], []
        for j, b in enumerate(content or []):
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "text":
                texts.append(b.get("text") or "")
            elif kind == "tool_use":
                calls.append({"id": b.get("id"), "type": "function",
                              "function": {"name": b.get("name"), "arguments": json.dumps(b.get("input") or {})}})
            elif kind in ("thinking", "redacted_thinking"):
                continue  # not part of what a non-Anthropic model is taught to emit
            else:
                raise TraceError(f"{where}[{j}].type: {kind!r} blocks are not supported (server tools, images)")
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
        if calls:
            msg["tool_calls"] = calls
        return msg

    def _user(self, content: Any, where: str) -> list[dict]:
        if isinstance(content, str):
            return [{"role": "user", "content": content}]
        tool_msgs, texts = [], []
        for j, b in enumerate(content or []):
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "tool_result":
                text = _join_text(b.get("content"), f"{where}[{j}].content", self._TEXT) or ""
                tool_msgs.append({"role": "tool", "tool_call_id": b.get("tool_use_id"), "content": text})
            elif kind == "text":
                texts.append(b.get("text") or "")
            else:
                raise TraceError(f"{where}[{j}].type: {kind!r} blocks cannot be trained on by a text model")
        return tool_msgs + ([{"role": "user", "content": "\n".join(texts)}] if texts else [])

    def to_transcripts(self, record: dict) -> list[Transcript]:
        req, resp = split_record(record)
        messages: list[dict] = []
        system = req.get("system")
        if system:
            messages.append({"role": "system", "content": _join_text(system, "system", self._TEXT)})
        for i, m in enumerate(req.get("messages") or []):
            where = f"messages[{i}].content"
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
                raise TraceError(f"messages[{i}]: expected a user or assistant message")
            if m["role"] == "assistant":
                messages.append(self._assistant(m.get("content"), where))
            else:
                messages += self._user(m.get("content"), where)
        if isinstance(resp.get("content"), list) and (resp is not req or resp.get("type") == "message"):
            messages.append(self._assistant(resp["content"], "response.content"))
        tools = [_function_tool(t.get("name"), t.get("description"), t.get("input_schema"))
                 for t in req.get("tools") or [] if t.get("type") in (None, "custom") and "input_schema" in t]
        return [Transcript(messages, tools or None, _meta(self.name, req, resp))]
