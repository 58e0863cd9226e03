"""A tool's JSON schema from its Python function: resolved type hints, the rollout parameter,
pydantic's schema made flat for the model, and parameter descriptions from the docstring.

- ``type_hints(fn)``: the annotations, string ones resolved (one unresolvable name does not
  spoil the others);
- ``is_rollout_param(name, annotation)``: a parameter injected at call time, hidden from the model;
- ``clean_schema(schema)``: pydantic's schema without ``title`` keys, ``$defs`` inlined (only
  recursive definitions stay);
- ``parse_docstring(doc)``: the description and per-parameter lines of a Google, NumPy or reST
  docstring.

Left out: building the arguments model and the ``Tool`` (``rlft.tools.Tool.from_function``
puts these together) and running calls (``rlft.tools.execute_tool_call``).
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable
from typing import Any

from rlft.types import Rollout

__all__ = ["type_hints", "is_rollout_param", "clean_schema", "parse_docstring"]


def type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """Resolved annotations (string ones too, under ``from __future__ import annotations``)."""
    fn = fn if inspect.isroutine(fn) else type(fn).__call__  # a callable object: its __call__'s hints
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:  # noqa: BLE001 - an unresolvable annotation raises anything (NameError, TypeError...)
        pass  # one unresolvable name fails them all: resolve one by one, leave failures as str
    hints: dict[str, Any] = {}
    for pname, ann in getattr(fn, "__annotations__", {}).items():
        try:
            hints[pname] = eval(ann, getattr(fn, "__globals__", {})) if isinstance(ann, str) else ann
        except Exception:  # noqa: BLE001 - the user's annotation text: keep it as a string when it won't evaluate
            hints[pname] = ann
    return hints


_ROLLOUT_STR = re.compile(r"(?:Optional\[)?(?:[\w.]+\.)?Rollout\]?(?:\s*\|\s*None)?")


def is_rollout_param(name: str, ann: Any) -> bool:
    if name == "rollout" or ann is Rollout:
        return True
    if isinstance(ann, str):
        return bool(_ROLLOUT_STR.fullmatch(ann.strip()))
    return Rollout in typing.get_args(ann)  # Optional[Rollout], Rollout | None


_DATA_KEYWORDS = {"default", "enum", "const", "examples"}  # values are data, not schemas
_NAME_MAPS = {"properties", "patternProperties"}  # keys are names, values schemas


def clean_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Drop pydantic's ``title`` keys and inline ``$defs`` so the model reads one flat schema;
    only recursive definitions (which cannot be inlined) stay under ``$defs``."""
    defs = schema.get("$defs", {})
    kept: set[str] = set()

    def walk(node: Any, stack: frozenset[str]) -> Any:
        if isinstance(node, list):
            return [walk(n, stack) for n in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            ref_name = ref.rsplit("/", 1)[1]
            if ref_name not in stack and ref_name in defs:
                siblings = {k: v for k, v in node.items() if k != "$ref"}
                return {**walk(defs[ref_name], stack | {ref_name}), **walk(siblings, stack)}
            kept.add(ref_name)
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in ("title", "$defs", "discriminator"):  # discriminator: OpenAPI, maps to gone $defs
                continue
            if key in _NAME_MAPS and isinstance(value, dict):
                out[key] = {n: walk(s, stack) for n, s in value.items()}
            else:
                out[key] = value if key in _DATA_KEYWORDS else walk(value, stack)
        # Older pydantic 2.x wraps a $ref that has siblings as allOf: [<ref>].
        all_of = out.get("allOf")
        if isinstance(all_of, list) and len(all_of) == 1 and isinstance(all_of[0], dict):
            out = {**all_of[0], **{k: v for k, v in out.items() if k != "allOf"}}
        return out

    result: dict[str, Any] = {
        "type": "object",
        "properties": {n: walk(p, frozenset()) for n, p in schema.get("properties", {}).items()},
        "required": list(schema.get("required", [])),
        "additionalProperties": False,  # the arguments model forbids extra fields
    }
    done: dict[str, Any] = {}
    while kept - done.keys():  # walking a kept definition may reveal another recursive one
        for def_name in sorted(kept - done.keys()):
            done[def_name] = walk(defs[def_name], frozenset({def_name})) if def_name in defs else {}
    if done:
        result["$defs"] = done
    return result


# -- docstrings ------------------------------------------------------------------------------

_PARAM_SECTIONS = {"args", "arguments", "parameters", "params", "keyword args", "keyword arguments",
                   "other parameters"}
_SECTION_NAMES = _PARAM_SECTIONS | {  # Google headers; a line "Returns the list:" is not one
    "returns", "return", "yields", "yield", "raises", "raise", "exceptions", "examples", "example", "notes",
    "note", "attributes", "see also", "warnings", "warning", "warns", "references", "todo"}
_NUMPY_RULE = re.compile(r"\s*-{3,}\s*")
_GOOGLE_ENTRY = re.compile(r"\**(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)")  # name (type): text
_NUMPY_ENTRY = re.compile(r"\**(\w+(?:\s*,\s*\**\w+)*)\s*(?::.*)?")  # name, other : type
_REST_FIELD = re.compile(r":(\w+)[^:]*:(.*)")
_REST_PARAM = re.compile(r":(?:param|parameter|arg|argument|key|keyword)\s+(?:[^:]*\s)?\**(\w+)\s*:\s*(.*)")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """``(description, {parameter: description})`` from a Google, NumPy or reST docstring.

    The description is the prose before the first section or ``:field:`` line (not only the
    first line: a second paragraph such as "returns at most 10 hits" helps the model)."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    description: list[str] = []
    params: dict[str, str] = {}
    section, style, body = None, "", []  # section None = still in the description

    def flush() -> None:
        if section in _PARAM_SECTIONS or style == "rest":
            params.update(_parse_entries(body, style))

    i = 0
    while i < len(lines):
        line, stripped = lines[i], lines[i].strip()
        at_margin = bool(stripped) and not line[0].isspace()
        if at_margin and i + 1 < len(lines) and _NUMPY_RULE.fullmatch(lines[i + 1]):
            flush()
            section, style, body = stripped.lower(), "numpy", []
            i += 2
            continue
        if at_margin and stripped.endswith(":") and stripped[:-1].strip().lower() in _SECTION_NAMES:
            flush()
            section, style, body = stripped[:-1].strip().lower(), "google", []
        elif at_margin and _REST_FIELD.fullmatch(stripped) and style != "rest":
            flush()
            section, style, body = "rest", "rest", [line]
        elif section is None:
            description.append(line)
        else:
            body.append(line)
        i += 1
    flush()
    return "\n".join(description).strip(), params


def _parse_entries(body: list[str], style: str) -> dict[str, str]:
    """Entries of one parameter section: an entry starts at the section's margin (reST: at a
    ``:field:``); more-indented lines continue it. Wrapped text is joined with spaces."""
    entries: list[tuple[list[str], list[str]]] = []  # (names, text lines)
    margin = min((len(line) - len(line.lstrip()) for line in body if line.strip()), default=0)
    for line in body:
        stripped = line.strip()
        at_margin = bool(stripped) and len(line) - len(line.lstrip()) == margin
        if style == "rest" and stripped.startswith(":"):
            m = _REST_PARAM.fullmatch(stripped)
            entries.append(([m[1]], [m[2]]) if m else ([], []))  # :returns: etc. name nothing
        elif at_margin and style == "google" and (m := _GOOGLE_ENTRY.fullmatch(stripped)):
            entries.append(([m[1]], [m[2]]))
        elif at_margin and style == "numpy" and (m := _NUMPY_ENTRY.fullmatch(stripped)):
            entries.append(([n.strip().lstrip("*") for n in m[1].split(",")], []))
        elif entries:
            entries[-1][1].append(stripped)
    return {n: " ".join(" ".join(text).split()) for names, text in entries for n in names if "".join(text).strip()}
