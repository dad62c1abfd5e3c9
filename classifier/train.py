"""`python train.py`: fine-tune a pretrained backbone on a folder of images, in two phases.

The story of a run, top to bottom: resolve the config → pick (or resume) the run folder → scan and split the
images → build the input pipelines → build the model inside the distribution strategy → phase 1 trains the head
on a frozen backbone → phase 2 unfreezes the top of the backbone (BatchNorm stays frozen) at a lower learning
rate → the best checkpoint is restored → its temperature is fitted on the validation split and baked into
`model.keras` (calibrated probabilities) → metrics, operating point and TensorBoard images of the final model.

An interrupted run continues where it stopped when the same command is run again: phase 2 keeps a backup of
every epoch in `checkpoints/` (phase 1, on cached features, simply runs again), a finished phase leaves a marker,
and the best checkpoint and its value are kept on disk so that selection carries across phases and restarts
(`classifier.checkpoints`: every file written whole or not at all; a damaged one is reported and worked around).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from classifier import (
    atomic,
    augment,
    backbones,
    calibration,
    callbacks,
    data,
    demo_data,
    distribute,
    features,
    gradcam,
    operating_point,
    optimizer,
    plots,
    runlock,
)
from classifier import budget as budget_lib
from classifier import checkpoints as checkpoints_lib
from classifier import model as model_lib
from classifier.config import Config, load_yaml, merge, parse_set
from classifier.contract import InputContract
from classifier.errors import UserError, run_cli
from classifier.metrics import classification_metrics
from classifier.run import CALIBRATION_FILE, CONFIG_FILE, LOGS_FOLDER, MODEL_FILE, OPERATING_POINT_FILE, Run

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point of `python train.py` and `python -m classifier train`."""
    return run_cli(lambda: _main(argv), "run the same command again to continue from the last completed epoch.")


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_backbones:
        for name, spec in backbones.BACKBONES.items():
            log.info(f"{name:22s} {spec.default_size:4d} px  ImageNet weights: {spec.weights_source}")
        return 0
    if args.resume is not None:
        ignored = [
            flag
            for flag in (
                "dataset",
                "image_size",
                "batch_size",
                "backbone",
                "weights",
                "epochs",
                "time_budget",
                "config",
            )
            if getattr(args, flag) is not None
        ] + (["set"] if args.set else [])
        if ignored:
            raise UserError(
                f"--resume continues a run with its saved settings, so it takes no {', '.join(ignored)}: "
                "drop them (only --data-dir, for a data folder that moved, and --output-dir go with --resume)."
            )
        config, run_dir = resume_run(args.resume, args.output_dir or "saved_models")
        if args.data_dir:  # the images moved: the split's relative paths are resolved against the new folder
            config = config.replace({"data": {"data_dir": str(Path(args.data_dir).resolve())}})
        train(config, run_dir=run_dir)
    else:
        train(config_from_args(args), overwrite=args.overwrite)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `train` command line: common flags, plus `--config` and `--set` for everything else.

    Every flag defaults to None (unset: the YAML file, `--set` or the dataclass default decides); the defaults the
    help shows are read from the dataclasses, so they are written once.
    """
    d = Config()
    parser = argparse.ArgumentParser(
        prog="python train.py",
        description=(
            "Fine-tune a pretrained backbone on a folder of images (one subfolder per class) and write a run folder "
            "with the model, TensorBoard logs and metrics. With no data argument it trains on the ELPV solar-cell "
            "demo dataset (install it with `make demo` or `pip install -e '.[demo]'`)."
        ),
        epilog=(
            "Every setting can also come from a YAML file (--config) or from --set section.key=value, e.g. "
            "--set augment.preset=medical --set train.unfreeze_blocks=all. The resolved settings are written to "
            "<run>/config.yaml. Re-running the same command after an interruption continues the run."
        ),
    )
    source = parser.add_argument_group("data")
    source.add_argument("--data-dir", help="folder with one subfolder of images per class (or train/ val/ test/)")
    source.add_argument("--dataset", help="tfds:NAME to download a TensorFlow Datasets dataset (needs the internet)")
    source.add_argument("--image-size", type=int, help="input size in pixels (default: the backbone's own)")
    source.add_argument("--batch-size", type=int, help=f"images per device per step (default {d.data.batch_size})")
    source.add_argument(
        "--val-fraction", type=float, help=f"share of each class for validation (default {d.data.val_fraction})"
    )
    source.add_argument(
        "--test-fraction", type=float, help=f"share of each class for testing (default {d.data.test_fraction})"
    )
    source.add_argument("--seed", type=int, help=f"seed of the split and shuffles (default {d.data.seed})")
    net = parser.add_argument_group("model")
    net.add_argument("--backbone", help=f"backbone name (default {d.model.backbone}; see --list-backbones)")
    net.add_argument("--weights", help=f"imagenet, none, or a path to backbone weights (default {d.model.weights})")
    net.add_argument("--list-backbones", action="store_true", help="list the available backbones and exit")
    fit = parser.add_argument_group("training")
    fit.add_argument("--epochs", type=int, help="epochs of BOTH phases (head, then fine-tuning)")
    fit.add_argument(
        "--head-epochs",
        type=int,
        help=f"phase 1 epochs, head on cached backbone features (default {d.train.head_epochs}; 0 skips)",
    )
    fit.add_argument(
        "--finetune-epochs",
        type=int,
        help=f"phase 2 epochs, top blocks unfrozen (default {d.train.finetune_epochs}; 0 skips)",
    )
    fit.add_argument(
        "--time-budget",
        help="wall-clock budget such as 10m: epochs and feature views are cut to fit "
        f"(default {d.train.time_budget or 'none'})",
    )
    fit.add_argument(
        "--augment", help=f"none, light, medium, heavy, medical or inspection (default {d.augment.preset})"
    )
    fit.add_argument(
        "--devices",
        help=f"auto, cpu, multi_worker (TF_CONFIG), or a list such as gpu:0,gpu:1 (default {d.runtime.devices})",
    )
    fit.add_argument(
        "--mixed-precision",
        choices=["auto", "on", "off"],
        help=f"float16 compute (default {d.runtime.mixed_precision})",
    )
    fit.add_argument("--jit-compile", action="store_true", default=None, help="compile training steps with XLA")
    run = parser.add_argument_group("run folder")
    run.add_argument("--output-dir", help=f"parent of run folders (default {d.run.output_dir})")
    run.add_argument("--name", help="run folder name (default <date-time>-<backbone>-<size>)")
    run.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        help="continue an interrupted run with its saved settings: a run folder, or the latest unfinished run",
    )
    run.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    parser.add_argument("--config", help="YAML file of settings (sections data, model, train, augment, runtime, run)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override any setting; repeatable"
    )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults, then the YAML file, then `--set`, then the dedicated flags."""
    flags = {
        "data": {
            "data_dir": args.data_dir,
            "dataset": args.dataset,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "val_fraction": args.val_fraction,
            "test_fraction": args.test_fraction,
            "seed": args.seed,
        },
        "model": {"backbone": args.backbone, "weights": args.weights},
        "train": {
            "head_epochs": args.epochs if args.head_epochs is None else args.head_epochs,
            "finetune_epochs": args.epochs if args.finetune_epochs is None else args.finetune_epochs,
            "time_budget": args.time_budget,
        },
        "augment": {"preset": args.augment},
        "runtime": {"devices": args.devices, "mixed_precision": args.mixed_precision, "jit_compile": args.jit_compile},
        "run": {"output_dir": args.output_dir, "name": args.name},
    }
    flags = {section: {k: v for k, v in values.items() if v is not None} for section, values in flags.items()}
    from_file = load_yaml(args.config) if args.config else {}
    return Config().replace(merge(from_file, parse_set(args.set), flags))


# ---------------------------------------------------------------------------------------------------------------
# Run folder


def _comparable(config_dict: dict) -> dict:
    """The settings that decide what a run computes (its name is not one of them), with the defaults of settings
    added since the run's config.yaml was written filled in.

    Raises:
        UserError: the settings are not valid (a damaged or hand-edited config.yaml).
    """
    complete = Config().replace({k: v for k, v in config_dict.items() if k != "run"}).to_dict()
    return {section: values for section, values in complete.items() if section != "run"}


def _auto_name(config: Config) -> str:
    return f"{datetime.now():%Y%m%d-%H%M%S}-{config.model.backbone}-{config.data.image_size}"


def _latest_unfinished(output_dir: Path, matching: dict | None = None) -> Path | None:
    """The most recently changed unfinished run folder, optionally with the same settings as `matching`."""
    candidates = []
    for config_file in output_dir.glob(f"*/{CONFIG_FILE}"):
        run = Run(config_file.parent)
        if run.is_finished():
            continue
        if matching is not None:
            try:
                if _comparable(run.read_settings()) != _comparable(matching):
                    continue
            except UserError:  # a damaged config.yaml: not a run this command can continue
                continue
        candidates.append((config_file.stat().st_mtime, run.root))
    return max(candidates)[1] if candidates else None


def choose_run_dir(config: Config, overwrite: bool) -> tuple[Path, bool]:
    """Picks the run folder: a new one, or an interrupted run of the same settings to continue.

    Returns:
        (run folder, whether it is being resumed).

    Raises:
        UserError: the named run exists and is finished, or was started with other settings.
    """
    output_dir = atomic.writable_folder(config.run.output_dir, "--output-dir")
    settings = config.to_dict()
    if config.run.name is None and not overwrite:
        previous = _latest_unfinished(output_dir, matching=settings)
        if previous is not None:
            runlock.ensure_free(previous, "training")
            log.info(f"Continuing the interrupted run {previous} (same settings). Pass --name to start a separate run.")
            return previous, True
    run_dir = output_dir / (config.run.name or _auto_name(config))
    run = Run(run_dir)
    if not run_dir.exists() or all(path.name == runlock.LOCK_FILE for path in run_dir.iterdir()):
        return run_dir, False
    if not run.config_path.exists():
        raise UserError(
            f"'{run_dir}' exists and is not a run folder (no {CONFIG_FILE}): choose another --name or --output-dir."
        )
    if overwrite:
        # Moved aside, not deleted: `train` deletes it once the new run is set up, or puts it back if not.
        runlock.ensure_free(run_dir, "training")  # never move a run folder away from the process working in it
        replaced = run_dir.with_name(f".{run_dir.name}.replaced")
        if replaced.exists():  # an --overwrite killed during setup: run_dir is its half-made run, the old one is aside
            shutil.rmtree(run_dir)
        else:
            os.replace(run_dir, replaced)
        return run_dir, False
    if run.is_finished():
        raise UserError(
            f"run '{run_dir}' already exists and is finished: pass --overwrite to train it again, "
            "or --name NEW_NAME for a separate run."
        )
    saved = _comparable(run.read_settings())
    if saved != _comparable(settings):
        changed = sorted(
            f"{section}.{key}"
            for section, values in _comparable(settings).items()
            for key, value in values.items()
            if saved.get(section, {}).get(key) != value
        )
        raise UserError(
            f"run '{run_dir}' was interrupted and used other settings ({', '.join(changed)}): "
            f"pass --resume {run_dir} to continue it with its saved settings, --overwrite to start it again, "
            "or --name NEW_NAME for a separate run."
        )
    runlock.ensure_free(run_dir, "training")  # a run that is training now is not "interrupted": say so instead
    log.info(f"Continuing the interrupted run {run_dir}.")
    return run_dir, True


def resume_run(resume: str, output_dir: str) -> tuple[Config, Path]:
    """Finds the run that `--resume` names ("latest" = the most recent unfinished one) and its saved config.

    Raises:
        UserError: no such unfinished run.
    """
    if resume == "latest":
        run_dir = _latest_unfinished(Path(output_dir))
        if run_dir is None:
            raise UserError(f"--resume: there is no unfinished run in '{output_dir}': start one without --resume.")
    else:
        run_dir = Path(resume)
    run = Run(run_dir)
    if not run.config_path.exists():
        raise UserError(f"--resume {resume}: '{run_dir}' is not a run folder (no {CONFIG_FILE}): pass a run folder.")
    if run.is_finished():
        raise UserError(f"--resume {resume}: run '{run_dir}' is already finished; nothing to continue.")
    log.info(f"Continuing the interrupted run {run_dir} with its saved settings.")
    return run.read_config(), run_dir


# ---------------------------------------------------------------------------------------------------------------
# Devices


def use_mixed_precision(setting: str, strategy: tf.distribute.Strategy) -> bool:
    """Mixed float16 where it speeds things up: GPUs of compute capability 7.0 or newer, never on the CPU.

    Not bfloat16 on CPUs that have it natively either: on a Xeon with AVX512_BF16 and AMX (TensorFlow 2.21,
    EfficientNet-Lite0, batch 32 at 224 px, alternating runs) `mixed_bfloat16` was no faster than float32:
    forward 1.03-1.55 s against 0.96-1.12 s a batch, a fine-tuning step 1.63-1.69 s against 1.12-1.59 s.
    """
    if setting != "auto":
        return setting == "on"
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus or not any("GPU" in d for d in distribute.replica_devices(strategy)):
        return False
    return all(
        (tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0)) >= (7, 0) for gpu in gpus
    )


# ---------------------------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a run does, resolved once from the settings (and the time budget) and kept for a resumed run.

    Attributes:
        feature_views: Augmented copies of each training image whose features phase 1 trains on.
        head_epochs: Phase 1 epochs (on cached features).
        finetune_epochs: Phase 2 epochs.
        finetune_start: Epoch number phase 2 starts at (phase 1's epochs run, so the history numbers run on).
    """

    feature_views: int
    head_epochs: int
    finetune_epochs: int
    finetune_start: int | None = None


def _learning_rate(peak: float, steps: int, warmup_fraction: float) -> keras.optimizers.schedules.LearningRateSchedule:
    """Linear warmup to `peak`, then cosine decay to 1 % of it over the phase."""
    warmup = int(steps * warmup_fraction)
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(peak, decay_steps=max(1, steps), alpha=0.01)
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, steps - warmup), alpha=0.01, warmup_target=peak, warmup_steps=warmup
    )


def _compile(model: keras.Model, config: Config, schedule, jit_compile: bool, steps_per_execution: int = 1) -> None:
    model.compile(
        optimizer=optimizer.AdamW(learning_rate=schedule, weight_decay=config.train.weight_decay),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.train.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    # Built now, not inside the first traced step: with no tf.distribute strategy (one device), Keras 3.15 defers
    # building to that trace, and a traced function that creates variables is traced a second time (TensorFlow's
    # rule). One trace instead of two: phase 2's step of a tiny test model 2.8 s -> 0.9 s of tracing.
    model.optimizer.build(model.trainable_variables)


@dataclasses.dataclass
class _Pipelines:
    """The tf.data pipelines of a run, all built on one decoded (and, when it fits, cached) copy of each subset.

    Attributes:
        train: Shuffled, augmented training batches with one-hot labels (phase 2).
        plain_train: The training images un-augmented, in manifest order (phase 1's plain features).
        views: The training images augmented, in manifest order; every pass draws new augmentations.
        val: Validation batches with one-hot labels.
        samples: 16 augmented training images for TensorBoard.
        steps_per_epoch: Batches of `train` per epoch.
    """

    split: data.Split
    options: dict
    replicas: int
    multi_worker: bool
    train: tf.data.Dataset
    plain_train: tf.data.Dataset
    views: tf.data.Dataset
    val: tf.data.Dataset
    samples: tf.data.Dataset
    steps_per_epoch: int

    @classmethod
    def create(
        cls, split: data.Split, config: Config, global_batch: int, replicas: int, multi_worker: bool = False
    ) -> _Pipelines:
        num_classes = len(split.class_names)

        def one_hot(images, labels):  # one-hot: label smoothing, and MixUp / CutMix make soft labels
            return images, tf.one_hot(labels, num_classes)

        options = dict(
            image_size=config.data.image_size,
            batch_size=global_batch,
            resize_mode=config.data.resize_mode,
            cache_budget_mb=config.data.cache_budget_mb,
            disk_cache=demo_data.cache_root() / "decoded" if config.data.disk_cache else None,
            decoding=data.Decoding.from_settings(config.data),
        )
        seed = config.data.seed
        # One decode of the training images serves phase 1's plain pass, its augmented views and phase 2.
        decoded_options = {key: value for key, value in options.items() if key != "batch_size"}
        decoded = data.decoded_images(split, "train", **decoded_options)
        plain = data.batched(decoded, global_batch)
        if _cached(split, "train", options):
            plain = _filled(plain)
        plain = plain.map(one_hot)
        views = augment.augment_dataset(plain, config.augment, num_classes, seed).prefetch(tf.data.AUTOTUNE)
        # The shuffle buffer holds decoded uint8 images (a quarter of float32 batches: an epoch's start fills it
        # with a quarter of the copying): all of them when they fit the memory budget, else as many as do (images
        # read from the disk cache or decoded every epoch come in manifest order, shuffled within it).
        buffer = data.shuffle_buffer(len(split.train), config.data.image_size, config.data.cache_budget_mb)
        shuffled = decoded.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
        steps = math.ceil(len(split.train) / global_batch)
        # A last batch smaller than the replica count leaves a replica an empty batch, which BatchNorm rejects;
        # the few images dropped are different ones every epoch (the pipeline reshuffles).
        if replicas > 1:
            steps = len(split.train) // global_batch
        train = data.batched(shuffled, global_batch, drop_remainder=replicas > 1).map(one_hot)
        train = augment.augment_dataset(train, config.augment, num_classes, seed).prefetch(tf.data.AUTOTUNE)
        # The sample grid reads 16 images of its own: a batch taken from `train` would make its full-size
        # shuffle buffer read the whole training set.
        sample_split = dataclasses.replace(split, train=split.train[:: max(1, len(split.train) // 16)][:16])
        samples = data.make_dataset(sample_split, "train", **options).map(one_hot)
        samples = augment.augment_dataset(samples, config.augment, num_classes, seed)
        pipelines = cls(split, options, replicas, multi_worker, train, plain, views, None, samples, steps)
        pipelines.val = pipelines.evaluation("val").map(one_hot)
        return pipelines

    def evaluation(self, subset: str) -> tf.data.Dataset:
        """Un-augmented batches of a subset in manifest order."""
        # Keras reduces the first batch across replicas before it builds the metrics, which fails when that batch
        # splits unevenly (a subset smaller than the global batch): keep the first batch divisible.
        count, batch = len(getattr(self.split, subset)), self.options["batch_size"]
        if self.multi_worker:
            batch = _batch_leaving_no_worker_empty(count, batch, self.replicas)
        elif count < batch:
            batch = max(self.replicas, count // self.replicas * self.replicas)
        dataset = data.make_dataset(self.split, subset, **dict(self.options, batch_size=batch))
        return _filled(dataset) if _cached(self.split, subset, self.options) else dataset


def _batch_leaving_no_worker_empty(count: int, batch: int, replicas: int) -> int:
    """The largest evaluation batch (at most `batch`) whose last batch still gives every replica an image.

    Across workers a batch is split between the replicas, and a replica handed no image fails in BatchNorm
    (`Incompatible shapes: [32] vs. [0,64,64,3]`); evaluation cannot drop images the way training drops its
    remainder, so the batch size bends instead (3 images on 2 replicas: one batch of 3, split 2 + 1).
    """
    for size in range(min(batch, count), 0, -1):
        if size >= replicas and (count % size == 0 or count % size >= replicas):
            return size
    return max(1, count)


def _filled(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Reads a dataset once to the end so its in-memory cache is complete before Keras iterates it.

    Keras opens an iterator, takes one batch and drops it (to build metrics under a strategy). An abandoned,
    half-written tf.data cache is reset when that iterator is collected, and if that happens while the next
    iterator is writing, the cache is completed short (seen here: 11 of 15 validation images, at random). A
    cache that is complete is only ever read. The decoding this pass does is what the first epoch would do.
    """
    for _ in dataset:
        pass
    return dataset


def _cached(split: data.Split, subset: str, options: dict) -> bool:
    return data.fits_cache(len(getattr(split, subset)), options["image_size"], options["cache_budget_mb"])


@dataclasses.dataclass(frozen=True)
class _Phase1Validation:
    """Phase 1's validation features, kept for the end of the run: while the best weights are still phase 1's (its
    frozen backbone computed them), the validation logits are the head's on them, and the validation images need
    not go through the backbone again (10 s of the demo's 300 px run).

    Attributes:
        epoch: The epoch (1-based) of the best checkpoint phase 1 saved.
        best: Its monitored value. A checkpoint phase 2 saves is better, so the pair tells them apart even when a
            damaged plan.json made phase 1 run again under a resumed phase 2's epoch numbers.
        x: The validation images' pooled features, in split order.
        labels: Their classes, to check the order against the split's.
    """

    epoch: int
    best: float
    x: np.ndarray
    labels: np.ndarray


@dataclasses.dataclass
class _Context:
    """What both phases of one run share."""

    run_dir: Path
    config: Config
    split: data.Split
    pipelines: _Pipelines
    strategy: tf.distribute.Strategy
    class_weight: dict | None
    budget: budget_lib.TimeBudget | None
    extra_callbacks: list
    inference_rate: float | None = None  # images/s of the frozen backbone's forward pass, once phase 1 measured it
    finishing: budget_lib.StepTimes = dataclasses.field(default_factory=budget_lib.StepTimes)
    phase1_validation: _Phase1Validation | None = None  # set by phase 1 when it ran in this process

    @property
    def mode(self) -> str:
        return "min" if self.config.train.monitor.endswith("loss") else "max"

    @property
    def run(self) -> Run:
        return Run(self.run_dir)

    def epoch_callbacks(self, phase: int) -> list[keras.callbacks.Callback]:
        """The callbacks of every epoch of both phases, in the order their logs need (history.csv last)."""
        return [
            callbacks.LearningRateLogger(),
            callbacks.PhaseLogger(phase),
            keras.callbacks.CSVLogger(self.run.history_path, append=True),
            callbacks.EpochScalars(self.run.logs),
            *self.extra_callbacks,
        ]


def _train_head(model: keras.Model, plan: _Plan, ctx: _Context) -> tuple[_Plan, dict]:
    """Phase 1: features of the frozen backbone computed once, then the head trained on them in memory.

    Returns:
        The plan (its views possibly cut by the time budget, and where phase 2's epochs start) and throughput.
    """
    config, split, pipelines = ctx.config, ctx.split, ctx.pipelines
    checkpoints = ctx.run.checkpoints
    ctx.run.history_path.unlink(missing_ok=True)  # a phase 1 cut short starts over: history from epoch 1
    with ctx.strategy.scope():
        model_lib.freeze_backbone(model)
        forward = features.forward_pass(features.feature_extractor(model))
        head = features.head_model(model)
    n_train = len(split.train)
    log.info(
        f"Phase 1/2: training the head on cached backbone features: the {n_train} training images plain and in "
        f"{plan.feature_views} augmented view(s), {plan.head_epochs} epochs, "
        f"peak learning rate {config.train.head_lr:g}."
    )
    plain = features.extract(forward, [pipelines.val, pipelines.plain_train])
    rate = (len(split.val) + n_train) / max(plain.seconds, 1e-9)
    views = plan.feature_views
    ctx.inference_rate = rate
    if ctx.budget is not None:
        views = ctx.budget.views(views, n_train / rate, _reserve_seconds(ctx), phase2=plan.finetune_epochs > 0)
        plan = dataclasses.replace(plan, feature_views=views)
    augmented = features.extract(forward, [pipelines.views] * views) if views else None
    n_val = len(split.val)
    x_val, y_val = plain.x[:n_val], plain.y[:n_val]
    x_train = plain.x[n_val:] if augmented is None else np.concatenate([plain.x[n_val:], augmented.x])
    y_train = plain.y[n_val:] if augmented is None else np.concatenate([plain.y[n_val:], augmented.y])
    extract_seconds = plain.seconds + (augmented.seconds if augmented else 0.0)
    log.info(f"  features of {len(x_train) + n_val} images in {extract_seconds:.0f} s ({rate:.0f} images/s)")

    # Large batches on cached features, but never so large that an epoch is fewer than MIN_HEAD_STEPS updates
    # (a small folder at batch 256 would train its head for one step an epoch).
    per_replica = max(config.data.batch_size, min(features.HEAD_BATCH, len(x_train) // features.MIN_HEAD_STEPS))
    batch = per_replica * ctx.strategy.num_replicas_in_sync
    steps = math.ceil(len(x_train) / batch)
    started = time.perf_counter()
    with ctx.strategy.scope():
        schedule = _learning_rate(config.train.head_lr, steps * plan.head_epochs, config.train.warmup_fraction)
        # A head step is a small matrix product: one call per epoch instead of one per step (28 % less time per
        # epoch on ELPV features, where Keras' per-step dispatch is the cost). Not across replicas: Keras 3.15's
        # multi-step loop under MirroredStrategy with more than one replica fails ("You must feed a value for
        # placeholder tensor ... while/cond/Placeholder").
        one_replica = ctx.strategy.num_replicas_in_sync == 1
        per_call = min(steps, 64) if one_replica else 1
        _compile(head, config, schedule, config.runtime.jit_compile, steps_per_execution=per_call)
    best = features.RestoreBest(config.train.monitor, ctx.mode)
    phase_callbacks = [best, *ctx.epoch_callbacks(phase=1)]
    phase_callbacks.append(callbacks.AugmentedSamples(ctx.run.logs, pipelines.samples, split.class_names))
    if config.train.early_stopping_patience > 0:
        patience = config.train.early_stopping_patience
        phase_callbacks.append(keras.callbacks.EarlyStopping(config.train.monitor, patience=patience, mode=ctx.mode))
    history = head.fit(
        x_train,
        y_train,
        batch_size=batch,
        epochs=plan.head_epochs,
        validation_data=(x_val, y_val),
        class_weight=ctx.class_weight,
        shuffle=True,  # seeded by keras.utils.set_random_seed
        callbacks=phase_callbacks,
        verbose=0,
    )
    epochs_run = len(history.epoch)
    head_seconds = time.perf_counter() - started
    log.info(
        f"  head trained in {head_seconds:.1f} s ({epochs_run} epochs); best {config.train.monitor} "
        f"{best.best:.4f} at epoch {best.best_epoch + 1}."
    )
    # The best head becomes the run's best checkpoint so far: phase 2 starts from it and must beat its value.
    checkpoints_lib.BestStore(checkpoints).save(model, config.train.monitor, best.best, best.best_epoch + 1)
    if ctx.strategy.num_replicas_in_sync == 1:  # with several replicas the end of the run predicts across them
        # A copy: a view would keep every training feature in memory as well.
        ctx.phase1_validation = _Phase1Validation(best.best_epoch + 1, best.best, x_val.copy(), y_val.argmax(-1))
    plan = dataclasses.replace(plan, finetune_start=epochs_run)
    throughput = {
        "phase1_feature_images_per_second": rate,
        "phase1_seconds": round(extract_seconds + head_seconds, 2),
        "phase1_images": len(x_train) + n_val,
    }
    return plan, throughput


def _run_finetuning(model: keras.Model, plan: _Plan, ctx: _Context) -> float | None:
    """Phase 2: unfreezes the top blocks (BatchNorm frozen), compiles and fits, resuming its backup if there is one.

    Returns:
        The phase's training throughput in images per second.
    """
    config = ctx.config
    checkpoints = ctx.run.checkpoints
    store = checkpoints_lib.BestStore(checkpoints)
    backup = checkpoints_lib.Backup(checkpoints / checkpoints_lib.BACKUP_FOLDER)
    start, end = plan.finetune_start, plan.finetune_start + plan.finetune_epochs
    with ctx.strategy.scope():
        blocks = model_lib.unfreeze_backbone(model, config.train.unfreeze_blocks)
        store.load_into(model)  # start from the best weights so far, not the last
        schedule = _learning_rate(
            config.train.finetune_lr, ctx.pipelines.steps_per_epoch * plan.finetune_epochs, config.train.warmup_fraction
        )
        _compile(model, config, schedule, config.runtime.jit_compile)
        # The backup brings back the weights, the optimizer (so the schedule's position) and the epoch reached.
        restored = backup.restore(model)
    if restored is not None:
        log.info(f"  continuing phase 2 after epoch {restored} from {backup.folder}.")
        start = restored
    # Rows of epochs about to run again (a kill after history.csv's row but before the backup, or a phase that
    # starts over) would be logged twice.
    _trim_history(ctx.run.history_path, before_epoch=start)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    log.info(
        f"Phase 2/2: fine-tuning {len(blocks)} backbone block(s) ({blocks[0]} to the top; BatchNorm frozen); "
        f"epochs {start + 1}-{end}, peak learning rate {config.train.finetune_lr:g}, "
        f"{trainable:,} trainable parameters."
    )
    meter = callbacks.ThroughputMeter(len(ctx.split.train))
    phase_callbacks = [
        meter,
        checkpoints_lib.BestCheckpoint(store, config.train.monitor, ctx.mode),
        *ctx.epoch_callbacks(phase=2),
        # Last: a backup never names an epoch whose best weights or history row were not written.
        backup,
    ]
    if ctx.budget is not None:
        cluster = isinstance(ctx.strategy, tf.distribute.MultiWorkerMirroredStrategy)
        validation = len(ctx.split.val) / ctx.inference_rate if ctx.inference_rate else 0.0
        stop = budget_lib.stop_when_spent(ctx.budget, _reserve_seconds(ctx), validation, within_epoch=not cluster)
        phase_callbacks.append(stop)
    if config.train.early_stopping_patience > 0:
        # The best weights are restored from the best checkpoint at the end of training (that file survives a
        # restart, EarlyStopping's copy in memory does not).
        patience = config.train.early_stopping_patience
        phase_callbacks.append(keras.callbacks.EarlyStopping(config.train.monitor, patience=patience, mode=ctx.mode))
    model.fit(
        ctx.pipelines.train,
        validation_data=ctx.pipelines.val,
        initial_epoch=start,
        epochs=end,
        class_weight=ctx.class_weight,
        shuffle=False,  # the pipeline shuffles, seeded; Keras cannot shuffle a tf.data.Dataset anyway
        callbacks=phase_callbacks,
        verbose=1 if sys.stdout.isatty() else 2,
    )
    return meter.steady_rate()


def _resolve_plan(ctx: _Context) -> _Plan:
    """The plan of this run: the one saved by an earlier attempt of it, else the settings' epochs and views.

    A damaged plan.json (a disk error, an edit) is reported and phase 1 runs again (seconds, on cached features),
    which makes the plan anew; phase 2 then continues from its backup as usual.
    """
    try:
        saved = ctx.run.read_plan()
        if saved is not None:
            plan = _Plan(**saved)
            if all(isinstance(value, int) or value is None for value in dataclasses.astuple(plan)):
                return plan
            raise TypeError(f"values {saved}")
    except (ValueError, TypeError) as error:
        log.warning(f"note: {ctx.run.plan_path} is damaged ({type(error).__name__}: {error}); phase 1 runs again.")
        ctx.run.plan_path.unlink()
        ctx.run.phase_marker(1).unlink(missing_ok=True)
    train_config = ctx.config.train
    return _Plan(train_config.feature_views, train_config.head_epochs, train_config.finetune_epochs)


def _fit_phases(model: keras.Model, ctx: _Context) -> dict:
    """Runs the phases not yet finished in this run folder; returns their throughput figures."""
    run = ctx.run
    plan = _resolve_plan(ctx)
    throughput: dict = {}
    if plan.head_epochs == 0:
        log.info("Phase 1/2: skipped (0 epochs).")
        plan = dataclasses.replace(plan, finetune_start=plan.finetune_start or 0)
    elif run.phase_done(1) and not _head_lost(run):
        log.info("Phase 1/2: already finished in this run; skipping.")
    else:
        plan, throughput = _train_head(model, plan, ctx)
        run.write_plan(dataclasses.asdict(plan))
        run.mark_phase_done(1)
    backup = checkpoints_lib.Backup(run.checkpoints / checkpoints_lib.BACKUP_FOLDER)
    phase2_started = backup.exists() or run.phase_done(2)
    if plan.finetune_epochs and ctx.budget is not None and not phase2_started:  # a resumed phase 2 keeps its plan
        plan = dataclasses.replace(plan, finetune_epochs=_affordable_epochs(model, plan.finetune_epochs, ctx))
        run.write_plan(dataclasses.asdict(plan))
    if plan.finetune_epochs == 0:
        log.info("Phase 2/2: skipped (0 epochs).")
    elif run.phase_done(2):
        log.info("Phase 2/2: already finished in this run; skipping.")
    else:
        run.write_plan(dataclasses.asdict(plan))
        throughput["phase2_images_per_second"] = _run_finetuning(model, plan, ctx)
        run.mark_phase_done(2)
    backup.remove()  # only once the phase is marked done: a kill before that resumes from it
    return throughput


@contextlib.contextmanager
def _naming_unreadable_images(split: data.Split, config: Config) -> Iterator[None]:
    """Turns tf.data's error for an image that no longer reads (changed after the split was made, e.g. truncated
    between a kill and the re-run) into a message naming the files: tf.data's own ("Truncated File Read", "image
    file is truncated") names none. Only checked after such an error, so it costs nothing otherwise."""
    try:
        yield
    except tf.errors.OpError:
        decoding = data.Decoding.from_settings(config.data)
        broken = []
        for relative, _ in [*split.train, *split.val, *split.test]:
            try:
                data.load_image(Path(split.root) / relative, decoding)
            except (OSError, ValueError) as error:
                broken.append(f"{relative} ({str(error).splitlines()[0]})")
        if not broken:
            raise
        shown = "; ".join(broken[:5]) + (f"; and {len(broken) - 5} more" if len(broken) > 5 else "")
        raise UserError(
            f"{len(broken)} image(s) of this run's split can no longer be read (changed after the split was made): "
            f"{shown}. Restore them and run the same command again, or start the run afresh with --overwrite "
            "(a new split without them)."
        ) from None


def _set_aside_damaged_history(run: Run) -> None:
    """Moves a history.csv that cannot be read (not UTF-8 CSV with an epoch column) to history.damaged.csv, so that
    Keras' CSVLogger starts a new one instead of failing on it; the checkpoints do not depend on it."""
    path = run.history_path
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        if not rows or "epoch" in rows[0]:
            return
    except FileNotFoundError:
        return
    except (UnicodeDecodeError, csv.Error):
        pass
    aside = path.with_name("history.damaged.csv")
    os.replace(path, aside)
    atomic.write_text(path, "")  # CSVLogger writes the header into an empty file
    log.warning(f"note: {path} cannot be read; it was moved to {aside.name}; the epochs from now on are logged anew.")


def _trim_history(path: Path, before_epoch: int) -> None:
    """Keeps the rows of history.csv for epochs before `before_epoch` (0-based)."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return
    column = rows[0].index("epoch")
    kept = [
        rows[0],
        *(row for row in rows[1:] if len(row) > column and row[column].isdigit() and int(row[column]) < before_epoch),
    ]
    if len(kept) < len(rows):
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(kept)
        atomic.write_text(path, buffer.getvalue())


def _head_lost(run: Run) -> bool:
    """True when phase 1 finished but its result is gone (a damaged best checkpoint and no phase-2 state to continue
    from): phase 1 then runs again, which costs seconds on cached features."""
    backup = checkpoints_lib.Backup(run.checkpoints / checkpoints_lib.BACKUP_FOLDER)
    if run.phase_done(2) or backup.sound():
        return False
    if checkpoints_lib.BestStore(run.checkpoints).record() is not None:
        return False
    log.warning("Phase 1/2: its best checkpoint is missing or damaged; training the head again.")
    return True


def _reserve_seconds(ctx: _Context) -> float:
    """Time kept back from a budget for the end of the run: predicting val and test, saving, plots."""
    rate = ctx.inference_rate or 20.0
    return (len(ctx.split.val) + len(ctx.split.test)) / rate + 15.0


def _affordable_epochs(model: keras.Model, wanted: int, ctx: _Context) -> int:
    """Measures one fine-tuning step with the top blocks unfrozen and returns the epochs the budget allows."""
    with ctx.strategy.scope():
        model_lib.unfreeze_backbone(model, ctx.config.train.unfreeze_blocks)
    images, labels = next(iter(ctx.pipelines.train))
    step = budget_lib.step_seconds(model, images, labels)
    batches_val = math.ceil(len(ctx.split.val) / ctx.pipelines.options["batch_size"])
    validation = len(ctx.split.val) / ctx.inference_rate if ctx.inference_rate else batches_val * step / 3
    epoch = ctx.pipelines.steps_per_epoch * step + validation + 2.0  # + the checkpoint and backup writes
    return ctx.budget.epochs(wanted, epoch, _reserve_seconds(ctx))


def train(
    config: Config,
    *,
    run_dir: Path | None = None,
    overwrite: bool = False,
    extra_callbacks: list[keras.callbacks.Callback] | tuple = (),
) -> Path:
    """Runs a whole training job and returns its run folder.

    In a cluster (TF_CONFIG, see classifier/distribute.py) every worker runs this same function; only the chief
    writes the run folder. The other workers train in step with it in a temporary folder that they remove.

    Args:
        config: The settings.
        run_dir: An existing run folder to continue (from `resume_run`); None picks the folder from the config.
        overwrite: Replace an existing run folder of the same name.
        extra_callbacks: Added to both phases (used by tests to interrupt a run).

    Raises:
        UserError: for any problem with the data, the settings or the run folder.
    """
    role = distribute.cluster_role()
    if role.is_chief or role.workers == 1:
        return _train(config, role, run_dir, overwrite, extra_callbacks)
    prefix = f"classifier-{role.task_type}{role.index}-"
    _remove_scratch_of_dead_workers(Path(tempfile.gettempdir()), prefix)
    scratch = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))
    try:
        chief = run_dir or (Path(config.run.output_dir) / config.run.name if config.run.name else None)
        mirror = _mirror_of_chief_state(chief, scratch)
        if mirror is not None:  # a restarted cluster: every worker continues from the chief's state, in step
            log.info(f"{role.describe()}: continuing from the chief's state in {chief}.")
            saved = Run(mirror).read_config()
            _train(saved.replace({"run": {"output_dir": str(scratch)}}), role, mirror, False, extra_callbacks)
        else:
            worker_config = config.replace({"run": {"output_dir": str(scratch)}})
            _train(worker_config, role, None, True, extra_callbacks)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info(f"{role.describe()}: finished; the chief wrote the run folder.")
    return Path(config.run.output_dir) / (config.run.name or "")


def _remove_scratch_of_dead_workers(folder: Path, prefix: str) -> None:
    """Removes temporary run folders (`<prefix><pid>-*`) that workers killed before they could clean up left."""
    for stale in folder.glob(f"{prefix}*"):
        pid = stale.name[len(prefix) :].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def _mirror_of_chief_state(chief: Path | None, scratch: Path) -> Path | None:
    """A copy, in `scratch`, of the chief's unfinished run folder when it holds training state to continue from
    (the output folder is shared, as on one host or a cluster file system), else None.

    A worker that started afresh while the chief continued would run other epochs than the chief and the
    cluster's collective steps would never meet. Copied, the worker makes the chief's decisions (phase markers,
    plan, backup epoch) on the same files.
    """
    if chief is None or Run(chief).is_finished() or not Run(chief).plan_path.exists():
        return None
    mirror = scratch / chief.name
    shutil.copytree(chief, mirror, ignore=shutil.ignore_patterns(runlock.LOCK_FILE, LOGS_FOLDER))
    return mirror


def _train(
    config: Config,
    role: distribute.Role,
    run_dir: Path | None,
    overwrite: bool,
    extra_callbacks: list[keras.callbacks.Callback] | tuple,
) -> Path:
    started = time.perf_counter()
    resumed = run_dir is not None
    if not resumed:
        data_dir = demo_data.resolve_data_dir(config.data.data_dir, config.data.dataset)
        _refuse_output_inside(Path(config.run.output_dir), Path(data_dir))
        spec = backbones.get_backbone_spec(config.model.backbone)
        resolved = {"data": {"data_dir": str(Path(data_dir).resolve()), "dataset": None}}
        if config.data.image_size is None:
            resolved["data"]["image_size"] = spec.default_size
        config = config.replace(resolved)
        spec.check_size(config.data.image_size)
        run_dir, resumed = choose_run_dir(config, overwrite)
    with runlock.hold(run_dir, "training"):
        try:
            return _train_in(config, role, run_dir, resumed, extra_callbacks, started)
        finally:
            callbacks.close_summary_writers(Run(run_dir).logs)  # flushed, also when training stops with an error


def _refuse_output_inside(output_dir: Path, data_dir: Path) -> None:
    """Run folders inside the data folder would be scanned as a class of images: the next run would fail on them."""
    output, data_root = output_dir.resolve(), data_dir.resolve()
    if output == data_root or data_root in output.parents:
        raise UserError(
            f"--output-dir '{output_dir}' is inside the data folder '{data_dir}', where its run folders would be read "
            "as a class of images: choose an output folder outside it (the default is saved_models/ in the current "
            "folder)."
        )


def _train_in(
    config: Config,
    role: distribute.Role,
    run_dir: Path,
    resumed: bool,
    extra_callbacks: list[keras.callbacks.Callback] | tuple,
    started: float,
) -> Path:
    """One training run, step by step: the folder and its split, the devices, the input pipelines and the model;
    the phases not yet finished; then the final model, its metrics and the files that mark the run finished."""
    run = Run(run_dir)
    # A mistake found while setting up (too large a batch, a bad size) must not leave a half-made run folder
    # that the next attempt would take for an interrupted run.
    with _removed_on_user_error(run_dir, keep=resumed):
        split = _prepare_folder(run, config)
        strategy, global_batch = _devices(config, role, split)
        with _naming_unreadable_images(split, config):  # the memory cache is filled here
            pipelines = _Pipelines.create(split, config, global_batch, strategy.num_replicas_in_sync, role.workers > 1)
        weights_by_class = _announced_class_weights(config.train.class_weights, split)
        with strategy.scope():
            model = model_lib.build_classifier(
                config.model.backbone,
                len(split.class_names),
                config.data.image_size,
                weights=config.model.weights,
                dropout=config.model.dropout,
            )
    ctx = _Context(
        run_dir=run_dir,
        config=config,
        split=split,
        pipelines=pipelines,
        strategy=strategy,
        class_weight=weights_by_class,
        budget=None
        if config.train.time_budget is None
        else budget_lib.TimeBudget(budget_lib.parse_duration(config.train.time_budget), started),
        extra_callbacks=list(extra_callbacks),
    )
    with _naming_unreadable_images(split, config):
        throughput = _fit_phases(model, ctx)
    _finish(model, ctx, throughput, started, resumed)
    return run_dir


def _prepare_folder(run: Run, config: Config) -> data.Split:
    """The run folder with its settings, split and labels (the split is made once and reused on resume)."""
    run.root.mkdir(parents=True, exist_ok=True)
    run.write_config(config)
    run.checkpoints.mkdir(exist_ok=True)
    for folder in (run.root, run.checkpoints, run.checkpoints / checkpoints_lib.BACKUP_FOLDER):
        atomic.remove_leftovers(folder)  # what writers killed mid-write left; their previous files are intact
    _set_aside_damaged_history(run)
    split = data.prepare_split(
        config.data.data_dir,
        run.root,
        val_fraction=config.data.val_fraction,
        test_fraction=config.data.test_fraction,
        seed=config.data.seed,
        decoding=data.Decoding.from_settings(config.data),
        group_by=config.data.group_by,
    )
    run.write_labels(split.class_names)
    _print_data_summary(split, run.root)
    positive = config.data.positive_class
    if positive is not None and (len(split.class_names) != 2 or positive not in split.class_names):
        raise UserError(
            f"positive_class '{positive}' needs a two-class dataset with a class of that name; the classes are "
            f"{split.class_names}: set data.positive_class to one of them, or leave it out."
        )
    return split


def _devices(config: Config, role: distribute.Role, split: data.Split) -> tuple[tf.distribute.Strategy, int]:
    """The seeded generators, the distribution strategy, the precision policy and the global batch, printed."""
    # Head initialisation, dropout and augmentation draw from the seeded generators: the same command gives
    # the same split and nearly the same model (multi-threaded CPU kernels still add rounding noise).
    keras.utils.set_random_seed(config.data.seed)
    strategy = distribute.make_strategy(config.runtime.devices, role)
    mixed = use_mixed_precision(config.runtime.mixed_precision, strategy)
    keras.mixed_precision.set_dtype_policy("mixed_float16" if mixed else "float32")
    global_batch = config.data.batch_size * strategy.num_replicas_in_sync
    data.check_batch_size(split, global_batch)
    log.info(
        f"Devices: {strategy.num_replicas_in_sync} replica(s) {distribute.replica_devices(strategy)}, "
        f"global batch {global_batch}, mixed precision {'on' if mixed else 'off'}, "
        f"image size {config.data.image_size}px."
    )
    if role.workers > 1:
        log.info(f"Cluster: this process is {role.describe()}.")
    return strategy, global_batch


def _announced_class_weights(setting: str, split: data.Split) -> dict[int, float] | None:
    """`_class_weights`, and a line saying which were chosen (or why none were, for two imbalanced classes)."""
    weights_by_class = _class_weights(setting, split)
    if weights_by_class:
        shown = ", ".join(f"{split.class_names[i]} {w:.2f}" for i, w in weights_by_class.items())
        log.info(f"Class weights (balanced): {shown}")
    elif setting == "auto" and data.class_weights(split) is not None:
        log.info(
            "Class weights: none, although the classes are imbalanced: with two classes the operating point "
            "chosen on the validation split sets the threshold (--set train.class_weights=on to weigh the loss)."
        )
    return weights_by_class


def _finish(model: keras.Model, ctx: _Context, throughput: dict, started: float, resumed: bool) -> None:
    """The best weights, calibrated and saved as model.keras; metrics, plots and TensorBoard images; metrics.json
    last, since its presence marks the run as finished. Each step is timed (`finishing_seconds` in metrics.json)."""
    run, finishing = Run(ctx.run_dir), ctx.finishing
    with finishing.step("predictions"):
        store = checkpoints_lib.BestStore(run.checkpoints)
        best = store.record()
        store.load_into(model)  # early stopping's "restore the best weights", across phases and restarts
        logits = _subset_logits(model, ctx, best)
    with finishing.step("calibration"):
        model, record = _calibrate(model, ctx, logits)
    with finishing.step("saving"):
        _save_model(model, run.model_path)
        run.write_contract(InputContract.of_training(ctx.config.data, ctx.split.class_names))  # beside model.keras
    metrics = _final_metrics(model, ctx, logits, record, best["epoch"] if best else None)
    with finishing.step("plots"):
        callbacks.write_hparams(run.logs, _flat_hparams(ctx.config))
        try:
            plots.plot_training_curves(run.root)
        except UserError as error:  # no epoch in history.csv (set aside as damaged): the model is not affected
            log.warning(f"note: no training curves: {error}")
    metrics.update(best=best, throughput=throughput, train_seconds=round(time.perf_counter() - started, 1))
    metrics["resumed"] = resumed
    metrics["finishing_seconds"] = finishing.seconds
    log.info(f"After training: {finishing.describe()}.")
    run.write_metrics(metrics)  # written last: its presence marks the run as finished
    _print_summary(run.root, metrics)


def _subset_logits(model: keras.Model, ctx: _Context, best: dict | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{subset: (logits, labels)} of the final weights on the validation and test splits that have images; the
    validation logits from phase 1's features when the final weights are phase 1's best (`_Phase1Validation`)."""
    with ctx.strategy.scope():
        to_logits = calibration.logits_model(model)
    kept = ctx.phase1_validation
    result = {}
    for subset in ("val", "test"):
        labels = np.array([label for _, label in getattr(ctx.split, subset)], dtype=np.int64)
        if not len(labels):
            continue
        phase1 = kept is not None and best is not None and (best["epoch"], best["best"]) == (kept.epoch, kept.best)
        if subset == "val" and phase1 and np.array_equal(kept.labels, labels):
            values = features.head_logits(model, kept.x)
        else:
            values = to_logits.predict(ctx.pipelines.evaluation(subset), verbose=0)
        result[subset] = (np.asarray(values, dtype=np.float64), labels)
    return result


def _calibrate(model: keras.Model, ctx: _Context, logits: dict) -> tuple[keras.Model, dict]:
    """Temperature scaling fitted on the validation split (`classifier.calibration`) and baked into the model.

    Returns:
        The calibrated model (same layers and weights, its "temperature" layer set) and the record written to
        calibration.json: the validation fit (temperature, NLL and ECE before and after) and the test split's ECE.
    """
    if "val" in logits:
        temperature, note = calibration.fit_temperature(*logits["val"])
    else:
        temperature, note = 1.0, "no validation images: nothing to fit the temperature on; kept at 1"
    values, labels = logits.get("val", (np.zeros((0, len(ctx.split.class_names))), np.zeros(0, np.int64)))
    record = calibration.calibration_record(values, labels, temperature, note)
    record.update(subset="val", class_names=ctx.split.class_names, test=None)
    if "test" in logits:
        test = calibration.calibration_record(*logits["test"], temperature, note)
        record["test"] = {key: test[key] for key in ("count", "nll_before", "nll_after", "ece_before", "ece_after")}
    calibration.write_calibration(ctx.run_dir, record)
    with ctx.strategy.scope():
        calibrated = calibration.with_temperature(model, temperature)
    if note:
        log.info(f"Calibration: temperature {temperature:g}: {note}.")
    else:
        log.info(
            f"Calibration: temperature {temperature:.3g} fitted on {record['count']} validation images: ECE "
            f"{record['ece_before']:.3f} -> {record['ece_after']:.3f}, NLL {record['nll_before']:.3f} -> "
            f"{record['nll_after']:.3f}. {MODEL_FILE} and every export give the calibrated probabilities."
        )
    return calibrated, record


def _final_metrics(model: keras.Model, ctx: _Context, logits: dict, record: dict, epoch: int | None) -> dict:
    """Metrics of the final (calibrated) model, its operating point, and its TensorBoard images."""
    class_names = ctx.split.class_names
    metrics = {"class_names": class_names, "calibration": record}
    probabilities = {}
    for subset, (values, labels) in logits.items():
        probabilities[subset] = calibration.softmax(values, record["temperature"])
        metrics[subset] = classification_metrics(labels, probabilities[subset], class_names)
    if "val" not in logits:
        return metrics
    labels, scores = logits["val"][1], probabilities["val"]
    decisions, rule = scores.argmax(axis=-1), "argmax (the most probable class)"
    if len(class_names) == 2:  # the threshold is chosen on the calibrated probabilities, as predict will see them
        point = _choose_operating_point(ctx.run_dir, ctx.config, ctx.split, labels, scores)
        metrics["operating_point"] = point
        positive = point["positive_index"]
        decisions = np.where(scores[:, positive] >= point["threshold"], positive, 1 - positive)
        rule = f"operating point, '{point['positive_class']}' when its probability >= {point['threshold']:.3f}"
    with ctx.finishing.step("plots"):
        callbacks.write_confusion_matrix(ctx.run.logs, labels, decisions, class_names, epoch, rule)
    with ctx.finishing.step("Grad-CAM grid"):
        _write_gradcam_grid(model, ctx, labels, decisions, scores, epoch, rule)
    return metrics


def _write_gradcam_grid(
    model: keras.Model,
    ctx: _Context,
    labels: np.ndarray,
    decisions: np.ndarray,
    scores: np.ndarray,
    epoch: int | None,
    rule: str,
) -> None:
    """Up to 16 validation images (the wrong ones first) with the heatmap of the decided class, to TensorBoard."""
    chosen = gradcam.pick_examples(labels, decisions, gradcam.TENSORBOARD_IMAGES)
    options, root = ctx.pipelines.options, Path(ctx.split.root)
    batch = np.stack(  # read again, the way the pipeline reads them: cheaper than a pass over the whole split
        [
            data.load_and_resize(
                str(root / ctx.split.val[i][0]), options["image_size"], options["resize_mode"], options["decoding"]
            )
            for i in chosen
        ]
    ).astype(np.float32)
    # One batch: traced from 224 px, eager below, where tracing costs more. EfficientNet-Lite0, 16 images, the first
    # call in a process (2026-12-03, 2-core EPYC): 300 px traced 2.0 s against eager 8.6-10.2 s; 224 px 1.5 against
    # 2.3 s; 128 px 1.8 against 1.1 s; the tests' tiny backbone at 48 px 0.75 against 0.44 s.
    traced = options["image_size"] >= 224
    maps, _, _, _ = gradcam.GradCam(model, traced=traced).heatmaps(batch, classes=decisions[chosen])
    names = ctx.split.class_names
    overlays = [gradcam.overlay(image.astype(np.uint8), heatmap) for image, heatmap in zip(batch, maps, strict=True)]
    titles = [f"true {names[labels[i]]}\npredicted {names[decisions[i]]} {scores[i, decisions[i]]:.2f}" for i in chosen]
    colours = ["tab:green" if labels[i] == decisions[i] else "tab:red" for i in chosen]
    wrong = sum(labels[i] != decisions[i] for i in chosen)
    heading = (
        f"Grad-CAM, validation, {callbacks.final_model_title(epoch)}: {wrong} wrong (red), {len(chosen) - wrong} "
        f"right (green)\npredicted by {rule}\nred = where the evidence for the predicted class was; a hint where "
        "to look, not proof"
    )
    callbacks.write_image_grid(ctx.run.logs, "gradcam", overlays, titles, colours, heading, epoch)


def _choose_operating_point(
    run_dir: Path, config: Config, split: data.Split, labels: list[int], probabilities: np.ndarray
) -> dict:
    """Picks the two-class decision threshold on the validation split and stores it with the run."""
    method, target = operating_point.parse_method(config.train.operating_point)
    point = operating_point.operating_point_for(
        labels,
        probabilities,
        split.class_names,
        method=method,
        target_sensitivity=target,
        positive_class=config.data.positive_class,
    )
    operating_point.write_operating_point(run_dir, point)
    return point


@contextlib.contextmanager
def _removed_on_user_error(run_dir: Path, keep: bool) -> Iterator[None]:
    """Deletes a new run folder when a UserError ends the run before training starts; `keep` for resumed runs.

    A run that `--overwrite` moved aside is put back in that case, and deleted only once setup has succeeded.
    """
    replaced = run_dir.with_name(f".{run_dir.name}.replaced")
    try:
        yield
    except UserError:
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
            if replaced.exists():
                os.replace(replaced, run_dir)
        raise
    shutil.rmtree(replaced, ignore_errors=True)


def _class_weights(setting: str, split: data.Split) -> dict[int, float] | None:
    """The loss weights per class: `auto` weighs imbalanced multi-class data, never two classes.

    With two classes the decision threshold is chosen afterwards on the validation split (the operating point),
    which is where the trade-off between the classes belongs; weighting the loss as well shifts every
    probability towards the minority class (worse calibration) and, at argmax, cost 1.5-3.5 points of test
    accuracy on ELPV (logistic regression on the backbone's features, seed 42, 224 and 300 px) for no AUC.
    """
    if setting == "off" or (setting == "auto" and len(split.class_names) == 2):
        return None
    return data.class_weights(split, force=setting == "on")


def _save_model(model: keras.Model, path: Path) -> None:
    checkpoints_lib.ensure_room(model, path)
    with atomic.replacing(path) as temporary:  # an interrupted save never leaves a half `model.keras`
        model.save(temporary)


def _flat_hparams(config: Config) -> dict:
    return {
        f"{section}.{key}": value
        for section, values in config.to_dict().items()
        if section != "run"
        for key, value in values.items()
        if value is not None
    }


def _print_data_summary(split: data.Split, run_dir: Path) -> None:
    counts = {name: [0, 0, 0] for name in split.class_names}
    for column, subset in enumerate((split.train, split.val, split.test)):
        for _, label in subset:
            counts[split.class_names[label]][column] += 1
    log.info(f"Data: {split.root}  ({len(split.class_names)} classes; train / val / test images)")
    for name, (n_train, n_val, n_test) in counts.items():
        log.info(f"  {name:24s} {n_train:6d} {n_val:6d} {n_test:6d}")
    if split.groups:
        # Counts only: the group hashes stay in split.json.
        sizes = ", ".join(f"{len(split.groups.get(subset, []))} in {subset}" for subset in data.SUBSETS)
        log.info(f"Grouped by {split.group_by}: {sizes} (groups).")
    if split.skipped:
        log.info(f"Skipped {len(split.skipped)} unreadable file(s), listed with reasons in {Run(run_dir).split_path}:")
        for entry in split.skipped[:5]:
            log.info(f"  {entry['path']}: {entry['reason']}")
        if len(split.skipped) > 5:
            log.info(f"  ... and {len(split.skipped) - 5} more")


def _print_summary(run_dir: Path, metrics: dict) -> None:
    log.info("")
    for subset in ("val", "test"):
        if subset in metrics:
            m = metrics[subset]
            auc = "n/a" if m["auc"] is None else f"{m['auc']:.3f}"
            log.info(
                f"{subset:5s} accuracy {m['accuracy']:.3f}  balanced {m['balanced_accuracy']:.3f}  "
                f"AUC {auc}  (n={m['count']})"
            )
    record = metrics.get("calibration")
    if record and record["count"]:
        log.info(
            f"Calibration: temperature {record['temperature']:.3g}, validation ECE {record['ece_before']:.3f} -> "
            f"{record['ece_after']:.3f} ({CALIBRATION_FILE}; {MODEL_FILE} and its exports apply it)"
        )
    point = metrics.get("operating_point")
    if point:
        log.info(
            f"Threshold for '{point['positive_class']}': {point['threshold']:.3f} ({point['method']}), validation "
            f"sensitivity {point['sensitivity']:.3f}, specificity {point['specificity']:.3f} "
            f"(stored in {OPERATING_POINT_FILE}; evaluate and predict use it)"
        )
    run = Run(run_dir)
    log.info(f"Curves:   {run.training_curves_path}")
    log.info(f"Model:    {run.model_path}")
    log.info(f"Metrics:  {run.metrics_path}")
    log.info(f"Watch:    tensorboard --logdir {run.logs}")
    log.info(f"Export:   python export.py --run-dir {run_dir}")
