"""Export a trained run to SavedModel and TFLite: `python export.py --run-dir saved_models/RUN`."""

import sys

from classifier.cli import main  # imports TensorFlow quietly, then the command (a Ctrl-C meanwhile is a message)

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
