"""What the rollout did rather than what it wrote: tool calls within bounds (and the required
tools used), and DAPO's soft penalty on sampled tokens past a target length.

Left out: checks on the completion's text (``answers.py``, ``structured.py``, ``text.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rlft.rewards.checks.common import Check, named


def _tool_names(rollout: Any) -> list[str]:
    names = []
    for m in rollout.assistant_messages:
        for tc in m.get("tool_calls") or []:
            if isinstance(tc, dict):
                names.append(str((tc.get("function") or {}).get("name") or tc.get("name") or ""))
            else:
                names.append(str(getattr(tc, "name", "")))
    return names


def tool_usage(min_calls: int = 0, max_calls: int | None = None, required_tools: Iterable[str] | None = None) -> Check:
    """(1 if the number of tool calls is within [min_calls, max_calls] else 0) x the fraction of
    ``required_tools`` called at least once. Calls are read from the assistant messages."""
    required = list(required_tools or [])

    def check(rollout: Any) -> float:
        names = _tool_names(rollout)
        in_bounds = len(names) >= min_calls and (max_calls is None or len(names) <= max_calls)
        return float(in_bounds) * (sum(t in names for t in required) / len(required) if required else 1.0)

    return named(check, "tool_usage")


def length_penalty(target_tokens: int, buffer_tokens: int | None = None) -> Check:
    """DAPO's soft overlong penalty on sampled tokens (``rollout.num_sampled_tokens``): 0 up to
    ``target_tokens``, falling linearly to -1 at ``target_tokens + buffer_tokens`` (default a
    quarter of the target), -1 beyond. Use it with a positive weight."""
    buffer = buffer_tokens if buffer_tokens is not None else max(1, target_tokens // 4)

    def check(rollout: Any) -> float:
        over = rollout.num_sampled_tokens - target_tokens
        return 0.0 if over <= 0 else -min(1.0, over / max(buffer, 1))

    return named(check, "length_penalty")
