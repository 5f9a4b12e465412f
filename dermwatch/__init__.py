"""dermwatch: classify dermoscopy images as they arrive and report suspected melanoma."""

__version__ = "0.1.0"
