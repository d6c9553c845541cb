"""The CPU process settings say so when they cannot apply (NumPy imported before minitensor)."""
import os
import subprocess
import sys


def stderr_of(code, **environment):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "MINITENSOR_CPU_DEFAULTS")}
    env.update(environment)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                          timeout=120).stderr


def test_numpy_first_warns_once_with_the_fix_and_minitensor_first_does_not():
    late = stderr_of("import numpy, minitensor, unet")
    assert late.count("CPUSettingsWarning") == 1, late
    assert "NumPy was imported before minitensor" in late and "export OPENBLAS_THREAD_TIMEOUT=4" in late
    assert "CPUSettingsWarning" not in stderr_of("import minitensor, numpy")
    assert "CPUSettingsWarning" not in stderr_of("import numpy, minitensor", OPENBLAS_THREAD_TIMEOUT="4")
    assert "CPUSettingsWarning" not in stderr_of("import numpy, minitensor", MINITENSOR_CPU_DEFAULTS="0")
