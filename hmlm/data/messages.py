"""What preparing a dataset tells the user: progress on stdout, warnings on stderr.

Errors are not printed here: they are raised as `UserError` and printed once by the command line.
"""

from __future__ import annotations

import sys


def info(message: str) -> None:
    print(message, flush=True)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
