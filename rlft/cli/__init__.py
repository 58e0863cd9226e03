"""The ``rlft`` command.

- ``main.py``: the parser and train | validate | eval | config | demo | init | tiny;
- ``runs.py``: runs | stop | export | serve | doctor;
- ``console.py``: console.
"""

from rlft.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
