"""The one exception type for a user's mistake, and how entry points show it.

Every error a user can cause (a missing folder, a bad option, a dataset too small to split) is raised as
`UserError` with a message that names the bad value and the fix. Entry points catch it and print the message
without a stack trace; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import io
import os
import sys
from collections.abc import Callable

# Write errors a user fixes by freeing space or raising a limit, not by reading a traceback.
_FULL = {
    errno.ENOSPC: "the disk is full",
    errno.EFBIG: "a file-size limit was reached",
    errno.EDQUOT: "the disk quota is used up",
}


class UserError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""


def run_cli(main: Callable[[], int | None], interrupted: str = "nothing was written; run the command again.") -> int:
    """Runs `main`, printing a `UserError` as one readable message (exit code 2) instead of a traceback.

    Args:
        interrupted: what a Ctrl-C leaves behind and how to go on, shown after "interrupted: ".
    """
    # A crash inside TensorFlow's native code (seen three times on 2026-12-02: segfaults in phase 1's head fit with
    # another TensorFlow process beside it, not reproduced by re-running) kills the process with no Python
    # traceback, so neither the user nor a bug report could say where. faulthandler writes the Python stack of
    # every thread to stderr on SIGSEGV, SIGFPE, SIGABRT and SIGBUS; the run resumes from its last checkpoint
    # when run again.
    if not faulthandler.is_enabled():
        # A stderr without a file descriptor (captured by a caller) cannot take the dump: run without it then.
        with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
            faulthandler.enable()
    try:
        return int(main() or 0)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130
    except Exception as error:  # an OSError, or TensorFlow's and h5py's own errors that wrap one
        reason = _write_failure(error)
        if reason is None:
            raise
        print(
            f"error: {reason} while writing ({error}). Files written before are intact (every file is written under "
            f"a temporary name first); free space or raise the limit, then run the same command again. {interrupted}",
            file=sys.stderr,
        )
        return 1


def _write_failure(error: BaseException) -> str | None:
    """Why a write failed, if it was space or a size limit: h5py and TensorFlow wrap the OS error in their own."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _FULL:
            return _FULL[error.errno]
        text = str(error)
        for code, reason in _FULL.items():
            if f"errno = {code}" in text or errno.errorcode[code] in text or os.strerror(code) in text:
                return reason
        error = error.__cause__ or error.__context__
    return None
