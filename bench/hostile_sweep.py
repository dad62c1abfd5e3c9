"""Hostile and careless use of every command, as a sweep with a tally (issue 11).

    python bench/hostile_sweep.py                    # every case, about 25 minutes on 2 busy cores
    python bench/hostile_sweep.py --quick            # about one case in four of each group
    python bench/hostile_sweep.py --only settings --only predict
    python bench/hostile_sweep.py --list             # the cases, without running them

A small generated dataset (three separable colour classes, 32 px) is trained once with the `tiny` backbone and
exported once; a second, two-class run serves the threshold cases. Then every case runs the real command
(`python -m classifier ...`) in a subprocess, with no stdin and a timeout, in a folder of its own holding a copy of
the base run, and is classified:

    ok         exit 0 and the expected result (each case states it and, where it can be checked, checks it)
    message    non-zero exit with an `error:` line naming the problem (the setting, flag or file), no traceback
    traceback  `Traceback (most recent call last)` in the output, death by a signal, or a hang past the timeout
    lost       a run or export that was fine before the case can no longer be used or finished by the same
               command, a file of it changed by a refused command, or a half-made run folder left behind that
               the corrected command would be refused for
    wrong      exit 0 but a wrong result: a bad value accepted, a file outside the data folder used, an input
               overwritten, a prediction that does not match
    unclear    non-zero exit without such a line (or a line that does not name what it should)

`expect` is what a careful program does: `ok` or `message`. A case that ends in `message` although `ok` was
expected is listed as a refusal. The settings cases are generated from the config dataclasses (every key of every
section: a wrong type, out-of-range numbers, unknown choices), so a new setting is covered without editing this
file. Cases run two at a time; the kill and concurrency cases, which start processes of their own, one at a time
beside a light case.

Results: a table and the tally on stdout, every case in bench/results/hostile_sweep.json.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import os
import platform
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import get_type_hints

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from classifier import config as config_lib  # noqa: E402  (no TensorFlow: the settings, not the commands)

PY = sys.executable
RESULTS = ROOT / "bench" / "results" / "hostile_sweep.json"
# The subprocesses import this checkout's package whatever their working folder is.
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
SIZE = 32
CLASSES = {"circle_red": (200, 40, 40), "square_green": (40, 180, 60), "stripes_blue": (40, 60, 200)}
# The cheapest training that goes through every step: random `tiny` backbone, one head epoch.
FAST = ["--backbone", "tiny", "--weights", "none", "--image-size", str(SIZE), "--batch-size", "4", "--augment", "none"]
FAST += ["--head-epochs", "1", "--finetune-epochs", "0"]
TRAIN = ["train", "--data-dir", "{images}", "--output-dir", "{case}/runs", "--name", "sweep", *FAST]
EXPORT = ["export", "--run-dir", "{run}", "--formats", "float32", "--latency-runs", "1", "--calibration-images", "8"]
LIGHT_TIMEOUT, HEAVY_TIMEOUT = 120, 420
MEMORY_LIMIT = 8 * 2**30  # address space of each command
OUTCOMES = ("ok", "message", "traceback", "lost", "wrong", "unclear")
TRACEBACK = "Traceback (most recent call last)"


# ---------------------------------------------------------------------------------------------------------------
# Generated data and the base runs


def write_images(root: Path, classes: dict = CLASSES, per_class: int = 10, size: int = SIZE, seed: int = 0) -> Path:
    """`per_class` JPEG/PNG images per class in `root/<class>/` that a model tells apart (a colour and a shape)."""
    rng = np.random.default_rng(seed)
    for name, colour in classes.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            image = np.array(colour) * rng.uniform(0.7, 1.0) + rng.normal(0, 20, (size, size, 3))
            image[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 230 + rng.normal(0, 10, 3)
            if name.startswith("stripes"):
                image[::6] = 240
            pixels = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
            pixels.save(folder / f"{index:03d}.{'png' if index % 2 else 'jpg'}")
    return root


def write_big_png(path: Path, side: int) -> None:
    """A valid grey PNG of side x side pixels, streamed row by row (never held in memory), a few hundred KB."""
    compressor, row = zlib.compressobj(9), b"\x00" + bytes(side)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


# Built in a child process, so that this one never imports TensorFlow (it forks the cases).
_ARTIFACTS = """
import sys, keras, numpy as np, tensorflow as tf
out = sys.argv[1]
lam = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Lambda(lambda x: x / 255.0),
                        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, activation="softmax")])
lam.save(f"{out}/lambda.keras")
dense = keras.Sequential([keras.Input((10,)), keras.layers.Dense(3, activation="softmax")])
dense.save(f"{out}/dense.keras")
open(f"{out}/dense.tflite", "wb").write(tf.lite.TFLiteConverter.from_keras_model(dense).convert())
four = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D(),
                         keras.layers.Dense(4, activation="softmax")])
four.save(f"{out}/four_outputs.keras")
"""


@dataclasses.dataclass(frozen=True)
class Base:
    """What every case starts from (read-only; a case gets copies).

    Attributes:
        work: The sweep's scratch folder.
        images: Three-class images the base run trained on.
        images2: Two-class images of the second run.
        run: The three-class run, finished and exported (float32, float16, dynamic, int8, SavedModel).
        run2: The two-class run, finished (with an operating point), not exported.
        artifacts: Hostile model files (a Lambda layer, a non-image model, ...).
        outside: A folder beside the data folders, with a real image in it.
        test_images: {absolute path: class} of the base run's test split.
    """

    work: Path
    images: Path
    images2: Path
    run: Path
    run2: Path
    artifacts: Path
    outside: Path
    test_images: dict[str, str]


def build_base(work: Path) -> Base:
    """Generates the data, trains the two base runs and exports the first; fails loudly if any of it fails."""
    images = write_images(work / "images")
    two = {name: CLASSES[name] for name in ("circle_red", "square_green")}
    images2 = write_images(work / "images2", classes=two, per_class=12, seed=1)
    outside = work / "outside"
    outside.mkdir()
    shutil.copy(images / "circle_red" / "000.jpg", outside / "x.png")
    artifacts = work / "artifacts"
    artifacts.mkdir()
    runs = work / "base"
    steps = [
        ["train", "--data-dir", str(images), "--output-dir", str(runs), "--name", "run", *FAST[:-4]]
        + ["--head-epochs", "3", "--finetune-epochs", "1"],
        ["train", "--data-dir", str(images2), "--output-dir", str(runs), "--name", "run2", *FAST],
        ["export", "--run-dir", str(runs / "run"), "--latency-runs", "2", "--calibration-images", "12"],
        # A .tflite without metadata (no labels or input contract inside): what the files beside it are read for.
        ["export", "--run-dir", str(runs / "run"), "--formats", "float32", "--no-metadata", "--out-dir"]
        + [str(work / "plain"), "--latency-runs", "1"],
    ]
    for argv in steps:
        started = time.perf_counter()
        result = run_command([PY, "-m", "classifier", *argv], work, HEAVY_TIMEOUT)
        if result.rc != 0:
            raise SystemExit(f"base step failed: {' '.join(argv)}\n{result.out[-3000:]}\n{result.err[-3000:]}")
        print(f"  base: {argv[0]} {time.perf_counter() - started:.0f} s", flush=True)
    made = run_command([PY, "-c", _ARTIFACTS, str(artifacts)], work, HEAVY_TIMEOUT)
    if made.rc != 0:
        raise SystemExit(f"could not build the hostile model files:\n{made.err[-3000:]}")
    split = json.loads((runs / "run" / "split.json").read_text())
    names = split["class_names"]
    test_images = {str(Path(split["root"]) / rel): names[label] for rel, label in split["test"]}
    return Base(work, images, images2, runs / "run", runs / "run2", artifacts, outside, test_images)


# ---------------------------------------------------------------------------------------------------------------
# Running one command


@dataclasses.dataclass
class Result:
    """One finished (or killed) command."""

    rc: int
    out: str
    err: str
    seconds: float
    maxrss_mb: float = 0.0
    timed_out: bool = False
    problem: str | None = None  # what a driver found wrong with an exit-0 result

    @property
    def text(self) -> str:
        return self.out + "\n" + self.err


def run_command(
    argv: list[str], cwd: Path, timeout: float, preexec: Callable[[], None] | None = None, on_start=None
) -> Result:
    """Runs `argv` with no stdin and output to files, in its own process group; kills the group at `timeout`.

    `on_start(process)` is called once it runs (the kill cases poll and signal from there). The peak memory comes
    from wait4, so it is this command's alone.
    """
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            env=ENV,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            preexec_fn=lambda: _child_setup(preexec),
            text=True,
        )
        if on_start is not None:
            on_start(process)
        timed_out, status, usage = False, None, None
        while status is None:
            pid, code, rusage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                status, usage = code, rusage
            elif time.perf_counter() - started > timeout:
                timed_out = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                _, status, usage = os.wait4(process.pid, 0)
            else:
                time.sleep(0.05)
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        with contextlib.suppress(ProcessLookupError):  # what the command left running (TF's helpers) goes too
            os.killpg(process.pid, signal.SIGKILL)
        out.seek(0), err.seek(0)
        return Result(
            process.returncode, out.read(), err.read(), time.perf_counter() - started, usage.ru_maxrss / 1024, timed_out
        )


def _child_setup(preexec: Callable[[], None] | None) -> None:
    """In the child before exec: Ctrl-C as in a terminal (a shell starts background jobs with SIGINT ignored, and
    Python then installs no KeyboardInterrupt), then the case's own setup (a file-size limit)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # A case that runs away (an alias bomb written out took 23 GB) fails alone instead of taking the machine down;
    # TensorFlow itself maps about 4 GB of address space.
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    if preexec is not None:
        preexec()


def command(argv: list[str], cwd: Path, timeout: float = LIGHT_TIMEOUT, **kwargs) -> Result:
    """`python -m classifier ARGV` (this checkout's package)."""
    return run_command([PY, "-m", "classifier", *argv], cwd, timeout, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Cases


@dataclasses.dataclass
class Case:
    """One hostile or careless use of a command.

    Attributes:
        group: The group (`--only`).
        name: What is tried, short.
        argv: The command after `python -m classifier`, with placeholders (`Context.expand`).
        expect: "ok" or "message": what a careful program does.
        says: For "message": words the error line must contain (any one of them), e.g. the setting's name.
        prepare: Builds the hostile files in the case folder before the command runs.
        verify: For exit 0: returns what is wrong with the result, or None.
        rerun: A command that must still succeed afterwards (else the run is lost), e.g. the same command
            without the fault.
        driver: Runs the case itself instead of `argv` (kills, concurrency) and returns the result to classify.
        heavy: Trains or exports: a longer timeout.
        exclusive: Starts processes of its own: one such case at a time.
        overwrites: Replaces the copied run on purpose (--overwrite): its files going is no loss when it succeeds.
        note: A behaviour chosen and documented rather than changed.
    """

    group: str
    name: str
    argv: list[str] = dataclasses.field(default_factory=list)
    expect: str = "message"
    says: tuple[str, ...] = ()
    prepare: Callable[[Context], None] | None = None
    verify: Callable[[Context, Result], str | None] | None = None
    rerun: list[str] | None = None
    driver: Callable[[Context], Result] | None = None
    heavy: bool = False
    exclusive: bool = False
    overwrites: bool = False
    note: str = ""


@dataclasses.dataclass
class Context:
    """A case's own folder, with copies of the base runs, and the placeholders its command line uses."""

    base: Base
    folder: Path

    @property
    def run(self) -> Path:
        return self.folder / "run"

    @property
    def run2(self) -> Path:
        return self.folder / "run2"

    def values(self) -> dict[str, str]:
        export = self.run / "export"
        return {
            "case": str(self.folder),
            "run": str(self.run),
            "run2": str(self.run2),
            "model": str(self.run / "model.keras"),
            "model2": str(self.run2 / "model.keras"),
            "tflite": str(export / "model_float32.tflite"),
            "int8": str(export / "model_int8.tflite"),
            "saved_model": str(export / "saved_model"),
            "images": str(self.base.images),
            "images2": str(self.base.images2),
            "own": str(self.folder / "images"),
            "image": self.image,
            "image2": str(self.base.images2 / "square_green" / "001.png"),
            "file": str(self.folder / "notes.txt"),
            "outside": str(self.base.outside),
        }

    @property
    def image(self) -> str:
        return next(path for path, name in sorted(self.base.test_images.items()) if name == "circle_red")

    def expand(self, argv: list[str]) -> list[str]:
        values = self.values()
        expanded = []
        for token in argv:
            for key, value in values.items():
                token = token.replace("{" + key + "}", value)
            expanded.append(token)
        return expanded

    def own_images(self) -> Path:
        """A copy of the base images in the case folder, for cases that change them."""
        return Path(shutil.copytree(self.base.images, self.folder / "images", symlinks=True))


# Files whose loss or change by a refused command loses a run or an export (logs, evaluations and reports are not).
_PRECIOUS = re.compile(
    r"^(model\.keras|split\.json|config\.yaml|labels\.txt|metrics\.json|calibration\.json|input_contract\.json|"
    r"history\.csv|export/(model_\w+\.tflite|labels\.txt|saved_model/.*))$"
)


def snapshot(run: Path) -> dict[str, str]:
    """{relative path: sha1} of a run folder's precious files."""
    found = {}
    if run.is_dir():
        for path in run.rglob("*"):
            rel = path.relative_to(run).as_posix()
            if path.is_file() and _PRECIOUS.match(rel):
                found[rel] = hashlib.sha1(path.read_bytes()).hexdigest()
    return found


# ---------------------------------------------------------------------------------------------------------------
# Checks of results that exit 0


def _rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def predictions_right(ctx: Context, result: Result, source: str | None = None) -> str | None:
    """The CSV (stdout, or the file `source`) has a row per input and base test images get their own class."""
    text = Path(ctx.expand([source])[0]).read_text() if source else result.out
    rows = _rows(text)
    if not rows:
        return "no prediction rows"
    for row in rows:
        expected = ctx.base.test_images.get(str(Path(row["path"]).resolve()))
        if expected and not row.get("error") and row["label"] != expected:
            return f"{row['path']} predicted {row['label']}, is {expected}"
    return None


def wrote(*paths: str) -> Callable[[Context, Result], str | None]:
    def check(ctx: Context, result: Result) -> str | None:
        missing = [p for p in ctx.expand(list(paths)) if not Path(p).exists()]
        return f"missing {missing}" if missing else None

    return check


def trained(classes: int = 3, inside: bool = True, run: str = "{case}/runs/sweep"):
    """The run finished with `classes` classes and (unless a documented symlink case) every image inside the data
    folder."""

    def check(ctx: Context, result: Result) -> str | None:
        folder = Path(ctx.expand([run])[0])
        if not (folder / "metrics.json").is_file():
            return f"{folder} has no metrics.json"
        split = json.loads((folder / "split.json").read_text())
        if len(split["class_names"]) != classes:
            return f"classes {split['class_names']}, expected {classes}"
        root = os.path.realpath(split["root"])
        for subset in ("train", "val", "test"):
            for rel, _ in split[subset]:
                real = os.path.realpath(os.path.join(split["root"], rel.split("#")[0]))
                if inside and not real.startswith(root + os.sep):
                    return f"{rel} is outside the data folder ({real})"
        counts = Counter(label for subset in ("train", "val", "test") for _, label in split[subset])
        if max(counts.values()) > 12:
            return f"a class has {max(counts.values())} images, its folder about 10: files counted twice"
        return None

    return check


def all_of(*checks):
    def check(ctx: Context, result: Result) -> str | None:
        return next((problem for c in checks if (problem := c(ctx, result))), None)

    return check


# ---------------------------------------------------------------------------------------------------------------
# Groups


def _settings_base(skip: str) -> list[str]:
    """`train` on the base images via --set only (a flag would override the value under test)."""
    values = {
        "data.data_dir": "{images}",
        "run.output_dir": "{case}/runs",
        "run.name": "sweep",
        "model.backbone": "tiny",
        "model.weights": "none",
        "data.image_size": str(SIZE),
        "data.batch_size": "4",
        "augment.preset": "none",
        "train.head_epochs": "1",
        "train.finetune_epochs": "0",
    }
    if skip == "data.dataset":  # both given is its own mistake, which would hide the one under test
        values.pop("data.data_dir")
    argv = ["train"]
    for key, value in values.items():
        if key != skip:
            argv += ["--set", f"{key}={value}"]
    return argv


# Bad values beyond the generated ones (-1 for every int, NaN for every float, an unknown word for every key with
# choices, a wrong type where nothing else applies): the ranges and forms a type cannot express. Values the `train`
# flag cases try (--image-size 0, --name ../escape, --data-dir a file, ...) are not repeated here.
EXTRA_BAD = {
    "data.image_size": ["100000"],
    "data.val_fraction": ["1.5"],
    "data.test_fraction": ["1.5"],
    "data.batch_size": ["100000"],
    "data.positive_class": ["bogus"],
    "data.dicom_window": ["bogus", "40,0"],
    "data.group_by": ["bogus", "filename_regex:("],
    "model.dropout": ["1.5"],
    "train.unfreeze_blocks": ["0"],
    "train.time_budget": ["bogus"],
    "train.warmup_fraction": ["1"],
    "train.label_smoothing": ["1.5"],
    "train.monitor": ["val_bogus"],
    "train.operating_point": ["bogus", "sensitivity:2"],
    "augment.zoom": ["2"],
    "augment.contrast": ["2"],
    "runtime.devices": ["gpu:7"],
    "run.name": ["."],
}
# A value of the wrong type for each kind of setting: a word for a number, a word for a yes/no, a list for a word.
WRONG_TYPE = {int: "abc", float: "abc", bool: "maybe", str: "[1, 2]"}
# An empty value where none is allowed: one key of each kind of section.
NULL_BAD = ("model.backbone", "train.head_epochs")


def _bad_values(key: str, hint, first_of_its_type: bool) -> list[str]:
    """Generated bad values of one setting: out of range, not a choice, the EXTRA_BAD ones; a value of the wrong type
    for the first setting of each type in a section (one code path converts them all) and wherever nothing else
    applies."""
    kind = next(k for k in getattr(hint, "__args__", (hint,)) if k is not type(None))
    values = {int: ["-1"], float: [".nan"]}.get(kind, [])  # NaN fails every comparison: -1 would fail the same ones
    if tuple(key.split(".")) in config_lib.CHOICES:
        values.append("bogus")
    values += [value for value in EXTRA_BAD.get(key, []) if value not in values]
    if first_of_its_type or not values:
        values.insert(0, WRONG_TYPE[kind])
    return values


def settings_cases() -> list[Case]:
    """Every key of every config section: out of range, unknown choice, wrong type; then unknown keys and forms."""
    cases = []
    root = config_lib.Config()
    for section in dataclasses.fields(root):
        section_type = type(getattr(root, section.name))
        hints = get_type_hints(section_type)
        types_seen = set()
        for item in dataclasses.fields(section_type):
            key = f"{section.name}.{item.name}"
            first = str(hints[item.name]) not in types_seen
            types_seen.add(str(hints[item.name]))
            values = _bad_values(key, hints[item.name], first) + (["null"] if key in NULL_BAD else [])
            for value in values:
                says = (item.name, item.name.replace("_", "-"), item.name.replace("_", " "))
                if key == "data.data_dir":
                    says += ("data folder",)
                cases.append(
                    Case("settings", f"{key}={value}", _settings_base(key) + ["--set", f"{key}={value}"], says=says)
                )
    forms = {"data.bogus_key=1": "bogus_key", "bogus.key=1": "bogus", "noequals": "noequals", "data.=1": "data."}
    for form, named in forms.items():
        cases.append(Case("settings", f"--set {form}", _settings_base("") + ["--set", form], says=(named,)))
    return cases


def _write(path: str, content: str | bytes) -> Callable[[Context], None]:
    def prepare(ctx: Context) -> None:
        target = Path(ctx.expand([path])[0])
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(ctx.expand([content])[0])

    return prepare


def _laughs() -> str:
    """A YAML alias bomb as the value of one setting: nine levels of nine references (9^9 strings written out)."""
    levels = ["&a0 [" + ", ".join(['"lol"'] * 9) + "]"]
    levels += [f"&a{level} [{', '.join([f'*a{level - 1}'] * 9)}]" for level in range(1, 9)]
    return "data:\n  dicom_window: [" + ", ".join(levels) + "]\n"


def config_cases() -> list[Case]:
    """`--config FILE.yaml`: missing, a folder, not YAML, not a mapping, wrong types inside, a Python tag, a bomb."""
    base = ["train", "--data-dir", "{images}", "--output-dir", "{case}/runs", "--name", "sweep", *FAST]
    files = [
        ("not YAML", "data: [unclosed\n", ("c.yaml",)),
        ("a list", "- 1\n- 2\n", ("c.yaml",)),
        ("a section that is a list", "train: [1, 2]\n", ("train", "c.yaml")),
        ("a wrong type inside", "train:\n  head_lr: fast\n", ("head_lr",)),
        ("a python tag", "data: !!python/object/apply:os.system ['touch {case}/planted']\n", ("c.yaml",)),
        ("an alias bomb", _laughs(), ("c.yaml", "dicom_window")),
        ("invalid UTF-8", b"data:\n  seed: \xff\xfe\n", ("c.yaml",)),
    ]
    cases = [
        Case(
            "config",
            f"--config {what}",
            [*base, "--config", "{case}/c.yaml"],
            prepare=_write("{case}/c.yaml", text),
            says=says,
        )
        for what, text, says in files
    ]
    cases.append(Case("config", "--config missing file", [*base, "--config", "{case}/none.yaml"], says=("none.yaml",)))
    cases.append(Case("config", "--config a folder", [*base, "--config", "{case}"], says=("config",)))
    cases.append(
        Case(
            "config",
            "--config empty file",
            [*base, "--config", "{case}/c.yaml"],
            expect="ok",
            prepare=_write("{case}/c.yaml", ""),
            heavy=True,
            verify=trained(),
        )
    )
    return cases


def train_flag_cases() -> list[Case]:
    def flag(name: str, *extra: str, says=(), expect="message", verify=None, heavy=False, argv=None) -> Case:
        base = argv if argv is not None else TRAIN
        return Case(
            "train", name, [*base, *extra], expect=expect, says=says, verify=verify, heavy=heavy or expect == "ok"
        )

    cases = [
        flag("--image-size abc", "--image-size", "abc", says=("image-size",)),
        flag("--image-size 0", "--image-size", "0", says=("image_size", "image-size")),
        flag("--image-size 7", "--image-size", "7", says=("image_size", "image-size")),
        flag("--batch-size 0", "--batch-size", "0", says=("batch_size", "batch-size")),
        flag("--epochs -1", argv=[*TRAIN[:-4], "--epochs", "-1"], says=("epochs",)),
        flag("--epochs 0", "--head-epochs", "0", "--finetune-epochs", "0", says=("epochs",)),
        flag("--val-fraction 1.5", "--val-fraction", "1.5", says=("val_fraction", "val-fraction")),
        flag("fractions adding to 1", "--val-fraction", "0.5", "--test-fraction", "0.5", says=("fraction",)),
        flag("--backbone bogus", "--backbone", "bogus", says=("bogus",)),
        flag("--weights a text file", "--weights", "{file}", says=("notes.txt",)),
        flag("--weights imagenet for tiny", "--weights", "imagenet", says=("imagenet", "tiny")),
        flag("--devices gpu:0 without a GPU", "--devices", "gpu:0", says=("gpu:0",)),
        flag("--time-budget -5m", "--time-budget", "-5m", says=("-5m", "budget")),
        flag("--name ../escape", "--name", "../escape", says=("name",)),
        flag("--name ''", "--name", "", says=("name",)),
        flag("--name .", "--name", ".", says=("name",)),
        flag("--output-dir a file", "--output-dir", "{file}", says=("notes.txt",)),
        flag("--output-dir not writable (/proc)", "--output-dir", "/proc/sweep", says=("/proc",)),
        flag(
            "--data-dir missing",
            argv=["train", "--data-dir", "{case}/missing", "--output-dir", "{case}/runs", *FAST],
            says=("missing",),
        ),
        flag(
            "--data-dir a file",
            argv=["train", "--data-dir", "{file}", "--output-dir", "{case}/runs", *FAST],
            says=("is a file",),
        ),
        flag("--data-dir and --dataset", "--dataset", "tfds:beans", says=("--dataset",)),
        flag(
            "--dataset bogus",
            argv=["train", "--dataset", "bogus", "--output-dir", "{case}/runs", *FAST],
            says=("bogus",),
        ),
        flag(
            "--dataset tfds:unknown (offline)",
            argv=["train", "--dataset", "tfds:no_such_dataset_xyz", "--output-dir", "{case}/runs", *FAST],
            says=("no_such_dataset_xyz",),
        ),
        flag("--resume a missing folder", argv=["train", "--resume", "{case}/missing"], says=("missing",)),
        flag("--resume a finished run", argv=["train", "--resume", "{run}"], says=("finished",)),
        flag("--resume the data folder", argv=["train", "--resume", "{images}"], says=("not a run folder",)),
        flag("--resume with --set", argv=["train", "--resume", "{run}", "--set", "train.head_lr=0.1"], says=("set",)),
        flag(
            "--resume latest with nothing to resume",
            argv=["train", "--resume", "--output-dir", "{case}/none"],
            says=("no unfinished run",),
        ),
        flag("unknown flag", "--bogus", says=("--bogus",)),
        flag(
            "--list-backbones",
            argv=["train", "--list-backbones"],
            expect="ok",
            verify=lambda ctx, r: None if "tiny" in r.out else "tiny not listed",
        ),
        Case(
            "train",
            "--mixed-precision on, on a CPU",
            [*TRAIN, "--mixed-precision", "on"],
            expect="ok",
            verify=trained(),
            heavy=True,
            note="--mixed-precision on is honoured on a CPU too: float16 compute there is slower, not wrong",
        ),
    ]
    return cases


def export_flag_cases() -> list[Case]:
    def flag(name, *extra, says=(), argv=None, expect="message", verify=None) -> Case:
        return Case(
            "export", name, [*(argv or EXPORT), *extra], expect=expect, says=says, verify=verify, heavy=expect == "ok"
        )

    empty = Case(
        "export",
        "--run-dir an empty folder",
        ["export", "--run-dir", "{case}/empty"],
        says=("model.keras",),
        prepare=lambda ctx: (ctx.folder / "empty").mkdir(),
    )
    unfinished = Case(
        "export",
        "--run-dir without model.keras",
        EXPORT,
        says=("model.keras",),
        prepare=lambda ctx: (ctx.run / "model.keras").unlink(),
    )
    return [
        flag("--run-dir missing", argv=["export", "--run-dir", "{case}/missing"], says=("missing",)),
        flag("--run-dir a file", argv=["export", "--run-dir", "{file}"], says=("notes.txt",)),
        flag("--run-dir the data folder", argv=["export", "--run-dir", "{images}"], says=("model.keras",)),
        empty,
        unfinished,
        flag("--formats bogus", "--formats", "bogus", says=("bogus",)),
        flag("--formats FLOAT32", "--formats", "FLOAT32", says=("FLOAT32",)),
        flag(
            "--formats float32,float32",
            "--formats",
            "float32,float32",
            expect="ok",
            verify=wrote("{run}/export/model_float32.tflite"),
        ),
        flag("--out-dir a file", "--out-dir", "{file}", says=("notes.txt", "out-dir")),
        flag("--out-dir not writable (/proc)", "--out-dir", "/proc/sweep", says=("/proc", "out-dir")),
        flag(
            "--out-dir the run folder itself",
            "--out-dir",
            "{run}",
            expect="ok",
            verify=wrote("{run}/model_float32.tflite", "{run}/model.keras"),
        ),
        flag(
            "--out-dir a new nested folder",
            "--out-dir",
            "{case}/a/b/c",
            expect="ok",
            verify=wrote("{case}/a/b/c/model_float32.tflite"),
        ),
        flag("--calibration-images 0", "--formats", "int8", "--calibration-images", "0", says=("calibration-images",)),
        flag("--calibration-images abc", "--calibration-images", "abc", says=("calibration-images",)),
        flag("--min-agreement-float32 5", "--min-agreement-float32", "5", says=("min-agreement-float32",)),
        flag("--max-diff-float32 -1", "--max-diff-float32", "-1", says=("max-diff-float32",)),
        flag("--max-accuracy-drop nan", "--max-accuracy-drop", "nan", says=("max-accuracy-drop",)),
        flag("--threads 0", "--threads", "0", says=("threads",)),
        flag("--latency-runs 0", "--latency-runs", "0", says=("latency-runs",)),
        flag("--no-metadata", "--no-metadata", expect="ok", verify=wrote("{run}/export/model_float32.tflite")),
    ]


def evaluate_flag_cases() -> list[Case]:
    evaluate = ["evaluate", "--run-dir", "{run}", "--batch-size", "8"]

    def flag(name, *extra, says=(), argv=None, expect="message", verify=None, prepare=None) -> Case:
        return Case(
            "evaluate", name, [*(argv or evaluate), *extra], expect=expect, says=says, verify=verify, prepare=prepare
        )

    def accuracy(ctx: Context, result: Result) -> str | None:
        report = json.loads((ctx.run / "evaluation" / "keras" / "evaluation.json").read_text())
        value = report.get("metrics", report).get("accuracy")
        return None if value is not None and value >= 0.8 else f"accuracy {value} on separable images"

    def partial_classes(ctx: Context) -> None:
        own = ctx.own_images()
        shutil.rmtree(own / "stripes_blue")

    def unknown_class(ctx: Context) -> None:
        own = ctx.own_images()
        shutil.copytree(own / "stripes_blue", own / "zebra")

    return [
        flag("nothing to evaluate on", argv=["evaluate"], says=("--run-dir",)),
        flag("--run-dir missing", argv=["evaluate", "--run-dir", "{case}/missing"], says=("missing",)),
        flag("--model missing", "--model", "{case}/m.keras", says=("m.keras",)),
        flag("--model the data folder", "--model", "{images}", says=("images",)),
        flag(
            "--data-dir missing",
            argv=["evaluate", "--model", "{model}", "--data-dir", "{case}/missing"],
            says=("missing",),
        ),
        flag(
            "--data-dir empty",
            argv=["evaluate", "--model", "{model}", "--data-dir", "{case}/empty"],
            says=("empty", "class"),
            prepare=lambda ctx: (ctx.folder / "empty").mkdir(),
        ),
        flag(
            "--data-dir with a class the model lacks",
            argv=["evaluate", "--model", "{model}", "--data-dir", "{own}"],
            says=("zebra",),
            prepare=unknown_class,
        ),
        flag(
            "--data-dir with two of three classes",
            argv=["evaluate", "--model", "{model}", "--data-dir", "{own}", "--output-dir", "{case}/ev"],
            expect="ok",
            prepare=partial_classes,
            verify=wrote("{case}/ev/evaluation.json"),
        ),
        flag(
            "--subset val", "--subset", "val", expect="ok", verify=wrote("{run}/evaluation/keras-val/evaluation.json")
        ),
        flag(
            "--subset with a class-folder --data-dir",
            argv=["evaluate", "--model", "{model}", "--data-dir", "{images}", "--subset", "val"],
            says=("subset",),
        ),
        flag("--output-dir a file", "--output-dir", "{file}", says=("notes.txt", "output-dir")),
        flag("--output-dir not writable (/proc)", "--output-dir", "/proc/sweep", says=("/proc", "output-dir")),
        flag(
            "--positive-class bogus",
            argv=["evaluate", "--run-dir", "{run2}", "--positive-class", "bogus"],
            says=("bogus",),
        ),
        flag("--choose-threshold, three classes", "--choose-threshold", says=("two-class", "2 classes", "two classes")),
        flag(
            "--choose-threshold bogus",
            argv=["evaluate", "--run-dir", "{run2}", "--choose-threshold", "bogus"],
            says=("bogus",),
        ),
        flag(
            "--target-sensitivity 5",
            argv=["evaluate", "--run-dir", "{run2}", "--target-sensitivity", "5"],
            says=("sensitivity",),
        ),
        flag(
            "--choose-threshold sensitivity:0.9 on two classes",
            argv=["evaluate", "--run-dir", "{run2}", "--choose-threshold", "sensitivity:0.9"],
            expect="ok",
            verify=wrote("{run2}/operating_point.json"),
        ),
        flag("--batch-size 0", "--batch-size", "0", says=("batch-size",)),
        flag("--dicom-window bogus", "--dicom-window", "bogus", says=("bogus", "window")),
        flag(
            "--model the .tflite",
            "--model",
            "{tflite}",
            expect="ok",
            verify=wrote("{run}/evaluation/model_float32/evaluation.json"),
        ),
        flag(
            "--model the int8 .tflite",
            "--model",
            "{int8}",
            expect="ok",
            verify=wrote("{run}/evaluation/model_int8/evaluation.json"),
        ),
        flag(
            "--model the SavedModel",
            "--model",
            "{saved_model}",
            expect="ok",
            verify=wrote("{run}/evaluation/saved_model/evaluation.json"),
        ),
        flag("the run's model, accuracy", expect="ok", verify=accuracy),
        flag("--model of another run", "--model", "{model2}", says=("classes", "outputs")),
    ]


def predict_flag_cases() -> list[Case]:
    predict = ["predict", "--model", "{model}"]

    def flag(name, *extra, says=(), expect="message", verify=None, prepare=None, model="{model}") -> Case:
        argv = ["predict", "--model", model, *extra]
        if expect == "ok" and verify is None:
            verify = predictions_right
        return Case("predict", name, argv, expect=expect, says=says, verify=verify, prepare=prepare)

    def make_fifo(ctx: Context) -> None:
        os.mkfifo(ctx.folder / "pipe.png")

    def input_kept(ctx: Context, result: Result) -> str | None:
        target = ctx.folder / "in.png"
        try:
            Image.open(target).verify()
        except Exception:  # noqa: BLE001 - anything: it is no longer the image it was
            return "--output overwrote its own input image"
        return None

    return [
        flag("no inputs", says=("input",)),
        Case("predict", "--model missing", [*predict[:2], "{case}/m.keras", "{image}"], says=("m.keras",)),
        Case("predict", "--model the data folder", [*predict[:2], "{images}", "{image}"], says=("images",)),
        flag("--top-k 0", "--top-k", "0", "{image}", says=("top-k",)),
        flag("--top-k 100", "--top-k", "100", "{image}", expect="ok"),
        flag("--batch-size 0", "--batch-size", "0", "{image}", says=("batch-size",)),
        flag("--threads 0", "--threads", "0", "{image}", says=("threads",)),
        flag("--threshold on three classes", "--threshold", "0.5", "{image}", says=("threshold",)),
        flag("--threshold 5", "--threshold", "5", "{image2}", says=("threshold",), model="{model2}"),
        flag("--threshold nan", "--threshold", "nan", "{image2}", says=("threshold",), model="{model2}"),
        flag("--output a folder", "--output", "{case}", "{image}", says=("--output",)),
        flag(
            "--output in a missing folder",
            "--output",
            "{case}/new/deep/p.csv",
            "{image}",
            expect="ok",
            verify=lambda ctx, r: predictions_right(ctx, r, "{case}/new/deep/p.csv"),
        ),
        flag("--output not writable (/proc)", "--output", "/proc/p.csv", "{image}", says=("/proc",)),
        flag(
            "--output onto its own input image",
            "--output",
            "{case}/in.png",
            "{case}/in.png",
            says=("in.png",),
            prepare=lambda ctx: shutil.copy(ctx.image, ctx.folder / "in.png"),
            verify=input_kept,
        ),
        flag("--explain onto a file", "--explain", "{file}", "{image}", says=("notes.txt",)),
        flag(
            "--explain with a .tflite",
            "--explain",
            "{case}/cams",
            "{image}",
            says=("TFLite", "tflite"),
            model="{tflite}",
        ),
        flag("a missing input", "{case}/none.png", says=("none.png",)),
        flag("an empty folder", "{case}/empty", says=("empty",), prepare=lambda ctx: (ctx.folder / "empty").mkdir()),
        flag(
            "a text file named .png",
            "{case}/fake.png",
            says=("fake.png",),
            prepare=_write("{case}/fake.png", "not an image"),
        ),
        flag("a FIFO named .png", "{case}/pipe.png", says=("pipe.png",), prepare=make_fifo),
        flag("/dev/zero", "/dev/zero", says=("/dev/zero",)),
        flag("the model file as an input", "{model}", says=("model.keras",)),
        flag(
            "--format json into .csv",
            "--format",
            "json",
            "--output",
            "{case}/p.csv",
            "{image}",
            expect="ok",
            verify=lambda ctx, r: (
                None if json.loads((ctx.folder / "p.csv").read_text())["predictions"] else "no predictions"
            ),
        ),
        flag("the .tflite", "{image}", expect="ok", model="{tflite}"),
        flag("the int8 .tflite", "{image}", expect="ok", model="{int8}"),
        flag("the SavedModel", "{image}", expect="ok", model="{saved_model}"),
        flag(
            "a .tflite copied alone",
            "{image}",
            expect="ok",
            model="{case}/alone/m.tflite",
            prepare=lambda ctx: (
                (ctx.folder / "alone").mkdir()
                or shutil.copy(ctx.run / "export" / "model_int8.tflite", ctx.folder / "alone" / "m.tflite")
            ),
        ),
        flag("--no-operating-point", "--no-operating-point", "{image2}", expect="ok", model="{model2}"),
    ]


def explain_flag_cases() -> list[Case]:
    base = ["explain", "--model", "{model}", "--output", "{case}/cams"]

    def flag(name, *extra, argv=None, says=(), expect="message", verify=None) -> Case:
        return Case("explain", name, [*(argv or base), *extra], expect=expect, says=says, verify=verify)

    return [
        flag("no --output", "{image}", argv=["explain", "--model", "{model}"], says=("--output",)),
        flag(
            "--output a file",
            "{image}",
            argv=["explain", "--model", "{model}", "--output", "{file}"],
            says=("notes.txt",),
        ),
        flag(
            "--output not writable (/proc)",
            "{image}",
            argv=["explain", "--model", "{model}", "--output", "/proc/cams"],
            says=("/proc",),
        ),
        flag(
            "--model a .tflite",
            "{image}",
            argv=["explain", "--model", "{tflite}", "--output", "{case}/cams"],
            says=("TFLite",),
        ),
        flag(
            "--model the SavedModel",
            "{image}",
            argv=["explain", "--model", "{saved_model}", "--output", "{case}/cams"],
            says=("SavedModel",),
        ),
        flag("--class bogus", "--class", "bogus", "{image}", says=("bogus",)),
        flag("--batch-size 0", "--batch-size", "0", "{image}", says=("batch-size",)),
        flag(
            "--threshold 5",
            "--threshold",
            "5",
            "{image2}",
            argv=["explain", "--model", "{model2}", "--output", "{case}/cams"],
            says=("threshold",),
        ),
        flag("no inputs", says=("input", "image files")),
        flag("one image", "{image}", expect="ok", verify=wrote("{case}/cams/gradcam.csv")),
    ]


def benchmark_flag_cases() -> list[Case]:
    base = [
        "benchmark",
        "--model",
        "{tflite}",
        "--runs",
        "2",
        "--warmup",
        "0",
        "--throughput-runs",
        "1",
        "--batch-size",
        "2",
    ]

    def flag(name, *extra, says=(), expect="message", verify=None, argv=None) -> Case:
        return Case("benchmark", name, [*(argv or base), *extra], expect=expect, says=says, verify=verify)

    def json_result(ctx: Context, result: Result) -> str | None:
        return (
            None if json.loads((ctx.folder / "new" / "b.json").read_text())["latency_ms"]["runs"] == 2 else "bad JSON"
        )

    def model_kept(ctx: Context, result: Result) -> str | None:
        return (
            None
            if (ctx.run / "export" / "model_float32.tflite").read_bytes()[4:8] == b"TFL3"
            else "overwrote the model"
        )

    return [
        flag("--runs 0", "--runs", "0", says=("runs",)),
        flag("--warmup -1", "--warmup", "-1", says=("warmup",)),
        flag("--batch-size 0", "--batch-size", "0", says=("batch-size",)),
        flag("--throughput-runs 0", "--throughput-runs", "0", says=("throughput-runs",)),
        flag("--threads 0", "--threads", "0", says=("threads",)),
        flag("--model missing", argv=["benchmark", "--model", "{case}/m.tflite"], says=("m.tflite",)),
        flag("--output a folder", "--output", "{case}", says=("--output",)),
        flag("--output below a file", "--output", "{file}/b.json", says=("notes.txt",)),
        flag("--output not writable (/proc)", "--output", "/proc/b.json", says=("/proc",)),
        flag("--output onto the model", "--output", "{tflite}", says=("--output", "model")),
        flag("--output in a missing folder", "--output", "{case}/new/b.json", expect="ok", verify=json_result),
        flag("the SavedModel", argv=[*base[:2], "{saved_model}", *base[3:]], expect="ok", verify=model_kept),
    ]


def folder_cases() -> list[Case]:
    """Training on hostile data folders: each is a copy of the base images with one thing done to it."""

    def hostile(name, change, expect="ok", verify=None, says=(), note="", argv=None) -> Case:
        def prepare(ctx: Context) -> None:
            change(ctx, ctx.own_images())

        argv = argv or ["train", "--data-dir", "{own}", "--output-dir", "{case}/runs", "--name", "sweep", *FAST]
        return Case(
            "folders",
            name,
            argv,
            expect=expect,
            says=says,
            prepare=prepare,
            verify=verify or (trained() if expect == "ok" else None),
            heavy=True,
            note=note,
        )

    def link(target: str, name: str):
        return lambda ctx, own: os.symlink(ctx.expand([target])[0].replace("{own}", str(own)), own / name)

    def damaged(ctx, own):
        (own / "circle_red" / "empty.png").write_bytes(b"")
        data = (own / "square_green" / "001.png").read_bytes()
        (own / "square_green" / "cut.png").write_bytes(data[: len(data) // 2])
        (own / "stripes_blue" / "text.jpg").write_text("not an image")
        (own / "stripes_blue" / "folder.jpg").mkdir()

    def odd_modes(ctx, own):
        rng = np.random.default_rng(3)
        pixels = (rng.random((SIZE, SIZE, 3)) * 60 + np.array(CLASSES["circle_red"]) * 0.8).astype(np.uint8)
        image = Image.fromarray(pixels)
        image.convert("CMYK").save(own / "circle_red" / "cmyk.jpg")
        image.convert("P").save(own / "circle_red" / "palette.png")
        image.convert("RGBA").save(own / "circle_red" / "rgba.png")
        image.resize((1, 1)).save(own / "circle_red" / "one_pixel.png")
        Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257).save(own / "circle_red" / "sixteen.png")
        for name in ("000.jpg", "002.jpg", "004.jpg", "006.jpg", "008.jpg"):  # keep 10 files in the class
            (own / "circle_red" / name).unlink()

    def odd_names(ctx, own):
        for index, name in enumerate(["new\nline.png", "com,ma.png", 'quo"te.png', "ünï cödé.png", "-dash.png"]):
            os.rename(own / "square_green" / f"{index * 2 + 1:03d}.png", own / "square_green" / name)

    def deep(ctx, own):
        folder = own / "circle_red"
        for level in range(40):
            folder = folder / f"d{level}"
        folder.mkdir(parents=True)
        os.rename(own / "circle_red" / "001.png", folder / "001.png")

    def fifo(ctx, own):
        os.mkfifo(own / "circle_red" / "pipe.png")

    def macosx(ctx, own):
        shutil.copytree(own / "circle_red", own / "__MACOSX" / "circle_red")
        for path in (own / "__MACOSX" / "circle_red").iterdir():
            path.rename(path.with_name("._" + path.name))
        for name in (".DS_Store", "Thumbs.db", "desktop.ini"):
            (own / "circle_red" / name).write_bytes(b"\x00\x01junk")
        shutil.copytree(own / "circle_red", own / ".git")

    def bomb(side):
        def change(ctx, own):
            write_big_png(own / "circle_red" / "huge.png", side)
            (own / "circle_red" / "000.jpg").unlink()

        return change

    def lean(ctx: Context, result: Result) -> str | None:
        return None if result.maxrss_mb < 1500 else f"peak memory {result.maxrss_mb:.0f} MB for a 32 px training"

    def only(n_classes: int, per_class: int):
        def change(ctx, own):
            for folder in sorted(own.iterdir())[n_classes:]:
                shutil.rmtree(folder)
            for folder in own.iterdir():  # the class folders (write_images makes nothing else)
                for path in sorted(folder.iterdir())[per_class:]:
                    path.unlink()

        return change

    def presplit(extra_class_in_test: bool):
        def change(ctx, own):
            for subset, picks in (("train", range(0, 6)), ("val", range(6, 8)), ("test", range(8, 10))):
                for name in CLASSES:
                    (own / subset / name).mkdir(parents=True)
                    for index in picks:
                        src = next((own / name).glob(f"{index:03d}.*"))
                        shutil.copy(src, own / subset / name / src.name)
            for name in CLASSES:
                shutil.rmtree(own / name)
            if extra_class_in_test:
                shutil.copytree(own / "test" / "circle_red", own / "test" / "zebra")

        return change

    def loose_images(ctx, own):
        for folder in list(own.iterdir()):
            for path in folder.iterdir():
                path.rename(own / f"{folder.name}_{path.name}")
            folder.rmdir()

    def output_inside(ctx, own):
        pass

    def predict_folder(name, change, expect="ok", says=()) -> Case:
        def prepare(ctx: Context) -> None:
            change(ctx, ctx.own_images())

        def rows(ctx: Context, result: Result) -> str | None:
            found = _rows(result.out)
            return None if len(found) >= 30 and len(found) < 40 else f"{len(found)} rows for 30 images"

        return Case(
            "folders",
            f"predict: {name}",
            ["predict", "--model", "{model}", "{own}"],
            expect=expect,
            says=says,
            prepare=prepare,
            verify=rows,
        )

    documented = "documented in README: links to folders and files are followed, wherever they point"
    return [
        hostile("a symlink loop at the data root", link("{own}", "loop")),
        hostile(
            "a symlink loop inside a class",
            lambda ctx, own: os.symlink(own / "circle_red", own / "circle_red" / "again"),
        ),
        hostile("__MACOSX/, .DS_Store, Thumbs.db, .git/", macosx),
        hostile("a 13000 x 13000 PNG (under Pillow's bomb limit)", bomb(13000), verify=all_of(trained(), lean)),
        hostile("a 20000 x 20000 PNG (a decompression bomb)", bomb(20000), verify=all_of(trained(), lean)),
        hostile(
            "a symlink to a file outside the folder",
            link("{outside}/x.png", "circle_red/outside.png"),
            verify=trained(inside=False),
            note=documented,
        ),
        hostile(
            "a class folder that is a symlink outside",
            lambda ctx, own: (
                os.rename(own / "circle_red", ctx.folder / "elsewhere")
                or os.symlink(ctx.folder / "elsewhere", own / "circle_red")
            ),
            verify=trained(inside=False),
            note=documented,
        ),
        hostile(
            "a broken symlink", lambda ctx, own: os.symlink(ctx.folder / "gone.png", own / "circle_red" / "gone.png")
        ),
        hostile("a FIFO named .png in a class", fifo),
        hostile("empty, truncated, text-as-jpg files and a folder named .jpg", damaged),
        hostile("CMYK, palette, RGBA, 16-bit and 1x1 images", odd_modes),
        hostile("file names with a newline, comma, quote, unicode, dash", odd_names),
        hostile("an empty class folder", lambda ctx, own: (own / "zebra").mkdir(), expect="message", says=("zebra",)),
        hostile(
            "a class with one image",
            lambda ctx, own: (own / "zebra").mkdir() or shutil.copy(ctx.image, own / "zebra"),
            expect="message",
            says=("zebra",),
        ),
        hostile("a single class", only(1, 10), expect="message", says=("single class",)),
        hostile("images at the root, no class folders", loose_images, expect="message", says=("class",)),
        hostile("pre-split train/ val/ test/", presplit(False)),
        hostile("pre-split with a class only in test/", presplit(True), expect="message", says=("zebra",)),
        hostile(
            "--output-dir inside --data-dir",
            output_inside,
            argv=["train", "--data-dir", "{own}", "--output-dir", "{own}/runs", "--name", "sweep", *FAST],
            expect="message",
            says=("inside",),
        ),
        predict_folder("a symlink loop inside", lambda ctx, own: os.symlink(own, own / "circle_red" / "loop")),
        predict_folder("__MACOSX/ and hidden files", macosx),
        Case(
            "folders",
            "predict: a 13000 x 13000 PNG",
            ["predict", "--model", "{model}", "{case}/huge.png"],
            says=("huge.png",),
            prepare=lambda ctx: write_big_png(ctx.folder / "huge.png", 13000),
            verify=None,
        ),
        Case(
            "folders",
            "evaluate --data-dir with __MACOSX/",
            ["evaluate", "--model", "{model}", "--data-dir", "{own}", "--output-dir", "{case}/ev"],
            expect="ok",
            prepare=lambda ctx: macosx(ctx, ctx.own_images()),
            verify=wrote("{case}/ev/evaluation.json"),
        ),
    ]


def untrusted_cases() -> list[Case]:
    """Files a run folder or a model may come with from elsewhere: split.json, config.yaml, models, records."""

    def edit_split(change) -> Callable[[Context], None]:
        def prepare(ctx: Context) -> None:
            path = ctx.run / "split.json"
            content = json.loads(path.read_text())
            change(ctx, content)
            path.write_text(json.dumps(content))

        return prepare

    def first_label(label: int):
        return lambda ctx, content: content["test"][0].__setitem__(1, label)

    def replace_model(name: str, target: str = "model.keras") -> Callable[[Context], None]:
        def prepare(ctx: Context) -> None:
            shutil.copy(ctx.base.artifacts / name, ctx.run / target)

        return prepare

    def text_model(ctx: Context) -> None:
        (ctx.run / "model.keras").write_text("this is not a model\n")

    def half_model(ctx: Context) -> None:
        path = ctx.run / "model.keras"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    def tflite(content: Callable[[Context], bytes]) -> Callable[[Context], None]:
        def prepare(ctx: Context) -> None:
            (ctx.run / "export" / "model_float32.tflite").write_bytes(content(ctx))

        return prepare

    def truncated_tflite(ctx: Context) -> bytes:
        data = (ctx.run / "export" / "model_float32.tflite").read_bytes()
        return data[: len(data) // 3]

    def corrupted_tflite(ctx: Context) -> bytes:
        data = bytearray((ctx.run / "export" / "model_float32.tflite").read_bytes())
        rng = np.random.default_rng(0)
        for index in rng.integers(64, len(data), 200):
            data[index] = int(rng.integers(0, 256))
        return bytes(data)

    outside = lambda ctx, content: content["test"].__setitem__(0, ["../outside/x.png", 0])  # noqa: E731
    evaluate = ["evaluate", "--run-dir", "{run}", "--batch-size", "8"]
    predict = ["predict", "--model", "{model}", "{image}"]
    bench = [
        "benchmark",
        "--model",
        "{model}",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--throughput-runs",
        "1",
        "--batch-size",
        "1",
    ]
    explain = ["explain", "--model", "{model}", "--output", "{case}/cams", "{image}"]
    tfl_predict = ["predict", "--model", "{tflite}", "{image}"]

    def case(name, argv, prepare, says=(), expect="message", verify=None, heavy=False, note="") -> Case:
        return Case(
            "untrusted", name, argv, expect=expect, says=says, prepare=prepare, verify=verify, heavy=heavy, note=note
        )

    python_tag = _write("{run}/config.yaml", "data: !!python/object/apply:os.system ['touch {case}/planted']\n")
    cases = [
        case(
            "split.json: an absolute path (evaluate)",
            evaluate,
            edit_split(lambda ctx, c: c["test"].__setitem__(0, ["/etc/passwd", 0])),
            says=("/etc/passwd",),
        ),
        case("split.json: ../ out of the folder (evaluate)", evaluate, edit_split(outside), says=("../outside",)),
        case("split.json: ../ out of the folder (export)", EXPORT, edit_split(outside), says=("../outside",)),
        case("split.json: not JSON (evaluate)", evaluate, _write("{run}/split.json", "{ nope"), says=("split.json",)),
        case("split.json: a label out of range", evaluate, edit_split(first_label(7)), says=("split.json",)),
        case("split.json: a negative label", evaluate, edit_split(first_label(-1)), says=("split.json",)),
        case(
            "split.json: a null path",
            evaluate,
            edit_split(lambda ctx, c: c["test"].__setitem__(0, [None, 0])),
            says=("split.json",),
        ),
        case(
            "split.json: four class names for three outputs",
            evaluate,
            edit_split(lambda ctx, c: c["class_names"].append("zebra")),
            says=("classes", "outputs"),
        ),
        case(
            "split.json: a root that does not exist",
            evaluate,
            edit_split(lambda ctx, c: c.__setitem__("root", "/nonexistent/data")),
            says=("/nonexistent/data",),
        ),
        case("config.yaml: a python tag (evaluate)", evaluate, python_tag, says=("config.yaml",)),
        case("config.yaml: a python tag (predict)", predict, python_tag, says=("config.yaml",)),
        case(
            "config.yaml: binary garbage (predict)",
            predict,
            _write("{run}/config.yaml", bytes(range(256)) * 4),
            says=("config.yaml",),
        ),
        case(
            "config.yaml: resize_mode bogus (predict)",
            predict,
            _write("{run}/config.yaml", "data:\n  resize_mode: bogus\n"),
            says=("resize_mode", "config.yaml"),
        ),
        case(
            "config.yaml: image_size abc (evaluate)",
            evaluate,
            _write("{run}/config.yaml", "data:\n  image_size: abc\n"),
            says=("image_size", "config.yaml"),
        ),
        case(
            "config.yaml: an alias bomb (predict)",
            predict,
            _write("{run}/config.yaml", _laughs()),
            says=("config.yaml",),
        ),
        case("model.keras: a Lambda layer (predict)", predict, replace_model("lambda.keras"), says=("Lambda",)),
        case("model.keras: a Lambda layer (explain)", explain, replace_model("lambda.keras"), says=("Lambda",)),
        case("model.keras: a Lambda layer (export)", EXPORT, replace_model("lambda.keras"), says=("Lambda",)),
        case("model.keras: a text file (predict)", predict, text_model, says=("model.keras",)),
        case("model.keras: a text file (export)", EXPORT, text_model, says=("model.keras",)),
        case("model.keras: cut in half (predict)", predict, half_model, says=("model.keras",)),
        case("model.keras: not an image model (predict)", predict, replace_model("dense.keras"), says=("model.keras",)),
        case("model.keras: not an image model (benchmark)", bench, replace_model("dense.keras"), says=("model.keras",)),
        case("model.keras: not an image model (export)", EXPORT, replace_model("dense.keras"), says=("model.keras",)),
        case(
            "model.keras: 4 outputs, 3 labels (predict)", predict, replace_model("four_outputs.keras"), says=("labels",)
        ),
        case(".tflite: garbage (predict)", tfl_predict, tflite(lambda ctx: os.urandom(5000)), says=(".tflite",)),
        case(".tflite: empty (predict)", tfl_predict, tflite(lambda ctx: b""), says=(".tflite",)),
        case(".tflite: truncated (predict)", tfl_predict, tflite(truncated_tflite), says=(".tflite",)),
        case(
            ".tflite: bytes flipped (predict)",
            tfl_predict,
            tflite(corrupted_tflite),
            says=(".tflite",),
            expect="message",
        ),
        case(
            ".tflite: not an image model (predict)",
            tfl_predict,
            tflite(lambda ctx: (ctx.base.artifacts / "dense.tflite").read_bytes()),
            says=(".tflite",),
        ),
        case(
            "SavedModel: garbage saved_model.pb",
            ["predict", "--model", "{saved_model}", "{image}"],
            _write("{run}/export/saved_model/saved_model.pb", os.urandom(3000)),
            says=("saved_model",),
        ),
        case("labels.txt: 2 names for 3 outputs", predict, _write("{run}/labels.txt", "a\nb\n"), says=("labels.txt",)),
        case(
            "labels.txt: invalid UTF-8",
            predict,
            _write("{run}/labels.txt", b"\xff\xfe\x00a\nb\nc\n"),
            says=("labels.txt",),
        ),
        case(
            "input_contract.json: garbage beside a .tflite that carries its own",
            ["predict", "--model", "{case}/alone/m.tflite", "{image}"],
            lambda ctx: _alone(ctx, "{ nope", plain=False),
            expect="ok",
            verify=predictions_right,
            note="the input contract inside a model is read first; one beside it is read only for a model without",
        ),
        case(
            "input_contract.json: garbage, .tflite alone",
            ["predict", "--model", "{case}/alone/m.tflite", "{image}"],
            lambda ctx: _alone(ctx, "{ nope"),
            says=("input_contract.json", "contract"),
        ),
        case(
            "input_contract.json: invalid UTF-8, .tflite alone",
            ["predict", "--model", "{case}/alone/m.tflite", "{image}"],
            lambda ctx: _alone(ctx, b"\xff\xfe{}"),
            says=("input_contract.json", "contract"),
        ),
        case(
            "input_contract.json: image_size -5, .tflite alone",
            ["predict", "--model", "{case}/alone/m.tflite", "{image}"],
            lambda ctx: _alone(ctx, "size"),
            says=("input_contract.json", "contract", "image_size"),
        ),
        case(
            "operating_point.json: garbage",
            ["predict", "--model", "{model2}", "{image2}"],
            _write("{run2}/operating_point.json", "{ nope"),
            says=("operating_point.json",),
        ),
        case(
            "operating_point.json: threshold 5",
            ["predict", "--model", "{model2}", "{image2}"],
            lambda ctx: _edit_json(ctx.run2 / "operating_point.json", threshold=5),
            says=("operating_point.json", "threshold"),
        ),
        case(
            "calibration.json: garbage (evaluate)",
            evaluate,
            _write("{run}/calibration.json", "{ nope"),
            says=("calibration.json",),
        ),
        case(
            "history.csv: garbage, training resumed",
            ["train", "--resume", "{run}"],
            lambda ctx: _unfinish(ctx) or (ctx.run / "history.csv").write_bytes(os.urandom(300)),
            expect="ok",
            verify=trained(run="{run}"),
            heavy=True,
        ),
        case(
            "checkpoints/plan.json: garbage, training resumed",
            ["train", "--resume", "{run}"],
            lambda ctx: _unfinish(ctx) or (ctx.run / "checkpoints" / "plan.json").write_text("{ nope"),
            expect="ok",
            verify=trained(run="{run}"),
            heavy=True,
        ),
        case(
            "metrics.json: garbage, same --name again",
            ["train", "--data-dir", "{images}", "--output-dir", "{case}", "--name", "run", *FAST],
            _write("{run}/metrics.json", "{ nope"),
            says=("finished", "overwrite"),
        ),
    ]
    return cases


def _alone(ctx: Context, contract: str | bytes, plain: bool = True) -> None:
    """A .tflite copied alone into a folder, with `contract` as the input_contract.json beside it ("size": the run's
    with image_size -5). `plain`: the file without metadata, so the one beside it is what tells its classes."""
    folder = ctx.folder / "alone"
    folder.mkdir()
    source = ctx.base.work / "plain" / "model_float32.tflite" if plain else ctx.run / "export" / "model_int8.tflite"
    shutil.copy(source, folder / "m.tflite")
    if contract == "size":
        content = json.loads((ctx.run / "input_contract.json").read_text())
        content["image_size"] = -5
        contract = json.dumps(content)
    (folder / "input_contract.json").write_bytes(contract if isinstance(contract, bytes) else contract.encode())


def _edit_json(path: Path, **changes) -> None:
    content = json.loads(path.read_text())
    content.update(changes)
    path.write_text(json.dumps(content))


def _unfinish(ctx: Context) -> None:
    """Makes the copied base run an interrupted one: finished phases, no metrics.json (the final steps to run)."""
    (ctx.run / "metrics.json").unlink()


def mistake_cases() -> list[Case]:
    """A user's slips that may touch a finished run: each must leave it as it was."""
    same = ["train", "--data-dir", "{images}", "--output-dir", "{case}", "--name", "run"]

    def one_class(ctx: Context) -> None:
        own = ctx.own_images()
        for name in ("square_green", "stripes_blue"):
            shutil.rmtree(own / name)

    return [
        Case("mistakes", "train the same finished --name again", [*same, *FAST], says=("finished",)),
        Case(
            "mistakes",
            "same --name, other settings, run interrupted",
            [*same, *FAST, "--seed", "7"],
            says=("other settings",),
            prepare=_unfinish,
        ),
        Case(
            "mistakes",
            "--overwrite a finished run with a data folder that fails",
            ["train", "--data-dir", "{own}", "--output-dir", "{case}", "--name", "run", "--overwrite", *FAST],
            says=("single class",),
            prepare=one_class,
            heavy=True,
            rerun=["predict", "--model", "{model}", "{image}"],
        ),
        Case(
            "mistakes",
            "--overwrite a finished run with a bad setting",
            [*same, *FAST, "--overwrite", "--set", "train.operating_point=bogus"],
            says=("operating_point",),
        ),
        Case(
            "mistakes",
            "--resume with --data-dir a file",
            ["train", "--resume", "{run}", "--data-dir", "{file}"],
            says=("notes.txt", "finished"),
        ),
        Case(
            "mistakes",
            "train --data-dir the run folder",
            ["train", "--data-dir", "{run}", "--output-dir", "{case}/runs", *FAST],
            says=("class", "image"),
        ),
        Case(
            "mistakes",
            "evaluate --run-dir the export folder",
            ["evaluate", "--run-dir", "{run}/export"],
            says=("split", "model.keras"),
        ),
        Case(
            "mistakes",
            "export --run-dir the export folder",
            ["export", "--run-dir", "{run}/export"],
            says=("model.keras",),
        ),
        Case(
            "mistakes",
            "predict --output onto model.keras",
            ["predict", "--model", "{model}", "--output", "{model}", "{image}"],
            says=("model.keras", "--output"),
        ),
        Case(
            "mistakes",
            "evaluate --output-dir the run folder",
            ["evaluate", "--run-dir", "{run}", "--output-dir", "{run}"],
            expect="ok",
            verify=wrote("{run}/evaluation.json"),
            rerun=["predict", "--model", "{model}", "{image}"],
        ),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Concurrency, kills and leftovers: drivers that run several processes


def _both(first: Result, second: Result, second_refused: bool, refusal: tuple[str, ...] = ("in use",)) -> Result:
    """Two commands as one result: exit 0 when `first` succeeded and `second` succeeded too, or (`second_refused`)
    was refused with one of the `refusal` words (the first held the run folder); else the failing exit code. The
    outputs are joined."""
    joined = Result(
        0,
        first.out + second.out,
        first.err + "\n" + second.err,
        max(first.seconds, second.seconds),
        max(first.maxrss_mb, second.maxrss_mb),
        first.timed_out or second.timed_out,
    )
    if first.rc != 0:
        joined.rc = first.rc
    elif second_refused and second.rc == 0:
        joined.problem = "both worked in one run folder at the same time"
    elif second_refused and not (second.rc == 2 and any(word in second.err for word in refusal)):
        joined.rc = second.rc or 1
    elif not second_refused:
        joined.rc = second.rc
    return joined


def _together(
    ctx: Context,
    first: list[str],
    second: list[str],
    ready: Callable[[], bool] | None = None,
    refused: bool = True,
    refusal: tuple[str, ...] = ("in use",),
) -> Result:
    """Starts `first`; once `ready()` holds (at once without it) runs `second` beside it; waits for both."""
    results: dict[str, Result] = {}
    thread = threading.Thread(
        target=lambda: results.setdefault("a", command(ctx.expand(first), ctx.folder, HEAVY_TIMEOUT))
    )
    thread.start()
    deadline = time.monotonic() + HEAVY_TIMEOUT
    while ready is not None and not ready() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    results["b"] = command(ctx.expand(second), ctx.folder, HEAVY_TIMEOUT)
    thread.join()
    return _both(results["a"], results["b"], refused, refusal)


def _holds_lock(folder: Path, what: str) -> Callable[[], bool]:
    """Whether a process has taken `folder`'s run lock for `what` ("training", "export")."""

    def ready() -> bool:
        try:
            return what in (folder / ".lock").read_text()
        except OSError:
            return False

    return ready


def _maps(process: subprocess.Popen, name: str) -> bool:
    """Whether the process has a file called `name` mapped (a .tflite file LiteRT opened)."""
    try:
        return name in Path(f"/proc/{process.pid}/maps").read_text()
    except OSError:
        return False


def _signal_when(ctx: Context, argv: list[str], ready: Callable, sig: signal.Signals) -> tuple[Result, bool]:
    """Runs `argv` and sends `sig` as soon as `ready(process)` holds; (its result, whether the signal was sent)."""
    sent = []

    def watch(process: subprocess.Popen) -> None:
        deadline = time.monotonic() + HEAVY_TIMEOUT
        while not ready(process):
            if process.poll() is not None or time.monotonic() > deadline:
                return
            time.sleep(0.02)
        if sig == signal.SIGKILL:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
        sent.append(sig)

    return command(ctx.expand(argv), ctx.folder, HEAVY_TIMEOUT, on_start=watch), bool(sent)


def concurrency_cases() -> list[Case]:
    busy = ["train", "--data-dir", "{images}", "--output-dir", "{case}/runs", "--name", "busy", *FAST[:-4]]
    busy += ["--head-epochs", "2", "--finetune-epochs", "2"]
    export_both = [*EXPORT, "--formats", "float32,int8"]

    def beside_training(second: list[str], refusal: tuple[str, ...] = ("in use",)) -> Callable[[Context], Result]:
        def drive(ctx: Context) -> Result:
            return _together(ctx, busy, second, _holds_lock(ctx.folder / "runs" / "busy", "training"), True, refusal)

        return drive

    def two_exports(ctx: Context) -> Result:
        return _together(ctx, export_both, export_both, _holds_lock(ctx.run, "export"))

    def two_predicts_one_output(ctx: Context) -> Result:
        argv = ["predict", "--model", "{tflite}", "--output", "{case}/p.csv", "{images}"]
        return _together(ctx, argv, argv, refused=False)

    def whole_csv(ctx: Context, result: Result) -> str | None:
        rows = len(_rows((ctx.folder / "p.csv").read_text()))
        return None if rows == 30 else f"p.csv has {rows} rows for 30 images"

    def stale_lock(ctx: Context) -> None:
        (ctx.run / ".lock").write_text("training (process 999999)")

    export_busy = ["export", "--run-dir", "{case}/runs/busy"]
    overwrite_busy = [*busy[:7], "--overwrite", *FAST]
    return [
        Case(
            "concurrency",
            "two trainings of one --name",
            driver=beside_training(busy),
            expect="ok",
            verify=trained(run="{case}/runs/busy"),
            exclusive=True,
        ),
        Case(
            "concurrency",
            "export while the run trains",
            driver=beside_training(export_busy, ("in use", "model.keras' does not exist")),
            expect="ok",
            verify=trained(run="{case}/runs/busy"),
            exclusive=True,
        ),
        Case(
            "concurrency",
            "--overwrite while the run trains",
            driver=beside_training(overwrite_busy),
            expect="ok",
            verify=trained(run="{case}/runs/busy"),
            exclusive=True,
        ),
        Case(
            "concurrency",
            "two exports of one run",
            driver=two_exports,
            expect="ok",
            verify=wrote("{run}/export/model_int8.tflite"),
            rerun=["predict", "--model", "{int8}", "{image}"],
            exclusive=True,
        ),
        Case(
            "concurrency",
            "two predicts into one --output",
            driver=two_predicts_one_output,
            expect="ok",
            verify=whole_csv,
            exclusive=True,
        ),
        Case(
            "concurrency",
            "a stale .lock of a dead process",
            EXPORT,
            expect="ok",
            prepare=stale_lock,
            verify=wrote("{run}/export/model_float32.tflite"),
            heavy=True,
        ),
    ]


def kill_cases() -> list[Case]:
    train = ["train", "--data-dir", "{images}", "--output-dir", "{case}/runs", "--name", "k", *FAST[:-4]]
    train += ["--head-epochs", "2", "--finetune-epochs", "2"]
    export = [*EXPORT, "--formats", "float32,int8"]
    run = "{case}/runs/k"

    def at(*parts: str) -> Callable[[Context], Callable]:
        """Ready when the file `run/parts...` exists (a glob pattern in the last part)."""

        def ready_for(ctx: Context) -> Callable:
            folder = Path(ctx.expand([run])[0]).joinpath(*parts[:-1])
            return lambda process: any(folder.glob(parts[-1]))

        return ready_for

    def converting(ctx: Context) -> Callable:
        return lambda process: any((ctx.run / "export").glob(".convert-*/*"))

    def predicting(ctx: Context) -> Callable:
        return lambda process: _maps(process, "model_float32.tflite")

    def stopped_then_again(argv: list[str], ready_for, sig: signal.Signals) -> Callable[[Context], Result]:
        """Stops the command at the moment, then runs the same command again: that result is the case's."""

        def drive(ctx: Context) -> Result:
            first, sent = _signal_when(ctx, argv, ready_for(ctx), sig)
            if not sent:
                raise RuntimeError(f"the moment to send {sig.name} never came (exit {first.rc})")
            if TRACEBACK in first.text:
                return first
            again = command(ctx.expand(argv), ctx.folder, HEAVY_TIMEOUT)
            again.err += f"\n[sweep: the first run was stopped by {sig.name}, exit {first.rc}]"
            return again

        return drive

    def interrupted(argv: list[str], ready_for) -> Callable[[Context], Result]:
        """Ctrl-C at the moment: the case's result is the interrupted command's (a message, exit 130)."""

        def drive(ctx: Context) -> Result:
            result, sent = _signal_when(ctx, argv, ready_for(ctx), signal.SIGINT)
            if not sent:
                raise RuntimeError(f"the moment to press Ctrl-C never came (exit {result.rc})")
            return result

        return drive

    def many_images(ctx: Context) -> None:
        for copy in range(20):
            shutil.copytree(ctx.base.images, ctx.folder / "many" / str(copy))

    def leftovers(ctx: Context) -> None:
        export_dir = ctx.run / "export"
        (export_dir / ".convert-dead").mkdir()
        (export_dir / ".convert-dead" / "scratch.bin").write_bytes(os.urandom(1000))
        (export_dir / ".partial-999999-model_float32.tflite").write_bytes(b"half")

    def clean(ctx: Context, result: Result) -> str | None:
        left = [
            p.name for p in (ctx.run / "export").iterdir() if p.name.startswith((".convert-", ".partial-", ".pending-"))
        ]
        return f"left behind: {left}" if left else None

    def replaced_left(ctx: Context) -> None:
        shutil.copytree(ctx.run, ctx.folder / ".run.replaced")
        _unfinish(ctx)

    def limited(argv: list[str], limit: int) -> Callable[[Context], Result]:
        def drive(ctx: Context) -> Result:
            def preexec() -> None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

            return command(ctx.expand(argv), ctx.folder, HEAVY_TIMEOUT, preexec=preexec)

        return drive

    again = "{case}/runs/k"
    finished = trained(run=again)
    overwrite = ["train", "--data-dir", "{images}", "--output-dir", "{case}", "--name", "run", "--overwrite", *FAST]
    predict_many = ["predict", "--model", "{tflite}", "{case}/many"]
    return [
        Case(
            "kills",
            "SIGKILL when split.json appears, same command",
            driver=stopped_then_again(train, at("split.json"), signal.SIGKILL),
            expect="ok",
            verify=finished,
            exclusive=True,
        ),
        Case(
            "kills",
            "SIGKILL after phase 1, same command",
            driver=stopped_then_again(train, at("checkpoints", "phase1.done"), signal.SIGKILL),
            expect="ok",
            verify=finished,
            exclusive=True,
        ),
        Case(
            "kills",
            "SIGKILL after phase 2's first backup, same command",
            driver=stopped_then_again(train, at("checkpoints", "phase2_backup", "state.json"), signal.SIGKILL),
            expect="ok",
            verify=finished,
            exclusive=True,
        ),
        Case(
            "kills",
            "SIGTERM after phase 1, same command",
            driver=stopped_then_again(train, at("checkpoints", "phase1.done"), signal.SIGTERM),
            expect="ok",
            verify=finished,
            exclusive=True,
        ),
        Case(
            "kills",
            "SIGKILL while converting, same export",
            driver=stopped_then_again(export, converting, signal.SIGKILL),
            expect="ok",
            verify=all_of(wrote("{run}/export/model_int8.tflite"), clean),
            exclusive=True,
        ),
        Case(
            "kills",
            "Ctrl-C in training after the split",
            driver=interrupted(train, at("split.json")),
            says=("interrupted",),
            rerun=train,
            exclusive=True,
        ),
        Case(
            "kills",
            "Ctrl-C in export while converting",
            driver=interrupted(export, converting),
            says=("interrupted",),
            rerun=export,
            exclusive=True,
        ),
        Case(
            "kills",
            "Ctrl-C in predict",
            driver=interrupted(predict_many, predicting),
            says=("interrupted",),
            prepare=many_images,
            exclusive=True,
        ),
        Case(
            "kills",
            "Ctrl-C while TensorFlow starts",
            driver=interrupted(
                ["predict", "--model", "{tflite}", "{image}"],
                lambda ctx: lambda process: _maps(process, "libtensorflow"),
            ),
            says=("interrupted",),
            exclusive=True,
        ),
        Case(
            "kills",
            "leftovers of killed writers, export again",
            EXPORT,
            expect="ok",
            prepare=leftovers,
            verify=clean,
            heavy=True,
        ),
        Case(
            "kills",
            "a .run.replaced left by a killed --overwrite",
            overwrite,
            expect="ok",
            prepare=replaced_left,
            verify=trained(run="{run}"),
            heavy=True,
            overwrites=True,
        ),
        Case(
            "kills",
            "file-size limit in export",
            driver=limited(export, 40_000),
            says=("file-size limit",),
            rerun=export,
            exclusive=True,
        ),
        Case(
            "kills",
            "file-size limit in predict --output",
            driver=limited(["predict", "--model", "{tflite}", "--output", "{case}/p.csv", "{images}"], 500),
            says=("file-size limit",),
            exclusive=True,
        ),
        Case(
            "kills",
            "file-size limit in evaluate",
            driver=limited(["evaluate", "--run-dir", "{run}"], 3_000),
            says=("file-size limit",),
            exclusive=True,
        ),
    ]


GROUPS: dict[str, Callable[[], list[Case]]] = {
    "settings": settings_cases,
    "config": config_cases,
    "train": train_flag_cases,
    "export": export_flag_cases,
    "evaluate": evaluate_flag_cases,
    "predict": predict_flag_cases,
    "explain": explain_flag_cases,
    "benchmark": benchmark_flag_cases,
    "folders": folder_cases,
    "untrusted": untrusted_cases,
    "mistakes": mistake_cases,
    "concurrency": concurrency_cases,
    "kills": kill_cases,
}


# ---------------------------------------------------------------------------------------------------------------
# Classifying


# An error line: ours (`error: `, `interrupted: `), argparse's (`prog: error: `), or a file predict and explain could
# not read (`skipped PATH: reason`; they exit 1 when no file could be read).
_ERROR_LINE = re.compile(r"^(error|interrupted|[\w. ]+: error|skipped .+?): .+", re.MULTILINE)


def classify(case: Case, result: Result, lost: str | None, problem: str | None) -> tuple[str, str]:
    """(outcome, detail) of one finished case; see the module docstring."""
    text = result.text
    if result.timed_out:
        return "traceback", f"hung: killed after {result.seconds:.0f} s"
    if result.rc < 0:
        return "traceback", f"died by signal {-result.rc}"
    if TRACEBACK in text:
        tail = [line for line in text[text.rindex(TRACEBACK) :].splitlines() if line.strip()]
        return "traceback", tail[-1][:300] if tail else "traceback"
    if lost:
        return "lost", lost
    if result.rc == 0:
        if case.expect == "message":
            return "wrong", problem or "exit 0: accepted although it should have been refused"
        return ("wrong", problem) if problem else ("ok", "")
    found = [m.group(0) for m in _ERROR_LINE.finditer(text)]
    if not found:
        last = [line for line in text.splitlines() if line.strip()]
        return "unclear", f"exit {result.rc}, no error line: {last[-1][:200] if last else '(no output)'}"
    if case.says and not any(word.lower() in " ".join(found).lower() for word in case.says):
        return "unclear", f"does not name {' / '.join(case.says)}: {found[-1][:250]}"
    return "message", found[-1][:300]


def run_case(case: Case, base: Base, work: Path, keep: bool) -> dict:
    """Runs one case in its own folder and returns its record."""
    folder = work / "cases" / f"{case.group}-{abs(hash(case.name)) % 10**8:08d}"
    folder.mkdir(parents=True)
    ctx = Context(base, folder)
    shutil.copytree(base.run, ctx.run, ignore=shutil.ignore_patterns("logs", ".lock"))
    shutil.copytree(base.run2, ctx.run2, ignore=shutil.ignore_patterns("logs", ".lock"))
    (folder / "notes.txt").write_text("a plain file\n")
    record = {"group": case.group, "name": case.name, "expect": case.expect, "note": case.note}
    try:
        if case.prepare is not None:
            case.prepare(ctx)
        before = snapshot(ctx.run), snapshot(ctx.run2)
        if case.driver is not None:
            result = case.driver(ctx)
        else:
            argv = ctx.expand(case.argv)
            record["argv"] = argv
            result = command(argv, folder, HEAVY_TIMEOUT if case.heavy else LIGHT_TIMEOUT)
        problem = result.problem
        if result.rc == 0 and problem is None and case.verify is not None:
            try:
                problem = case.verify(ctx, result)
            except Exception as error:  # noqa: BLE001 - the result is not there or not readable: wrong
                problem = f"{type(error).__name__}: {error}"
        if (folder / "planted").exists():
            problem, result.rc = "code from an untrusted file ran (it created 'planted')", 0
        lost = _lost(case, ctx, result, before)
        outcome, detail = classify(case, result, lost, problem)
    except Exception as error:  # noqa: BLE001 - a bug of the sweep itself, shown as such, never as a case's result
        result, outcome, detail = Result(-1, "", "", 0.0), "sweep-error", f"{type(error).__name__}: {error}"
    record.update(
        outcome=outcome,
        as_expected=outcome == case.expect,
        detail=detail,
        exit=result.rc,
        seconds=round(result.seconds, 1),
        peak_mb=round(result.maxrss_mb),
    )
    if keep:
        (folder / "sweep-output.txt").write_text(result.text)
    else:
        shutil.rmtree(folder, ignore_errors=True)
    return record


def _lost(case: Case, ctx: Context, result: Result, before: tuple[dict, dict]) -> str | None:
    """Why the case lost a run or an export, or None."""
    for run, snap in zip((ctx.run, ctx.run2), before, strict=True):
        if case.overwrites and result.rc == 0:
            continue
        after = snapshot(run)
        gone = sorted(set(snap) - set(after))
        if gone:
            return f"{run.name}: {', '.join(gone[:4])} gone"
        changed = sorted(rel for rel in snap if after.get(rel) != snap[rel])
        if changed and result.rc != 0:
            return f"{run.name}: a refused command changed {', '.join(changed[:4])}"
    left = ctx.folder / "runs" / "sweep"
    if result.rc != 0 and (left / "config.yaml").is_file() and not (left / "metrics.json").is_file():
        return "a refused training left a half-made run folder: the corrected command with --name would be refused"
    if case.rerun is not None:
        again = command(ctx.expand(case.rerun), ctx.folder, HEAVY_TIMEOUT)
        if again.rc != 0:
            tail = [line for line in again.text.splitlines() if line.strip()]
            return f"afterwards `{' '.join(case.rerun[:3])} ...` fails: {tail[-1][:200] if tail else again.rc}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Report


def tally(records: list[dict]) -> dict:
    counts = Counter(record["outcome"] for record in records)
    return {
        "cases": len(records),
        **{outcome: counts.get(outcome, 0) for outcome in OUTCOMES},
        "sweep_errors": counts.get("sweep-error", 0),
        "refused_although_ok_expected": sum(r["outcome"] == "message" and r["expect"] == "ok" for r in records),
    }


def print_table(records: list[dict]) -> None:
    print(f"\n{'group':12s} {'case':58s} {'expect':8s} {'outcome':10s} {'s':>5s}  detail")
    print("-" * 150)
    for r in records:
        mark = "" if r["as_expected"] else " *"
        print(
            f"{r['group']:12s} {r['name'][:58]:58s} {r['expect']:8s} {r['outcome'] + mark:10s} "
            f"{r['seconds']:5.0f}  {r['detail'][:110]}"
        )


def print_tally(t: dict, wall: float) -> None:
    print(
        f"\nCases tried: {t['cases']}. ok {t['ok']}, message {t['message']}; tracebacks: {t['traceback']}, "
        f"runs lost: {t['lost']}, silently wrong results: {t['wrong']}; unclear messages: {t['unclear']}"
        + (f", sweep errors: {t['sweep_errors']}" if t["sweep_errors"] else "")
        + f". Refused although they should work: {t['refused_although_ok_expected']}. Wall time {wall / 60:.1f} min."
    )


def select(groups: list[str] | None, quick: bool) -> list[Case]:
    cases = []
    for name, make in GROUPS.items():
        if groups and name not in groups:
            continue
        made = make()
        cases += made[::4] if quick else made
    return cases


def run_cases(cases: list[Case], run_one: Callable[[Case], dict], workers: int, done: Callable[[dict], None]) -> None:
    """Runs the cases `workers` at a time with at most one `exclusive` case at once (kills and concurrency: each
    runs beside at most one light case); a free worker takes the next exclusive case when none runs, so they are
    spread over the whole sweep instead of queueing at its end."""
    pending, lock, state = list(cases), threading.Lock(), {"exclusive": False}

    def take() -> Case | None:
        with lock:
            if not state["exclusive"]:
                case = next((case for case in pending if case.exclusive), None)
                if case is not None:
                    state["exclusive"] = True
                    pending.remove(case)
                    return case
            case = next((case for case in pending if not case.exclusive), None)
            if case is not None:
                pending.remove(case)
            return case

    def work() -> None:
        while True:
            case = take()
            if case is None:
                with lock:
                    if not pending:
                        return
                time.sleep(0.5)  # only exclusive cases left, and one of them runs
                continue
            try:
                record = run_one(case)
            finally:
                if case.exclusive:
                    with lock:
                        state["exclusive"] = False
            with lock:
                done(record)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about one case in four of each group")
    parser.add_argument("--only", action="append", choices=sorted(GROUPS), help="run this group (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--workers", type=int, default=2, choices=(1, 2), help="cases at a time (default 2)")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep every case's folder and output")
    parser.add_argument("--output", default=str(RESULTS), help=f"JSON results (default {RESULTS.relative_to(ROOT)})")
    args = parser.parse_args()
    cases = select(args.only, args.quick)
    if args.list:
        for case in cases:
            print(f"{case.group:12s} {case.expect:8s} {case.name}")
        print(f"{len(cases)} cases")
        return 0
    started = time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hostile-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{len(cases)} cases; building the base runs in {work}", flush=True)
    base = build_base(work)
    records: list[dict] = []

    def done(record: dict) -> None:
        records.append(record)
        flag = "" if record["as_expected"] else "  <-- " + record["outcome"]
        print(
            f"[{len(records):3d}/{len(cases)}] {record['group']:11s} {record['name'][:60]:60s} "
            f"{record['outcome']}{flag}",
            flush=True,
        )

    run_cases(cases, lambda case: run_case(case, base, work, args.keep), args.workers, done)
    order = {(case.group, case.name): index for index, case in enumerate(cases)}
    records.sort(key=lambda record: order[record["group"], record["name"]])
    wall = time.perf_counter() - started
    print_table(records)
    totals = tally(records)
    print_tally(totals, wall)
    notes = sorted({r["note"] for r in records if r["note"]})
    for note in notes:
        print(f"documented: {note}")
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "wall_seconds": round(wall),
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
        "tally": totals,
        "documented": notes,
        "cases": records,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    bad = totals["traceback"] + totals["lost"] + totals["wrong"] + totals["unclear"] + totals["sweep_errors"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
