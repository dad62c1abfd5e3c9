"""The run's checkpoints: the best weights so far and phase 2's backup, written so a kill at any moment loses
at most the epoch in progress and a damaged file is reported and worked around, never a traceback.

Both stores use the same commit rule: the weights go to a new file (under a temporary name, then renamed), and
only then does a small JSON file that names it take its new content (also by rename). A reader trusts the JSON
alone; whatever a kill leaves, the JSON names a complete file. Keras' `ModelCheckpoint` and `BackupAndRestore`
write their files in place (a SIGKILL mid-write left `best.weights.h5` at 96 bytes and every re-run failing in
h5py), and BackupAndRestore writes its weights and its epoch as two steps (a kill between them resumes the
wrong epoch), hence these replacements.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import resource
import shutil
import warnings
from pathlib import Path

import h5py
import keras
import numpy as np

from classifier import atomic
from classifier.run import BEST_RECORD

log = logging.getLogger(__name__)

BACKUP_FOLDER = "phase2_backup"
BACKUP_RECORD = "state.json"


def _readable_weights(path: Path) -> str | None:
    """None if every array of the HDF5 file reads back, else why not (an oracle independent of Keras' loader)."""
    try:
        with h5py.File(path, "r") as handle:
            handle.visititems(lambda _, item: np.asarray(item[()]) if isinstance(item, h5py.Dataset) else None)
        return None
    except (OSError, KeyError, ValueError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"


def _read_record(path: Path, keys: tuple[str, ...]) -> tuple[dict | None, str | None]:
    """The JSON record at `path` (None if absent), or why it is damaged."""
    if not path.exists():
        return None, None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or any(key not in record for key in keys):
            return None, f"it lacks {', '.join(k for k in keys if not isinstance(record, dict) or k not in record)}"
        return record, None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"{type(error).__name__}: {error}"


def ensure_room(model: keras.Model, path: Path) -> None:
    """Raises OSError (ENOSPC or EFBIG) when `model`'s weights cannot fit in `path`'s folder or under the process's
    file-size limit. Checked before writing because h5py does not fail cleanly there: a write refused with EFBIG
    ended in a segmentation fault inside h5py (`ObjectID.__dealloc__`) here, not in an exception."""
    optimizer = getattr(model, "optimizer", None)  # an uncompiled model has none
    variables = list(model.weights) + (list(optimizer.variables) if optimizer is not None else [])
    needed = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables) * 1.1 + (1 << 20)
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and needed > soft:
        raise OSError(
            errno.EFBIG, f"{needed / 1e6:.0f} MB of weights do not fit under the {soft / 1e6:.0f} MB limit", str(path)
        )
    free = shutil.disk_usage(path.parent).free
    if needed > free:
        raise OSError(errno.ENOSPC, f"{needed / 1e6:.0f} MB of weights do not fit in {free / 1e6:.0f} MB", str(path))


def save_weights(model: keras.Model, path: Path) -> None:
    """`model.save_weights` under a temporary name, after checking there is room for it."""
    ensure_room(model, path)
    with atomic.replacing(path) as temporary:
        model.save_weights(temporary)


def _load(model: keras.Model, path: Path) -> None:
    with warnings.catch_warnings():
        # A phase-1 checkpoint holds the head's optimizer slots only; Keras warns that it skips them.
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(path)


class BestStore:
    """`checkpoints/best.json` ({monitor, best, epoch, weights}) and the weights file it names."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.record_path = self.folder / BEST_RECORD

    def record(self) -> dict | None:
        """The best record, or None if there is none yet or it is damaged (then it is reported and set aside)."""
        record, problem = _read_record(self.record_path, ("best", "epoch", "weights"))
        if problem is None and record is not None:
            problem = _readable_weights(self.folder / record["weights"])
            if problem is None:
                return record
        if problem is not None:
            log.warning(
                f"warning: the best checkpoint in {self.folder} is damaged ({problem}); it is set aside as "
                f"{BEST_RECORD}.damaged and the best value so far is forgotten."
            )
            with contextlib.suppress(OSError):
                self.record_path.replace(self.record_path.with_name(f"{BEST_RECORD}.damaged"))
        return None

    def best_value(self) -> float | None:
        record = self.record()
        return float(record["best"]) if record else None

    def weights(self) -> Path | None:
        """The best weights file, if there is a sound one."""
        record = self.record()
        return self.folder / record["weights"] if record else None

    def save(self, model: keras.Model, monitor: str, value: float, epoch: int) -> None:
        """Saves `model`'s weights as the best so far, reached after `epoch` (1-based)."""
        name = f"best-epoch{epoch:04d}.weights.h5"
        save_weights(model, self.folder / name)
        atomic.write_json(self.record_path, {"monitor": monitor, "best": float(value), "epoch": epoch, "weights": name})
        for older in self.folder.glob("best-epoch*.weights.h5"):
            if older.name != name:
                older.unlink(missing_ok=True)

    def load_into(self, model: keras.Model) -> bool:
        """Loads the best weights into `model`; False if there are none."""
        path = self.weights()
        if path is None:
            return False
        _load(model, path)
        return True


class BestCheckpoint(keras.callbacks.Callback):
    """Saves the weights whenever the monitored value improves on the run's best so far (kept across phases and
    restarts in `BestStore`), like `ModelCheckpoint(save_best_only=True)` but atomically."""

    def __init__(self, store: BestStore, monitor: str, mode: str):
        super().__init__()
        self.store, self.monitor, self.mode = store, monitor, mode
        self.best = store.best_value()

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not math.isfinite(float(value)):
            return
        value = float(value)
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if better:
            self.store.save(self.model, self.monitor, value, epoch + 1)
            self.best = value


class Backup(keras.callbacks.Callback):
    """Phase 2's state after every epoch (weights with the optimizer, so the schedule's position, and the epoch
    reached), restored by `restore` before `fit`; a damaged backup is reported and the phase restarts."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = Path(folder)
        self.record_path = self.folder / BACKUP_RECORD

    def exists(self) -> bool:
        return self.folder.exists()

    def sound(self) -> bool:
        """True if there is a backup whose record and weights read back; a damaged one is reported and removed."""
        record, problem = _read_record(self.record_path, ("epoch", "weights"))
        if record is None and problem is None:
            if self.folder.exists():  # killed before its first record: nothing in it to continue from
                self.remove()
            return False
        if problem is None:
            problem = _readable_weights(self.folder / record["weights"])
        if problem is not None:
            self._damaged(problem)
        return problem is None

    def restore(self, model: keras.Model) -> int | None:
        """Loads the backup into `model` (compiled) and returns the epoch to continue from, or None if there is
        no sound backup (a damaged one is reported and removed; the caller restarts the phase)."""
        if not self.sound():
            return None
        record, _ = _read_record(self.record_path, ("epoch", "weights"))
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        try:
            _load(model, self.folder / record["weights"])
            return int(record["epoch"])
        except (OSError, ValueError, KeyError) as error:  # weights of another model, or unreadable after all
            self._damaged(f"{type(error).__name__}: {error}")
            return None

    def _damaged(self, problem: str) -> None:
        log.warning(f"warning: phase 2's backup in {self.folder} is damaged ({problem}); phase 2 starts again.")
        self.remove()

    def on_epoch_end(self, epoch, logs=None):
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"epoch{epoch + 1:04d}.weights.h5"
        save_weights(self.model, self.folder / name)
        atomic.write_json(self.record_path, {"epoch": epoch + 1, "weights": name})
        for older in self.folder.glob("epoch*.weights.h5"):
            if older.name != name:
                older.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
