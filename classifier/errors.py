"""The one exception type for a user's mistake, and how entry points show it.

Every error a user can cause (a missing folder, a bad option, a dataset too small to split) is raised as
`UserError` with a message that names the bad value and the fix. Entry points catch it and print the message
without a stack trace; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""


def run_cli(main: Callable[[], int | None]) -> int:
    """Runs `main`, printing a `UserError` as one readable message (exit code 2) instead of a traceback."""
    try:
        return int(main() or 0)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to continue from the last completed epoch.", file=sys.stderr)
        return 130
