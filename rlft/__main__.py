"""``python -m rlft ...`` = the ``rlft`` command (what torchrun runs: ``torchrun ... -m rlft train``)."""

import sys

from rlft.cli import main

if __name__ == "__main__":
    sys.exit(main())
