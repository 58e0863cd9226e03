"""``python -m rlft.cli ...`` = the ``rlft`` command."""

from rlft.cli.main import main

raise SystemExit(main())
