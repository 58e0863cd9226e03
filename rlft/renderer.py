"""Chat rendering, tool-call parsing and the token bookkeeping of multi-turn rollouts.

A ``Renderer`` wraps a tokenizer and its chat template. It renders the initial prompt to token
ids, parses sampled assistant text into content + tool calls, and renders what comes after an
assistant turn (tool results, a simulated user's reply, the next generation prompt) as tokens
to *append* to the sampled ones. The sampled tokens themselves are never re-rendered or
re-tokenized, so the sequence trained on is exactly the one sampled.

How the appended tokens are found: render the conversation up to and including the assistant
turn, render it again with the new messages and the generation prompt, and tokenize only the
text difference. The template's own end of an assistant turn (``<|im_end|>\\n`` in ChatML) is
split into the end-of-turn token, which the model sampled, and the "glue" after it (``\\n``),
which the renderer adds. Templates that are not prefix-stable (some drop earlier reasoning)
fall back to rendering the new messages after a fixed dummy exchange.

Tool schemas go to the template through ``tools=`` when the template uses them; otherwise
(``tool_format="system"``, or ``"auto"`` with a template that never mentions tools, such as
SmolLM2's) they are written into the system prompt in the Hermes format, and assistant tool
calls are rendered back as that same text.

Parsers, chosen per model family with ``tool_parser``: ``hermes`` (Hermes/Qwen
``<tool_call>{json}</tool_call>``), ``llama3`` (a JSON object ``{"name", "parameters"}``,
optionally after ``<|python_tag|>``), ``mistral`` (``[TOOL_CALLS] [...]`` or
``[TOOL_CALLS]name[ARGS]{...}``), ``json`` (the whole reply is a JSON call or list of calls),
and ``auto`` (from the chat template; Hermes when it says nothing). Left out: streaming parsing
and reasoning (``<think>``) extraction.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from typing import Any

from rlft.types import Message, ToolCall

TOOL_SYSTEM_PROMPT = (
    "# Tools\n"
    "You may call one or more functions to help answer. Their signatures:\n"
    "<tools>\n{schemas}\n</tools>\n"
    "To call a function, reply with one line per call:\n"
    '<tool_call>{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}</tool_call>\n'
    "Each result comes back in a message from the tool. When you have the answer, reply without a tool call."
)


# --------------------------------------------------------------------------------------------
# Tool-call parsers: text -> (content, tool calls). Never raise: a malformed call becomes a
# ToolCall with ``error`` set, which the rollout loop turns into a message to the model.
# --------------------------------------------------------------------------------------------


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:12]


def _call_from_obj(obj: Any) -> ToolCall:
    if not isinstance(obj, dict):
        return ToolCall(name="", arguments={}, id=_call_id(),
                        error=f"a tool call must be a JSON object, got {type(obj).__name__}")
    if "function" in obj and isinstance(obj["function"], dict):  # OpenAI shape
        obj = obj["function"]
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            return ToolCall(name=str(name or ""), arguments={}, id=_call_id(),
                            error=f"arguments are not valid JSON: {e}")
    if not isinstance(name, str) or not name:
        return ToolCall(name="", arguments={}, id=_call_id(), error='a tool call needs a "name" string')
    if not isinstance(args, dict):
        return ToolCall(name=name, arguments={}, id=_call_id(), error="arguments must be a JSON object")
    return ToolCall(name=name, arguments=args, id=_call_id())


def _loads_call(text: str) -> ToolCall:
    try:
        return _call_from_obj(json.loads(text))
    except json.JSONDecodeError as e:
        name = re.search(r'"name"\s*:\s*"([^"]+)"', text)
        return ToolCall(name=name.group(1) if name else "", arguments={}, id=_call_id(),
                        error=f"invalid JSON in tool call: {e}")


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse_hermes(text: str) -> tuple[str, list[ToolCall]]:
    calls = [_loads_call(m.group(1)) for m in _HERMES.finditer(text) if m.group(1).strip()]
    content = _HERMES.sub("", text).strip() if calls else text.strip()
    return content, calls


def _json_values(text: str) -> list[Any] | None:
    """Decode one or more JSON values separated by whitespace or ';' (Llama 3 style)."""
    dec, i, out = json.JSONDecoder(), 0, []
    text = text.strip()
    while i < len(text):
        while i < len(text) and text[i] in " \n\t;":
            i += 1
        if i >= len(text):
            break
        try:
            val, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        out.append(val)
    return out


def parse_llama3(text: str) -> tuple[str, list[ToolCall]]:
    body = text.strip()
    tagged = body.startswith("<|python_tag|>")
    body = body.removeprefix("<|python_tag|>").strip()
    vals = _json_values(body) if body.startswith(("{", "[")) else None
    if vals is None:
        if tagged:
            return "", [ToolCall(name="", arguments={}, id=_call_id(), error="invalid JSON after <|python_tag|>")]
        return text.strip(), []
    flat = [v for val in vals for v in (val if isinstance(val, list) else [val])]
    if not all(isinstance(v, dict) and "name" in v for v in flat):
        return text.strip(), []  # JSON that is an answer, not a call
    return "", [_call_from_obj(v) for v in flat]


_MISTRAL_V11 = re.compile(r"\[TOOL_CALLS\]\s*([A-Za-z0-9_.\-]+)\s*\[ARGS\]\s*", re.DOTALL)


def parse_mistral(text: str) -> tuple[str, list[ToolCall]]:
    if "[TOOL_CALLS]" not in text:
        return text.strip(), []
    content, _, rest = text.partition("[TOOL_CALLS]")
    if _MISTRAL_V11.search("[TOOL_CALLS]" + rest):
        calls = []
        for part in ("[TOOL_CALLS]" + rest).split("[TOOL_CALLS]")[1:]:
            name, _, args = part.partition("[ARGS]")
            calls.append(_call_from_obj({"name": name.strip(), "arguments": args.strip() or "{}"}))
        return content.strip(), calls
    vals = _json_values(rest)
    if vals is None:
        return content.strip(), [ToolCall(name="", arguments={}, id=_call_id(),
                                          error="invalid JSON after [TOOL_CALLS]")]
    flat = [v for val in vals for v in (val if isinstance(val, list) else [val])]
    return content.strip(), [_call_from_obj(v) for v in flat]


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def parse_json(text: str) -> tuple[str, list[ToolCall]]:
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    vals = _json_values(body) if body.startswith(("{", "[")) else None
    if not vals:
        return text.strip(), []
    flat: list[Any] = []
    for val in vals:
        if isinstance(val, dict) and isinstance(val.get("tool_calls"), list):
            flat.extend(val["tool_calls"])
        else:
            flat.extend(val if isinstance(val, list) else [val])
    if not all(isinstance(v, dict) and ("name" in v or "function" in v) for v in flat):
        return text.strip(), []
    return "", [_call_from_obj(v) for v in flat]


PARSERS: dict[str, Callable[[str], tuple[str, list[ToolCall]]]] = {
    "hermes": parse_hermes,
    "llama3": parse_llama3,
    "mistral": parse_mistral,
    "json": parse_json,
}


def detect_parser(chat_template: str | None) -> str:
    """The parser a template implies; Hermes when it says nothing (it is what our fallback
    system prompt teaches)."""
    t = chat_template or ""
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or "ipython" in t:
        return "llama3"
    return "hermes"


def get_parser(name: str, chat_template: str | None = None) -> Callable[[str], tuple[str, list[ToolCall]]]:
    if name == "auto":
        name = detect_parser(chat_template)
    if name not in PARSERS:
        raise ValueError(f"unknown tool_parser {name!r}; choose one of: auto, {', '.join(PARSERS)}")
    return PARSERS[name]


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _hermes_call_text(tc: dict[str, Any]) -> str:
    fn = tc.get("function", tc)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    return "<tool_call>" + json.dumps({"name": fn.get("name"), "arguments": args}) + "</tool_call>"


class Renderer:
    """Tokenizer + chat template + tool-call parser for one model.

    ``tool_format``: "template" passes schemas through ``tools=``; "system" writes them into the
    system prompt (for templates without tool support); "auto" picks "template" when the
    template mentions ``tools``. ``tool_role``: the role tool results are rendered with
    ("tool", or "user" for templates that reject a tool role); "auto" probes the template.
    """

    def __init__(self, tokenizer, *, tool_parser: str = "auto", tool_format: str = "auto", tool_role: str = "auto"):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the tokenizer has no chat template: use an instruct/chat model, or set one with "
                "`tokenizer.chat_template = ...` (config key `chat_template`, a Jinja string or file)"
            )
        self.tokenizer = tokenizer
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else str(tokenizer.chat_template)
        if tool_format == "auto":
            tool_format = "template" if "tools" in template else "system"
        if tool_format not in ("template", "system"):
            raise ValueError(f"tool_format must be auto, template or system, not {tool_format!r}")
        self.tool_format = tool_format
        self.parser_name = detect_parser(template) if tool_parser == "auto" else tool_parser
        self.parse_fn = get_parser(self.parser_name)
        self.tool_role = self._probe_tool_role() if tool_role == "auto" else tool_role
        self.eot_text, self.glue = self._find_turn_end()
        self.eos_token_ids = self._eos_ids()

    # -- template plumbing ---------------------------------------------------------------------
    def _apply(self, messages: list[Message], tools: list[dict] | None, add_generation_prompt: bool) -> str:
        msgs = self._prepare(messages, tools)
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
        if tools and self.tool_format == "template":
            kwargs["tools"] = tools
        return self.tokenizer.apply_chat_template(msgs, **kwargs)

    def _prepare(self, messages: list[Message], tools: list[dict] | None) -> list[Message]:
        """Canonical OpenAI messages -> what this template renders correctly."""
        out: list[Message] = []
        for m in messages:
            m = {k: v for k, v in m.items() if v is not None}
            if m.get("role") == "assistant" and m.get("tool_calls"):
                if self.tool_format == "system":
                    calls = "\n".join(_hermes_call_text(tc) for tc in m["tool_calls"])
                    m = {"role": "assistant",
                         "content": ((m.get("content") or "") + ("\n" if m.get("content") else "") + calls)}
                else:
                    m["tool_calls"] = [
                        {**tc, "function": {**tc["function"], "arguments": _as_dict(tc["function"].get("arguments"))}}
                        for tc in m["tool_calls"]
                    ]
            elif m.get("role") == "tool" and self.tool_role == "user":
                m = {"role": "user", "content": f"<tool_response>\n{m.get('content', '')}\n</tool_response>"}
            out.append(m)
        if tools and self.tool_format == "system":
            block = TOOL_SYSTEM_PROMPT.format(schemas="\n".join(json.dumps(t) for t in tools))
            if out and out[0].get("role") == "system":
                out[0] = {**out[0], "content": (out[0].get("content") or "") + "\n\n" + block}
            else:
                out.insert(0, {"role": "system", "content": block})
        return out

    def _probe_tool_role(self) -> str:
        try:
            msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                    {"role": "tool", "content": "PROBE_RESULT"}]
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return "tool" if "PROBE_RESULT" in text else "user"
        except Exception:  # noqa: BLE001 - templates that enforce user/assistant alternation raise here, with any error type
            return "user"

    def _find_turn_end(self) -> tuple[str, str]:
        """Split the template's end of an assistant turn into (end-of-turn text, glue)."""
        marker = "ASSISTANT_REPLY_MARKER"
        msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False)
        tail = text[text.rindex(marker) + len(marker):]
        for tok in self._eos_strings():
            if tail.startswith(tok):
                return tok, tail[len(tok):]
        return "", tail

    def _eos_strings(self) -> list[str]:
        vocab = self.tokenizer.get_vocab()  # built anew on each call (~25 ms at a 49k vocabulary): once
        toks = []
        for t in (getattr(self.tokenizer, "eos_token", None), "<|im_end|>", "<|eot_id|>", "<|end|>", "</s>",
                  "<end_of_turn>"):
            if t and t not in toks and t in vocab:
                toks.append(t)
        return toks

    def _eos_ids(self) -> list[int]:
        ids = []
        for t in ([self.eot_text] if self.eot_text else []) + self._eos_strings():
            i = self.tokenizer.convert_tokens_to_ids(t)
            if isinstance(i, int) and i >= 0 and i not in ids:
                ids.append(i)
        return ids

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -- public API ----------------------------------------------------------------------------
    def render_prompt(self, messages: list[Message], tools: list[dict] | None = None) -> list[int]:
        """Token ids of the conversation so far plus the assistant generation prompt."""
        return self.encode(self._apply(messages, tools, add_generation_prompt=True))

    def render_text(self, messages: list[Message], tools: list[dict] | None = None,
                    add_generation_prompt: bool = False) -> str:
        return self._apply(messages, tools, add_generation_prompt)

    def continuation_ids(self, history: list[Message], new_messages: list[Message], tools: list[dict] | None,
                         ended_with_eot: bool) -> list[int]:
        """Tokens to append after a sampled assistant turn (the last message of ``history``):
        the template's glue, ``new_messages`` and the next generation prompt."""
        before = self._apply(history, tools, add_generation_prompt=False)
        after = self._apply(history + new_messages, tools, add_generation_prompt=True)
        if after.startswith(before):
            delta = after[len(before):]
        else:  # not prefix-stable: render the new turns after a fixed exchange instead
            dummy = [m for m in history[:1] if m.get("role") == "system"] + [
                {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
            before = self._apply(dummy, tools, add_generation_prompt=False)
            after = self._apply(dummy + new_messages, tools, add_generation_prompt=True)
            if not after.startswith(before):
                raise ValueError("the chat template does not render new turns as a suffix; "
                                 "set tool_format/tool_role or a simpler chat_template")
            delta = after[len(before):]
        prefix = self.glue if ended_with_eot else self.eot_text + self.glue
        return self.encode(prefix + delta)

    def decode(self, token_ids: list[int]) -> str:
        """Assistant text of sampled tokens, without the trailing end-of-turn token."""
        ids = list(token_ids)
        while ids and ids[-1] in self.eos_token_ids:
            ids.pop()
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        return self.parse_fn(text)

    def assistant_message(self, text: str) -> tuple[Message, list[ToolCall]]:
        """The canonical assistant message for sampled text, and its parsed tool calls."""
        content, calls = self.parse(text)
        if any(c.error for c in calls):  # keep the malformed markup visible in the transcript
            content = text.strip()
        msg: Message = {"role": "assistant", "content": content}
        good = [c for c in calls if c.error is None]
        if good:
            msg["tool_calls"] = [c.to_openai() for c in good]
        return msg, calls


def _as_dict(args: Any) -> Any:
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            return args
    return args
