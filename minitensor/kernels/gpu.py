"""GPU kernels: the same numbers as ``reference.py``, written in CUDA C and launched by CuPy.

Each public function has the signature and semantics of its twin in ``reference.py``
(see docs/CONTRACTS.md), takes CuPy arrays and returns a new C-contiguous CuPy array.

How it works: the CUDA source of every kernel lives below as a string, listed in ``_KERNELS``
(one per op whose CUDA column in the op table, kernels/table.py, is this file; tests/test_cuda_as_cpp.py
checks that the two agree). ``PROGRAM`` (kernels/cuda_build.py) compiles them together, once per
float type and device, on first use; CuPy itself is never imported when this module is.

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

import numpy as np

from minitensor.backend import cupy_module
from minitensor.kernels.cuda_build import THREADS_PER_BLOCK, CudaProgram, check_pixels

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
#: The kernels above, compiled together (kernels/cuda_build.py). tests/test_cuda_as_cpp.py checks that they are
#: exactly the ops whose CUDA column in the op table (kernels/table.py) is this file.
PROGRAM = CudaProgram(_KERNELS)
cuda_source, cuda_sources = PROGRAM.source, PROGRAM.sources
_launch = PROGRAM.launch


def im2col(x, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w, out=None):
    """CUDA twin of ``reference.im2col``: cols (N*out_h*out_w, kh*kw*C), written into ``out`` if given."""
    cupy = cupy_module()
    x = cupy.ascontiguousarray(x)
    n_batch, height, width, channels = x.shape
    check_pixels(x.shape, (n_batch, out_h, out_w, kh * kw * channels))
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
    check_pixels(x_shape, (n_batch, out_h, out_w, kh * kw * channels))
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
    check_pixels(x.shape, y.shape)
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
    check_pixels(x_shape, dy.shape)
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
    check_pixels(y.shape)
    _launch("upsample_forward", x.dtype, y.size, (x, y), (n_batch, height, width, channels, sh, sw))
    return y


def upsample_backward(dy, sh, sw):
    """CUDA twin of ``reference.upsample_backward``: dx (N, H, W, C)."""
    cupy = cupy_module()
    dy = cupy.ascontiguousarray(dy)
    n_batch, out_h, out_w, channels = dy.shape
    check_pixels(dy.shape)
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
    blocks = (param.size + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    PROGRAM.kernel("adam_update", param.dtype)(
        (blocks,), (THREADS_PER_BLOCK,),
        (param, grad, m, v, scalar(step_size), scalar(one_minus_beta_1), scalar(one_minus_beta_2), scalar(epsilon),
         guard, np.int64(param.size)))
