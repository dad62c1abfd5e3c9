"""Train an image classifier: `python train.py --data-dir DIR` (see `python train.py --help`)."""

import sys

from classifier.quiet import import_tensorflow_quietly

import_tensorflow_quietly()  # before anything imports TensorFlow: its GPU-probe noise is held back

from classifier.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
