"""The run folder: every file name in it, and the one place each of them is read and written.

Training writes one folder per run (DESIGN.md, "Contract"); export, evaluate, predict, explain and the benchmarks
read it. They all reach its files through `Run`, so a name is spelled once and each file has one reader and one
writer (atomic: `classifier.atomic`).

    saved_models/<run>/
        config.yaml  labels.txt  split.json  model.keras  history.csv  metrics.json (present = finished)
        input_contract.json   how to feed model.keras: size, resize mode, decoding, classes (classifier.contract)
        calibration.json  operating_point.json  training_curves.png
        logs/                 TensorBoard
        checkpoints/          plan.json, phase1.done, phase2.done, best.json (classifier.checkpoints)
        export/               the shipped files, with labels.txt, input_contract.json, calibration.json and
                              operating_point.json
        evaluation/<name>/    evaluation.json and its figures

An `export/` folder, or any folder a model was copied into with its labels, carries the files that travel with a
model under the same names, so `Run(folder)` reads those too: `Run.beside_model` looks in the model's own folder
first, then in the one above it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from classifier import atomic
from classifier.errors import UserError

if TYPE_CHECKING:
    from classifier.config import Config
    from classifier.contract import InputContract

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.keras"
LABELS_FILE = "labels.txt"
CONTRACT_FILE = "input_contract.json"  # also inside every exported model: see classifier.contract
SPLIT_FILE = "split.json"
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
CALIBRATION_FILE = "calibration.json"
OPERATING_POINT_FILE = "operating_point.json"
TRAINING_CURVES_FILE = "training_curves.png"
LOGS_FOLDER = "logs"
CHECKPOINTS_FOLDER = "checkpoints"
PLAN_FILE = "plan.json"  # in checkpoints/: the epochs and views this run settled on, kept across restarts
BEST_RECORD = "best.json"  # in checkpoints/: written by classifier.checkpoints.BestStore
EXPORT_FOLDER = "export"
EXPORT_REPORT_FILE = "export_report.json"  # in export/
EVALUATION_FOLDER = "evaluation"
EVALUATION_REPORT_FILE = "evaluation.json"  # in each evaluation/<name>/

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Run:
    """A run folder (or a folder laid out like one, such as its `export/`): its paths, and reading and writing them.

    Attributes:
        root: The folder.
    """

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def beside_model(cls, model_path: str | os.PathLike) -> tuple[Run, Run]:
        """The folders the files that travel with a model are looked for in, nearest first: the model's own folder
        (the run folder of a model.keras, the export/ folder of an exported file, or wherever it was copied with
        its labels) and the folder above it (the run folder of an exported file or SavedModel folder)."""
        folder = Path(model_path).resolve().parent
        return cls(folder), cls(folder.parent)

    @classmethod
    def of_model(cls, model_path: str | os.PathLike) -> Run | None:
        """The training run a model file or SavedModel folder belongs to: the folder beside or above it that has a
        config.yaml (model.keras in it, or export/<file> below it), or None."""
        return next((run for run in cls.beside_model(model_path) if run.config_path.is_file()), None)

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def model_path(self) -> Path:
        return self.root / MODEL_FILE

    @property
    def labels_path(self) -> Path:
        return self.root / LABELS_FILE

    @property
    def contract_path(self) -> Path:
        return self.root / CONTRACT_FILE

    @property
    def split_path(self) -> Path:
        return self.root / SPLIT_FILE

    @property
    def history_path(self) -> Path:
        return self.root / HISTORY_FILE

    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def calibration_path(self) -> Path:
        return self.root / CALIBRATION_FILE

    @property
    def operating_point_path(self) -> Path:
        return self.root / OPERATING_POINT_FILE

    @property
    def training_curves_path(self) -> Path:
        return self.root / TRAINING_CURVES_FILE

    @property
    def logs(self) -> Path:
        return self.root / LOGS_FOLDER

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_FOLDER

    @property
    def plan_path(self) -> Path:
        return self.checkpoints / PLAN_FILE

    @property
    def export_dir(self) -> Path:
        return self.root / EXPORT_FOLDER

    @property
    def export_report_path(self) -> Path:
        return self.export_dir / EXPORT_REPORT_FILE

    @property
    def evaluation_dir(self) -> Path:
        return self.root / EVALUATION_FOLDER

    def phase_marker(self, phase: int) -> Path:
        """`checkpoints/phase<N>.done`: present once phase N (1 = head, 2 = fine-tuning) has finished."""
        return self.checkpoints / f"phase{phase}.done"

    def phase_done(self, phase: int) -> bool:
        return self.phase_marker(phase).exists()

    def mark_phase_done(self, phase: int) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.phase_marker(phase).touch()  # an empty file: created whole or not at all

    def is_finished(self) -> bool:
        """Whether training finished: metrics.json is written last, so its presence marks the run as done."""
        return self.metrics_path.exists()

    def read_labels(self) -> list[str] | None:
        """The class names of labels.txt, one a line in output order (blank lines skipped); None without the file.

        Raises:
            UserError: the file is not UTF-8 text, naming it.
        """
        if not self.labels_path.is_file():
            return None
        try:
            return parse_labels(self.labels_path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise UserError(
                f"'{self.labels_path}' is not UTF-8 text ({error.reason} at byte {error.start}): restore the run's "
                f"own {LABELS_FILE} (one class name a line)."
            ) from None

    def write_labels(self, names: list[str]) -> Path:
        """Writes labels.txt (one class name a line), atomically; returns its path."""
        with atomic.replacing(self.labels_path) as temporary:  # UTF-8 whatever the locale, as read_labels reads
            temporary.write_text(format_labels(names), encoding="utf-8")
        return self.labels_path

    def read_contract(self) -> InputContract | None:
        """The input contract beside the model (`classifier.contract`), or None without the file.

        Raises:
            UserError: the file is not a contract this version reads, naming it.
        """
        from classifier import contract

        return contract.read(self.contract_path)

    def write_contract(self, record: InputContract) -> Path:
        """Writes input_contract.json, atomically; returns its path."""
        from classifier import contract  # it finds the record beside models through this module

        return contract.write(self.contract_path, record)

    def read_settings(self) -> dict[str, dict[str, Any]] | None:
        """The raw `{section: {key: value}}` of config.yaml (yaml.safe_load: no Python objects are built from a
        file someone else may have written), or None when there is none.

        Raises:
            UserError: config.yaml is not valid YAML or not a mapping of sections, naming the file.
        """
        from classifier.config import load_yaml  # config imports modules that find files through this one

        return load_yaml(self.config_path) if self.config_path.is_file() else None

    def setting(self, section: str, key: str) -> Any:
        """One value of config.yaml, or None when there is no config.yaml or no such value. A setting this version
        knows is checked (`config.checked_setting`); others are returned as written, so a run of an older or newer
        version still reads.

        Raises:
            UserError: see `read_settings`; or the value is not valid, naming the file.
        """
        from classifier.config import checked_setting

        section_values = (self.read_settings() or {}).get(section)
        value = section_values.get(key) if isinstance(section_values, dict) else None
        if value is None:
            return None
        try:
            return checked_setting(section, key, value)
        except UserError as error:
            raise UserError(
                f"'{self.config_path}': {error} Restore the run's own {CONFIG_FILE}, or train again."
            ) from None

    def read_config(self) -> Config:
        """The run's saved settings as a checked `Config` (defaults of settings added since it was written filled in).

        Raises:
            UserError: config.yaml is missing, not valid YAML, or holds settings that are not valid.
        """
        from classifier.config import Config, load_yaml

        return Config().replace(load_yaml(self.config_path))

    def write_config(self, config: Config) -> Path:
        """Writes the resolved config (all sections, all keys) as config.yaml, atomically; returns its path."""
        from classifier.config import save_yaml

        save_yaml(config, self.config_path)
        return self.config_path

    def read_metrics(self) -> dict:
        return json.loads(self.metrics_path.read_text())

    def write_metrics(self, metrics: dict) -> None:
        """Writes metrics.json; training writes it last, as its presence marks the run as finished."""
        atomic.write_json(self.metrics_path, metrics)

    def read_plan(self) -> dict | None:
        return json.loads(self.plan_path.read_text()) if self.plan_path.exists() else None

    def write_plan(self, plan: dict) -> None:
        atomic.write_json(self.plan_path, plan)


def format_labels(names: list[str]) -> str:
    """The text of a labels file: one class name a line, in output order (also inside a .tflite's metadata)."""
    return "".join(f"{name}\n" for name in names)


def parse_labels(text: str) -> list[str]:
    """The class names of a labels file's text; surrounding spaces and blank lines are not names."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_record(path: Path, keys: tuple[str, ...], convert: Callable[[dict], None], what: str, fix: str) -> dict | None:
    """A small JSON record of a run (calibration.json, operating_point.json): None when the file is not there, else
    the dict with its `keys` checked, `convert(record)` applied (types, ranges) and "path" added.

    Raises:
        UserError: the file is there but is not such a record, naming the file, `what` it should be and the `fix`.
    """
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        missing = [key for key in keys if key not in record]
        if missing:
            raise KeyError(", ".join(missing))
        convert(record)
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"'{path}' is not a valid {what} ({type(error).__name__}: {error}): {fix}") from None
    record["path"] = str(path)
    return record


def find_beside_model(model_path: str | os.PathLike, read: Callable[[Run], T | None]) -> T | None:
    """The first record `read(run)` finds for a model in the folders of `Run.beside_model`, nearest first, or None.

    Shared by the labels, the operating point and the calibration record, which travel with a model the same way.
    """
    for run in Run.beside_model(model_path):
        record = read(run)
        if record is not None:
            return record
    return None
