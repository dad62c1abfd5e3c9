"""Export a trained run to SavedModel and TFLite: `python export.py --run-dir saved_models/RUN`."""

import sys

from classifier.quiet import import_tensorflow_quietly

import_tensorflow_quietly()  # before anything imports TensorFlow: its GPU-probe noise is held back

from classifier.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
