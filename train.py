"""Train an image classifier: `python train.py --data-dir DIR` (see `python train.py --help`)."""

import sys

from classifier.cli import main  # imports TensorFlow quietly, then the command (a Ctrl-C meanwhile is a message)

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
