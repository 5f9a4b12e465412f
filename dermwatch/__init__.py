"""dermwatch: classify dermoscopy images as they arrive and report suspected melanoma."""

import os

# TensorFlow leaves its oneDNN kernels off on many CPUs unless asked (on this project's
# 2-core AVX2 EPYC they are off), and without them a default training step takes 1.7 times
# as long. The switch counts only before TensorFlow loads, so it is set here, in the package
# that every entry point imports first; a user's own setting, 0 included, wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"
