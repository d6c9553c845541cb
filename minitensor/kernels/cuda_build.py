"""How gpu.py's CUDA C becomes kernels on a device: one source per C type, compiled once per device, launched
one thread per output element.

The kernels of gpu.py are strings. ``CudaProgram`` puts them after a prelude (``typedef float scalar_t;``
or ``typedef double scalar_t;``, then the device helpers below), so one source serves both float
dtypes; CuPy's NVRTC compiles it into a ``cupy.RawModule`` on the first launch for a dtype on a
device (CuPy also caches the binary on disk), and the function handles are looked up once. CuPy
itself is never imported when this module is: ``backend.cupy_module()`` is asked at the first launch.
``tests/cuda_cpp.py`` compiles the same strings as C++ on the CPU, so every source here is checked
without a GPU.
"""
from __future__ import annotations

import numpy as np

from minitensor.backend import cupy_module

THREADS_PER_BLOCK = 256
MAX_INT32 = 2**31 - 1
C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

# Shared by every kernel, compiled after the scalar_t typedef.
HELPERS = r"""
// The output index o whose window reads input position `position` at kernel offset `offset`,
// or -1 if there is none: position = o*stride + offset - pad, for some o in [0, out_size).
__device__ __forceinline__ int output_index(int position, int offset, int stride, int pad, int out_size)
{
    const int shifted = position + pad - offset;
    if (shifted < 0 || shifted % stride != 0) return -1;
    const int o = shifted / stride;
    return o < out_size ? o : -1;
}

// The flat 64-bit index of this thread.
__device__ __forceinline__ long long thread_index()
{
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}
"""

# No multiply-add contraction (see gpu.py's adam_update); the other kernels do no float multiply-adds at
# all. CuPy appends -ftz=true after these options for every NVRTC compile (cupy/cuda/compiler.py,
# _compile_with_cache_cuda, in 13.6 and 14.2), so every float32 add, multiply, divide, sqrt and
# comparison flushes subnormal inputs and results to zero (NVRTC then emits add.rn.ftz.f32,
# setp.gt.ftz.f32, ...); float64 is not affected. So in float32 the sums of col2im, maxpool_backward
# and upsample_backward, maxpool_forward's comparisons and adam_update match the reference bit for
# bit except where a value is subnormal; the copies (im2col, upsample_forward) are always exact.
NVRTC_OPTIONS = ("--fmad=false",)

# -infinity without <math.h> (NVRTC compiles without the C library headers): the IEEE bits of +inf.
NEGATIVE_INFINITY = {
    "float": "(-__int_as_float(0x7f800000))",
    "double": "(-__longlong_as_double(0x7ff0000000000000LL))",
}


def check_pixels(*shapes):
    """The kernels index pixels (everything but the channel) with 32-bit ints: refuse arrays with more."""
    for shape in shapes:
        pixels = int(np.prod(shape[:-1]))
        if pixels > MAX_INT32:
            raise ValueError(f"array of shape {tuple(shape)} has {pixels} pixels, more than the GPU kernels' "
                             f"32-bit pixel index allows ({MAX_INT32}); use a smaller batch")


class CudaProgram:
    """CUDA kernels compiled together: their source per C type, and their compiled copies per device."""

    def __init__(self, kernels):
        self.kernels = tuple(kernels)
        self._sources = {c_type: self._build_source(c_type) for c_type in C_TYPES.values()}
        self._modules, self._functions = {}, {}

    def _build_source(self, c_type):
        prelude = f"typedef {c_type} scalar_t;\n#define NEGATIVE_INFINITY {NEGATIVE_INFINITY[c_type]}\n"
        return prelude + HELPERS + "".join(self.kernels)

    def source(self, c_type: str) -> str:
        """The CUDA source of all kernels for ``c_type`` ("float" or "double")."""
        return self._sources[c_type]

    def sources(self) -> dict[str, str]:
        """Every source this program compiles, by C type; needs no CuPy (the tests use it)."""
        return dict(self._sources)

    def module(self, c_type: str, device: int):
        """All kernels for one C type on one device, compiled on first use there and kept for the process.

        Keyed by device because a CUDA module and its function handles belong to the context of the device
        that loaded them; with one process driving several GPUs (or one rank per GPU picking its device
        after import) each device gets its own. CuPy's RawKernel happens to load itself again per device
        too; this key keeps the engine right without relying on that.
        """
        key = (c_type, device)
        if key not in self._modules:
            self._modules[key] = cupy_module().RawModule(code=self._sources[c_type], options=NVRTC_OPTIONS)
        return self._modules[key]

    def kernel(self, name: str, dtype):
        """Kernel ``name`` for ``dtype``, compiled for the current CUDA device (``cudaGetDevice``: no sync)."""
        key = (name, C_TYPES[np.dtype(dtype)], cupy_module().cuda.runtime.getDevice())
        if key not in self._functions:
            self._functions[key] = self.module(*key[1:]).get_function(name)
        return self._functions[key]

    def launch(self, name: str, dtype, n_threads: int, arrays, sizes):
        """Run kernel ``name`` with one thread per output element; ``sizes`` are passed as C ints."""
        if n_threads == 0:
            return
        blocks = (n_threads + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
        # CuPy would pass a Python int as a 64-bit integer; the kernels take 32-bit ints.
        args = tuple(arrays) + tuple(np.int32(size) for size in sizes)
        self.kernel(name, dtype)((blocks,), (THREADS_PER_BLOCK,), args)

    def forget_compiled(self):
        """Drop every compiled module and handle (the tests swap the CuPy stand-in in and out)."""
        self._modules.clear()
        self._functions.clear()
