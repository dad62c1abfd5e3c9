"""Image classification toolkit: transfer learning on a folder of images, exported for phones and edge devices."""

from classifier import log

__version__ = "0.1.0"

log.configure()  # progress and result lines through the `classifier` logger, printed as plain lines
