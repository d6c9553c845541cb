"""CPU kernels compiled with numba: the same numbers as ``reference.py``, without temporaries.

Each public function has the signature and semantics of its twin in ``reference.py``
(see docs/CONTRACTS.md); it allocates the output and calls a jitted kernel that writes it.
The kernels differ from the reference in three ways, each stated in its docstring:

- the outer loop is a ``prange`` over independent output rows, run on all cores;
- every output cell is written by exactly one iteration of that loop, so there are no
  races: the backward kernels *gather* into the cell they own instead of scattering;
- padding is checked with index tests inside the loop, never by building a padded copy.

They keep the input dtype: a float32 input gives a float32 output (numba compiles one
version per dtype, cached on disk next to this file by ``cache=True``).

Debugging tip: run with ``NUMBA_DISABLE_JIT=1`` and these kernels run as plain Python
(``prange`` becomes ``range``), so print() and pdb work inside them, very slowly.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from minitensor.kernels import reference

# fastmath=False: no reordering of additions, so sums come out in the reference's order.
_jit = njit(parallel=True, cache=True, fastmath=False)


@njit(cache=True)
def _split(flat_row, rows_per_image):
    """(n, row within image n) of a row index over the whole batch.

    Inside a parallel loop numba makes the prange index unsigned, and unsigned // signed is
    typed as float; casting to a signed int first keeps n and the row integers."""
    return divmod(np.int64(flat_row), rows_per_image)


@njit(cache=True)
def _output_index(position, offset, stride, pad, out_size):
    """The output index whose window reads input ``position`` at kernel offset ``offset``,
    or -1 if none: ``position = o*stride + offset - pad`` must hold for an o in range."""
    shifted = position + pad - offset
    if shifted < 0 or shifted % stride != 0:
        return -1
    out_index = shifted // stride
    return out_index if out_index < out_size else -1


def _im2col_kernel(x, cols, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w):
    """Parallel over the N*out_h output rows; iteration (n, oh) writes the out_w rows of cols
    for that output row and nothing else (no races). The inner loop copies C contiguous values.
    Every cell of cols is written, zeros for window cells in the padding, so cols can be
    uninitialised (reused) memory: no separate pass to zero 9x the input's size."""
    n_batch, height, width, channels = x.shape
    for output_row in prange(n_batch * out_h):
        n, oh = _split(output_row, out_h)
        for ow in range(out_w):
            r = output_row * out_w + ow
            for i in range(kh):
                h = oh * sh + i - pad_top
                for j in range(kw):
                    w = ow * sw + j - pad_left
                    first_column = (i * kw + j) * channels
                    if 0 <= h < height and 0 <= w < width:
                        for c in range(channels):
                            cols[r, first_column + c] = x[n, h, w, c]
                    else:
                        for c in range(channels):
                            cols[r, first_column + c] = 0


# Two compiled versions of one kernel: Conv2D calls im2col on cache-sized pieces, between matrix
# products that run on every core through BLAS. For such small calls waking numba's threads costs
# more than it saves, and its threads and BLAS's then compete for the same cores.
_im2col_parallel = _jit(_im2col_kernel)
_im2col_serial = njit(cache=True, fastmath=False)(_im2col_kernel)
SERIAL_BELOW_ELEMENTS = 1 << 22


@_jit
def _col2im_kernel(cols, dx, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w):
    """Parallel over the N*H rows of dx; iteration (n, h) owns row dx[n, h] and *gathers* every
    cols entry that im2col copied from it. A scatter over the rows of cols would race: with
    overlapping windows two output rows add into the same dx row. Contributions are added in
    (i, j) order like the reference."""
    n_batch, height, width, channels = dx.shape
    for input_row in prange(n_batch * height):
        n, h = _split(input_row, height)
        for i in range(kh):
            oh = _output_index(h, i, sh, pad_top, out_h)
            if oh < 0:
                continue
            for j in range(kw):
                first_column = (i * kw + j) * channels
                for ow in range(out_w):
                    w = ow * sw + j - pad_left
                    if not 0 <= w < width:
                        continue
                    r = (n * out_h + oh) * out_w + ow
                    for c in range(channels):
                        dx[n, h, w, c] += cols[r, first_column + c]


@_jit
def _maxpool_forward_kernel(x, y, argmax, ph, pw, sh, sw, pad_top, pad_left):
    """Parallel over the N*out_h output rows; iteration (n, oh) owns y[n, oh] and argmax[n, oh].
    y arrives filled with -inf and argmax with 0; window cells are visited in row-major order
    and replace the maximum only when strictly greater, so ties go to the first. Cells in the
    padding are skipped. The inner loop runs over C contiguous channels."""
    n_batch, height, width, channels = x.shape
    _, out_h, out_w, _ = y.shape
    for output_row in prange(n_batch * out_h):
        n, oh = _split(output_row, out_h)
        for ow in range(out_w):
            for i in range(ph):
                h = oh * sh + i - pad_top
                if not 0 <= h < height:
                    continue
                for j in range(pw):
                    w = ow * sw + j - pad_left
                    if not 0 <= w < width:
                        continue
                    for c in range(channels):
                        if x[n, h, w, c] > y[n, oh, ow, c]:
                            y[n, oh, ow, c] = x[n, h, w, c]
                            argmax[n, oh, ow, c] = i * pw + j


@_jit
def _maxpool_backward_kernel(dy, argmax, dx, ph, pw, sh, sw, pad_top, pad_left):
    """Parallel over the N*H rows of dx; iteration (n, h) owns dx[n, h] and gathers dy from every
    window whose maximum is in that row. Gathering, not scattering, keeps overlapping windows
    (stride < pool size) race-free. Same loop structure as _col2im_kernel."""
    n_batch, height, width, channels = dx.shape
    _, out_h, out_w, _ = dy.shape
    for input_row in prange(n_batch * height):
        n, h = _split(input_row, height)
        for i in range(ph):
            oh = _output_index(h, i, sh, pad_top, out_h)
            if oh < 0:
                continue
            for j in range(pw):
                for ow in range(out_w):
                    w = ow * sw + j - pad_left
                    if not 0 <= w < width:
                        continue
                    for c in range(channels):
                        if argmax[n, oh, ow, c] == i * pw + j:
                            dx[n, h, w, c] += dy[n, oh, ow, c]


@_jit
def _upsample_forward_kernel(x, y, sh, sw):
    """Parallel over the N*H*sh rows of y; each iteration writes its own row (no races)."""
    n_batch, height, width, channels = x.shape
    out_h = height * sh
    for output_row in prange(n_batch * out_h):
        n, h_out = _split(output_row, out_h)
        for w_out in range(width * sw):
            for c in range(channels):
                y[n, h_out, w_out, c] = x[n, h_out // sh, w_out // sw, c]


@_jit
def _upsample_backward_kernel(dy, dx, sh, sw):
    """Parallel over the N*H rows of dx; iteration (n, h) sums the sh x sw blocks of dy for its
    own row, in (i, j) order like the reference."""
    n_batch, height, width, channels = dx.shape
    for input_row in prange(n_batch * height):
        n, h = _split(input_row, height)
        for i in range(sh):
            for j in range(sw):
                for w in range(width):
                    for c in range(channels):
                        dx[n, h, w, c] += dy[n, h * sh + i, w * sw + j, c]


@_jit
def _softmax_kernel(x, y):
    """y[r] = softmax(x[r]) for every row r of the (rows, channels) arrays, parallel over rows.

    One pass per row over its few channels, where NumPy makes five passes over the whole array
    (max, subtract, exp, sum, divide) and reduces along a short last axis, its slow case
    (docs/benchmarks.md has the timings). The same operations in the same order; exp is LLVM's,
    which may differ from NumPy's in the last bit."""
    rows, channels = x.shape
    for r in prange(rows):
        largest = x[r, 0]
        for c in range(1, channels):
            largest = max(largest, x[r, c])
        total = x.dtype.type(0)
        for c in range(channels):
            y[r, c] = np.exp(x[r, c] - largest)
            total += y[r, c]
        for c in range(channels):
            y[r, c] /= total


@_jit
def _relu_backward_kernel(dy, y, dx):
    """dx = dy * (y > 0) over the flat arrays, parallel: one pass where NumPy makes two (the
    mask, then the product) and a temporary. The same product, so NaN and -0.0 come out as
    NumPy's do."""
    for i in prange(dx.size):
        dx[i] = dy[i] * (y[i] > 0)


@_jit
def _add_kernel(a, b, out):
    """out = a + b over (rows, C) views, parallel over the rows. a or b may be strided (a slice of a
    wider array along its last axis): NumPy's add walks such a view 128 bytes at a time on one core,
    2.4x slower than this for small_unet's 16x128x128x32 skip gradient on a 2-core Xeon."""
    for row in prange(out.shape[0]):
        for c in range(out.shape[1]):
            out[row, c] = a[row, c] + b[row, c]


@_jit
def _copy_block(source, out, first):
    """out[:, first:first + source.shape[1]] = source, parallel over the rows (one input of a concatenation)."""
    width = source.shape[1]
    for row in prange(out.shape[0]):
        for q in range(width):
            out[row, first + q] = source[row, q]


@_jit
def _adam_kernel(param, grad, m, v, step_size, one_minus_beta_1, one_minus_beta_2, epsilon):
    """reference.adam_update's operations in its order, one element at a time, parallel: each of param,
    grad, m and v read once and param, m, v written once, no temporaries (the reference makes 9 passes
    over the parameter and 2 temporaries). fastmath=False: no fused multiply-adds, so the same bits."""
    for i in prange(param.size):
        g = grad[i]
        m_i = m[i] + (g - m[i]) * one_minus_beta_1
        v_i = v[i] + (g * g - v[i]) * one_minus_beta_2
        m[i], v[i] = m_i, v_i
        param[i] -= (m_i * step_size) / (np.sqrt(v_i) + epsilon)


def im2col(x, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w, out=None):
    """Numba twin of ``reference.im2col``: cols (N*out_h*out_w, kh*kw*C), written into ``out`` if given."""
    x = np.ascontiguousarray(x)
    n_batch, _, _, channels = x.shape
    shape = (n_batch * out_h * out_w, kh * kw * channels)
    cols = np.empty(shape, dtype=x.dtype) if out is None else out
    kernel = _im2col_serial if cols.size < SERIAL_BELOW_ELEMENTS else _im2col_parallel
    kernel(x, cols, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w)
    return cols


def col2im(cols, x_shape, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w):
    """Numba twin of ``reference.col2im``: dx with shape x_shape."""
    cols = np.ascontiguousarray(cols)
    dx = np.zeros(x_shape, dtype=cols.dtype)
    _col2im_kernel(cols, dx, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w)
    return dx


def maxpool_forward(x, ph, pw, sh, sw, pad_top, pad_left, out_h, out_w):
    """Numba twin of ``reference.maxpool_forward``: (y, argmax int32), both (N, out_h, out_w, C)."""
    x = np.ascontiguousarray(x)
    n_batch, _, _, channels = x.shape
    y = np.full((n_batch, out_h, out_w, channels), -np.inf, dtype=x.dtype)
    argmax = np.zeros((n_batch, out_h, out_w, channels), dtype=np.int32)
    _maxpool_forward_kernel(x, y, argmax, ph, pw, sh, sw, pad_top, pad_left)
    return y, argmax


def maxpool_backward(dy, argmax, x_shape, ph, pw, sh, sw, pad_top, pad_left):
    """Numba twin of ``reference.maxpool_backward``: dx with shape x_shape."""
    dy = np.ascontiguousarray(dy)
    argmax = np.ascontiguousarray(argmax)
    dx = np.zeros(x_shape, dtype=dy.dtype)
    _maxpool_backward_kernel(dy, argmax, dx, ph, pw, sh, sw, pad_top, pad_left)
    return dx


def upsample_forward(x, sh, sw):
    """Numba twin of ``reference.upsample_forward``: y (N, H*sh, W*sw, C)."""
    x = np.ascontiguousarray(x)
    n_batch, height, width, channels = x.shape
    y = np.empty((n_batch, height * sh, width * sw, channels), dtype=x.dtype)
    _upsample_forward_kernel(x, y, sh, sw)
    return y


def upsample_backward(dy, sh, sw):
    """Numba twin of ``reference.upsample_backward``: dx (N, H, W, C).

    dy is read where it lies: in a U-Net it is a slice of the next Concatenate's gradient along the
    channels, and NumPy's copy of such a view (16x128x128x32 of 64 channels) took 11 ms of the 14; numba's
    strided version of the kernel sums it in 8.7 ms, its contiguous one a contiguous dy in 3.3."""
    n_batch, out_h, out_w, channels = dy.shape
    dx = np.zeros((n_batch, out_h // sh, out_w // sw, channels), dtype=dy.dtype)
    _upsample_backward_kernel(dy, dx, sh, sw)
    return dx


def relu_backward(dy, y):
    """Numba twin of ``reference.relu_backward``: dx = dy * (y > 0)."""
    dy = np.ascontiguousarray(dy)
    y = np.ascontiguousarray(y)
    dx = np.empty_like(dy)
    _relu_backward_kernel(dy.reshape(-1), y.reshape(-1), dx.reshape(-1))
    return dx


def softmax_forward(x):
    """Numba twin of ``reference.softmax_forward``: softmax over the last axis."""
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    _softmax_kernel(x.reshape(-1, x.shape[-1]), y.reshape(-1, x.shape[-1]))
    return y


def add(a, b):
    """Numba twin of ``reference.add``: a + b, a new array."""
    out = np.empty(a.shape, dtype=a.dtype)
    if out.size == 0:
        return out
    width = a.shape[-1]
    # reshape is a view for a slice along the last axis of a contiguous array, a copy otherwise
    _add_kernel(a.reshape(-1, width), b.reshape(-1, width), out.reshape(-1, width))
    return out


def concatenate(arrays, axis):
    """Numba twin of ``reference.concatenate``. For C-contiguous arrays, concatenating along ``axis`` is, for
    every index of the axes before it, the inputs' blocks of the axes from ``axis`` on, one after another:
    each input is a (rows, its block) matrix copied into its columns of a (rows, sum of blocks) output.
    NumPy copies the 32-channel rows of small_unet's 128 px concatenation 128 bytes at a time on one core:
    20.9 ms against 6.9 ms here on a 2-core Xeon."""
    axis = axis % arrays[0].ndim
    shape = list(arrays[0].shape)
    shape[axis] = sum(array.shape[axis] for array in arrays)
    out = np.empty(shape, dtype=arrays[0].dtype)
    if out.size == 0:
        return out
    rows = int(np.prod(shape[:axis], dtype=np.int64))
    out_matrix, first = out.reshape(rows, -1), 0
    for array in arrays:
        block = np.ascontiguousarray(array).reshape(rows, -1)
        _copy_block(block, out_matrix, first)
        first += block.shape[1]
    return out


def adam_update(param, grad, m, v, step_size, one_minus_beta_1, one_minus_beta_2, epsilon, guard=None):
    """Numba twin of ``reference.adam_update``: the step in one parallel pass, in place, the reference's bits.

    Performance contract: one read of param, grad, m and v and one write of param, m and v per element,
    no temporary (small_unet's 2 M parameters: 19 ms a step by the reference on a 2-core Xeon). The
    scalars are cast to the arrays' dtype first, as NumPy treats a Python float beside a float32 array.
    Arrays that are not C-contiguous take the reference's code."""
    if guard is not None and not math.isfinite(float(guard)):
        return
    if not all(array.flags.c_contiguous for array in (param, grad, m, v)):
        reference.adam_update(param, grad, m, v, step_size, one_minus_beta_1, one_minus_beta_2, epsilon)
        return
    scalar = param.dtype.type
    _adam_kernel(param.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1), scalar(step_size),
                 scalar(one_minus_beta_1), scalar(one_minus_beta_2), scalar(epsilon))
