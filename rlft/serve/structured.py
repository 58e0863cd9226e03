"""What a chat request's ``tools``, ``tool_choice`` and ``response_format`` ask of the reply: the
tools shown to the model, an instruction for the system prompt, whether calls are parsed, and
the grammar that constrained decoding enforces (``rlft.engines.constrained``, llguidance).

``tool_choice``: "auto" (default with tools) shows the tools and parses calls; "none" does not
show them and parses nothing; "required" and a named function are enforced by constrained
decoding on the in-process HFEngine: the reply is one or more calls (exactly one with
``parallel_tool_calls: false``; that function's, once, when named) in the model's tool-call
format, their ``arguments`` valid against the tool's ``parameters`` schema; an instruction to
call a tool (that one; only its schema is then shown) is also added to the system prompt. An
engine plugged in with ``engines=`` cannot be constrained: there the instruction is all (a reply
without a call comes back as text).

``response_format``: ``json_object`` (any JSON object) and ``json_schema`` (``{"name", "schema"}``:
valid against ``schema``) are enforced the same way, streamed as sampled; an engine that cannot
constrain answers them with 400. A constrained reply is written in ``json.dumps``'s layout; one
cut by ``max_tokens`` (``finish_reason: "length"``) is a prefix of a valid reply. Logprobs of a
constrained reply are those of the masked distribution (the allowed tokens renormalised).

Left out: the decoding itself (the engine applies the grammar's token masks) and
``response_format`` on ``/v1/completions``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlft.serve.errors import APIError

if TYPE_CHECKING:
    from rlft.serve.requests import ChatRequest

__all__ = ["chat_grammar", "forces_structure", "reply_grammar", "tool_setup"]


def tool_setup(req: Any) -> tuple[list[dict[str, Any]] | None, str | None, bool]:
    """``(tools shown to the model, instruction for the system prompt, parse calls?)``."""
    tools, choice = req.tools or None, req.tool_choice if req.tool_choice is not None else "auto"
    for k, t in enumerate(tools or []):
        if not (t.get("type", "function") == "function" and isinstance((t.get("function") or {}).get("name"), str)):
            raise APIError(400, f"tools[{k}] must be {{'type': 'function', 'function': {{'name': ...}}}}",
                           param=f"tools[{k}]")
    if choice == "none" or (choice == "auto" and not tools):
        return None, None, False
    if not tools:
        raise APIError(400, f"tool_choice {choice!r} needs tools", param="tool_choice")
    if choice == "auto":
        return tools, None, True
    if choice == "required":
        return tools, "You must call at least one of the tools (functions) in your reply.", True
    name = ((choice.get("function") or {}).get("name") if isinstance(choice, dict) else None)
    chosen = [t for t in tools if t["function"]["name"] == name]
    if not chosen:
        raise APIError(400, f"tool_choice must be 'none', 'auto', 'required' or "
                            f"{{'type': 'function', 'function': {{'name': <one of the tools>}}}}, not {choice!r}",
                       param="tool_choice")
    return chosen, f"You must call the function `{name}` in your reply.", True


def forces_structure(req: ChatRequest, tools: list[dict[str, Any]] | None) -> bool:
    """Whether the request asks for a forced tool call or for JSON (see :func:`chat_grammar`)."""
    return bool(tools and (req.tool_choice == "required" or isinstance(req.tool_choice, dict))) or (
        req.response_format is not None and req.response_format.get("type") != "text")


def chat_grammar(req: ChatRequest, tools: list[dict[str, Any]] | None, parser: str) -> str | None:
    """The grammar a chat request's reply must follow (``rlft.engines.constrained``): a call of
    ``tools`` (the ones shown) in the ``parser``'s format for ``tool_choice`` "required" (one or
    more; one with ``parallel_tool_calls: false``) or a named function (that one, once); else JSON
    for ``response_format`` ``json_object`` (any object) or ``json_schema`` (valid against its
    ``schema``); None for plain text."""
    from rlft.engines.constrained import GrammarError, json_grammar, tool_call_grammar

    if tools and (req.tool_choice == "required" or isinstance(req.tool_choice, dict)):
        try:
            return tool_call_grammar(tools, parser, many=req.tool_choice == "required" and req.parallel_tool_calls)
        except GrammarError as e:
            raise APIError(400, f"the tools' parameter schemas cannot be enforced: {e}", param="tools") from e
    fmt = req.response_format
    kind = fmt.get("type") if fmt is not None else "text"
    if kind == "text":
        return None
    if kind == "json_object":
        return json_grammar(None)
    if kind != "json_schema":
        raise APIError(400, f"response_format.type must be 'text', 'json_object' or 'json_schema', not {kind!r}",
                       param="response_format.type")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise APIError(400, "response_format.json_schema needs a name (and a schema)",
                       param="response_format.json_schema")
    try:
        return json_grammar(spec.get("schema"))
    except GrammarError as e:
        raise APIError(400, f"response_format.json_schema.schema: {e}",
                       param="response_format.json_schema.schema") from e


def reply_grammar(req: ChatRequest, tools: list[dict[str, Any]] | None, constrained: bool, parser: str,
                  model: str) -> str | None:
    """The grammar for a request that :func:`forces_structure`, on an engine that can (``constrained``)
    or cannot enforce one: without, a forced tool call falls back to its instruction (None) and a
    ``response_format`` is a 400 naming ``model``. Compiling can take a while: call it off the event loop."""
    if constrained:
        return chat_grammar(req, tools, parser)
    if req.response_format is not None and req.response_format.get("type") != "text":
        raise APIError(400, f"the engine serving {model!r} cannot constrain its output: "
                            "response_format is not supported", param="response_format")
    return None
