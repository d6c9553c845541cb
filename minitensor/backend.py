"""The one place in minitensor that knows about devices.

Every other module asks this one which array module an array belongs to
(``xp = get_array_module(x)``) and then writes ``xp.matmul``, ``xp.zeros`` and so on,
so that ninety percent of the engine never knows whether it runs on NumPy (CPU) or
CuPy (GPU). CuPy is optional: it is imported lazily, the first time somebody asks for
the GPU or hands us an array that is not a NumPy array.

Devices are named ``"cpu"`` and ``"gpu"``.
"""
from __future__ import annotations

import os

import numpy as np

CPU = "cpu"
GPU = "gpu"
DEVICES = (CPU, GPU)

_INSTALL_HINT = (
    "install CuPy for your CUDA version on a machine with an NVIDIA GPU: pip install 'minitensor[gpu-cuda12]' "
    "(cupy-cuda12x) for CUDA 12, 'minitensor[gpu-cuda13]' (cupy-cuda13x) for CUDA 13"
)
# What NVRTC and cuBLAS come with: the toolkit of the CUDA major version that CuPy was built for.
_TOOLKIT_HINT = "install the CUDA toolkit of your CuPy's CUDA version (12 for cupy-cuda12x, 13 for cupy-cuda13x)"

_USE_THE_CPU = "or train on the CPU (--device cpu)"

_cupy = None          # the cupy module once imported successfully
_cupy_error = None    # why importing it failed, to repeat in error messages


def _import_cupy():
    """Import CuPy once; return the module or None (remembering why it failed)."""
    global _cupy, _cupy_error
    if _cupy is None and _cupy_error is None:
        try:
            import cupy  # noqa: PLC0415  (optional dependency, imported on demand)
            _cupy = cupy
        except Exception as exc:  # ImportError, or a broken CUDA install raising anything
            _cupy_error = f"{type(exc).__name__}: {exc}"
    return _cupy


def cupy_module():
    """Return the cupy module, or raise a RuntimeError that says how to get it."""
    cupy = _import_cupy()
    if cupy is None:
        raise RuntimeError(f"the GPU needs CuPy, which could not be imported ({_cupy_error}); {_INSTALL_HINT}; "
                           f"{_USE_THE_CPU}")
    return cupy


_gpu_status = None    # (usable, reason) once gpu_status() has probed the GPU in this process

# The probe: compiled by NVRTC and launched like the engine's own kernels (kernels/gpu.py).
_PROBE_SOURCE = r"""
extern "C" __global__ void minitensor_probe(float* x, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = 2.0f * x[i] + 1.0f;
}
"""


def gpu_status():
    """``(usable, reason)``: whether the GPU really works here, decided once per process.

    Counting devices is not enough: where NVRTC (which compiles the kernels) or cuBLAS (the
    matrix products) cannot be loaded, CuPy still sees the device and training would fail
    inside its first batch. So the GPU counts as usable only after a tiny kernel was compiled
    and run and a cuBLAS GEMM gave the right numbers. ``reason`` is "" when usable, else one
    sentence naming what failed and what to install (``require_gpu`` adds the CPU alternative).
    """
    global _gpu_status
    if _gpu_status is None:
        _gpu_status = _probe_gpu()
    return _gpu_status


def _probe_gpu():
    cupy = _import_cupy()
    if cupy is None:
        return False, f"CuPy could not be imported ({_cupy_error}); {_INSTALL_HINT}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"CuPy is installed but no CUDA driver or device can be used ({exc}); {_INSTALL_HINT}"
    if count == 0:
        return False, f"CuPy is installed but sees no CUDA device; {_INSTALL_HINT}"
    try:
        x = cupy.asarray(np.arange(4, dtype=np.float32))
        cupy.RawKernel(_PROBE_SOURCE, "minitensor_probe")((1,), (32,), (x, np.int32(4)))
        kernel_ok = x.get().tolist() == [1.0, 3.0, 5.0, 7.0]
    except Exception as exc:
        return False, (f"CUDA kernels cannot be compiled or run: NVRTC or the driver failed ({type(exc).__name__}: "
                       f"{exc}); {_TOOLKIT_HINT}, which brings NVRTC, or the CuPy build for this machine's CUDA")
    if not kernel_ok:
        return False, "a test kernel ran but gave wrong numbers: the GPU or its driver is not usable"
    try:
        a = cupy.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
        gemm_ok = (a @ a.T).get().tolist() == [[5.0, 14.0], [14.0, 50.0]]
    except Exception as exc:
        return False, (f"cuBLAS cannot run a matrix product ({type(exc).__name__}: {exc}); {_TOOLKIT_HINT}, "
                       f"which brings cuBLAS")
    if not gemm_ok:
        return False, "a cuBLAS matrix product gave wrong numbers: the GPU is not usable"
    return True, ""


def is_gpu_available() -> bool:
    """True when a GPU really works: CuPy imports, sees a device, compiles and runs a kernel and a GEMM."""
    return gpu_status()[0]


REQUIRE_GPU_VARIABLE = "MINITENSOR_REQUIRE_GPU"


def gpu_required() -> bool:
    """True when the environment says a GPU must be used (``MINITENSOR_REQUIRE_GPU=1``, set by
    bench/gpu_check.sh on a GPU machine): the test suite and the benchmark then fail, naming
    ``gpu_status()``'s reason, where they would otherwise run the gpu tests on the CPU stand-in or
    report the GPU as unavailable. The engine itself never falls back: ``--device gpu`` fails anyway.
    """
    value = os.environ.get(REQUIRE_GPU_VARIABLE, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{REQUIRE_GPU_VARIABLE}={value!r}: expected 1 (a GPU must be used) or 0 / unset")
    return value == "1"


def require_gpu():
    """Return cupy, or raise RuntimeError naming what is missing (see ``gpu_status``)."""
    usable, reason = gpu_status()
    if not usable:
        raise RuntimeError(f"{reason}; {_USE_THE_CPU}")
    return _cupy


def set_tf32(enabled: bool) -> None:
    """Let cuBLAS run float32 matrix products on TF32 tensor cores (10-bit mantissa inputs,
    float32 sums), or not. Off by default: strict float32, what the tests and TensorFlow
    comparisons assume. It sets CuPy's float32 compute type for the current device (what
    CUPY_TF32=1 sets at import), so it applies to every GEMM after the call; GPUs older than
    Ampere keep strict float32. ``set_compute_type(dtype, compute_type)`` and the constants
    (DEFAULT 1, TF32 7) are the same in CuPy 13.6 and 14.2 (checked in both wheels).
    """
    require_gpu()
    from cupy._core import _routines_linalg as linalg   # CuPy's switch behind CUPY_TF32 (13.x and 14.x)

    linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT)


def _is_cupy_array(x) -> bool:
    # Check the type's module name first, so that a NumPy array never imports CuPy.
    return type(x).__module__.split(".")[0] == "cupy"


def get_array_module(*arrays):
    """Return ``numpy`` or ``cupy``: the module that owns the given arrays.

    Non-array arguments (floats, None) are ignored. Mixing NumPy and CuPy arrays in one
    call is an error that names both devices, instead of a crash deep inside a kernel.
    """
    found_cpu = found_gpu = False
    for a in arrays:
        if a is None or np.isscalar(a):
            continue
        if _is_cupy_array(a):
            found_gpu = True
        elif isinstance(a, np.ndarray):
            found_cpu = True
    if found_cpu and found_gpu:
        raise TypeError(
            "arrays on different devices in one operation: some are NumPy arrays (cpu) and some are "
            "CuPy arrays (gpu); move them to one device first, e.g. minitensor.to_device(x, 'gpu') "
            "or model.to('cpu')"
        )
    if found_gpu:
        return cupy_module()
    return np


def device_of(x) -> str:
    """``"gpu"`` for a CuPy array, ``"cpu"`` for anything else."""
    return GPU if _is_cupy_array(x) else CPU


def check_device(name: str) -> str:
    """Validate a device name and return it normalised ("cpu" or "gpu")."""
    device = str(name).lower()
    if device not in DEVICES:
        raise ValueError(f"unknown device {name!r}: expected 'cpu' or 'gpu'")
    return device


def to_device(x, device: str):
    """Return ``x`` as an array on ``device`` ("cpu" or "gpu"), copying only if needed."""
    device = check_device(device)
    if device == GPU:
        if _is_cupy_array(x):
            return x
        return require_gpu().asarray(x)
    if _is_cupy_array(x):
        return x.get()
    return np.asarray(x)


def to_numpy(x):
    """Return a NumPy array whatever the device (a no-op for NumPy arrays)."""
    return to_device(x, CPU)


def read_scalars(scalars) -> list:
    """Python floats of many 0-d arrays (or NumPy scalars) of one device, read in one transfer:
    on a GPU, one wait for the device instead of one per value."""
    return to_numpy(get_array_module(*scalars).stack(scalars)).tolist()


def resolve_device(name: str) -> str:
    """Turn "auto" into "gpu" when a GPU is usable, else "cpu" (``gpu_status()[1]`` says why); check "gpu" is usable."""
    if str(name).lower() == "auto":
        return GPU if is_gpu_available() else CPU
    device = check_device(name)
    if device == GPU:
        require_gpu()
    return device


_scratch_buffers: dict = {}   # dtype -> one flat NumPy buffer, grown to the largest request


def scratch_array(shape, dtype, like):
    """Uninitialised memory for a temporary that is dead before the next request (im2col's columns).

    On the CPU one buffer per dtype is kept and reused: allocating hundreds of megabytes
    afresh for every convolution makes the operating system hand over and zero new pages
    each time, which costs as much as the copy itself. The returned array aliases that
    buffer, so it is only valid until the next ``scratch_array`` call. On the GPU CuPy's
    memory pool already reuses blocks, so a plain ``empty`` is the same thing.
    """
    xp = get_array_module(like)
    dtype = np.dtype(dtype)
    if xp is not np:
        return xp.empty(shape, dtype=dtype)
    size = int(np.prod(shape))
    buffer = _scratch_buffers.get(dtype)
    if buffer is None or buffer.size < size:
        _scratch_buffers[dtype] = None        # let the old buffer go before taking a bigger one
        buffer = _scratch_buffers[dtype] = np.empty(size, dtype=dtype)
    return buffer[:size].reshape(shape)
