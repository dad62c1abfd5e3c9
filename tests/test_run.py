"""The run folder (`classifier.run.Run`): its file names, finding the run of a model file, and reading and writing
its files. No training: folders are laid out by hand, with the names of the contract in DESIGN.md spelled out."""

from __future__ import annotations

import re

import pytest

from classifier.errors import UserError
from classifier.run import Run, find_beside_model


@pytest.fixture
def run_dir(tmp_path):
    """A run folder as training and export leave it (file contents do not matter here)."""
    root = tmp_path / "saved_models" / "run1"
    (root / "export" / "saved_model").mkdir(parents=True)
    (root / "config.yaml").write_text("data:\n  image_size: 32\n")
    (root / "model.keras").write_bytes(b"not opened")
    (root / "export" / "model_int8.tflite").write_bytes(b"not opened")
    (root / "export" / "saved_model" / "saved_model.pb").write_bytes(b"not opened")
    return root


def test_paths_are_the_names_of_the_contract(tmp_path):
    run = Run(str(tmp_path))
    assert run.root == tmp_path
    expected = {
        run.config_path: "config.yaml",
        run.model_path: "model.keras",
        run.labels_path: "labels.txt",
        run.split_path: "split.json",
        run.history_path: "history.csv",
        run.metrics_path: "metrics.json",
        run.calibration_path: "calibration.json",
        run.operating_point_path: "operating_point.json",
        run.training_curves_path: "training_curves.png",
        run.logs: "logs",
        run.checkpoints: "checkpoints",
        run.plan_path: "checkpoints/plan.json",
        run.phase_marker(2): "checkpoints/phase2.done",
        run.export_dir: "export",
        run.export_report_path: "export/export_report.json",
        run.evaluation_dir: "evaluation",
    }
    for path, name in expected.items():
        assert path == tmp_path / name


@pytest.mark.parametrize(
    "model", ["model.keras", "export/model_int8.tflite", "export/saved_model"], ids=["keras", "tflite", "saved_model"]
)
def test_of_model_finds_the_run_folder(run_dir, model):
    assert Run.of_model(run_dir / model) == Run(run_dir.resolve())


def test_of_model_finds_the_run_from_a_relative_path(run_dir, monkeypatch):
    monkeypatch.chdir(run_dir / "export")  # "model_int8.tflite" alone: its parent is "." until resolved
    assert Run.of_model("model_int8.tflite") == Run(run_dir.resolve())


def test_a_lone_model_has_no_run(tmp_path):
    (tmp_path / "lone").mkdir()
    model = tmp_path / "lone" / "model.tflite"
    model.write_bytes(b"not opened")
    assert Run.of_model(model) is None
    (tmp_path / "lone" / "labels.txt").write_text("a\nb\n")  # labels beside it do not make a run folder
    assert Run.of_model(model) is None


def test_labels_round_trip_with_spaces_and_accents(tmp_path):
    run = Run(tmp_path)
    assert run.read_labels() is None
    names = ["no finding", "défaut grave", "crack (hairline)"]
    run.write_labels(names)
    assert run.labels_path.read_bytes() == "no finding\ndéfaut grave\ncrack (hairline)\n".encode()
    assert run.read_labels() == names
    assert [path.name for path in tmp_path.iterdir()] == ["labels.txt"]  # no temporary file left
    run.labels_path.write_text("  first \n\nsecond\n\n")  # as a user might edit it
    assert run.read_labels() == ["first", "second"]


def test_files_beside_a_model_are_found_nearest_first(run_dir):
    model = run_dir / "export" / "model_int8.tflite"
    Run(run_dir).write_labels(["ok", "defect"])
    assert find_beside_model(model, Run.read_labels) == ["ok", "defect"]  # the run folder above export/
    Run(run_dir / "export").write_labels(["good", "bad"])
    assert find_beside_model(model, Run.read_labels) == ["good", "bad"]  # the copy beside the file wins
    assert find_beside_model(run_dir / "model.keras", Run.read_labels) == ["ok", "defect"]


def test_is_finished_once_metrics_are_written(run_dir):
    run = Run(run_dir)
    assert not run.is_finished()
    run.write_metrics({"test": {"accuracy": 0.75}})
    assert run.is_finished()
    assert (run_dir / "metrics.json").is_file()
    assert run.read_metrics() == {"test": {"accuracy": 0.75}}


def test_phase_markers_and_plan(tmp_path):
    run = Run(tmp_path)
    assert not run.phase_done(1) and run.read_plan() is None
    run.mark_phase_done(1)
    assert run.phase_done(1) and not run.phase_done(2)
    assert (tmp_path / "checkpoints" / "phase1.done").is_file()
    run.write_plan({"head_epochs": 3, "finetune_epochs": 2})
    assert run.read_plan() == {"head_epochs": 3, "finetune_epochs": 2}


def test_settings_are_read_as_written_and_the_config_is_checked(tmp_path):
    run = Run(tmp_path)
    assert run.read_settings() is None and run.setting("data", "resize_mode") is None  # no config.yaml
    (tmp_path / "config.yaml").write_text("data:\n  resize_mode: crop\n  a_later_setting: 1\nmodel: {}\n")
    assert run.setting("data", "resize_mode") == "crop"
    assert run.setting("data", "image_size") is None and run.setting("train", "head_lr") is None
    with pytest.raises(UserError, match="unknown setting 'data.a_later_setting'"):
        run.read_config()  # the typed config refuses what this version does not know; a single setting reads
    (tmp_path / "config.yaml").write_text("data:\n  resize_mode: crop\n  image_size: 64\n")
    config = run.read_config()
    assert config.data.resize_mode == "crop" and config.data.image_size == 64
    assert config.model.backbone == "efficientnet_lite0"  # a default filled in


def test_a_damaged_config_yaml_is_named(tmp_path):
    run = Run(tmp_path)
    (tmp_path / "config.yaml").write_text("data: [resize_mode: crop\n")
    expected = f"config file '{tmp_path / 'config.yaml'}' is not valid settings YAML"
    for read in (run.read_settings, run.read_config, lambda: run.setting("data", "resize_mode")):
        with pytest.raises(UserError, match=re.escape(expected)) as caught:
            read()
        assert "fix the line it names" in str(caught.value)


def test_a_known_setting_that_is_not_valid_is_refused_naming_the_file(tmp_path):
    """Found by bench/hostile_sweep.py: `image_size: abc` ended evaluate in int()'s ValueError, an alias bomb as
    `dicom_window` hung predict (its text is billions of characters), `resize_mode: bogus` failed image by image."""
    run = Run(tmp_path)
    bomb = "data:\n  dicom_window: [&a [x, x, x], [*a, *a, *a], [*a, *a]]\n"  # small, but a list where one value goes
    cases = [
        ("data:\n  image_size: abc\n", "image_size", "'abc', which is not a valid value (int or null)"),
        ("data:\n  resize_mode: bogus\n", "resize_mode", "choose one of stretch, crop"),
        (bomb, "dicom_window", "got a list"),
    ]
    for text, key, words in cases:
        (tmp_path / "config.yaml").write_text(text)
        with pytest.raises(UserError) as caught:
            run.setting("data", key)
        assert str(tmp_path / "config.yaml") in str(caught.value) and words in str(caught.value)
    (tmp_path / "config.yaml").write_bytes(b"data:\n  seed: \xff\xfe\n")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        run.setting("data", "seed")


def test_labels_that_are_not_utf8_text_are_named(tmp_path):
    (tmp_path / "labels.txt").write_bytes(b"\xff\xfe\x00a\nb\n")
    with pytest.raises(UserError, match=re.escape(f"'{tmp_path / 'labels.txt'}' is not UTF-8 text")):
        Run(tmp_path).read_labels()


def test_an_output_folder_that_refuses_writes_is_named_before_any_work(tmp_path):
    """/proc accepts `os.access(W_OK)` for root but no new file: the check writes one, so root is refused too."""
    from classifier import atomic
    from classifier.errors import UserError

    with pytest.raises(UserError, match="'/proc' is not writable"):
        atomic.writable_folder("/proc", "--output", given="/proc/predictions.json")
    assert atomic.writable_folder(tmp_path / "new" / "folder", "--output").is_dir()
    assert list((tmp_path / "new" / "folder").iterdir()) == []  # the probe file is gone
