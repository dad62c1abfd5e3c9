"""Write under a temporary name, then rename: the one way files that a later run depends on are written.

A process killed mid-write, a full disk or a file-size limit leaves the temporary file (removed on the error,
or by `remove_leftovers` on the next start) and the previous good file under its name; `os.replace` is atomic
on POSIX file systems, so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from classifier.errors import UserError

# The temporary name keeps the final name as its tail, so libraries that check suffixes (Keras wants
# `.weights.h5` and `.keras`) accept it, and starts with a dot so folder scans skip it.
PREFIX = ".partial-"


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write to; on success renames it to `path`, on any error removes it.

    Example:
        with atomic.replacing(run.model_path) as temporary:
            model.save(temporary)
    """
    path = Path(path)
    temporary = path.with_name(f"{PREFIX}{os.getpid()}-{path.name}")
    try:
        yield temporary
        if temporary.is_file():
            with open(temporary, "rb") as handle:  # on disk before the rename makes it the real file
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with replacing(path) as temporary:
        temporary.write_text(text)


def write_json(path: str | os.PathLike, content) -> None:
    write_text(path, json.dumps(content, indent=2))


def remove_leftovers(folder: str | os.PathLike) -> None:
    """Removes the temporary files of writers that were killed (their final files are intact)."""
    folder = Path(folder)
    if folder.is_dir():
        for leftover in folder.glob(f"{PREFIX}*"):
            with contextlib.suppress(OSError):
                leftover.unlink()


def writable_folder(path: str | os.PathLike, flag: str, given: str | os.PathLike | None = None) -> Path:
    """Creates the folder a command writes into (and its parents), before any work whose results it would hold.

    Args:
        path: The folder.
        flag: How the user named it, for the message (`--out-dir`, "heatmap folder").
        given: What the user gave, when it is not `path` itself (a file to write into `path`).

    Raises:
        UserError: it, or a folder above it, is a file; it cannot be created; or it is not writable.
    """
    path = Path(path)
    named = f"{flag} '{given or path}'"
    for folder in [path, *path.parents]:
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{named}: '{folder}' is a file, not a folder; choose another path.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"{named}: '{path}' cannot be created ({error.strerror}); choose a folder you can write to."
        ) from None
    # A file created and removed there, not `os.access`: root passes `os.access` everywhere, and a read-only or
    # pseudo file system (/proc) refuses only the write itself (found by bench/hostile_sweep.py: predict and
    # benchmark --output /proc/... failed after all their work).
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise UserError(
            f"{named}: '{path}' is not writable ({error.strerror}); choose a folder you can write to."
        ) from None
    return path
