"""Export a trained run to SavedModel and TFLite: `python export.py --run-dir saved_models/RUN`."""

import sys

from classifier.export import main

if __name__ == "__main__":
    sys.exit(main())
