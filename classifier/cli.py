"""`classifier <command>` / `python -m classifier <command>`: one CLI over the per-job modules."""

from __future__ import annotations

import importlib
import sys

# command -> (module whose `main(argv)` runs it, one-line help). Modules are imported only when used:
# importing TensorFlow takes seconds, `classifier --help` should not.
COMMANDS = {
    "train": ("classifier.train", "fine-tune a backbone on a folder of images"),
    "export": ("classifier.export", "write SavedModel and TFLite files, checked against the Keras model"),
    "evaluate": ("classifier.evaluate", "metrics, confusion matrix, ROC and calibration of any model file"),
    "predict": ("classifier.predict", "classify image files, folders or globs; CSV or JSON"),
    "explain": ("classifier.explain", "Grad-CAM heatmaps: where in each image the model found its evidence"),
    "benchmark": ("classifier.benchmark", "latency, throughput and size of a model file"),
}


def main(argv: list[str] | None = None) -> int:
    """Dispatches to the command's module."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:10s} {text}" for name, (_, text) in COMMANDS.items()]
        usage = "usage: classifier {" + ",".join(COMMANDS) + "} [options]\n\ncommands:\n" + "\n".join(lines)
        usage += "\n\n`classifier COMMAND --help` describes each command's options."
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command '{argv[0]}'\n\n{usage}", file=sys.stderr)
            return 2
        print(usage)
        return 0
    from classifier.quiet import import_tensorflow_quietly

    try:
        import_tensorflow_quietly()  # before the command's module imports TensorFlow
        module = importlib.import_module(COMMANDS[argv[0]][0])
    except KeyboardInterrupt:  # Ctrl-C in the seconds TensorFlow takes to load: the command has not started
        print("interrupted: nothing was done.", file=sys.stderr)
        return 130
    return module.main(argv[1:])
