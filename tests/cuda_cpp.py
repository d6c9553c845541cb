"""Run CUDA C kernel source on the CPU: compile it as C++ with g++ and call it through ctypes.

Test-only code. ``CppModule`` stands in for ``cupy.RawModule`` and ``CppKernel`` for the
``cupy.RawKernel`` that ``get_function`` returns, so the *same source strings* that CuPy
compiles on a GPU (``minitensor.kernels.gpu.cuda_source``) can be checked on any machine
with g++, against NumPy arrays, with no nvcc, CUDA or GPU.

How: ``EMULATION_HEADER`` defines the few CUDA names the kernels use; for every
``extern "C" __global__ void NAME(PARAMS)`` in the source a C++ function ``launch_NAME``
is generated that runs the kernel once per (block, thread) of a 1-D grid, serially. The
shared library is cached on disk under a sha256 of everything compiled, so each source is
compiled once, even across processes.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

EMULATION_HEADER = r"""
// --- CUDA emulation for g++ (tests/cuda_cpp.py) ---------------------------------------------
// Why a serial loop over (block, thread) is a faithful emulation of these kernels: they use no
// shared memory, no __syncthreads() or other barriers, no atomics and no warp intrinsics, and
// each thread writes only its own output cell and never reads any output. So a thread's result
// depends only on the inputs and its own indices, and every execution order -- the GPU's
// unspecified one or this serial one -- gives the same bits. (Index arithmetic is int/long
// long, 32/64 bits as on CUDA; the float work is done in the same order as on the GPU, where
// --fmad=false forbids contracting a*b+c into an FMA, as -ffp-contract=off does here.)
#include <cmath>
#include <cstring>
using std::isfinite;   // CUDA's device math overloads these for float and double, as <cmath>'s std:: ones do
using std::sqrt;

struct cuda_emulated_uint3 { unsigned int x, y, z; };
// Set by the generated launch_* functions; thread_local so concurrent launches do not clash.
inline thread_local cuda_emulated_uint3 blockIdx, blockDim, threadIdx, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline __attribute__((always_inline))

// CUDA's bit casts (no conversion of the value), as memcpy: the defined way in C++.
inline float __int_as_float(int bits) { float f; std::memcpy(&f, &bits, sizeof f); return f; }
inline double __longlong_as_double(long long bits) { double d; std::memcpy(&d, &bits, sizeof d); return d; }
// --- end of CUDA emulation -------------------------------------------------------------------
"""

# -Wall -Werror like nvcc's "-Werror all-warnings" in tests/test_kernels.py; nothing is relaxed.
GXX_FLAGS = ("-O2", "-shared", "-fPIC", "-std=c++17", "-Wall", "-Werror")
CACHE_DIR = Path(tempfile.gettempdir()) / "minitensor-cuda-cpp"

_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)')
_TYPEDEF = re.compile(r"\btypedef\s+([\w\s]+?)\s+(\w+)\s*;")
_PARAM = re.compile(r"^(?P<type>[\w\s]+?)\s*(?P<pointer>\*?)\s*(?:__restrict__\s*)?(?P<name>\w+)$")
# C type (after typedefs and without const) -> (NumPy dtype, ctypes scalar type).
_C_TYPES = {
    "float": (np.dtype(np.float32), ctypes.c_float),
    "double": (np.dtype(np.float64), ctypes.c_double),
    "int": (np.dtype(np.int32), ctypes.c_int32),
    "unsigned int": (np.dtype(np.uint32), ctypes.c_uint32),
    "long long": (np.dtype(np.int64), ctypes.c_int64),
}
_LOADED: dict[str, ctypes.CDLL] = {}   # sha256 -> library, so a source is loaded once per process


class CompileError(RuntimeError):
    """g++ rejected the source; the message holds its stderr."""


class Param:
    """One kernel parameter: its name, C type (typedefs resolved, const dropped), pointer or not."""

    def __init__(self, text: str, typedefs: dict[str, str]):
        match = _PARAM.match(" ".join(text.split()))
        if match is None:
            raise ValueError(f"cannot parse kernel parameter {text!r}")
        words = [w for w in match["type"].split() if w != "const"]
        self.const = "const" in match["type"].split()
        self.name, self.pointer = match["name"], bool(match["pointer"])
        self.c_type = " ".join(typedefs.get(w, w) for w in words)
        if self.c_type not in _C_TYPES:
            raise ValueError(f"parameter {self.name!r}: unsupported C type {self.c_type!r}")
        self.dtype, scalar = _C_TYPES[self.c_type]
        self.ctype = ctypes.c_void_p if self.pointer else scalar

    def convert(self, arg):
        """The ctypes value for ``arg``, or TypeError if a real launch would misread it."""
        if self.pointer:
            array = getattr(arg, "_data", arg)   # a device-array stand-in exposes its NumPy array as ._data
            if not isinstance(array, np.ndarray):
                raise TypeError(f"{self.name}: expected an array, got {type(arg).__name__}")
            if array.dtype != self.dtype:
                raise TypeError(f"{self.name}: expected a {self.dtype} array ({self.c_type}*), got {array.dtype}")
            if not array.flags.c_contiguous:
                raise TypeError(f"{self.name}: array is not C-contiguous")
            if not self.const and not array.flags.writeable:
                raise TypeError(f"{self.name}: array is read-only but the kernel writes it")
            return ctypes.c_void_p(array.ctypes.data)
        if self.dtype.kind == "f":
            ok = type(arg) is float or (isinstance(arg, np.generic) and arg.dtype == self.dtype)
        else:
            ok = (isinstance(arg, np.generic) and arg.dtype == self.dtype) or (
                type(arg) is int and np.iinfo(self.dtype).min <= arg <= np.iinfo(self.dtype).max)
        if not ok:
            raise TypeError(f"{self.name}: expected {self.dtype} ({self.c_type}), got {type(arg).__name__} {arg!r}")
        return self.ctype(arg)


def _launcher(name: str, params_text: str, params: list[Param]) -> str:
    """C++ source of ``launch_NAME``: run kernel NAME for every thread of a 1-D grid, in order."""
    names = ", ".join(p.name for p in params)
    return f"""
extern "C" void launch_{name}(unsigned int grid_x, unsigned int block_x, {" ".join(params_text.split())})
{{
    gridDim = {{grid_x, 1, 1}};
    blockDim = {{block_x, 1, 1}};
    for (unsigned int b = 0; b < grid_x; ++b)
        for (unsigned int t = 0; t < block_x; ++t) {{
            blockIdx = {{b, 0, 0}};
            threadIdx = {{t, 0, 0}};
            {name}({names});
        }}
}}
"""


# NVRTC options the engine passes -> g++ flags of the same meaning; any other option is refused.
NVRTC_TO_GXX = {"--fmad=false": ("-ffp-contract=off",)}


class CppModule:
    """``cupy.RawModule(code=..., options=...)`` for the CPU: ``code`` is compiled by g++.

    ``options`` are NVRTC options, translated by NVRTC_TO_GXX (an unknown one is a ValueError,
    so that the emulation never silently ignores what the GPU build was asked to do).
    Raises CompileError with g++'s stderr.
    """

    def __init__(self, code: str, options=()):
        unknown = [option for option in options if option not in NVRTC_TO_GXX]
        if unknown:
            raise ValueError(f"no g++ equivalent known for the NVRTC options {unknown}: add it to NVRTC_TO_GXX")
        options = sum((NVRTC_TO_GXX[option] for option in options), ())
        typedefs = {alias: " ".join(target.split()) for target, alias in _TYPEDEF.findall(code)}
        self.params = {name: [Param(p, typedefs) for p in text.split(",") if p.strip()]
                       for name, text in _KERNEL.findall(code)}
        if not self.params:
            raise ValueError('no extern "C" __global__ kernel found in the source')
        launchers = "".join(_launcher(name, text, self.params[name]) for name, text in _KERNEL.findall(code))
        source = EMULATION_HEADER + "#line 1 \"kernel source\"\n" + code + "\n#line 1 \"launchers\"\n" + launchers
        flags = GXX_FLAGS + tuple(options)
        digest = hashlib.sha256("\0".join((source,) + flags).encode()).hexdigest()
        if digest not in _LOADED:
            _LOADED[digest] = ctypes.CDLL(str(_compile(source, flags, digest)))
        self.library = _LOADED[digest]

    def get_function(self, name: str) -> "CppKernel":
        """The kernel ``name``, like ``RawModule.get_function``."""
        if name not in self.params:
            raise AttributeError(f"no kernel {name!r} in the module; it has {sorted(self.params)}")
        return CppKernel(name, self.params[name], getattr(self.library, f"launch_{name}"))


def _compile(source: str, flags: tuple, digest: str) -> Path:
    """The shared library for ``source``, compiled now unless the cache already has it."""
    library = CACHE_DIR / f"{digest}.so"
    if library.exists():
        return library
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as scratch:
        cpp, built = Path(scratch) / "kernels.cpp", Path(scratch) / "kernels.so"
        cpp.write_text(source)
        result = subprocess.run(["g++", *flags, str(cpp), "-o", str(built)], capture_output=True, text=True,
                                env={**os.environ, "LC_ALL": "C"})   # plain ASCII quotes in messages
        if result.returncode != 0:
            raise CompileError(f"g++ failed (exit {result.returncode}):\n{result.stderr}")
        os.replace(built, library)   # atomic: a concurrent process sees no half-written library
    return library


class CppKernel:
    """One compiled kernel, called like ``cupy.RawKernel``: ``kernel(grid, block, args)``."""

    def __init__(self, name: str, params: list[Param], launch):
        self.name, self.params, self._launch = name, params, launch
        launch.argtypes = [ctypes.c_uint, ctypes.c_uint] + [p.ctype for p in params]
        launch.restype = None

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        """Run on a 1-D grid. ``args`` must match the parameters (types checked); ``stream`` is ignored."""
        grid_x, block_x = _x_dimension("grid", grid), _x_dimension("block", block)
        if shared_mem:
            raise ValueError("dynamic shared memory is not emulated")
        args = tuple(args)
        if len(args) != len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} arguments "
                            f"({', '.join(p.name for p in self.params)}), got {len(args)}")
        self._launch(grid_x, block_x, *(p.convert(a) for p, a in zip(self.params, args)))


def _x_dimension(what: str, dims) -> int:
    """x of a CUDA grid or block given as an int or a tuple of up to 3; y and z must be 1."""
    dims = (dims,) if isinstance(dims, (int, np.integer)) else tuple(dims)
    if not 1 <= len(dims) <= 3 or any(int(d) != 1 for d in dims[1:]) or int(dims[0]) < 1:
        raise ValueError(f"{what} {dims}: only a 1-D {what} (x >= 1, y = z = 1) is emulated")
    return int(dims[0])
