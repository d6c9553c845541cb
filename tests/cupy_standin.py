"""A strict CPU stand-in for CuPy, so that the GPU path's tests run on machines without a GPU (test-only code).

It is NumPy underneath, but it refuses what real CuPy refuses and counts what a GPU would pay for:

* its ``ndarray`` is not a NumPy array (it wraps one; ``type(x).__module__`` starts with "cupy", which is
  how ``minitensor.backend`` tells devices apart), so a device array can only reach the host on purpose;
* a NumPy array handed to a device operation raises TypeError, as in CuPy ("Unsupported type");
* an implicit conversion to NumPy (``np.asarray(x)``, OpenCV, any ``__array__`` call) raises TypeError, as in
  CuPy; ``.get()``, ``cupy.asnumpy``, ``float(x)``, ``int(x)``, ``bool(x)`` and ``.item()`` work and are
  counted as a device-to-host transfer and a host sync (a GPU must finish its queue first);
* only names that both CuPy 13.6 and CuPy 14.2 have exist, for the module, its arrays, ``cupy.cuda`` and
  ``_routines_linalg`` (``tests/cupy_names.txt`` dumped from ``cupy-cuda12x==13.6.0``,
  ``tests/cupy_names_14.txt`` from ``cupy-cuda13x==14.2.0``; 14.2 lacks ``cupy.sparse``): anything else is
  an AttributeError naming the version that lacks it, so the engine cannot lean on a NumPy-only function,
  or on a name of one CuPy only, that would fail on a real GPU;
* ``RawModule``/``RawKernel`` compile the CUDA source the engine gives NVRTC as C++ (``tests/cuda_cpp.py``)
  and run it, so the real kernels run, not NumPy copies of them;
* devices are numbered (``DEVICE_COUNT``, 1 unless a test sets more; ``cuda.Device(i)`` as a context
  manager, ``cuda.runtime.getDevice``/``setDevice``), and a compiled module launches its kernels only on
  the device that was current when it was created, as a CUDA function handle does (CuPy's own RawKernel
  would quietly load the module again; the engine keys its cache by device instead of relying on that);
* ``CUPY_STANDIN_BREAK=device`` or ``=nvrtc`` (environment) breaks it on purpose, as a machine without a
  usable CUDA device or without a working NVRTC is broken, to check that nothing mistakes that for a GPU;
* ``COUNTS`` counts device calls (every operation, allocation and kernel launch), kernel launches,
  host<->device transfers (and their bytes) and syncs; ``reset_counts()`` starts afresh.

What it cannot check: timing, memory limits, asynchrony (every call completes at once), the numerics of
cuBLAS, whose sums may be ordered differently from NumPy's, and the flushing of float32 subnormals to zero
in every kernel CuPy compiles (it adds ``-ftz=true`` to NVRTC's options; g++ here keeps subnormals).
"""
from __future__ import annotations

import collections
import os
import sys
import types

import numpy as np

from cuda_cpp import CppModule

# The CuPy versions whose public names the stand-in allows: a name must be in every list.
_NAME_LISTS = {"13.6.0": "cupy_names.txt", "14.2.0": "cupy_names_14.txt"}
__version__ = " and ".join(_NAME_LISTS) + " names (CPU stand-in)"
STANDIN = True


def _read_names(filename):
    sections = collections.defaultdict(set)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), filename)) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                section, name = line.split()
                sections[section].add(name)
    return sections


_NAMES_BY_VERSION = {version: _read_names(filename) for version, filename in _NAME_LISTS.items()}


def _common_names(section):
    return set.intersection(*(names[section] for names in _NAMES_BY_VERSION.values()))


def _missing(section, name):
    """Why ``name`` is not allowed, for its AttributeError: 'CuPy 14.2.0 lacks it' (or both versions)."""
    lacking = [version for version, names in _NAMES_BY_VERSION.items() if name not in names[section]]
    return f"CuPy {' and '.join(lacking)} {'lacks' if len(lacking) == 1 else 'lack'} it"


MODULE_NAMES, ARRAY_NAMES = _common_names("cupy"), _common_names("cupy.ndarray")

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
            raise AttributeError(f"cupy.ndarray has no attribute {name!r} ({_missing('cupy.ndarray', name)})")
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


# ----- breaking it on purpose ----------------------------------------------------------------------------

_BREAKS = {
    "device": "cudaErrorNoDevice: no CUDA-capable device is detected",
    "nvrtc": "nvrtc: error: failed to open libnvrtc-builtins.so.13: cannot open shared object file",
}


def _broken(part):
    """Raise as a machine broken in ``part`` would, where ``CUPY_STANDIN_BREAK`` names that part."""
    which = os.environ.get("CUPY_STANDIN_BREAK", "")
    if which and which not in _BREAKS:
        raise ValueError(f"CUPY_STANDIN_BREAK={which!r}: expected one of {', '.join(_BREAKS)} (or unset)")
    if which == part:
        raise CUDARuntimeError(f"{_BREAKS[part]} (the CPU stand-in, broken on purpose: CUPY_STANDIN_BREAK={part})")


class CUDARuntimeError(RuntimeError):   # cupy.cuda.runtime.CUDARuntimeError
    pass


# ----- kernels ------------------------------------------------------------------------------------------

class RawModule:
    """``cupy.RawModule(code=..., options=...)``: the CUDA source compiled as C++ and run on the CPU.

    ``device_id`` is the device that was current when the module was made: its kernels refuse to
    launch on another one, as a CUDA module's function handles do.
    """

    def __init__(self, code, options=(), **kwargs):
        _broken("nvrtc")
        self.device_id = _CURRENT["device"]
        self._module = CppModule(code, options)

    def get_function(self, name):
        kernel = self._module.get_function(name)

        def launch(grid, block, args, **kwargs):
            if _CURRENT["device"] != self.device_id:
                raise CUDARuntimeError(f"cudaErrorInvalidResourceHandle: kernel {name} of a module loaded on "
                                       f"device {self.device_id} launched on device {_CURRENT['device']}")
            COUNTS["calls"] += 1
            COUNTS["launches"] += 1
            for arg in args:
                _unwrap(arg, f"an argument of kernel {name}")   # host arrays are refused, as on a GPU
            return kernel(grid, block, args, **kwargs)
        return launch


def RawKernel(code, name, options=(), **kwargs):   # noqa: N802 (CuPy's name)
    return RawModule(code, options).get_function(name)


# ----- the CUDA runtime, as far as the engine asks ------------------------------------------------------

DEVICE_COUNT = 1          # how many devices the stand-in has (a test may set more)
_CURRENT = {"device": 0}  # the current device of this (single-threaded) process


def _device_count():
    _broken("device")
    return DEVICE_COUNT


def _set_device(device):
    if not 0 <= int(device) < _device_count():
        raise CUDARuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {device} ({DEVICE_COUNT} devices)")
    _CURRENT["device"] = int(device)


class _Device:
    """cupy.cuda.Device: ``Device()`` is the current one; ``with Device(i):`` makes i current, then restores."""

    def __init__(self, device=None):
        self.id = _CURRENT["device"] if device is None else int(device)
        self._previous = []

    def synchronize(self):
        COUNTS["syncs"] += 1

    def use(self):
        _set_device(self.id)

    def __enter__(self):
        self._previous.append(_CURRENT["device"])
        _set_device(self.id)
        return self

    def __exit__(self, *exc):
        _CURRENT["device"] = self._previous.pop()
        return False


_POOL = types.SimpleNamespace(used_bytes=lambda: 0, total_bytes=lambda: 0, free_all_blocks=lambda: None)

# cupy._core._routines_linalg's compute-type switch (what CUPY_TF32 sets), as backend.set_tf32 uses it;
# the values are those of CuPy 13.6 and 14.2 alike.
_linalg = types.SimpleNamespace(COMPUTE_TYPE_DEFAULT=1, COMPUTE_TYPE_TF32=7, compute_types={})
_linalg.set_compute_type = lambda dtype, compute_type: _linalg.compute_types.__setitem__(np.dtype(dtype), compute_type)
_core = types.SimpleNamespace(_routines_linalg=_linalg)


def get_default_memory_pool():
    return _POOL


cuda = types.SimpleNamespace(
    Device=_Device,
    runtime=types.SimpleNamespace(CUDARuntimeError=CUDARuntimeError,
                                  getDeviceCount=_device_count,
                                  getDevice=lambda: _CURRENT["device"],
                                  setDevice=_set_device,
                                  getDeviceProperties=lambda device: {"name": b"CPU stand-in for CuPy",
                                                                      "totalGlobalMem": 0}),
)


# ----- everything else: NumPy's function of the same name, if CuPy 13.6 and 14.2 have that name ----------

_OWN = {"asarray", "array", "asnumpy", "RawModule", "RawKernel", "get_default_memory_pool", "cuda", "ndarray"}


def __getattr__(name):
    if name not in MODULE_NAMES or not hasattr(np, name):
        why = _missing("cupy", name) if name not in MODULE_NAMES else "the CPU stand-in lacks it"
        raise AttributeError(f"module 'cupy' has no attribute {name!r} ({why})")
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
    monkeypatch.setattr(sys.modules[__name__], "DEVICE_COUNT", DEVICE_COUNT)
    monkeypatch.setitem(_CURRENT, "device", 0)
    monkeypatch.setattr(backend, "_cupy", module)
    monkeypatch.setattr(backend, "_cupy_error", None)
    monkeypatch.setattr(backend, "_gpu_status", None)
    gpu.PROGRAM.forget_compiled()
    reset_counts()
    return module


def _check_own_names():
    """Every name the stand-in defines is one that CuPy 13.6 and 14.2 both have."""
    own = {"cupy": _OWN - {"cuda"}, "cupy.cuda": set(vars(cuda)), "cupy.cuda.runtime": set(vars(cuda.runtime)),
           "cupy.cuda.Device": {name for name in vars(_Device) if not name.startswith("_")},
           "cupy._core._routines_linalg": set(vars(_linalg)) - {"compute_types"}}   # compute_types: the record
    for section, names in own.items():
        extra = names - _common_names(section)
        assert not extra, f"the stand-in defines {section} names that not every CuPy has: {sorted(extra)}"


_check_own_names()
