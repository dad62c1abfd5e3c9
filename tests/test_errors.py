"""Entry points: a native crash still names where it happened."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A command whose work dies in native code, as a TensorFlow kernel crash does: reading address 0 through ctypes.
CRASHING_COMMAND = """
import ctypes
from classifier.errors import run_cli

def phase_one_step():
    ctypes.string_at(0)

run_cli(phase_one_step)
"""


def test_a_segfault_inside_a_command_prints_the_python_stack_of_the_crash():
    result = subprocess.run(
        [sys.executable, "-c", CRASHING_COMMAND], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode != 0
    assert "Segmentation fault" in result.stderr
    assert "phase_one_step" in result.stderr  # the function that crashed, as a bug report needs it


def test_a_command_called_with_stderr_captured_in_memory_still_runs(monkeypatch):
    """A notebook or a caller that captures stderr in memory: no file descriptor for faulthandler, no failure."""
    import faulthandler
    import io

    from classifier.errors import run_cli

    was_enabled = faulthandler.is_enabled()
    faulthandler.disable()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    try:
        assert run_cli(lambda: 0) == 0
    finally:
        monkeypatch.undo()
        if was_enabled:
            faulthandler.enable()
