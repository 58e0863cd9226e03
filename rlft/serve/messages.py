"""OpenAI chat ``messages`` -> the chat messages the Renderer takes: roles (``developer`` =
``system``), text content parts joined, assistant ``tool_calls`` kept, each ``tool`` result
checked to answer an earlier call (its ``tool_call_id``, else 400 as OpenAI's API answers) and
given that call's function name, and an instruction (a forced tool call's) added to the system
prompt. Errors are :class:`~rlft.serve.errors.APIError` naming the message and field.

Left out: image and audio parts (a 400), and what the tools and ``tool_choice`` ask
(``structured.py``).
"""

from __future__ import annotations

from typing import Any

from rlft.serve.errors import APIError

__all__ = ["chat_messages"]


def _content_text(content: Any, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for k, p in enumerate(content):
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                raise APIError(400, f"{param}[{k}]: only text content parts are supported", param=f"{param}[{k}]")
            parts.append(p["text"])
        return "".join(parts)
    raise APIError(400, f"{param} must be a string or a list of text parts", param=param)


def chat_messages(raw: list[dict[str, Any]], instruction: str | None) -> list[dict[str, Any]]:
    if not raw:
        raise APIError(400, "messages must be a non-empty list", param="messages", code="empty_messages")
    out, call_names = [], {}
    for i, m in enumerate(raw):
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"messages[{i}].role must be system, developer, user, assistant or tool, not "
                                f"{m.get('role')!r}", param=f"messages[{i}].role")
        if role != "assistant" and m.get("content") is None:
            raise APIError(400, f"messages[{i}].content is required", param=f"messages[{i}].content")
        msg: dict[str, Any] = {"role": role, "content": _content_text(m.get("content"), f"messages[{i}].content")}
        if role == "assistant" and m.get("tool_calls"):
            for k, tc in enumerate(m["tool_calls"]):
                fn = tc.get("function") if isinstance(tc, dict) else None
                if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)):
                    raise APIError(400, f"messages[{i}].tool_calls[{k}] needs function.name",
                                   param=f"messages[{i}].tool_calls[{k}]")
                call_names[tc.get("id")] = fn["name"]
            msg["tool_calls"] = m["tool_calls"]
        if role == "tool":  # as OpenAI's API: a tool result answers a call made earlier in the conversation
            if not isinstance(m.get("tool_call_id"), str):
                raise APIError(400, f"Missing required parameter: 'messages[{i}].tool_call_id'.",
                               param=f"messages[{i}].tool_call_id", code="missing_required_parameter")
            if m["tool_call_id"] not in call_names:
                raise APIError(400, f"Invalid parameter: messages[{i}] with role 'tool' must be a response to a "
                                    f"preceding message with 'tool_calls': no earlier call has id "
                                    f"{m['tool_call_id']!r}.", param=f"messages[{i}].tool_call_id")
            msg["tool_call_id"] = m["tool_call_id"]
            name = m.get("name") or call_names.get(m.get("tool_call_id"))
            if name:
                msg["name"] = name
        out.append(msg)
    if instruction:
        if out[0]["role"] == "system":
            out[0] = {**out[0], "content": (out[0]["content"] + "\n\n" + instruction).strip()}
        else:
            out.insert(0, {"role": "system", "content": instruction})
    return out

