"""A strict CPU stand-in for CuPy, so that the GPU path's tests run on machines without a GPU (test-only code).

It is NumPy underneath, but it refuses what real CuPy refuses and counts what a GPU would pay for:

* its ``ndarray`` is not a NumPy array (it wraps one; ``type(x).__module__`` starts with "cupy", which is
  how ``minitensor.backend`` tells devices apart), so a device array can only reach the host on purpose;
* a NumPy array handed to a device operation raises TypeError, as in CuPy ("Unsupported type");
* an implicit conversion to NumPy (``np.asarray(x)``, OpenCV, any ``__array__`` call) raises TypeError, as in
  CuPy; ``.get()``, ``cupy.asnumpy``, ``float(x)``, ``int(x)``, ``bool(x)`` and ``.item()`` work and are
  counted as a device-to-host transfer and a host sync (a GPU must finish its queue first);
* only names that CuPy 13.6 has exist, for the module and for its arrays (``tests/cupy_names.txt``, dumped
  from an installed ``cupy-cuda12x==13.6.0``): anything else is an AttributeError, so the engine cannot lean
  on a NumPy-only function that would fail on a real GPU;
* ``RawModule``/``RawKernel`` compile the CUDA source the engine gives NVRTC as C++ (``tests/cuda_cpp.py``)
  and run it, so the real kernels run, not NumPy copies of them;
* ``COUNTS`` counts device calls (every operation, allocation and kernel launch), kernel launches,
  host<->device transfers (and their bytes) and syncs; ``reset_counts()`` starts afresh.

What it cannot check: timing, memory limits, asynchrony (every call completes at once), and the numerics of
cuBLAS, whose sums may be ordered differently from NumPy's.
"""
from __future__ import annotations

import collections
import os
import sys
import types

import numpy as np

from cuda_cpp import CppModule

__version__ = "13.6.0 (CPU stand-in)"
STANDIN = True

_NAMES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cupy_names.txt")


def _read_names():
    sections = collections.defaultdict(set)
    with open(_NAMES_FILE) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                section, name = line.split()
                sections[section].add(name)
    return sections


_NAMES = _read_names()
MODULE_NAMES, ARRAY_NAMES = _NAMES["cupy"], _NAMES["cupy.ndarray"]

COUNTS = collections.Counter()


def reset_counts():
    COUNTS.clear()


def _count_transfer(direction, nbytes):
    COUNTS[direction] += 1
    COUNTS[f"bytes_{direction}"] += int(nbytes)


# ----- arrays -------------------------------------------------------------------------------------

def _unwrap(value, what="an argument"):
    """A device array -> its NumPy data; NumPy arrays are refused, as a real GPU cannot read host memory."""
    if isinstance(value, ndarray):
        return value._data
    if isinstance(value, np.ndarray):
        raise TypeError(f"Unsupported type <class 'numpy.ndarray'> as {what} of a device operation: move it "
                        f"with cupy.asarray first (the CPU stand-in for CuPy refuses host arrays as CuPy does)")
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v, what) for v in value)
    return value


def _wrap(value):
    if isinstance(value, np.ndarray):
        return ndarray(value)
    if isinstance(value, np.generic) and not isinstance(value, np.dtype):
        return ndarray(np.asarray(value))        # CuPy reductions give 0-d arrays, not host scalars
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


# Operations that CuPy does without a kernel when the result is a view of the input (reshape of a
# contiguous array, basic slicing, ascontiguousarray of a contiguous array): free unless they copy.
_VIEWS = {"reshape", "transpose", "view", "swapaxes", "squeeze", "ravel", "__getitem__", "ascontiguousarray"}


def _device_call(function, *args, _view_of=None, **kwargs):
    """Run ``function`` on the NumPy data; a device call unless it returned a view of ``_view_of``."""
    args = _unwrap(args)
    kwargs = {key: _unwrap(value, f"argument {key}=") for key, value in kwargs.items()}
    result = function(*args, **kwargs)
    if not (_view_of is not None and isinstance(result, np.ndarray) and np.shares_memory(result, _view_of)):
        COUNTS["calls"] += 1
    return _wrap(result)


class ndarray:
    """A device array: a NumPy array that the host cannot read without asking (``get()``)."""

    __module__ = "cupy._core.core"
    __slots__ = ("_data",)
    __array_ufunc__ = None                        # numpy_array + device_array -> our __radd__, which refuses

    def __init__(self, data):
        self._data = data

    # Metadata lives on the host in CuPy too: reading it costs nothing.
    shape = property(lambda self: self._data.shape)
    dtype = property(lambda self: self._data.dtype)
    ndim = property(lambda self: self._data.ndim)
    size = property(lambda self: self._data.size)
    nbytes = property(lambda self: self._data.nbytes)
    itemsize = property(lambda self: self._data.itemsize)
    strides = property(lambda self: self._data.strides)
    flags = property(lambda self: self._data.flags)
    T = property(lambda self: ndarray(self._data.T))

    def __len__(self):
        return len(self._data)

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct "
                        "a NumPy array explicitly.")

    # -- deliberate reads of device memory: each one a transfer and a sync --
    def get(self, stream=None, order="C", out=None):
        COUNTS["syncs"] += 1
        _count_transfer("to_host", self._data.nbytes)
        return self._data.copy(order=order)

    def _host_scalar(self):
        if self._data.size != 1:
            raise TypeError("only size-1 arrays can be converted to Python scalars")
        COUNTS["syncs"] += 1
        _count_transfer("to_host", self._data.itemsize)
        return self._data.reshape(()).item()

    def __float__(self):
        return float(self._host_scalar())

    def __int__(self):
        return int(self._host_scalar())

    def __bool__(self):
        return bool(self._host_scalar())

    def item(self):
        return self._host_scalar()

    def __repr__(self):
        return f"standin.ndarray({self._data!r})"

    # -- indexing: views stay on the device --
    def __getitem__(self, key):
        return _device_call(self._data.__getitem__, key, _view_of=self._data)

    def __setitem__(self, key, value):
        COUNTS["calls"] += 1
        self._data[_unwrap(key, "an index")] = _unwrap(value, "the assigned value")

    def __getattr__(self, name):
        if name not in ARRAY_NAMES:
            raise AttributeError(f"cupy.ndarray has no attribute {name!r} (CuPy 13.6)")
        method, view_of = getattr(self._data, name), self._data if name in _VIEWS else None
        return lambda *args, **kwargs: _device_call(method, *args, _view_of=view_of, **kwargs)


def _operator(name):
    def method(self, *args):
        return _device_call(getattr(self._data, name), *args)
    method.__name__ = name
    return method


for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
              "__floordiv__", "__mod__", "__pow__", "__rpow__", "__matmul__", "__rmatmul__", "__neg__", "__abs__",
              "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__", "__and__", "__or__", "__invert__",
              "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ipow__"):
    setattr(ndarray, _name, _operator(_name))
ndarray.__hash__ = None


# ----- moving data ----------------------------------------------------------------------------------

def asarray(a, dtype=None, order=None):
    """Host data becomes a device copy (a transfer); a device array is returned as it is (or cast)."""
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == np.dtype(dtype) else a.astype(dtype)
    COUNTS["calls"] += 1
    data = np.array(a, dtype=dtype, order=order or "K", copy=True)
    _count_transfer("to_device", data.nbytes)
    return ndarray(data)


def array(a, dtype=None, copy=True, order="K"):
    if isinstance(a, ndarray):
        return _device_call(np.array, a, dtype=dtype, copy=copy, order=order)
    return asarray(a, dtype, order)


def asnumpy(a, stream=None, order="C", out=None):
    return a.get(order=order) if isinstance(a, ndarray) else np.asarray(a, order=order)


# ----- kernels ------------------------------------------------------------------------------------------

class RawModule:
    """``cupy.RawModule(code=..., options=...)``: the CUDA source compiled as C++ and run on the CPU."""

    def __init__(self, code, options=(), **kwargs):
        self._module = CppModule(code, options)

    def get_function(self, name):
        kernel = self._module.get_function(name)

        def launch(grid, block, args, **kwargs):
            COUNTS["calls"] += 1
            COUNTS["launches"] += 1
            for arg in args:
                _unwrap(arg, f"an argument of kernel {name}")   # host arrays are refused, as on a GPU
            return kernel(grid, block, args, **kwargs)
        return launch


def RawKernel(code, name, options=(), **kwargs):   # noqa: N802 (CuPy's name)
    return RawModule(code, options).get_function(name)


# ----- the CUDA runtime, as far as the engine asks ------------------------------------------------------

class _Device:
    def __init__(self, device=0):
        self.id = device

    def synchronize(self):
        COUNTS["syncs"] += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _MemoryPool:
    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        pass


_POOL = _MemoryPool()

# cupy._core._routines_linalg's compute-type switch (what CUPY_TF32 sets), as backend.set_tf32 uses it.
_linalg = types.SimpleNamespace(COMPUTE_TYPE_DEFAULT=1, COMPUTE_TYPE_TF32=7, compute_types={})   # CuPy 13.6's values
_linalg.set_compute_type = lambda dtype, compute_type: _linalg.compute_types.__setitem__(np.dtype(dtype), compute_type)
_core = types.SimpleNamespace(_routines_linalg=_linalg)


def get_default_memory_pool():
    return _POOL


cuda = types.SimpleNamespace(
    Device=_Device,
    runtime=types.SimpleNamespace(getDeviceCount=lambda: 1,
                                  getDeviceProperties=lambda device: {"name": b"CPU stand-in for CuPy",
                                                                      "totalGlobalMem": 0}),
)


# ----- everything else: NumPy's function of the same name, if CuPy 13.6 has that name ---------------------

_OWN = {"asarray", "array", "asnumpy", "RawModule", "RawKernel", "get_default_memory_pool", "cuda", "ndarray"}


def __getattr__(name):
    if name not in MODULE_NAMES or not hasattr(np, name):
        raise AttributeError(f"module 'cupy' has no attribute {name!r} (CuPy 13.6; or the CPU stand-in lacks it)")
    value = getattr(np, name)
    if isinstance(value, type) or not callable(value):
        return value                              # dtypes (cupy.float32 is numpy.float32), constants
    if name in _VIEWS:
        return lambda a, *args, **kwargs: _device_call(value, a, *args, _view_of=_unwrap(a), **kwargs)
    return lambda *args, **kwargs: _device_call(value, *args, **kwargs)


def install(monkeypatch):
    """Make ``import cupy`` and minitensor's backend use this stand-in for one test."""
    from minitensor import backend
    from minitensor.kernels import gpu

    module = sys.modules[__name__]
    monkeypatch.setitem(sys.modules, "cupy", module)
    monkeypatch.setitem(sys.modules, "cupy._core", _core)
    monkeypatch.setitem(sys.modules, "cupy._core._routines_linalg", _linalg)
    _linalg.compute_types.clear()
    monkeypatch.setattr(backend, "_cupy", module)
    monkeypatch.setattr(backend, "_cupy_error", None)
    if hasattr(backend, "_gpu_status"):
        monkeypatch.setattr(backend, "_gpu_status", None)
    gpu._module.cache_clear()
    gpu._kernel.cache_clear()
    reset_counts()
    return module


assert _OWN - {"cuda"} <= MODULE_NAMES | {"asnumpy", "ndarray"}, "the stand-in defines a name CuPy lacks"
