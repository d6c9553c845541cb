"""How minitensor's two CPU thread pools share the cores: set before NumPy is imported.

A training step on the CPU alternates between two thread pools: numba's (the ``prange``
kernels: Winograd and direct convolutions, pooling, upsampling) and OpenBLAS's (the matrix
products of the layers that keep im2col + GEMM, the 1x1 output layer, the bias gradients).
Out of the box each pool's threads keep spinning after their work is done, waiting for more:
OpenBLAS's for about 2^28 cycles (a tenth of a second) after every product, libgomp's (numba's
OpenMP layer) for a while too. On a machine with as many cores as threads, the spinning threads
of one pool then steal the cores from the other pool's busy ones. Measured on the 2-core EPYC
(docs/benchmarks.md, "Thread pools"): a small_unet step took 1.6-1.7 s with the defaults and
1.0-1.2 s with the two settings below, which let idle threads sleep at once.

- ``OPENBLAS_THREAD_TIMEOUT=4``: OpenBLAS's threads wait 2^4 cycles before sleeping. OpenBLAS
  reads it once, when the library is loaded, i.e. when NumPy is first imported. So it only takes
  effect when minitensor is imported before NumPy (``train.py`` and ``predict.py`` do that), or
  when it is set in the environment beforehand.
- ``OMP_WAIT_POLICY=PASSIVE``: numba's OpenMP threads sleep when idle. libgomp reads it when
  numba first starts its threads, which is later, at the first parallel kernel.

Both are defaults only (``os.environ.setdefault``): a value set by the user wins. ``status()``
says what is in effect.
"""
from __future__ import annotations

import os
import sys

DEFAULTS = {"OPENBLAS_THREAD_TIMEOUT": "4", "OMP_WAIT_POLICY": "PASSIVE"}

#: Whether NumPy (and so OpenBLAS) was already loaded when minitensor was imported.
NUMPY_WAS_LOADED_FIRST = "numpy" in sys.modules
#: The variables the environment already had then (a shell's export, set before NumPy loaded).
_SET_BY_USER = {name for name in DEFAULTS if name in os.environ}

for _name, _value in DEFAULTS.items():
    if _name == "OPENBLAS_THREAD_TIMEOUT" and NUMPY_WAS_LOADED_FIRST:
        continue                       # too late to matter; do not pretend it was applied
    os.environ.setdefault(_name, _value)


def status() -> dict:
    """The thread settings of this process: each variable's value and whether it took effect."""
    report = {}
    for name in DEFAULTS:
        value = os.environ.get(name)
        late = name == "OPENBLAS_THREAD_TIMEOUT" and NUMPY_WAS_LOADED_FIRST and name not in _SET_BY_USER
        report[name] = {"value": value, "in_effect": value is not None and not late}
    return report
