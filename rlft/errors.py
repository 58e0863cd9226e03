"""User errors: what the ``rlft`` command reports as one message and exit code 2, no traceback.

A user error is something the user can fix by reading its message: a config key, a dataset row,
an environment file that does not import, a run that does not exist, a checkpoint that cannot be
used, an environment that fails validation. Each subclass's message names the file, row, field
or run, and what to do. Anything else that reaches the command line is a bug: it prints its
traceback (``--debug`` prints one for user errors too). Left out: errors inside rollouts, which
never stop a run (they are recorded on the rollout; see ``rlft.types.RolloutError``).
"""

from __future__ import annotations


class UserError(Exception):
    """An error whose message tells the user what to fix."""


class UnknownRunError(UserError, KeyError):
    """No run has that id, name or id prefix (or the prefix is ambiguous)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class EnvironmentLoadError(UserError):
    """The environment file or module cannot be imported (a syntax error, a failing import)."""


class ValidationError(UserError, RuntimeError):
    """The environment failed its end-to-end check before step 1."""


__all__ = ["EnvironmentLoadError", "UnknownRunError", "UserError", "ValidationError"]
