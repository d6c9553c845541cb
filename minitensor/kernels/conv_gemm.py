"""The convolution as im2col + GEMM, the way the engine runs it: in cache-sized pieces on the CPU, whole on the GPU.

The same three products as ``reference.conv2d_forward`` / ``conv2d_input_grad`` / ``conv2d_kernel_grad``
(layers/conv2d.py derives them), with the im2col of ``cpu.py`` (numba) or ``gpu.py`` (CUDA) and the
matrix products of BLAS or cuBLAS:

    Z = X_col @ W_col (+ b, ReLU)        dW_col = X_col^T @ dZ
    dx: stride 1, the forward's own code on dZ with the flipped kernel (geometry.ConvGeometry.flipped);
        other strides, col2im(dZ @ W_col^T); a 1x1 stride-1 kernel needs no im2col at all.

Pieces. X_col is KH*KW (9x) larger than x. On the CPU it is never built whole: ``column_pieces``
builds it a band of output rows at a time, in the same small reused scratch memory
(backend.scratch_array), so each piece is still in the cache when the matrix product reads it;
the forward writes its product band by band into the output, and dW is the sum of the bands'
X_col^T @ dZ (the rows of X_col are independent, so only the order of dW's float sums changes).
On the GPU it is built whole, in one launch, and multiplied with ``@``.
"""
from __future__ import annotations

import numpy as np

from minitensor import backend
from minitensor.kernels import cpu, gpu
from minitensor.kernels.geometry import flip_kernel

#: On the CPU, X_col is built this many bytes at a time, so that it is still in the cache when the
#: matrix product reads it (a few MiB: well inside a server's L3 cache, docs/benchmarks.md).
CPU_PIECE_BYTES = 8 << 20


def _device_kernels(xp):
    """The im2col / col2im twins for this array module: numba for NumPy, CUDA for CuPy."""
    return cpu if xp is np else gpu


def _pieces(xp, n_images, out_h, row_bytes):
    """(first image, end image, first row, end row) of each piece of the output."""
    if xp is not np:
        return [(0, n_images, 0, out_h)]       # the GPU is fastest with one large launch per layer
    rows = max(1, CPU_PIECE_BYTES // row_bytes)
    if rows >= out_h:                          # whole images fit: take several at once
        images = rows // out_h
        return [(n, min(n + images, n_images), 0, out_h) for n in range(0, n_images, images)]
    return [(n, n + 1, row, min(row + rows, out_h)) for n in range(n_images) for row in range(0, out_h, rows)]


def column_pieces(x, geometry):
    """Yield ``(images, rows, X_col piece)``: X_col in pieces, one band of output rows at a time.

    Each piece is im2col of just the input rows that band of output rows reads, built in the
    same reused scratch memory; ``output[images, rows]``-shaped slices of the output belong to it.
    """
    xp = backend.get_array_module(x)
    im2col = _device_kernels(xp).im2col
    n_images, height, _, channels = x.shape
    kernel_h, kernel_w, stride_h, stride_w, pad_top, pad_left, out_h, out_w = geometry.window
    columns = kernel_h * kernel_w * channels
    for first, last, row_a, row_b in _pieces(xp, n_images, out_h, out_w * columns * x.dtype.itemsize):
        top = row_a * stride_h - pad_top                     # first input row read (may be padding)
        start, stop = max(top, 0), min(height, (row_b - 1) * stride_h - pad_top + kernel_h)
        scratch = backend.scratch_array(((last - first) * (row_b - row_a) * out_w, columns), x.dtype, x)
        cols = im2col(x[first:last, start:stop], kernel_h, kernel_w, stride_h, stride_w, start - top, pad_left,
                      row_b - row_a, out_w, out=scratch)
        yield slice(first, last), slice(row_a, row_b), cols


def convolve_as_gemm(x, geometry, matrix):
    """im2col(x) @ matrix, piece by piece: (N, out_h, out_w, matrix.shape[1]).

    On the GPU there is one piece, and ``@`` writes a new result: CuPy sends ``matmul(out=)``
    through its slower general path, ``@`` straight to cuBLAS.
    """
    xp = backend.get_array_module(x, matrix)
    out_h, out_w = geometry.out_h, geometry.out_w
    if xp is not np:
        ((_, _, cols),) = column_pieces(x, geometry)
        return (cols @ matrix).reshape(x.shape[0], out_h, out_w, matrix.shape[1])
    out = xp.empty((x.shape[0], out_h, out_w, matrix.shape[1]), dtype=x.dtype)
    for images, rows, cols in column_pieces(x, geometry):
        xp.matmul(cols, matrix, out=out[images, rows].reshape(-1, matrix.shape[1]))
    return out


def conv2d_forward(x, kernel, bias, geometry, relu=False):
    """relu?(im2col(x) @ W_col + b): y (N, out_h, out_w, OC), any stride."""
    xp = backend.get_array_module(x, kernel)
    out_channels = kernel.shape[3]
    kernel_matrix = kernel.reshape(-1, out_channels)                  # W_col, a free reshape of HWIO
    if geometry.pointwise:
        z = (x.reshape(-1, x.shape[-1]) @ kernel_matrix).reshape(x.shape[0], geometry.out_h, geometry.out_w,
                                                                 out_channels)
    else:
        z = convolve_as_gemm(x, geometry, kernel_matrix)
    if bias is not None:
        z += bias
    if relu:
        z = xp.maximum(z, 0, out=z)                                   # z is ours: no second array
    return z


def conv2d_kernel_grad(x, dz, geometry):
    """dW = X_col^T @ dZ, summed over the pieces of X_col: (KH, KW, C, OC)."""
    out_channels = dz.shape[3]
    shape = (geometry.kernel_h, geometry.kernel_w, x.shape[3], out_channels)
    if geometry.pointwise:
        return (x.reshape(-1, x.shape[-1]).T @ dz.reshape(-1, out_channels)).reshape(shape)
    grad = None
    for images, rows, cols in column_pieces(x, geometry):
        piece = cols.T @ dz[images, rows].reshape(-1, out_channels)
        if grad is None:
            grad = piece
        else:
            grad += piece
    return grad.reshape(shape)


def conv2d_input_grad(dz, kernel, x_shape, geometry):
    """dx (x_shape): dZ @ W_col^T for 1x1, im2col(dZ) @ W_flip for stride 1, col2im(dZ @ W_col^T) otherwise."""
    xp = backend.get_array_module(dz, kernel)
    out_channels = kernel.shape[3]
    dz_matrix = dz.reshape(-1, out_channels)
    if geometry.pointwise:
        return (dz_matrix @ kernel.reshape(-1, out_channels).T).reshape(x_shape)
    if geometry.unit_stride:
        flipped = flip_kernel(kernel, xp).reshape(-1, x_shape[3])
        return convolve_as_gemm(dz, geometry.flipped(x_shape[1], x_shape[2]), flipped)
    dcols = dz_matrix @ kernel.reshape(-1, out_channels).T            # dX_col = dZ @ W_col^T
    return _device_kernels(xp).col2im(dcols, tuple(x_shape), *geometry.window)
