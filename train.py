"""Train an image classifier: `python train.py --data-dir DIR` (see `python train.py --help`)."""

import sys

from classifier.train import main

if __name__ == "__main__":
    sys.exit(main())
