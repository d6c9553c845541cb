"""``import cupy`` answered by the CPU stand-in (tests/cupy_standin.py), for whole programs.

Put this folder and tests/ on PYTHONPATH (``bench/gpu_check.sh`` does, with GPU_CHECK_DRY_RUN=1)
and ``python train.py --device gpu`` runs its GPU path on the CPU, strictly: nothing in
minitensor knows. ``CUPY_STANDIN_DEVICES=N`` gives it N devices (one per rank of a data-parallel
run), and ``cupy.cuda.nccl`` is the stand-in over MPI (tests/nccl_standin.py). Test-only code;
pytest installs the stand-in by itself (tests/conftest.py).
"""
import os
import sys

import cupy_standin
import nccl_standin

cupy_standin.DEVICE_COUNT = int(os.environ.get("CUPY_STANDIN_DEVICES", "1"))
sys.modules[__name__] = cupy_standin
sys.modules[__name__ + "._core"] = cupy_standin._core
sys.modules[__name__ + "._core._routines_linalg"] = cupy_standin._linalg
nccl_standin.install()
