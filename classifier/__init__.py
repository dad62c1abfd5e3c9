"""Image classification toolkit: transfer learning on a folder of images, exported for phones and edge devices."""

__version__ = "0.1.0"
