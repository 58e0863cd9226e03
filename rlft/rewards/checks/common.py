"""What every kind of check shares: the ``Check`` type, naming a factory's function, the
expected value read from the rollout, and optional dependencies imported on use.

Left out: the checks themselves (``answers.py``, ``structured.py``, ``text.py``, ``usage.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Check = Callable[[Any], Any]


def need(module: str, package: str):
    """The optional ``module``, or an ImportError naming the extra that installs ``package``."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise ImportError(f"{package} is needed for this check: pip install 'rlft[rewards]' (or {package})") from e


def named(fn: Check, name: str) -> Check:
    fn.__name__ = fn.__qualname__ = name
    return fn


def expected_value(rollout: Any, field: str) -> Any:
    if field == "ground_truth":
        value = rollout.ground_truth
    elif field in rollout.example:
        value = rollout.example[field]
    else:
        raise KeyError(f"the example has no field {field!r} (it has: {', '.join(map(str, rollout.example))})")
    if value is None:
        raise ValueError(f"the example's {field!r} is empty")
    return value


def gold_values(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple, set)) else [value]
