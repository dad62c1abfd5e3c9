"""`classifier benchmark` on a Keras file, a SavedModel folder and a .tflite file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import keras
import pytest
import tensorflow as tf
from test_predict import colour_model

from classifier.benchmark import JSON_KEYS, benchmark, main, model_size


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bench")
    keras_path = colour_model(folder, ["red", "green", "blue"])
    saved_model = folder / "saved_model"
    keras.models.load_model(keras_path).export(saved_model, format="tf_saved_model", verbose=False)
    tflite = folder / "model.tflite"
    tflite.write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(saved_model)).convert())
    return {"keras": keras_path, "saved_model": saved_model, "tflite": tflite}


@pytest.mark.parametrize("kind", ["keras", "saved_model", "tflite"])
def test_benchmark_measures_every_kind(models, kind):
    result = benchmark(models[kind], threads=1, batch_size=4, runs=5, warmup=2, throughput_runs=2)
    assert set(result) == set(JSON_KEYS)
    assert result["kind"] == kind
    latency = result["latency_ms"]
    assert 0 < latency["median"] <= latency["p90"] and latency["runs"] == 5
    assert result["throughput"]["images_per_second"] > 0 and result["throughput"]["batch_size"] == 4
    assert result["size_bytes"] == bytes_on_disk(models[kind]) > 0
    assert result["runtime"].split()[0] == {"keras": "Keras", "saved_model": "TensorFlow", "tflite": "LiteRT"}[kind]


def bytes_on_disk(path: Path) -> int:
    """What GNU find reports for the files of a file or folder (another tool than the code under test)."""
    sizes = subprocess.run(["find", str(path), "-type", "f", "-printf", "%s\\n"], capture_output=True, text=True)
    return sum(int(line) for line in sizes.stdout.split())


def test_saved_model_size_counts_the_whole_folder(models):
    assert model_size(models["saved_model"]) == bytes_on_disk(models["saved_model"])
    assert model_size(models["saved_model"]) > model_size(models["saved_model"] / "saved_model.pb")  # + variables


def test_cli_json_output(models, tmp_path, capsys):
    output = tmp_path / "bench.json"
    argv = ["--model", str(models["tflite"]), "--threads", "2", "--runs", "3", "--batch-size", "2", "--json"]
    assert main([*argv, "--output", str(output)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(output.read_text())
    assert printed["threads"] == 2 and printed["latency_ms"]["median"] > 0
    assert main(["--model", str(models["tflite"]), "--runs", "3"]) == 0
    assert "latency, batch 1" in capsys.readouterr().out


def test_bad_model_and_counts_are_clear_errors(tmp_path, models, capsys):
    assert main(["--model", str(tmp_path / "missing.tflite")]) == 2
    assert "missing.tflite" in capsys.readouterr().err
    text_file = tmp_path / "model.txt"
    text_file.write_text("not a model")
    assert main(["--model", str(text_file)]) == 2
    assert ".tflite" in capsys.readouterr().err
    assert main(["--model", str(models["tflite"]), "--runs", "0"]) == 2
    assert "--runs 0" in capsys.readouterr().err
