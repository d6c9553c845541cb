"""Reference kernels: plain array code that is obviously correct, to read and to test against.

Convolution and pooling both look at small windows of the input. This module shows the
one trick behind fast convolution, *im2col*, in its simplest form, and the convolution built on it
(forward and both gradients, any stride, in three matrix products). The fast twins, ``cpu.py``
(numba), ``gpu.py`` (CUDA) and the convolutions of ``conv_gemm.py``, ``cpu_winograd.py`` and
``cpu_conv.py``, compute the same numbers faster and are tested against this file: copies and
the max-pool's choices exactly, sums to rounding (their order of additions differs; each test
states its tolerance). The op table (kernels/table.py) says which twin exists for each op.

Layout (Keras): data is NHWC, (batch, height, width, channels); conv kernels are HWIO,
(KH, KW, C, OC). A window of a KH x KW kernel with strides (SH, SW) and zero padding
``pad_top`` / ``pad_left`` at output position (oh, ow) covers input rows
``oh*SH - pad_top + i`` for i in 0..KH-1 and columns ``ow*SW - pad_left + j`` for j in 0..KW-1.
Padding at the bottom and right is implied by ``out_h`` / ``out_w``: whatever the last
window needs beyond the input is zero (for pooling: ignored).

The loops here run over the KH*KW kernel offsets (i, j), never over pixels: for a fixed
offset, the input pixels read by all output positions form one strided slice, so each
offset is a single array operation. Every function takes NumPy or CuPy arrays alike.

Argument names follow the rest of minitensor: kh, kw kernel (or pool) size, sh, sw
strides, pad_top, pad_left padding before the input, out_h, out_w output size.
"""
from __future__ import annotations

import math

from minitensor.backend import get_array_module


def _window_extent(out_size: int, kernel_size: int, stride: int) -> int:
    """How many (padded) input rows the windows of ``out_size`` outputs span together."""
    return (out_size - 1) * stride + kernel_size


def _offset_slice(offset: int, stride: int, out_size: int) -> slice:
    """The padded input rows that kernel row ``offset`` reads, one per output row.

    Output row o reads padded row ``o*stride + offset``, so over o = 0..out_size-1 that is
    the slice ``offset, offset + stride, ...``: one strided view instead of a loop over o.
    """
    return slice(offset, offset + (out_size - 1) * stride + 1, stride)


def _padded_shape(x_shape, pad_top, pad_left, rows, cols):
    """Shape of a buffer that holds x at (pad_top, pad_left) and windows spanning rows x cols.

    When a stride skips the last input rows (``pad_top + H > rows``) the buffer keeps them;
    they are simply never read.
    """
    n_batch, height, width, channels = x_shape
    return (n_batch, max(pad_top + height, rows), max(pad_left + width, cols), channels)


def _pad(x, pad_top, pad_left, rows, cols, fill):
    """x surrounded by ``fill`` so that every window lies inside the result."""
    _, height, width, _ = x.shape
    xp = get_array_module(x)
    padded = xp.full(_padded_shape(x.shape, pad_top, pad_left, rows, cols), fill, dtype=x.dtype)
    padded[:, pad_top:pad_top + height, pad_left:pad_left + width, :] = x
    return padded


def _crop(padded, x_shape, pad_top, pad_left):
    """The part of a padded array where x lives, as a C-contiguous array."""
    _, height, width, _ = x_shape
    xp = get_array_module(padded)
    return xp.ascontiguousarray(padded[:, pad_top:pad_top + height, pad_left:pad_left + width, :])


def im2col(x, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w, out=None):
    """Copy every kh x kw window of x into one row of a matrix, so convolution becomes one GEMM.

    x: (N, H, W, C). Returns cols: (N*out_h*out_w, kh*kw*C) where

    - row ``r = (n*out_h + oh)*out_w + ow`` is the window of output pixel (n, oh, ow): rows are
      in NHWC order of the *output*, so ``cols @ w_mat`` of shape (N*out_h*out_w, OC) is already
      the output y (N, out_h, out_w, OC) after a free reshape;
    - column ``q = (i*kw + j)*C + c`` is kernel offset (i, j), channel c: the same row-major
      (i, j, c) order as an HWIO kernel (KH, KW, C, OC) flattened to ``w_mat`` (KH*KW*C, OC).
      So the columns of cols meet the rows of ``w_mat`` one to one and the product needs no
      transpose of either operand: ``y = (cols @ w.reshape(-1, OC)).reshape(N, OH, OW, OC)``.

    cols[r, q] = x[n, oh*sh + i - pad_top, ow*sw + j - pad_left, c], or 0 outside x.

    Cost: each input pixel is copied about kh*kw/(sh*sw) times; that memory is the price of
    turning a convolution into a matrix product, which BLAS/cuBLAS compute near peak speed.
    """
    n_batch, _, _, channels = x.shape
    xp = get_array_module(x)
    x_pad = _pad(x, pad_top, pad_left, _window_extent(out_h, kh, sh), _window_extent(out_w, kw, sw), fill=0)
    # Axes (n, oh, ow, i, j, c): flattening the first three gives r, the last three gives q.
    cols = xp.empty((n_batch, out_h, out_w, kh, kw, channels), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, :, i, j, :] = x_pad[:, _offset_slice(i, sh, out_h), _offset_slice(j, sw, out_w), :]
    cols = cols.reshape(n_batch * out_h * out_w, kh * kw * channels)
    if out is not None:   # the fast twins write straight into reused memory; here a copy keeps it plain
        out[...] = cols
        return out
    return cols


def col2im(cols, x_shape, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w):
    """The adjoint of im2col: add every entry of cols back onto the input pixel it came from.

    im2col is linear, x -> A x, and copies some pixels into several rows (windows overlap
    when the stride is smaller than the kernel). Its adjoint (transpose) A^T therefore *adds*
    every copy back: dx[n, h, w, c] = sum of cols[r, q] over all (r, q) that im2col filled from
    (n, h, w, c). That is exactly the chain rule for a value used several times (gradients add),
    so conv backward is ``dx = col2im(dy_mat @ w_mat.T)``. The defining identity, tested, is
    ``<im2col(x), cols> == <x, col2im(cols)>``. Entries that im2col took from the zero padding
    have no source pixel and are dropped.

    cols: (N*out_h*out_w, kh*kw*C) laid out as in im2col. Returns dx with shape x_shape.
    """
    n_batch, _, _, channels = x_shape
    xp = get_array_module(cols)
    dx_pad = xp.zeros(_padded_shape(x_shape, pad_top, pad_left, _window_extent(out_h, kh, sh),
                                    _window_extent(out_w, kw, sw)), dtype=cols.dtype)
    windows = cols.reshape(n_batch, out_h, out_w, kh, kw, channels)
    for i in range(kh):
        for j in range(kw):
            # One offset never hits a pixel twice (the slice has distinct rows and columns),
            # so this += is safe; different offsets hitting the same pixel add up in turn.
            dx_pad[:, _offset_slice(i, sh, out_h), _offset_slice(j, sw, out_w), :] += windows[:, :, :, i, j, :]
    return _crop(dx_pad, x_shape, pad_top, pad_left)


def conv2d_forward(x, kernel, bias, geometry, relu=False):
    """The convolution as one matrix product, any stride and padding: relu?(im2col(x) @ W_col + b).

    x (N, H, W, C); kernel (KH, KW, C, OC) "HWIO"; bias (OC,) or None; geometry a
    ``ConvGeometry``. Returns y (N, OH, OW, OC), y[n, oh, ow, o] = b[o] + sum_{i,j,c}
    x[n, oh*SH + i - PT, ow*SW + j - PL, c] * kernel[i, j, c, o] (x = 0 outside the image),
    then max(., 0) if ``relu``. HWIO flattened is W_col (KH*KW*C, OC), rows in im2col's column
    order: no transpose of either operand.
    """
    out_channels = kernel.shape[3]
    cols = im2col(x, *geometry.window)                                 # X_col (N*OH*OW, KH*KW*C)
    z = cols @ kernel.reshape(-1, out_channels)                        # Z = X_col @ W_col
    if bias is not None:
        z += bias
    if relu:
        z = get_array_module(z).maximum(z, 0, out=z)
    return z.reshape(x.shape[0], geometry.out_h, geometry.out_w, out_channels)


def conv2d_kernel_grad(x, dz, geometry):
    """dW = im2col(x)^T @ dZ, shaped like the kernel (KH, KW, C, OC).

    dz (N, OH, OW, OC) is the gradient at the pre-activation output Z; dW[i, j, c, o] = sum_{n,oh,ow}
    x[n, oh*SH + i - PT, ow*SW + j - PL, c] * dz[n, oh, ow, o] (layers/conv2d.py derives it).
    """
    out_channels = dz.shape[3]
    cols = im2col(x, *geometry.window)
    return (cols.T @ dz.reshape(-1, out_channels)).reshape(geometry.kernel_h, geometry.kernel_w, x.shape[3],
                                                          out_channels)


def conv2d_input_grad(dz, kernel, x_shape, geometry):
    """dx = col2im(dZ @ W_col^T), shape x_shape: every window's gradient added back onto the pixels
    it was copied from (col2im is im2col's adjoint; layers/conv2d.py derives it)."""
    out_channels = kernel.shape[3]
    dcols = dz.reshape(-1, out_channels) @ kernel.reshape(-1, out_channels).T   # dX_col = dZ @ W_col^T
    return col2im(dcols, tuple(x_shape), *geometry.window)


def maxpool_forward(x, ph, pw, sh, sw, pad_top, pad_left, out_h, out_w):
    """Max over each ph x pw window of x, and where in the window that maximum is.

    x: (N, H, W, C). Returns (y, argmax), both (N, out_h, out_w, C); argmax is int32 and holds
    the window offset ``i*pw + j`` of the maximum, so the backward pass needs no search.

    Window cells outside x (padding) are ignored: the padding is -inf, which never wins.

    Ties: the *first* maximum in row-major window order wins (smallest i*pw + j), because a
    later cell replaces the running maximum only if it is strictly greater. The gradient of a
    tied window then goes entirely to that one cell, as TensorFlow does; splitting it between
    the tied cells would be just as valid a subgradient, but would not match Keras.
    """
    xp = get_array_module(x)
    x_pad = _pad(x, pad_top, pad_left, _window_extent(out_h, ph, sh), _window_extent(out_w, pw, sw),
                 fill=float("-inf"))
    n_batch, _, _, channels = x.shape
    y = xp.full((n_batch, out_h, out_w, channels), float("-inf"), dtype=x.dtype)
    argmax = xp.zeros((n_batch, out_h, out_w, channels), dtype=xp.int32)
    for i in range(ph):          # row-major window order: this is what makes ties go to the first
        for j in range(pw):
            cell = x_pad[:, _offset_slice(i, sh, out_h), _offset_slice(j, sw, out_w), :]
            better = cell > y    # strictly greater: an equal later cell does not take over
            y[better] = cell[better]
            argmax[better] = i * pw + j
    return y, argmax


def maxpool_backward(dy, argmax, x_shape, ph, pw, sh, sw, pad_top, pad_left):
    """Route each window's gradient to the cell that was its maximum.

    y = max of a window depends on the winning cell only (with slope 1), so dy of the window
    goes to that cell and nothing to the others. When windows overlap (stride < pool size) one
    input cell can win several windows: its gradients add, as for any value used twice.

    dy, argmax: (N, out_h, out_w, C) from maxpool_forward. Returns dx with shape x_shape.
    """
    _, out_h, out_w, _ = dy.shape
    xp = get_array_module(dy)
    dx_pad = xp.zeros(_padded_shape(x_shape, pad_top, pad_left, _window_extent(out_h, ph, sh),
                                    _window_extent(out_w, pw, sw)), dtype=dy.dtype)
    zero = xp.zeros((), dtype=dy.dtype)
    for i in range(ph):
        for j in range(pw):
            routed = xp.where(argmax == i * pw + j, dy, zero)
            dx_pad[:, _offset_slice(i, sh, out_h), _offset_slice(j, sw, out_w), :] += routed
    return _crop(dx_pad, x_shape, pad_top, pad_left)


def upsample_forward(x, sh, sw):
    """Nearest-neighbour upsampling: repeat each pixel sh times down and sw times across.

    x: (N, H, W, C). Returns y: (N, H*sh, W*sw, C) with y[n, h, w, c] = x[n, h//sh, w//sw, c].
    For offset (i, j) inside a block, the rows i, i+sh, ... of y are a full copy of x.
    """
    n_batch, height, width, channels = x.shape
    xp = get_array_module(x)
    y = xp.empty((n_batch, height * sh, width * sw, channels), dtype=x.dtype)
    for i in range(sh):
        for j in range(sw):
            y[:, i::sh, j::sw, :] = x
    return y


def upsample_backward(dy, sh, sw):
    """The adjoint of upsample_forward: each x pixel was copied into an sh x sw block, so its
    gradient is the sum of dy over that block.

    dy: (N, H*sh, W*sw, C). Returns dx: (N, H, W, C).
    """
    n_batch, out_h, out_w, channels = dy.shape
    xp = get_array_module(dy)
    dx = xp.zeros((n_batch, out_h // sh, out_w // sw, channels), dtype=dy.dtype)
    for i in range(sh):
        for j in range(sw):
            dx += dy[:, i::sh, j::sw, :]
    return dx


def concatenate(arrays, axis):
    """The arrays side by side along ``axis`` (Concatenate's forward; its backward is slices of dy, no op).

    arrays: a list of (..., C_i, ...) arrays that agree on every other axis. Returns (..., sum C_i, ...).
    """
    return get_array_module(*arrays).concatenate(arrays, axis=axis)


def softmax_forward(x):
    """Softmax over the last axis: exp(x - max) / sum(exp(x - max)) (activations.py derives its
    backward). Subtracting the max changes nothing mathematically and keeps exp from overflowing."""
    xp = get_array_module(x)
    shifted = x - x.max(axis=-1, keepdims=True)
    e = xp.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def elementwise(function):
    """Mark an op as elementwise: every array argument has one shape and one float dtype (scalars may
    follow). The op table (kernels/table.py) lists the marked ops in ``ELEMENTWISE`` and gives each its row
    unless it writes one by hand, and kernels/__init__.py writes the public ``kernels.<op>`` with those
    checks: a new elementwise op is its kernels and this mark, and no line of the table or the dispatcher."""
    function.elementwise = True
    return function


@elementwise
def relu_backward(dy, y):
    """dx = dy where the ReLU's output y was positive, else 0: ``dy * (y > 0)`` (activations.py
    derives it). dy and y share shape, dtype and device."""
    return dy * (y > 0)


@elementwise
def add(a, b):
    """a + b: the two shares of the gradient of a tensor read twice (an encoder map that also feeds a skip
    connection; Model.backward adds them). A share may be a view into another array (a slice of
    Concatenate's dy): the sum is a new array, never written into either."""
    return a + b


def adam_update(param, grad, m, v, step_size, one_minus_beta_1, one_minus_beta_2, epsilon, guard=None):
    """One Adam step of one parameter, in place, in Keras's rounding order (see optimizers.Adam)::

        m     += (grad - m) * (1 - beta_1)
        v     += (grad * grad - v) * (1 - beta_2)
        param -= (m * step_size) / (sqrt(v) + epsilon)

    The four arrays share shape, dtype and device; the scalars are of their dtype. Two
    temporaries the size of the parameter, since this order needs the numerator and the
    denominator at once; everything else is updated in place. Nothing changes where the
    scalar ``guard`` (if given) is NaN or infinite (reading it waits for a GPU: the CUDA twin
    checks it on the device).
    """
    if guard is not None and not math.isfinite(float(guard)):
        return
    xp = get_array_module(param, grad, m, v)
    scratch = xp.subtract(grad, m)
    scratch *= one_minus_beta_1
    m += scratch
    xp.square(grad, out=scratch)
    scratch -= v
    scratch *= one_minus_beta_2
    v += scratch
    step = xp.multiply(m, step_size, out=scratch)
    denominator = xp.sqrt(v)
    denominator += epsilon
    step /= denominator
    param -= step
