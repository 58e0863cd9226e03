"""Whether an environment runs untrusted code in the code sandbox, and that sandbox's isolation
level, checked where an environment is loaded: before a run, ``rlft validate`` or ``rlft eval``
spends compute (issue #15, point 11).

:func:`environment_isolation` returns the sandbox's :class:`~rlft.rewards.sandbox.Isolation`
for an environment that uses it (a ``code_tests`` reward, or a module that imports the sandbox)
and raises :class:`~rlft.rewards.sandbox.SandboxRefusedError` when it is below level
"namespaces" and running unconfined was not allowed (``sandbox_unconfined = true``, set for the
process with ``sandbox.set_unconfined``). Left out: the sandbox itself
(``rlft.rewards.sandbox``), and code that reaches ``run_code`` some other way, which
``run_code`` refuses on its first call (a refused reward stops the run: ``rlft.rewards``).
"""

from __future__ import annotations

from typing import Any

from rlft.rewards import sandbox


def environment_isolation(env: Any, module: Any = None) -> sandbox.Isolation | None:
    """The sandbox's isolation when ``env`` (an Environment; ``module``: its source module, if
    any) runs code in it, else None; raises SandboxRefusedError when it may not run here."""
    objects = [r.fn for r in env.rewards] + [t.fn for t in env.function_tools.values()]
    if module is not None:
        objects += list(vars(module).values())
    if not sandbox.uses_sandbox(objects):
        return None
    iso = sandbox.isolation()
    sandbox.check_confined(iso)
    return iso


def announce_isolation(env: Any, module: Any = None, *, unconfined: bool, out: Any) -> None:
    """For a CLI command that runs ``env`` in this process: apply ``sandbox_unconfined`` and print
    the sandbox's isolation line to ``out`` when the environment runs code in it (below level
    "namespaces" without the opt-in: ``SandboxRefusedError``, a user error, before the model loads)."""
    sandbox.set_unconfined(unconfined)  # one command, one process: for run_code in the rewards
    iso = environment_isolation(env, module)
    if iso is not None:
        print(("" if iso.confined else "WARNING: ") + iso.line(), file=out)


__all__ = ["announce_isolation", "environment_isolation"]
