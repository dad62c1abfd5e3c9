"""TensorFlow's start-up noise kept from users: on a machine without a GPU, importing TensorFlow and listing its
devices prints "Could not find cuda drivers", "failed call to cuInit", absl's "All log messages before
absl::InitializeLog()" and, on CPUs with AVX-512, "oneDNN custom operations are on" to the terminal, which reads
like an error although CPU training is what was asked for.

Those lines come from C++ before Python's logging or `TF_CPP_MIN_LOG_LEVEL` can act (level 3 still shows them), so
the only way to hold them back is the process's own stderr: it is pointed at a temporary file while TensorFlow
starts, and every line that is not one of the known messages is written back. Entry points call
`import_tensorflow_quietly()` before anything imports TensorFlow; later imports find it loaded and print nothing.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

# What TensorFlow prints at start-up on a CPU-only machine; anything else (a real error) is passed on.
NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|cudart_stub\.cc.*Could not find cuda drivers"
    r"|cuda_platform\.cc.*failed call to cuInit"
    r"|cuda_executor\.cc|cuda_diagnostics\.cc"
    r"|cpu_feature_guard\.cc.*optimized to use available CPU instructions"
    r"|To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags"
    r"|Unable to register cu(DNN|FFT|BLAS) factory|computation placer already registered"
    # On CPUs with AVX-512 (most servers): an INFO line a user cannot act on, shown at every start. What it warns of,
    # tiny run-to-run differences from oneDNN's threaded reductions, is in the README.
    r"|port\.cc.*oneDNN custom operations are on"
)


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow and lists its devices (where the GPU probe happens) with the start-up noise held back.

    Also sets `TF_CPP_MIN_LOG_LEVEL=2` unless the user set it, which hides TensorFlow's later INFO and WARNING
    lines (input-pipeline notes a user cannot act on); errors still show.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines() if not NOISE.search(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr)
