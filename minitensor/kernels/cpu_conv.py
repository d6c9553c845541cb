"""Direct convolution on the CPU (numba): stride-1 Conv2D without im2col, forward and kernel gradient.

The im2col path (``conv_gemm.py``, and ``reference.conv2d_forward``) copies every KH x KW x C
window into a row of X_col and hands one matrix product to BLAS. At the U-Nets' full-resolution
layers that is a poor deal twice over: X_col is 9x the input, so im2col streams hundreds of
megabytes per call, and with 32 output channels the product is a tall, narrow (N*H*W x 9C) @
(9C x 32), far from the square shapes BLAS runs best. This file computes the same sums straight
from the input, in the order that keeps the CPU's vector units busy:

    y[n, oh, ow, o] = b[o] + sum_{i, j, c} x_pad[n, oh + i, ow + j, c] * W[i, j, c, o]

    dW[i, j, c, o]  = sum_{n, oh, ow} x_pad[n, oh + i, ow + j, c] * dz[n, oh, ow, o]

with x_pad the input in a zero frame (the padding) and its channels rounded up to a multiple
of 4 with zeros (which add nothing). The input gradient needs no kernel of its own: for stride 1
it is this same forward applied to dZ with the kernel flipped (``conv2d_input_grad``;
layers/conv2d.py derives it).

The micro-kernel. Each task owns a block of 4 neighbouring output pixels of one output row.
For every kernel offset (i, j) and every 4 input channels c..c+3 it loads the 16 input values
``x_pad[n, oh + i, q + p + j, c + k]`` (p, k = 0..3) into scalars, then sweeps the output
channels o, where ``W[i, j, c + k, o]`` and ``y[n, oh, q + p, o]`` are contiguous:

    for o in range(OC):                     # LLVM turns this loop into vector code
        y[.., q + p, o] += x_p0 * W[.., c, o] + x_p1 * W[.., c+1, o] + x_p2 * W[.., c+2, o] + x_p3 * W[.., c+3, o]

Per 16 multiply-adds that is 4 loads of W (shared by the 4 pixels) and 4 loads and stores of y,
where a one-pixel, one-channel loop would do 16 of each: the loads and stores, not the
arithmetic, are what limits this loop, and the 4 x 4 block divides them by 4. The trip count
must stay a run-time value: with a constant one LLVM unrolls the loop before vectorising it,
then gives up on the aliasing of y and W and leaves scalar code (docs/benchmarks.md, "Tried
and not kept", has the measurements).

Contract. Memory: the padded copy of the input (scratch memory) and the output, no X_col.
``conv_algorithm("auto")`` never picks this kernel (Winograd, cpu_winograd.py, measured faster
wherever either beats im2col + GEMM: docs/benchmarks.md); it is there for
``conv_algorithm("direct")``, for kernels other than 3x3, and as the plainest fast twin to learn
from. Float sums: each output element is added up in a fixed order, (i, j, c) with c four at a
time, independent of the thread count; the kernel gradient's partial sums are split over a fixed
number of row bands (``partial_bands``), so results repeat run to run, and differ from the GEMM
path's only in the last bits (tests/test_conv_algorithms.py).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from minitensor import backend
from minitensor.kernels.geometry import flip_kernel

# 'contract' lets LLVM fuse a*b + c into one FMA instruction (one rounding instead of two);
# no other fast-math freedom, so the order of every sum is the one written here.
_jit = njit(parallel=True, cache=True, fastmath={"contract"})

#: The kernel gradient is summed in this many row bands at most, one partial dW per band.
MAX_BANDS = 16
#: ... and the partial dWs together take at most this many bytes.
BANDS_BYTES = 64 << 20


def _round_up_to_4(count):
    return (count + 3) // 4 * 4


@_jit
def _pad_kernel(x, out, pad_top, pad_left):
    """out = x in a zero frame: x[n, h, w, c] lands at out[n, h + pad_top, w + pad_left, c].

    Every element of ``out`` is written (zeros outside x, and in channels past x's), so out may
    be reused scratch memory."""
    n_batch, height, width, channels = x.shape
    _, rows, cols, padded_channels = out.shape
    for task in prange(n_batch * rows):
        n, row = divmod(np.int64(task), rows)
        h = row - pad_top
        for col in range(cols):
            w = col - pad_left
            inside = 0 <= h < height and 0 <= w < width
            for c in range(padded_channels):
                out[n, row, col, c] = x[n, h, w, c] if inside and c < channels else 0


def pad_input(x, pad_top, pad_left, rows, cols):
    """x (N, H, W, C) in a zero frame of rows x cols, channels rounded up to a multiple of 4.

    The result is scratch memory (backend.scratch_array): valid until the next scratch request.
    That buffer grows to the largest padded input a model's layers need (84 MiB for unet's
    570 px, 64-channel dx, against im2col's 8 MiB pieces) and is kept for reuse while the
    process runs."""
    n_batch, _, _, channels = x.shape
    out = backend.scratch_array((n_batch, rows, cols, _round_up_to_4(channels)), x.dtype, x)
    _pad_kernel(np.ascontiguousarray(x), out, pad_top, pad_left)
    return out


def pad_kernel_channels(kernel):
    """kernel (KH, KW, C, OC) with zero rows added so that C is a multiple of 4."""
    kernel_h, kernel_w, channels, out_channels = kernel.shape
    padded = _round_up_to_4(channels)
    if padded == channels:
        return np.ascontiguousarray(kernel)
    out = np.zeros((kernel_h, kernel_w, padded, out_channels), dtype=kernel.dtype)
    out[:, :, :channels] = kernel
    return out


@_jit
def _forward_kernel(x_pad, kernel, bias, y, relu):
    """y = relu?(bias + valid stride-1 convolution of x_pad with kernel). One task per 4 pixels.

    x_pad (N, OH + KH - 1, OW + KW - 1, C4), C4 % 4 == 0; kernel (KH, KW, C4, OC); bias (OC,);
    y (N, OH, OW, OC), fully written. Pixels left over when OW is not a multiple of 4 go one at
    a time, with the same order of additions."""
    n_batch, _, _, channels = x_pad.shape
    kernel_h, kernel_w, _, out_channels = kernel.shape
    _, out_h, out_w, _ = y.shape
    blocks = (out_w + 3) // 4
    for task in prange(n_batch * out_h * blocks):
        n, rest = divmod(np.int64(task), out_h * blocks)
        oh, block = divmod(rest, blocks)
        q = block * 4                                  # first output column of this block
        last = min(q + 4, out_w)
        for ow in range(q, last):
            for o in range(out_channels):
                y[n, oh, ow, o] = bias[o]
        for i in range(kernel_h):
            h = oh + i
            for j in range(kernel_w):
                for c in range(0, channels, 4):
                    if last - q == 4:
                        # x{pixel}{channel}: the 16 inputs this block needs at offset (i, j), channels c..c+3
                        x00 = x_pad[n, h, q + j, c]
                        x01 = x_pad[n, h, q + j, c + 1]
                        x02 = x_pad[n, h, q + j, c + 2]
                        x03 = x_pad[n, h, q + j, c + 3]
                        x10 = x_pad[n, h, q + 1 + j, c]
                        x11 = x_pad[n, h, q + 1 + j, c + 1]
                        x12 = x_pad[n, h, q + 1 + j, c + 2]
                        x13 = x_pad[n, h, q + 1 + j, c + 3]
                        x20 = x_pad[n, h, q + 2 + j, c]
                        x21 = x_pad[n, h, q + 2 + j, c + 1]
                        x22 = x_pad[n, h, q + 2 + j, c + 2]
                        x23 = x_pad[n, h, q + 2 + j, c + 3]
                        x30 = x_pad[n, h, q + 3 + j, c]
                        x31 = x_pad[n, h, q + 3 + j, c + 1]
                        x32 = x_pad[n, h, q + 3 + j, c + 2]
                        x33 = x_pad[n, h, q + 3 + j, c + 3]
                        for o in range(out_channels):
                            w0 = kernel[i, j, c, o]
                            w1 = kernel[i, j, c + 1, o]
                            w2 = kernel[i, j, c + 2, o]
                            w3 = kernel[i, j, c + 3, o]
                            y[n, oh, q, o] += x00 * w0 + x01 * w1 + x02 * w2 + x03 * w3
                            y[n, oh, q + 1, o] += x10 * w0 + x11 * w1 + x12 * w2 + x13 * w3
                            y[n, oh, q + 2, o] += x20 * w0 + x21 * w1 + x22 * w2 + x23 * w3
                            y[n, oh, q + 3, o] += x30 * w0 + x31 * w1 + x32 * w2 + x33 * w3
                    else:
                        for ow in range(q, last):
                            x0 = x_pad[n, h, ow + j, c]
                            x1 = x_pad[n, h, ow + j, c + 1]
                            x2 = x_pad[n, h, ow + j, c + 2]
                            x3 = x_pad[n, h, ow + j, c + 3]
                            for o in range(out_channels):
                                y[n, oh, ow, o] += (x0 * kernel[i, j, c, o] + x1 * kernel[i, j, c + 1, o]
                                                    + x2 * kernel[i, j, c + 2, o] + x3 * kernel[i, j, c + 3, o])
        if relu:
            for ow in range(q, last):
                for o in range(out_channels):
                    y[n, oh, ow, o] = max(y[n, oh, ow, o], 0)


@_jit
def _kernel_grad_kernel(x_pad, dz, partial):
    """partial[band] = the band's share of dW: sum over its output rows of x_pad windows * dz.

    x_pad (N, OH + KH - 1, OW + KW - 1, C4); dz (N, OH, OW, OC); partial (bands, KH, KW, C4, OC),
    zeros on entry. Band b owns the output rows [b*R/bands, (b+1)*R/bands) of the R = N*OH rows
    and its own partial: no two tasks write the same memory. Within a band, 4 pixels and 4
    channels at a time, as the forward: the inner loop runs over the contiguous OC."""
    n_batch, _, _, channels = x_pad.shape
    bands, kernel_h, kernel_w, _, out_channels = partial.shape
    _, out_h, out_w, _ = dz.shape
    total_rows = n_batch * out_h
    for band in prange(bands):
        for row in range(band * total_rows // bands, (band + 1) * total_rows // bands):
            n, oh = divmod(np.int64(row), out_h)
            for i in range(kernel_h):
                h = oh + i
                for j in range(kernel_w):
                    for c in range(0, channels, 4):
                        q = 0
                        while q + 4 <= out_w:
                            x00 = x_pad[n, h, q + j, c]
                            x01 = x_pad[n, h, q + j, c + 1]
                            x02 = x_pad[n, h, q + j, c + 2]
                            x03 = x_pad[n, h, q + j, c + 3]
                            x10 = x_pad[n, h, q + 1 + j, c]
                            x11 = x_pad[n, h, q + 1 + j, c + 1]
                            x12 = x_pad[n, h, q + 1 + j, c + 2]
                            x13 = x_pad[n, h, q + 1 + j, c + 3]
                            x20 = x_pad[n, h, q + 2 + j, c]
                            x21 = x_pad[n, h, q + 2 + j, c + 1]
                            x22 = x_pad[n, h, q + 2 + j, c + 2]
                            x23 = x_pad[n, h, q + 2 + j, c + 3]
                            x30 = x_pad[n, h, q + 3 + j, c]
                            x31 = x_pad[n, h, q + 3 + j, c + 1]
                            x32 = x_pad[n, h, q + 3 + j, c + 2]
                            x33 = x_pad[n, h, q + 3 + j, c + 3]
                            for o in range(out_channels):
                                d0 = dz[n, oh, q, o]
                                d1 = dz[n, oh, q + 1, o]
                                d2 = dz[n, oh, q + 2, o]
                                d3 = dz[n, oh, q + 3, o]
                                partial[band, i, j, c, o] += x00 * d0 + x10 * d1 + x20 * d2 + x30 * d3
                                partial[band, i, j, c + 1, o] += x01 * d0 + x11 * d1 + x21 * d2 + x31 * d3
                                partial[band, i, j, c + 2, o] += x02 * d0 + x12 * d1 + x22 * d2 + x32 * d3
                                partial[band, i, j, c + 3, o] += x03 * d0 + x13 * d1 + x23 * d2 + x33 * d3
                            q += 4
                        for ow in range(q, out_w):
                            x0 = x_pad[n, h, ow + j, c]
                            x1 = x_pad[n, h, ow + j, c + 1]
                            x2 = x_pad[n, h, ow + j, c + 2]
                            x3 = x_pad[n, h, ow + j, c + 3]
                            for o in range(out_channels):
                                d = dz[n, oh, ow, o]
                                partial[band, i, j, c, o] += x0 * d
                                partial[band, i, j, c + 1, o] += x1 * d
                                partial[band, i, j, c + 2, o] += x2 * d
                                partial[band, i, j, c + 3, o] += x3 * d


def partial_bands(rows, partial_bytes):
    """How many row bands a kernel gradient is split into, one partial sum of ``partial_bytes``
    each: a function of the shape only (never of the thread count), so dW's float sums come out
    the same on every machine."""
    return int(max(1, min(MAX_BANDS, rows, BANDS_BYTES // partial_bytes)))


def conv2d_forward(x, kernel, bias, geometry, relu=False):
    """Numba twin of ``reference.conv2d_forward`` for stride 1: y (N, out_h, out_w, OC)."""
    n_batch = x.shape[0]
    kernel_h, kernel_w, _, out_channels = kernel.shape
    out_h, out_w = geometry.out_h, geometry.out_w
    kernel = pad_kernel_channels(kernel)
    if bias is None:
        bias = np.zeros(out_channels, dtype=x.dtype)
    x_pad = pad_input(x, geometry.pad_top, geometry.pad_left, out_h + kernel_h - 1, out_w + kernel_w - 1)
    y = np.empty((n_batch, out_h, out_w, out_channels), dtype=x.dtype)
    _forward_kernel(x_pad, kernel, np.ascontiguousarray(bias), y, bool(relu))
    return y


def conv2d_input_grad(dz, kernel, x_shape, geometry):
    """dx of a stride-1 convolution: this file's forward on dZ with the flipped kernel."""
    return conv2d_forward(dz, flip_kernel(kernel, np), None, geometry.flipped(x_shape[1], x_shape[2]))


def conv2d_kernel_grad(x, dz, geometry):
    """Numba twin of ``reference.conv2d_kernel_grad`` for stride 1: dW (KH, KW, C, OC)."""
    n_batch, _, _, channels = x.shape
    kernel_h, kernel_w = geometry.kernel_size
    _, out_h, out_w, out_channels = dz.shape
    x_pad = pad_input(x, geometry.pad_top, geometry.pad_left, out_h + kernel_h - 1, out_w + kernel_w - 1)
    bands = partial_bands(n_batch * out_h, kernel_h * kernel_w * x_pad.shape[3] * out_channels * x.dtype.itemsize)
    partial = np.zeros((bands, kernel_h, kernel_w, x_pad.shape[3], out_channels), dtype=x.dtype)
    _kernel_grad_kernel(x_pad, np.ascontiguousarray(dz), partial)
    return np.ascontiguousarray(partial.sum(axis=0)[:, :, :channels])
