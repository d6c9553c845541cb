"""GPU kernels: the same numbers as ``reference.py``, written in CUDA C and launched by CuPy.

Each public function has the signature and semantics of its twin in ``reference.py``
(see docs/CONTRACTS.md), takes CuPy arrays and returns a new C-contiguous CuPy array.

How it works: the CUDA source of every kernel in ``_KERNELS`` (one per op whose CUDA column in
the op table, kernels/table.py, is this file; tests/test_cuda_as_cpp.py checks that the two
agree) lives below as strings. The first call
for a dtype on a device compiles them into one ``cupy.RawModule`` (CuPy also caches the
binary on disk), once for ``float`` and once for ``double``: the source is the same, preceded by
``typedef float scalar_t;`` or ``typedef double scalar_t;``. CuPy itself is never
imported when this module is: ``backend.cupy_module()`` is asked inside the functions.

Performance contract, common to all kernels:

- one thread per *output* element, so each thread writes exactly one cell, no races and
  no atomics; consecutive threads handle consecutive channels, so global reads and writes
  of neighbouring threads are neighbouring addresses (coalesced);
- the backward kernels (col2im, maxpool_backward, upsample_backward) *gather*: the thread
  of an input cell visits the few windows that contain it and sums their contributions in
  a register, in (i, j) order like the reference. Scattering with atomicAdd would also work
  for overlapping windows but makes float sums depend on thread timing (not reproducible);
- the flat element index is 64-bit (cols of a big batch can exceed 2**31 elements) but is
  split once into (pixel, channel); pixel coordinates are 32-bit ints because 64-bit
  integer division is many times slower on a GPU. Hence the check that the pixel counts
  N*H*W stay below 2**31.

Testing: ``tests/test_kernels.py`` compiles ``cuda_sources()`` with nvcc wherever nvcc is
installed (no GPU needed), and compares these kernels with the reference on a GPU machine.
"""
from __future__ import annotations

import functools

import numpy as np

from minitensor.backend import cupy_module

_THREADS_PER_BLOCK = 256
_MAX_INT32 = 2**31 - 1

_C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

# Shared by the kernels below, compiled after the scalar_t typedef.
_HELPERS = r"""
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

_IM2COL = r"""
// One thread per element of cols (N*out_h*out_w rows, kh*kw*C columns).
extern "C" __global__ void im2col(const scalar_t* x, scalar_t* cols,
                                  int n_batch, int height, int width, int channels,
                                  int kh, int kw, int sh, int sw, int pad_top, int pad_left,
                                  int out_h, int out_w)
{
    const long long row_length = (long long)kh * kw * channels;
    const long long idx = thread_index();
    if (idx >= (long long)n_batch * out_h * out_w * row_length) return;
    const int r = (int)(idx / row_length);              // (n, oh, ow) of the window
    const int q = (int)(idx - (long long)r * row_length);  // (i, j, c) inside the window
    const int c = q % channels, j = (q / channels) % kw, i = q / (channels * kw);
    const int ow = r % out_w, oh = (r / out_w) % out_h, n = r / (out_w * out_h);
    const int h = oh * sh + i - pad_top, w = ow * sw + j - pad_left;
    const bool inside = h >= 0 && h < height && w >= 0 && w < width;
    cols[idx] = inside ? x[(((long long)n * height + h) * width + w) * channels + c] : (scalar_t)0;
}
"""

_COL2IM = r"""
// One thread per element of dx: it gathers every cols entry that im2col copied from it.
extern "C" __global__ void col2im(const scalar_t* cols, scalar_t* dx,
                                  int n_batch, int height, int width, int channels,
                                  int kh, int kw, int sh, int sw, int pad_top, int pad_left,
                                  int out_h, int out_w)
{
    const long long idx = thread_index();
    if (idx >= (long long)n_batch * height * width * channels) return;
    const int pixel = (int)(idx / channels), c = (int)(idx - (long long)pixel * channels);
    const int w = pixel % width, h = (pixel / width) % height, n = pixel / (width * height);
    const long long row_length = (long long)kh * kw * channels;
    scalar_t sum = 0;
    for (int i = 0; i < kh; ++i) {
        const int oh = output_index(h, i, sh, pad_top, out_h);
        if (oh < 0) continue;
        for (int j = 0; j < kw; ++j) {
            const int ow = output_index(w, j, sw, pad_left, out_w);
            if (ow < 0) continue;
            const long long r = ((long long)n * out_h + oh) * out_w + ow;
            sum += cols[r * row_length + (i * kw + j) * channels + c];
        }
    }
    dx[idx] = sum;
}
"""

_MAXPOOL_FORWARD = r"""
// One thread per element of y: scan the window in row-major order, keep the first maximum.
extern "C" __global__ void maxpool_forward(const scalar_t* x, scalar_t* y, int* argmax,
                                           int n_batch, int height, int width, int channels,
                                           int ph, int pw, int sh, int sw, int pad_top, int pad_left,
                                           int out_h, int out_w)
{
    const long long idx = thread_index();
    if (idx >= (long long)n_batch * out_h * out_w * channels) return;
    const int pixel = (int)(idx / channels), c = (int)(idx - (long long)pixel * channels);
    const int ow = pixel % out_w, oh = (pixel / out_w) % out_h, n = pixel / (out_w * out_h);
    scalar_t best = NEGATIVE_INFINITY;
    int best_offset = 0;
    for (int i = 0; i < ph; ++i) {
        const int h = oh * sh + i - pad_top;
        if (h < 0 || h >= height) continue;          // padding is ignored
        for (int j = 0; j < pw; ++j) {
            const int w = ow * sw + j - pad_left;
            if (w < 0 || w >= width) continue;
            const scalar_t value = x[(((long long)n * height + h) * width + w) * channels + c];
            if (value > best) {                      // strictly greater: ties stay with the first
                best = value;
                best_offset = i * pw + j;
            }
        }
    }
    y[idx] = best;
    argmax[idx] = best_offset;
}
"""

_MAXPOOL_BACKWARD = r"""
// One thread per element of dx: it sums dy over the windows whose maximum it was. Gathering
// needs no atomics even when windows overlap (stride < pool size).
extern "C" __global__ void maxpool_backward(const scalar_t* dy, const int* argmax, scalar_t* dx,
                                            int n_batch, int height, int width, int channels,
                                            int ph, int pw, int sh, int sw, int pad_top, int pad_left,
                                            int out_h, int out_w)
{
    const long long idx = thread_index();
    if (idx >= (long long)n_batch * height * width * channels) return;
    const int pixel = (int)(idx / channels), c = (int)(idx - (long long)pixel * channels);
    const int w = pixel % width, h = (pixel / width) % height, n = pixel / (width * height);
    scalar_t sum = 0;
    for (int i = 0; i < ph; ++i) {
        const int oh = output_index(h, i, sh, pad_top, out_h);
        if (oh < 0) continue;
        for (int j = 0; j < pw; ++j) {
            const int ow = output_index(w, j, sw, pad_left, out_w);
            if (ow < 0) continue;
            const long long window = (((long long)n * out_h + oh) * out_w + ow) * channels + c;
            if (argmax[window] == i * pw + j) sum += dy[window];
        }
    }
    dx[idx] = sum;
}
"""

_UPSAMPLE_FORWARD = r"""
// One thread per element of y (N, height*sh, width*sw, C): copy its source pixel.
extern "C" __global__ void upsample_forward(const scalar_t* x, scalar_t* y,
                                            int n_batch, int height, int width, int channels,
                                            int sh, int sw)
{
    const int out_h = height * sh, out_w = width * sw;
    const long long idx = thread_index();
    if (idx >= (long long)n_batch * out_h * out_w * channels) return;
    const int pixel = (int)(idx / channels), c = (int)(idx - (long long)pixel * channels);
    const int w = pixel % out_w, h = (pixel / out_w) % out_h, n = pixel / (out_w * out_h);
    y[idx] = x[(((long long)n * height + h / sh) * width + w / sw) * channels + c];
}
"""

_UPSAMPLE_BACKWARD = r"""
// One thread per element of dx (N, height, width, C): sum its sh x sw block of dy.
extern "C" __global__ void upsample_backward(const scalar_t* dy, scalar_t* dx,
                                             int n_batch, int height, int width, int channels,
                                             int sh, int sw)
{
    const int out_h = height * sh, out_w = width * sw;
    const long long idx = thread_index();
    if (idx >= (long long)n_batch * height * width * channels) return;
    const int pixel = (int)(idx / channels), c = (int)(idx - (long long)pixel * channels);
    const int w = pixel % width, h = (pixel / width) % height, n = pixel / (width * height);
    scalar_t sum = 0;
    for (int i = 0; i < sh; ++i)
        for (int j = 0; j < sw; ++j)
            sum += dy[(((long long)n * out_h + h * sh + i) * out_w + w * sw + j) * channels + c];
    dx[idx] = sum;
}
"""

_ADAM_UPDATE = r"""
// One thread per element of a parameter: Keras's Adam step, the operations of reference.adam_update
// in the same order. The module is compiled with --fmad=false, so that no a*b+c is contracted into
// one rounding: every element gets the bits the NumPy twin gives, except where a float32 value or
// intermediate is subnormal (below 2**-126): CuPy compiles with -ftz=true, which flushes it to zero.
// `guard` is one number on the device (the step's loss): where it is NaN or infinite nothing changes,
// so a diverged step is never applied and the host need not read the loss first.
extern "C" __global__ void adam_update(scalar_t* param, const scalar_t* grad, scalar_t* m, scalar_t* v,
                                       scalar_t step_size, scalar_t one_minus_beta_1, scalar_t one_minus_beta_2,
                                       scalar_t epsilon, const scalar_t* guard, long long size)
{
    const long long idx = thread_index();
    if (idx >= size || !isfinite(*guard)) return;
    const scalar_t g = grad[idx];
    const scalar_t m_new = m[idx] + (g - m[idx]) * one_minus_beta_1;
    const scalar_t v_new = v[idx] + (g * g - v[idx]) * one_minus_beta_2;
    m[idx] = m_new;
    v[idx] = v_new;
    param[idx] = param[idx] - (m_new * step_size) / (sqrt(v_new) + epsilon);
}
"""

_KERNELS = (_IM2COL, _COL2IM, _MAXPOOL_FORWARD, _MAXPOOL_BACKWARD, _UPSAMPLE_FORWARD, _UPSAMPLE_BACKWARD,
            _ADAM_UPDATE)
# No multiply-add contraction (see adam_update); the other kernels do no float multiply-adds at all.
# CuPy appends -ftz=true after these options for every NVRTC compile (cupy/cuda/compiler.py,
# _compile_with_cache_cuda, in 13.6 and 14.2), so every float32 add, multiply, divide, sqrt and
# comparison flushes subnormal inputs and results to zero (NVRTC then emits add.rn.ftz.f32,
# setp.gt.ftz.f32, ...); float64 is not affected. So in float32 the sums of col2im, maxpool_backward
# and upsample_backward, maxpool_forward's comparisons and adam_update match the reference bit for
# bit except where a value is subnormal; the copies (im2col, upsample_forward) are always exact.
_NVRTC_OPTIONS = ("--fmad=false",)

# -infinity without <math.h> (NVRTC compiles without the C library headers): the IEEE bits of +inf.
_NEGATIVE_INFINITY = {
    "float": "(-__int_as_float(0x7f800000))",
    "double": "(-__longlong_as_double(0x7ff0000000000000LL))",
}


def cuda_source(c_type: str) -> str:
    """The CUDA source of all kernels for ``c_type`` ("float" or "double")."""
    prelude = f"typedef {c_type} scalar_t;\n#define NEGATIVE_INFINITY {_NEGATIVE_INFINITY[c_type]}\n"
    return prelude + _HELPERS + "".join(_KERNELS)


def cuda_sources() -> dict[str, str]:
    """Every CUDA source this module compiles, by C type; needs no CuPy (the tests use it)."""
    return {c_type: cuda_source(c_type) for c_type in _C_TYPES.values()}


@functools.cache
def _module(c_type: str, device: int):
    """All kernels for one C type on one device, compiled on first use there and kept for the process.

    Keyed by device because a CUDA module and its function handles belong to the context of the device
    that loaded them; with one process driving several GPUs (or one rank per GPU picking its device after
    import) each device gets its own. CuPy's RawKernel happens to load itself again per device too; this
    key keeps the engine right without relying on that.
    """
    return cupy_module().RawModule(code=cuda_source(c_type), options=_NVRTC_OPTIONS)


@functools.cache
def _kernel(name: str, c_type: str, device: int):
    """One compiled kernel of one device, looked up once."""
    return _module(c_type, device).get_function(name)


def _current_kernel(name: str, c_type: str):
    """Kernel ``name`` compiled for the current CUDA device (``cudaGetDevice``: no sync, no context switch)."""
    return _kernel(name, c_type, cupy_module().cuda.runtime.getDevice())


def _launch(name: str, dtype, n_threads: int, arrays, sizes):
    """Run kernel ``name`` with one thread per output element; ``sizes`` are passed as C ints."""
    if n_threads == 0:
        return
    blocks = (n_threads + _THREADS_PER_BLOCK - 1) // _THREADS_PER_BLOCK
    # CuPy would pass a Python int as a 64-bit integer; the kernels take 32-bit ints.
    args = tuple(arrays) + tuple(np.int32(size) for size in sizes)
    _current_kernel(name, _C_TYPES[np.dtype(dtype)])((blocks,), (_THREADS_PER_BLOCK,), args)


def _check_pixels(*shapes):
    """The kernels index pixels (everything but the channel) with 32-bit ints."""
    for shape in shapes:
        pixels = int(np.prod(shape[:-1]))
        if pixels > _MAX_INT32:
            raise ValueError(f"array of shape {tuple(shape)} has {pixels} pixels, more than the GPU kernels' "
                             f"32-bit pixel index allows ({_MAX_INT32}); use a smaller batch")


def im2col(x, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w, out=None):
    """CUDA twin of ``reference.im2col``: cols (N*out_h*out_w, kh*kw*C), written into ``out`` if given."""
    cupy = cupy_module()
    x = cupy.ascontiguousarray(x)
    n_batch, height, width, channels = x.shape
    _check_pixels(x.shape, (n_batch, out_h, out_w, kh * kw * channels))
    shape = (n_batch * out_h * out_w, kh * kw * channels)
    cols = cupy.empty(shape, dtype=x.dtype) if out is None else out
    _launch("im2col", x.dtype, cols.size, (x, cols),
            (n_batch, height, width, channels, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w))
    return cols


def col2im(cols, x_shape, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w):
    """CUDA twin of ``reference.col2im``: dx with shape x_shape."""
    cupy = cupy_module()
    cols = cupy.ascontiguousarray(cols)
    n_batch, height, width, channels = x_shape
    _check_pixels(x_shape, (n_batch, out_h, out_w, kh * kw * channels))
    dx = cupy.empty(x_shape, dtype=cols.dtype)
    _launch("col2im", cols.dtype, dx.size, (cols, dx),
            (n_batch, height, width, channels, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w))
    return dx


def maxpool_forward(x, ph, pw, sh, sw, pad_top, pad_left, out_h, out_w):
    """CUDA twin of ``reference.maxpool_forward``: (y, argmax int32), both (N, out_h, out_w, C)."""
    cupy = cupy_module()
    x = cupy.ascontiguousarray(x)
    n_batch, height, width, channels = x.shape
    y = cupy.empty((n_batch, out_h, out_w, channels), dtype=x.dtype)
    _check_pixels(x.shape, y.shape)
    argmax = cupy.empty(y.shape, dtype=cupy.int32)
    _launch("maxpool_forward", x.dtype, y.size, (x, y, argmax),
            (n_batch, height, width, channels, ph, pw, sh, sw, pad_top, pad_left, out_h, out_w))
    return y, argmax


def maxpool_backward(dy, argmax, x_shape, ph, pw, sh, sw, pad_top, pad_left):
    """CUDA twin of ``reference.maxpool_backward``: dx with shape x_shape."""
    cupy = cupy_module()
    dy = cupy.ascontiguousarray(dy)
    argmax = cupy.ascontiguousarray(argmax)
    n_batch, height, width, channels = x_shape
    _, out_h, out_w, _ = dy.shape
    _check_pixels(x_shape, dy.shape)
    dx = cupy.empty(x_shape, dtype=dy.dtype)
    _launch("maxpool_backward", dy.dtype, dx.size, (dy, argmax, dx),
            (n_batch, height, width, channels, ph, pw, sh, sw, pad_top, pad_left, out_h, out_w))
    return dx


def upsample_forward(x, sh, sw):
    """CUDA twin of ``reference.upsample_forward``: y (N, H*sh, W*sw, C)."""
    cupy = cupy_module()
    x = cupy.ascontiguousarray(x)
    n_batch, height, width, channels = x.shape
    y = cupy.empty((n_batch, height * sh, width * sw, channels), dtype=x.dtype)
    _check_pixels(y.shape)
    _launch("upsample_forward", x.dtype, y.size, (x, y), (n_batch, height, width, channels, sh, sw))
    return y


def upsample_backward(dy, sh, sw):
    """CUDA twin of ``reference.upsample_backward``: dx (N, H, W, C)."""
    cupy = cupy_module()
    dy = cupy.ascontiguousarray(dy)
    n_batch, out_h, out_w, channels = dy.shape
    _check_pixels(dy.shape)
    dx = cupy.empty((n_batch, out_h // sh, out_w // sw, channels), dtype=dy.dtype)
    _launch("upsample_backward", dy.dtype, dx.size, (dy, dx),
            (n_batch, out_h // sh, out_w // sw, channels, sh, sw))
    return dx


def adam_update(param, grad, m, v, step_size, one_minus_beta_1, one_minus_beta_2, epsilon, guard=None):
    """CUDA twin of ``reference.adam_update``: the whole step in one launch, in place.

    Performance contract: one kernel launch and no temporary per parameter (the array code
    takes 12 elementwise launches and 2 allocations); each element of param, grad, m and v is
    read once and param, m and v written once; ``guard`` is checked on the device, never read
    back. Bit-identical to the reference (--fmad=false), except that in float32 a subnormal value or
    intermediate is flushed to zero (CuPy compiles with -ftz=true; see _NVRTC_OPTIONS).
    """
    cupy = cupy_module()
    guard = cupy.zeros((), param.dtype) if guard is None else cupy.ascontiguousarray(guard, dtype=param.dtype)
    for name, array in (("param", param), ("grad", grad), ("m", m), ("v", v)):
        if array.shape != param.shape or array.dtype != param.dtype or not array.flags.c_contiguous:
            raise ValueError(f"adam_update: {name} must be a C-contiguous {param.dtype} array of shape "
                             f"{tuple(param.shape)}, got {array.dtype} {tuple(array.shape)}")
    if param.size == 0:
        return
    scalar = np.dtype(param.dtype).type
    blocks = (param.size + _THREADS_PER_BLOCK - 1) // _THREADS_PER_BLOCK
    _current_kernel("adam_update", _C_TYPES[np.dtype(param.dtype)])(
        (blocks,), (_THREADS_PER_BLOCK,),
        (param, grad, m, v, scalar(step_size), scalar(one_minus_beta_1), scalar(one_minus_beta_2), scalar(epsilon),
         guard, np.int64(param.size)))
