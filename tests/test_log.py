"""The library reports through the `classifier` logger: its lines show as plain text, once, in a script and on the
command line, and a program that imports the library can turn them down."""

from __future__ import annotations

import logging

from conftest import write_separable_folder

from classifier import data


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


# The command line's side (each line once with absl's handler on the root logger) is checked in test_quiet.py, in
# the one child process that also checks TensorFlow's start-up noise.
