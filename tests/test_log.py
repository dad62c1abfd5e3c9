"""The library reports through the `classifier` logger: its lines show as plain text, once, in a script and on the
command line, and a program that imports the library can turn them down."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from conftest import write_separable_folder

from classifier import data

ROOT = Path(__file__).resolve().parents[1]


def test_a_library_call_shows_its_line_and_the_classifier_logger_level_silences_it(tmp_path, capsys):
    images = write_separable_folder(tmp_path / "images", per_class=10, size=16)
    data.prepare_split(images, tmp_path / "run", seed=1)
    capsys.readouterr()

    data.prepare_split(images, tmp_path / "run", seed=2)  # the split on disk is kept: a line says so
    out = capsys.readouterr().out
    assert out.startswith(f"Reusing the split in {tmp_path / 'run' / 'split.json'} (seed 1, "), out
    assert out.endswith("the requested seed/fractions apply to new runs only.\n"), out

    logger = logging.getLogger("classifier")
    logger.setLevel(logging.WARNING)
    try:
        data.prepare_split(images, tmp_path / "run", seed=2)
    finally:
        logger.setLevel(logging.INFO)
    assert capsys.readouterr() == ("", "")


def test_the_command_line_shows_each_line_once_with_absls_handler_on_the_root_logger():
    # An absl.app program, or TensorFlow code logging through absl, puts absl's handler on the root logger; a record
    # that reached it would show a second time, as "I1123 20:55:24.713 ... train.py:73] tiny  96 px ...".
    code = (
        "import sys, absl.logging; absl.logging.use_absl_handler(); from classifier.cli import main; sys.exit(main())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "train", "--list-backbones"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    line = (
        "tiny                     96 px  "
        "ImageNet weights: none: random init only, for pipeline checks (use --weights none)"
    )
    assert result.stdout.splitlines().count(line) == 1, result.stdout
    assert "random init only" not in result.stderr, result.stderr
