"""Validation of one transcript row: every problem as (field, message), none raised.

A row is ``{"messages": [...], "tools": [...]?, **anything else}``; ``messages`` is an OpenAI chat
(system/user/assistant/tool), assistant turns may carry ``tool_calls`` and ``weight`` (0 or 1).
``rlft.sft.transcripts.load_transcripts`` and trace import both run these checks, so a file trace
import writes always loads. Field paths read like ``messages[2].tool_calls[0].function.arguments``.

Left out: content parts (images, audio; text parts must be joined into a string first) and
JSON-schema validation of tool arguments against the tool's ``parameters``.
"""

from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
Problem = tuple[str, str]


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def tool_problems(tools: Any) -> list[Problem]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        return [("tools", f"must be a list of OpenAI tool schemas, got {_show(tools)}")]
    out: list[Problem] = []
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            out.append((where, 'must be {"type": "function", "function": {"name", "parameters"}}, got ' + _show(t)))
            continue
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            out.append((f"{where}.function.name", f"must be a non-empty string, got {_show(fn.get('name'))}"))
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            out.append((f"{where}.function.parameters", f"must be a JSON schema object, got {_show(fn['parameters'])}"))
    return out


def _call_problems(where: str, tc: Any, tool_names: set[str] | None) -> list[Problem]:
    fn = tc.get("function") if isinstance(tc, dict) else None
    if not isinstance(fn, dict):
        return [(where, 'must be {"id", "type": "function", "function": {"name", "arguments"}}, got ' + _show(tc))]
    out: list[Problem] = []
    if tc.get("type", "function") != "function":
        out.append((f"{where}.type", f"{tc.get('type')!r} is not 'function'"))
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        out.append((f"{where}.function.name", f"must be a non-empty string, got {_show(name)}"))
    elif tool_names is not None and name not in tool_names:
        out.append((f"{where}.function.name",
                    f"{name!r} is not one of the row's tools ({', '.join(sorted(tool_names))})"))
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            return out + [(f"{where}.function.arguments", f"not valid JSON ({e.msg} at char {e.pos})")]
    if not isinstance(args, dict):
        out.append((f"{where}.function.arguments", f"must be a JSON object (or its JSON text), got {_show(args)}"))
    return out


def _message_problems(i: int, m: Any, tool_names: set[str] | None, call_ids: set[str]) -> list[Problem]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        return [(where, f"must be a {{'role', 'content'}} dict, got {_show(m)}")]
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
        return [(f"{where}.role", f"{role!r} is not one of {', '.join(ROLES)}")]
    out: list[Problem] = []
    calls = m.get("tool_calls")
    # an assistant turn that only calls tools legitimately has no text
    if not isinstance(content, str) and not (content is None and role == "assistant" and calls):
        hint = " (join text parts into one string)" if isinstance(content, list) else ""
        out.append((f"{where}.content", f"must be a string, got {_show(content)}{hint}"))
    if "weight" in m:
        if role != "assistant":
            out.append((f"{where}.weight", "only assistant messages carry a weight (what to train on)"))
        elif m["weight"] not in (0, 1):  # True/False and 1.0/0.0 compare equal and are fine
            out.append((f"{where}.weight", f"must be 0 (do not train) or 1 (train), got {_show(m['weight'])}"))
    if calls is not None:
        if role != "assistant":
            out.append((f"{where}.tool_calls", "only assistant messages make tool calls"))
        elif not isinstance(calls, list):
            out.append((f"{where}.tool_calls", f"must be a list, got {_show(calls)}"))
        else:
            for j, tc in enumerate(calls):
                out += _call_problems(f"{where}.tool_calls[{j}]", tc, tool_names)
                if isinstance(tc, dict) and isinstance(tc.get("id"), str):
                    call_ids.add(tc["id"])
    if role == "tool":
        cid = m.get("tool_call_id")
        if cid is not None and cid not in call_ids:
            out.append((f"{where}.tool_call_id", f"{cid!r} answers no earlier tool call's id"))
    return out


def transcript_problems(row: Any) -> list[Problem]:
    """Every problem of one row; an empty list means it loads."""
    if not isinstance(row, dict):
        return [("(row)", f"must be an object with 'messages', got {_show(row)}")]
    out = tool_problems(row.get("tools"))
    tools = row.get("tools") if isinstance(row.get("tools"), list) else None
    names = {t["function"]["name"] for t in tools or [] if isinstance(t, dict) and isinstance(t.get("function"), dict)
             and isinstance(t["function"].get("name"), str)} if tools else None
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return out + [("messages", f"must be a non-empty list of chat messages, got {_show(messages)}")]
    call_ids: set[str] = set()
    for i, m in enumerate(messages):
        out += _message_problems(i, m, names, call_ids)
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if "assistant" not in roles:
        out.append(("messages", "has no assistant message; there is nothing to learn from"))
    else:
        first = roles.index("assistant")
        if first == 0:
            out.append(("messages[0].role",
                        "the first message is the assistant's; put the prompt (system/user) before it"))
        trained = [m for m in messages
                   if isinstance(m, dict) and m.get("role") == "assistant" and m.get("weight", 1) == 1]
        if not trained:
            out.append(("messages", "every assistant message has weight 0; there is nothing to train on"))
    return out


def format_problems(where: str, problems: list[Problem]) -> list[str]:
    """data.py's style: ``line 3, field 'messages[2].content': must be a string``."""
    return [f"{where}: {msg}" if field == "(row)" else f"{where}, field {field!r}: {msg}" for field, msg in problems]
