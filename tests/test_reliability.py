"""Kills at named moments, damaged checkpoints and a file-size limit: the same command always finishes the run,
with the right epochs, and never shows a traceback.

The kill tests run `train.py` in a child process, poll for the file that marks the moment and SIGKILL it there. The
runs that follow (the same command again, on what the kills left, or under a file-size limit) go through
`train.main` in the test's own process: the same code as `python train.py` after its imports, without a second
TensorFlow import (7 s each here); their output is read from capsys, and an exception would fail the test as a
traceback would.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import TINY, write_separable_folder

ROOT = Path(__file__).resolve().parents[1]
# Phase 1 is epochs 0-3 (on cached features), phase 2 epochs 4-6.
SMALL = ["--image-size", "32", "--batch-size", "4", "--augment", "none", *TINY]
EPOCHS = ["--head-epochs", "4", "--finetune-epochs", "3"]
HEAD, FINETUNE = 4, 3


def command(images: Path, output: Path) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--data-dir", str(images), "--output-dir", str(output)]


def run_here(argv: list[str], capsys) -> subprocess.CompletedProcess:
    """`argv` (a `command(...)` line) run through `train.main` in this process, with what it printed."""
    from classifier.train import main

    assert argv[:2] == [sys.executable, str(ROOT / "train.py")]
    capsys.readouterr()
    code = main(argv[2:])
    printed = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, printed.out, printed.err)


def kill_when(argv: list[str], ready, timeout: float = 300) -> str:
    """Starts `argv`, SIGKILLs it as soon as `ready()` is true, fails if it ends on its own first, and returns what
    it printed."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    # Files, not pipes: a full pipe would stall the child.
    with tempfile.TemporaryFile("w+") as output, tempfile.TemporaryFile("w+") as errors:
        child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=output, stderr=errors, text=True)
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                if child.poll() is not None:
                    errors.seek(0)
                    raise AssertionError(f"the run ended (exit {child.returncode}) first: {errors.read()[-3000:]}")
                assert time.monotonic() < deadline, "the moment to kill never came"
                time.sleep(0.02)
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        output.seek(0)
        return output.read()


def history_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as handle:
        return list(csv.DictReader(handle))


def history_epochs(run_dir: Path) -> list[int]:
    return [int(row["epoch"]) for row in history_rows(run_dir)]


def backup_epoch(run_dir: Path) -> int | None:
    state = run_dir / "checkpoints" / "phase2_backup" / "state.json"
    try:
        return json.loads(state.read_text())["epoch"]
    except (OSError, ValueError):  # not there yet, or caught between its rename and our read
        return None


def inside_phase_1(run_dir: Path) -> bool:
    """A head epoch is in history.csv and phase 1 is not marked done."""
    try:
        rows = len(history_epochs(run_dir))
    except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
        return False
    return rows >= 1 and not (run_dir / "checkpoints" / "phase1.done").exists()


def assert_finished_cleanly(run_dir: Path, result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    rows = history_rows(run_dir)
    assert [int(row["epoch"]) for row in rows] == list(range(HEAD + FINETUNE))  # each epoch once, in order
    assert [int(float(row["phase"])) for row in rows] == [1] * HEAD + [2] * FINETUNE  # each phase its own epochs
    assert (run_dir / "model.keras").is_file() and (run_dir / "metrics.json").is_file()
    assert not (run_dir / "checkpoints" / "phase2_backup").exists()  # removed once phase 2 is marked done
    leftovers = [p for p in run_dir.rglob("*") if p.name.startswith(".partial-")]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> tuple[Path, Path, Path, str]:
    """A run SIGKILLed after a head epoch (inside phase 1), run again with the same command and SIGKILLed after
    phase 2's first backup: (images, output folder, run folder, what the second run printed). The second run went
    from the restarted phase 1 into phase 2 in one process, the issue's silently wrong case (phase 2 used to run past
    its schedule, and history.csv to number epochs 1, 2, 1, 2, 3, 4). Tests copy it before changing it."""
    root = tmp_path_factory.mktemp("interrupted")
    images = write_separable_folder(root / "images", per_class=8, size=32)
    output = root / "runs"
    argv = command(images, output) + ["--name", "run", *SMALL, *EPOCHS]
    run_dir = output / "run"
    kill_when(argv, lambda: inside_phase_1(run_dir))
    assert not (run_dir / "checkpoints" / "phase1.done").exists() and not (run_dir / "metrics.json").exists()
    printed = kill_when(argv, lambda: backup_epoch(run_dir) is not None)
    return images, output, run_dir, printed


def copy_of(interrupted, tmp_path: Path) -> tuple[list[str], Path]:
    images, output, _, _ = interrupted
    shutil.copytree(output, tmp_path / "runs", symlinks=True)
    return command(images, tmp_path / "runs") + ["--name", "run", *SMALL, *EPOCHS], tmp_path / "runs" / "run"


def test_killed_in_phase_1_and_in_phase_2_the_same_command_finishes_with_each_epoch_once(interrupted, tmp_path, capsys):
    assert "Phase 1/2: already finished" not in interrupted[3]  # after the first kill the head trained again
    argv, run_dir = copy_of(interrupted, tmp_path)
    reached = backup_epoch(run_dir)
    assert reached in (HEAD + 1, HEAD + 2)  # phase 2 had finished one epoch (or two, if the poll was slow)
    result = run_here(argv, capsys)
    assert "Phase 1/2: already finished" in result.stdout
    assert f"continuing phase 2 after epoch {reached}" in result.stdout
    assert_finished_cleanly(run_dir, result)
    # The learning rate goes on decaying from where phase 2 stopped (the optimizer state came back with it).
    rates = [float(row["learning_rate"]) for row in history_rows(run_dir)]
    assert rates[HEAD + 2] < rates[HEAD + 1] < rates[HEAD]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:96])  # what a kill in the middle of an in-place h5py write left


@pytest.mark.parametrize(
    "damage",
    [
        # The best weights cut short and the backup's record empty: phase 1 and phase 2 both run again.
        ("best_weights", "backup_record"),
        # best.json cut short and the backup's weights cut short.
        ("best_record", "backup_weights"),
    ],
)
def test_damaged_checkpoints_are_reported_and_the_run_still_finishes(interrupted, tmp_path, damage, capsys):
    argv, run_dir = copy_of(interrupted, tmp_path)
    checkpoints = run_dir / "checkpoints"
    best = json.loads((checkpoints / "best.json").read_text())
    state = json.loads((checkpoints / "phase2_backup" / "state.json").read_text())
    if "best_weights" in damage:
        _truncate(checkpoints / best["weights"])
    if "best_record" in damage:
        (checkpoints / "best.json").write_text('{"monitor": "val_loss", "be')
    if "backup_weights" in damage:
        _truncate(checkpoints / "phase2_backup" / state["weights"])
    if "backup_record" in damage:
        (checkpoints / "phase2_backup" / "state.json").write_text("")
    result = run_here(argv, capsys)
    assert "the best checkpoint" in result.stdout and "is damaged" in result.stdout
    assert "phase 2's backup" in result.stdout and "phase 2 starts again" in result.stdout
    assert "continuing phase 2" not in result.stdout
    assert_finished_cleanly(run_dir, result)


def test_a_file_size_limit_stops_the_run_with_a_message_and_keeps_the_last_good_backup(interrupted, tmp_path, capsys):
    argv, run_dir = copy_of(interrupted, tmp_path)
    backup = run_dir / "checkpoints" / "phase2_backup"
    before = {p.name: p.read_bytes() for p in backup.iterdir()}
    weights = max(path.stat().st_size for path in backup.glob("*.h5"))
    limit = weights // 2  # below one backup file, above every small file of the run
    small = [p for p in run_dir.rglob("*") if p.is_file() and p.suffix not in (".h5", ".keras")]
    assert all(p.stat().st_size < limit for p in small), [(p.name, p.stat().st_size) for p in small]

    # The limit is this process's own for the length of the run (the soft limit, raised back after; Python ignores
    # SIGXFSZ, so a write over it fails with EFBIG as in a user's `python train.py`).
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        result = run_here(argv, capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "file-size limit" in result.stderr and "run the same command again" in result.stderr
    # The good backup is untouched, so the same command without the limit continues from it (as the kill test shows).
    assert {p.name: p.read_bytes() for p in backup.iterdir()} == before


def test_a_damaged_plan_and_history_are_reported_and_the_run_still_finishes(interrupted, tmp_path, capsys):
    """Found by bench/hostile_sweep.py: plan.json that is not JSON and history.csv that is not text ended the resumed
    run in JSONDecodeError and UnicodeDecodeError, every time."""
    argv, run_dir = copy_of(interrupted, tmp_path)
    (run_dir / "checkpoints" / "plan.json").write_text("{ nope")
    (run_dir / "history.csv").write_bytes(bytes(range(256)))
    result = run_here(argv, capsys)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "plan.json is damaged" in result.stdout and "phase 1 runs again" in result.stdout
    assert "history.csv cannot be read" in result.stdout and (run_dir / "history.damaged.csv").is_file()
    assert (run_dir / "metrics.json").is_file() and (run_dir / "training_curves.png").is_file()
    assert history_epochs(run_dir)[:2] == [0, 1]  # phase 1 again, then the rest of phase 2 from its backup


def test_a_write_error_that_tensorflow_wraps_gets_the_one_line_message(capsys):
    """Found by bench/hostile_sweep.py: export under a file-size limit ended in TensorFlow's OutOfRangeError (an
    OSError would have been named)."""
    import tensorflow as tf

    from classifier.errors import run_cli

    def save():
        raise tf.errors.OutOfRangeError(None, None, "saved_model/variables/part-00000 ... ; File too large [Op:SaveV2]")

    assert run_cli(save) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: a file-size limit was reached") and "Traceback" not in err


# Settings and untrusted files: refused before any work, in one line, never a traceback.


def test_a_bad_operating_point_is_refused_before_training_starts(tmp_path, capsys):
    from classifier.train import main

    images = write_separable_folder(tmp_path / "images", per_class=4, size=32)
    argv = ["--data-dir", str(images), "--output-dir", str(tmp_path / "runs"), *TINY]
    assert main([*argv, "--set", "train.operating_point=bogus"]) == 2
    assert "train.operating_point" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # no run folder: nothing started, nothing for the next run to trip on


def test_a_config_yaml_with_a_python_tag_is_named_not_executed(tmp_path, capsys):
    from test_predict import colour_model, write_image

    from classifier.predict import main

    model = colour_model(tmp_path / "run", ["red", "green", "blue"])
    planted = tmp_path / "planted"
    (tmp_path / "run" / "config.yaml").write_text(
        f"data: !!python/object/apply:os.makedirs ['{planted}']\n"  # what an attacker would ship with a model
    )
    image = write_image(tmp_path / "red.png", (200, 10, 10))
    assert main(["--model", str(model), str(image)]) == 2
    err = capsys.readouterr().err
    assert "config.yaml" in err and "not valid settings YAML" in err and "Traceback" not in err
    assert not planted.exists()


@pytest.mark.parametrize("flag", ["--min-agreement-float32", "--max-accuracy-drop", "--max-diff-float32"])
def test_export_thresholds_outside_0_to_1_are_refused(tmp_path, capsys, flag):
    from classifier.export import main

    assert main(["--run-dir", str(tmp_path), flag, "5"]) == 2
    err = capsys.readouterr().err
    assert flag in err and "outside 0..1" in err


def test_ctrl_c_in_predict_does_not_talk_about_epochs(tmp_path, capsys, monkeypatch):
    from test_predict import colour_model, write_image

    from classifier import predict

    model = colour_model(tmp_path / "run", ["red", "green", "blue"])
    image = write_image(tmp_path / "red.png", (200, 10, 10))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(predict, "predict_files", interrupted)
    assert predict.main(["--model", str(model), str(image)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "epoch" not in err


def test_ctrl_c_while_tensorflow_loads_is_a_message(monkeypatch, capsys):
    """Found by bench/hostile_sweep.py: a Ctrl-C in the seconds before the command starts showed the traceback of
    an import."""
    import importlib

    from classifier import cli

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib, "import_module", interrupted)
    assert cli.main(["predict", "--model", "m.keras", "x.png"]) == 130
    assert capsys.readouterr().err == "interrupted: nothing was done.\n"


def test_an_image_truncated_between_a_kill_and_the_re_run_is_named(interrupted, tmp_path, capsys):
    images, _, _, _ = interrupted
    _, run_dir = copy_of(interrupted, tmp_path)
    moved = Path(shutil.copytree(images, tmp_path / "images"))
    train_image = json.loads((run_dir / "split.json").read_text())["train"][0][0]
    victim = moved / train_image
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    result = run_here(
        [sys.executable, str(ROOT / "train.py"), "--resume", str(run_dir), "--data-dir", str(moved)], capsys
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert train_image in result.stderr and "can no longer be read" in result.stderr
    assert (run_dir / "checkpoints" / "phase2_backup" / "state.json").is_file()  # nothing of the run was lost


# Output paths: refused before any work, naming the path, never a traceback (bench/hostile_sweep.py found the
# tracebacks of export, evaluate, benchmark and of a folder that cannot be created).

BAD_OUTPUTS = {
    "a file": lambda tmp: tmp / "notes.txt",
    "below a file": lambda tmp: tmp / "notes.txt" / "sub",
    "not creatable": lambda tmp: Path("/proc/classifier-test"),  # even root cannot make a folder in /proc
}


def _argv(command: str, tmp: Path, out: Path) -> list[str]:
    """`command`'s arguments with everything right except its output, which is `out` (a folder, or a file in it)."""
    from test_predict import colour_model, write_image

    if command == "train":
        images = write_separable_folder(tmp / "images", per_class=4, size=32)
        return ["--data-dir", str(images), "--output-dir", str(out), *TINY]
    if command == "export":
        run_dir = tmp / "run"  # checked before the model is loaded: the files only need to be there
        run_dir.mkdir()
        (run_dir / "model.keras").write_bytes(b"")
        (run_dir / "split.json").write_text("{}")
        return ["--run-dir", str(run_dir), "--out-dir", str(out)]
    model = colour_model(tmp / "model", ["red", "green", "blue"])
    image = write_image(tmp / "images" / "red" / "r.png", (220, 30, 30))
    if command == "evaluate":
        write_image(tmp / "images" / "red" / "r2.png", (220, 30, 30))  # two images a class, as a scan wants
        for name, colour in (("green", (30, 200, 40)), ("blue", (30, 40, 220))):
            for index in range(2):
                write_image(tmp / "images" / name / f"{name}{index}.png", colour)
        return ["--model", str(model), "--data-dir", str(tmp / "images"), "--output-dir", str(out)]
    if command == "explain":
        return ["--model", str(model), "--output", str(out), str(image)]
    if command == "predict":
        return ["--model", str(model), str(image), "--output", str(out / "predictions.csv")]
    return ["--model", str(model), "--runs", "1", "--output", str(out / "benchmark.json")]


@pytest.mark.parametrize("where", list(BAD_OUTPUTS))
@pytest.mark.parametrize("command", ["train", "export", "evaluate", "explain", "predict", "benchmark"])
def test_an_output_that_cannot_be_a_folder_is_refused_before_any_work(tmp_path, capsys, command, where):
    import importlib

    if where == "not creatable" and not Path("/proc").is_dir():
        pytest.skip("needs Linux's /proc")
    (tmp_path / "notes.txt").write_text("a plain file\n")
    out = BAD_OUTPUTS[where](tmp_path)
    main = importlib.import_module(f"classifier.{command}").main
    assert main(_argv(command, tmp_path, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert ("is a file, not a folder" if where != "not creatable" else "cannot be created") in err
    assert str(tmp_path / "notes.txt") in err or str(out) in err


@pytest.mark.parametrize("command", ["predict", "benchmark"])
def test_a_report_named_like_a_model_or_an_image_is_refused_and_the_file_kept(tmp_path, capsys, command):
    """`--output` typed in front of an input: predict overwrote the image with its CSV, benchmark the model."""
    import importlib

    argv = _argv(command, tmp_path, tmp_path)
    target = tmp_path / "images" / "red" / "r.png" if command == "predict" else tmp_path / "model" / "model.keras"
    argv[argv.index("--output") + 1] = str(target)
    before = target.read_bytes()
    assert importlib.import_module(f"classifier.{command}").main(argv) == 2
    assert "name of a model or image file" in capsys.readouterr().err
    assert target.read_bytes() == before
