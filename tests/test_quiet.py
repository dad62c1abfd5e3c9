"""TensorFlow's GPU-probe noise stays off a CPU-only user's terminal; real messages still reach it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOISE_WORDS = ("cuInit", "Could not find cuda drivers", "absl::InitializeLog", "cpu_feature_guard", "oneDNN custom")


def test_the_command_line_prints_no_cuda_noise_and_each_line_once_with_absls_handler_on_the_root_logger():
    """`python train.py --list-backbones` as a CPU-only user runs it (train.py is `classifier.cli.main(["train",
    ...])`), in a program that first puts absl's handler on the root logger, as an absl.app program or TensorFlow
    code logging through absl does: a record that reached that handler would show a second time, as
    "I1123 20:55:24.713 ... train.py:73] tiny  96 px ..."."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user's shell has it
    code = "import sys, absl.logging; absl.logging.use_absl_handler()\n"
    code += "from classifier.cli import main; sys.exit(main())"
    result = subprocess.run(
        [sys.executable, "-c", code, "train", "--list-backbones"], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert "efficientnet_lite0" in result.stdout
    assert not [word for word in NOISE_WORDS if word in result.stderr], result.stderr
    line = (
        "tiny                     96 px  "
        "ImageNet weights: none: random init only, for pipeline checks (use --weights none)"
    )
    assert result.stdout.splitlines().count(line) == 1, result.stdout
    assert "random init only" not in result.stderr, result.stderr


def test_a_line_that_is_not_known_noise_is_passed_on(tmp_path):
    # A stand-in for TensorFlow that prints, from the process's own stderr as TensorFlow's C++ does, two noise lines
    # and one that a user must see.
    fake = tmp_path / "tensorflow"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import os, types\n"
        "os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n')\n"
        "os.write(2, b'E0000 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\\n')\n"
        "os.write(2, b'I0000 port.cc:153] oneDNN custom operations are on. You may see slightly different ...\\n')\n"
        "os.write(2, b'E0000 something.cc:1] a real problem\\n')\n"
        "config = types.SimpleNamespace(list_physical_devices=lambda: [])\n"
    )
    script = "from classifier.quiet import import_tensorflow_quietly; import_tensorflow_quietly(); print('done')"
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr
    assert result.stderr.strip().splitlines() == ["E0000 something.cc:1] a real problem"]
