"""One process at a time per run folder: a lock that a killed holder cannot leave stuck.

Two trainings of the same `--name`, or an export while the run still trains, would write the same files: one
crashed (h5py's `BlockingIOError`) and the other carried on with a folder it no longer owned. The lock is
`flock` on `<run folder>/.lock`: the kernel releases it when its holder exits, however it exits, so there is no
stale lock to clean up after a kill or a reboot. (`fcntl` is POSIX; on Windows the lock is skipped.)
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path

from classifier.errors import UserError
from classifier.run import MODEL_FILE

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_FILE = ".lock"


@contextlib.contextmanager
def hold(run_dir: str | os.PathLike, what: str) -> Iterator[None]:
    """Holds the run folder's lock for `what` ("training", "export"), creating the folder if needed.

    Raises:
        UserError: another live process holds it (the message says which).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the whole block
    try:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise UserError(
                    f"run folder '{run_dir}' is in use by {holder}: wait for it to finish or stop it, then run "
                    "this again (a process that was killed holds nothing)."
                ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{what} (process {os.getpid()})")
        handle.flush()
        yield
    finally:
        handle.close()  # closing the file releases the lock


def ensure_free(run_dir: str | os.PathLike, what: str) -> None:
    """Raises `hold`'s UserError when a live process holds the run folder (before moving it aside, say)."""
    with hold(run_dir, what):
        pass


def holding(what: str):
    """Decorator: the function's first argument is a run folder, held for the duration of the call."""

    def decorate(function):
        @functools.wraps(function)
        def wrapper(run_dir, *args, **kwargs):
            if not (Path(run_dir) / MODEL_FILE).is_file():  # not a run folder: the function says so, nothing is created
                return function(run_dir, *args, **kwargs)
            with hold(run_dir, what):
                return function(run_dir, *args, **kwargs)

        return wrapper

    return decorate
