"""Winograd F(2x2, 3x3) on the CPU (numba): 3x3 stride-1 Conv2D with 2.25x fewer multiplications.

Why it pays. A 3x3 convolution spends 9 multiply-adds per input channel on every output
pixel. Winograd's minimal filtering algorithm (Lavin & Gray, "Fast Algorithms for Convolutional
Neural Networks", 2016) computes a 2x2 block of outputs from a 4x4 block of inputs with 16
multiplications instead of 36, by first mixing the inputs and the kernel with a few additions.
In one dimension, F(2, 3) gives two outputs of a 3-tap correlation from four inputs d0..d3:

    y0 = d0*g0 + d1*g1 + d2*g2 = m1 + m2 + m3        m1 = (d0 - d2) * g0
    y1 = d1*g0 + d2*g1 + d3*g2 = m2 - m3 - m4        m2 = (d1 + d2) * (g0 + g1 + g2) / 2
                                                      m3 = (d2 - d1) * (g0 - g1 + g2) / 2
                                                      m4 = (d1 - d3) * g2

(expand m2 + m3 = d1*g1 + d2*(g0 + g2) to check). As matrices, y = A^T [(G g) * (B^T d)] with

    B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]      input transform
    G   = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]         kernel transform
    A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]                                    output transform

and nesting it in both directions gives F(2x2, 3x3) for one 4x4 input tile d and one 3x3 kernel g:

    Y (2x2) = A^T [ U * V ] A,   U = G g G^T (4x4),   V = B^T d B (4x4),   * elementwise.

For a layer, sum over the C input channels before the output transform (it is linear):

    M[e, tile, o] = sum_c V[e, tile, c] * U[e, c, o]        for each of the 16 positions e

so the multiplications become 16 small matrix products (tiles x C) @ (C x OC), the heavy part,
and the transforms are additions over channels (vectorised over the contiguous C or OC).
Neighbouring tiles overlap by 2 pixels: tile (th, tw) reads input rows 2*th .. 2*th + 3 of the
zero-padded input and writes output rows 2*th, 2*th + 1.

Backward. The input gradient of a stride-1 convolution is a convolution of dZ with the flipped
kernel (conv2d.py derives it), so it runs through the same forward kernel. The kernel gradient
follows from the tile formula by the chain rule: Y = A^T M A gives dM = A dY A^T per tile, then
M = sum_c U_c * V_c gives dU[e, c, o] = sum over tiles of V[e, tile, c] * dM[e, tile, o], and
U = G g G^T gives dg = G^T dU G:

    dW[i, j, c, o] = sum_{a, b} G[a, i] * dU[(a, b), c, o] * G[b, j]

Again 16 products (C x tiles) @ (tiles x OC) instead of 9 at 4x the pixel count.

Numerics: the transforms add and subtract neighbouring values (and halve), so float32 results
differ from the direct sum by a few units in the last place more than the GEMM path does;
tests/test_conv_algorithms.py bounds the difference (relative to the largest output: 2e-6 in
float32, 1e-13 in float64).

Contract. Memory: the padded input (scratch memory), the output, the transformed kernel
(16 x C x OC, 1.8x the kernel) and per task two buffers of a few KiB; no 9x im2col matrix, no
4x transformed image. Tasks are independent rows of output tiles (``prange``), every output
element is written by one task, and the kernel gradient's partial sums are split over row bands
fixed by the shape (not the thread count): results repeat bit for bit. Its speed against
im2col + GEMM, layer shape by layer shape, is in docs/benchmarks.md ("Choosing the algorithm"),
and kernels/conv_policy.py gives it the products where it measured faster.

Vectorisation, which decides the speed: every inner loop runs over contiguous channels (c in
the input transform, o in the products and the output transform) with a run-time trip count,
inside the ``prange`` body, where numba tells LLVM that the arrays do not alias.
``_input_tiles`` is inlined there (``inline="always"``): compiled on its own, LLVM could not
prove its buffers apart and left it scalar (docs/benchmarks.md, "Tried and not kept"). The output tiles are
written whole, with no bounds tests in the loop, for the same reason.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .cpu_conv import pad_input, partial_bands
from .geometry import flip_kernel

_jit = njit(parallel=True, cache=True, fastmath={"contract"})

#: Output tiles (2x2 pixels each) per task: 4 tiles x 4 input channels per step of the products.
TILES_PER_TASK = 4

_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def transform_kernel(kernel, channels):
    """U = G g G^T for every (c, o): kernel (3, 3, C, OC) -> (16, channels, OC), zero rows past C.

    Two tensordots (BLAS), not one three-operand einsum, which runs as a slow single loop:
    ``u[a, b] = sum_i G[a, i] sum_j g[i, j] G[b, j]``."""
    _, _, in_channels, out_channels = kernel.shape
    g = np.array(_G, dtype=kernel.dtype)
    u = np.zeros((4, 4, channels, out_channels), dtype=kernel.dtype)
    rows = np.tensordot(g, kernel, (1, 0))                                # (a, j, c, o) = G g
    u[:, :, :in_channels] = np.tensordot(g, rows, (1, 1)).transpose(1, 0, 2, 3)   # (G g) G^T
    return u.reshape(16, channels, out_channels)


def untransform_kernel_grad(grad_u, in_channels):
    """dW = G^T dU G for every (c, o): (16, C4, OC) -> (3, 3, in_channels, OC)."""
    g = np.array(_G, dtype=grad_u.dtype)
    grad_u = grad_u.reshape(4, 4, *grad_u.shape[1:])
    rows = np.tensordot(g, grad_u, (0, 0))                                # (i, b, c, o) = G^T dU
    grad = np.tensordot(g, rows, (0, 1)).transpose(1, 0, 2, 3)            # (G^T dU) G
    return np.ascontiguousarray(grad[:, :, :in_channels])


@njit(cache=True, fastmath={"contract"}, inline="always")
def _input_tiles(x_pad, n, row, first, count, v):
    """v[e, t, c] = (B^T d B)[e] for the 4x4 input tiles d at rows row..row+3, columns
    2*(first + t)..+3 of image n, t < count. Vectorised over the contiguous channels c."""
    channels = x_pad.shape[3]
    for t in range(count):
        col = 2 * (first + t)
        for c in range(channels):
            # B^T d: combine the four rows (rows 0-2, 1+2, 2-1, 1-3), one value per column
            a0 = x_pad[n, row, col, c] - x_pad[n, row + 2, col, c]
            a1 = x_pad[n, row, col + 1, c] - x_pad[n, row + 2, col + 1, c]
            a2 = x_pad[n, row, col + 2, c] - x_pad[n, row + 2, col + 2, c]
            a3 = x_pad[n, row, col + 3, c] - x_pad[n, row + 2, col + 3, c]
            b0 = x_pad[n, row + 1, col, c] + x_pad[n, row + 2, col, c]
            b1 = x_pad[n, row + 1, col + 1, c] + x_pad[n, row + 2, col + 1, c]
            b2 = x_pad[n, row + 1, col + 2, c] + x_pad[n, row + 2, col + 2, c]
            b3 = x_pad[n, row + 1, col + 3, c] + x_pad[n, row + 2, col + 3, c]
            e0 = x_pad[n, row + 2, col, c] - x_pad[n, row + 1, col, c]
            e1 = x_pad[n, row + 2, col + 1, c] - x_pad[n, row + 1, col + 1, c]
            e2 = x_pad[n, row + 2, col + 2, c] - x_pad[n, row + 1, col + 2, c]
            e3 = x_pad[n, row + 2, col + 3, c] - x_pad[n, row + 1, col + 3, c]
            f0 = x_pad[n, row + 1, col, c] - x_pad[n, row + 3, col, c]
            f1 = x_pad[n, row + 1, col + 1, c] - x_pad[n, row + 3, col + 1, c]
            f2 = x_pad[n, row + 1, col + 2, c] - x_pad[n, row + 3, col + 2, c]
            f3 = x_pad[n, row + 1, col + 3, c] - x_pad[n, row + 3, col + 3, c]
            # (B^T d) B: the same combination of the four columns of each row
            v[0, t, c] = a0 - a2
            v[1, t, c] = a1 + a2
            v[2, t, c] = a2 - a1
            v[3, t, c] = a1 - a3
            v[4, t, c] = b0 - b2
            v[5, t, c] = b1 + b2
            v[6, t, c] = b2 - b1
            v[7, t, c] = b1 - b3
            v[8, t, c] = e0 - e2
            v[9, t, c] = e1 + e2
            v[10, t, c] = e2 - e1
            v[11, t, c] = e1 - e3
            v[12, t, c] = f0 - f2
            v[13, t, c] = f1 + f2
            v[14, t, c] = f2 - f1
            v[15, t, c] = f1 - f3


@_jit
def _forward_kernel(x_pad, u, bias, y, relu):
    """y = relu?(bias + 3x3 stride-1 convolution), one row of output tiles per task.

    x_pad (N, 2*tiles_h + 2, 2*tiles_w + 2, C4), C4 % 4 == 0; u (16, C4, OC) the transformed
    kernel; bias (OC,); y (N, 2*tiles_h, 2*tiles_w, OC), whole tiles: every element written once
    (conv2d_forward crops the extra row or column of an odd OH or OW)."""
    n_batch, _, _, channels = x_pad.shape
    out_channels = u.shape[2]
    _, out_h, out_w, _ = y.shape
    tiles_h, tiles_w = (out_h + 1) // 2, (out_w + 1) // 2
    for task in prange(n_batch * tiles_h):
        n, tile_row = divmod(np.int64(task), tiles_h)
        # One task per row of tiles, its blocks in turn: the two buffers are allocated once per row.
        v = np.zeros((16, TILES_PER_TASK, channels), dtype=x_pad.dtype)
        m = np.empty((16, TILES_PER_TASK, out_channels), dtype=x_pad.dtype)
        for first in range(0, tiles_w, TILES_PER_TASK):
            count = min(TILES_PER_TASK, tiles_w - first)
            if count < TILES_PER_TASK:          # a short last block: its unused tiles read zeros
                v[:] = 0
            m[:] = 0
            _input_tiles(x_pad, n, 2 * tile_row, first, count, v)
            # M[e] = V[e] @ U[e]: 4 tiles x 4 channels at a time, vectorised over the contiguous o
            for e in range(16):
                for c in range(0, channels, 4):
                    v00, v01, v02, v03 = v[e, 0, c], v[e, 0, c + 1], v[e, 0, c + 2], v[e, 0, c + 3]
                    v10, v11, v12, v13 = v[e, 1, c], v[e, 1, c + 1], v[e, 1, c + 2], v[e, 1, c + 3]
                    v20, v21, v22, v23 = v[e, 2, c], v[e, 2, c + 1], v[e, 2, c + 2], v[e, 2, c + 3]
                    v30, v31, v32, v33 = v[e, 3, c], v[e, 3, c + 1], v[e, 3, c + 2], v[e, 3, c + 3]
                    for o in range(out_channels):
                        u0, u1, u2, u3 = u[e, c, o], u[e, c + 1, o], u[e, c + 2, o], u[e, c + 3, o]
                        m[e, 0, o] += v00 * u0 + v01 * u1 + v02 * u2 + v03 * u3
                        m[e, 1, o] += v10 * u0 + v11 * u1 + v12 * u2 + v13 * u3
                        m[e, 2, o] += v20 * u0 + v21 * u1 + v22 * u2 + v23 * u3
                        m[e, 3, o] += v30 * u0 + v31 * u1 + v32 * u2 + v33 * u3
            oh = 2 * tile_row
            for t in range(count):
                ow = 2 * (first + t)
                for o in range(out_channels):
                    # A^T M: rows 0+1+2 and 1-2-3 of the 4x4 M, then the same for the columns
                    p0 = m[0, t, o] + m[4, t, o] + m[8, t, o]
                    p1 = m[1, t, o] + m[5, t, o] + m[9, t, o]
                    p2 = m[2, t, o] + m[6, t, o] + m[10, t, o]
                    p3 = m[3, t, o] + m[7, t, o] + m[11, t, o]
                    s0 = m[4, t, o] - m[8, t, o] - m[12, t, o]
                    s1 = m[5, t, o] - m[9, t, o] - m[13, t, o]
                    s2 = m[6, t, o] - m[10, t, o] - m[14, t, o]
                    s3 = m[7, t, o] - m[11, t, o] - m[15, t, o]
                    y00 = bias[o] + (p0 + p1 + p2)
                    y01 = bias[o] + (p1 - p2 - p3)
                    y10 = bias[o] + (s0 + s1 + s2)
                    y11 = bias[o] + (s1 - s2 - s3)
                    if relu:
                        y00, y01, y10, y11 = max(y00, 0), max(y01, 0), max(y10, 0), max(y11, 0)
                    y[n, oh, ow, o] = y00
                    y[n, oh, ow + 1, o] = y01
                    y[n, oh + 1, ow, o] = y10
                    y[n, oh + 1, ow + 1, o] = y11


@_jit
def _kernel_grad_kernel(x_pad, dz, partial):
    """partial[band] = the band's share of dU: sum over its tiles of V[e, tile, c] * dM[e, tile, o].

    x_pad as in _forward_kernel; dz (N, OH, OW, OC) with OH, OW even (conv2d_kernel_grad pads
    it); partial (bands, 16, C4, OC), zeros on entry. Band b owns tile rows [b*R/bands,
    (b+1)*R/bands) of the R = N*OH/2 tile rows and its own partial: no two tasks write the same
    memory. Per 4 tiles: their V (16 x 4 x C4), their dM = A dY A^T (16 x 4 x OC), then the 16
    products dU[e] += V[e]^T dM[e], 4 channels x 4 tiles at a time, vectorised over o. Each
    step sweeps all 16*C4*OC sums of the partial, which pays while they stay in the L2 cache:
    the layers with few channels (Conv2D leaves the deep ones to im2col + GEMM)."""
    n_batch, _, _, channels = x_pad.shape
    bands, _, _, out_channels = partial.shape
    _, out_h, out_w, _ = dz.shape
    tiles_h, tiles_w = out_h // 2, out_w // 2
    total_rows = n_batch * tiles_h
    for band in prange(bands):
        v = np.zeros((16, TILES_PER_TASK, channels), dtype=x_pad.dtype)
        dm = np.zeros((16, TILES_PER_TASK, out_channels), dtype=x_pad.dtype)
        for tile_row_index in range(band * total_rows // bands, (band + 1) * total_rows // bands):
            n, tile_row = divmod(np.int64(tile_row_index), tiles_h)
            oh = 2 * tile_row
            for first in range(0, tiles_w, TILES_PER_TASK):
                count = min(TILES_PER_TASK, tiles_w - first)
                if count < TILES_PER_TASK:      # a short last block: its unused tiles add zeros
                    v[:] = 0
                    dm[:] = 0
                _input_tiles(x_pad, n, oh, first, count, v)
                for t in range(count):
                    ow = 2 * (first + t)
                    for o in range(out_channels):
                        g00, g01 = dz[n, oh, ow, o], dz[n, oh, ow + 1, o]
                        g10, g11 = dz[n, oh + 1, ow, o], dz[n, oh + 1, ow + 1, o]
                        # A dY: rows (g0, g0 + g1, g0 - g1, -g1) of the 2x2 block; then the same over columns
                        r10, r11 = g00 + g10, g01 + g11
                        r20, r21 = g00 - g10, g01 - g11
                        dm[0, t, o] = g00
                        dm[1, t, o] = g00 + g01
                        dm[2, t, o] = g00 - g01
                        dm[3, t, o] = -g01
                        dm[4, t, o] = r10
                        dm[5, t, o] = r10 + r11
                        dm[6, t, o] = r10 - r11
                        dm[7, t, o] = -r11
                        dm[8, t, o] = r20
                        dm[9, t, o] = r20 + r21
                        dm[10, t, o] = r20 - r21
                        dm[11, t, o] = -r21
                        dm[12, t, o] = -g10
                        dm[13, t, o] = -g10 - g11
                        dm[14, t, o] = g11 - g10
                        dm[15, t, o] = g11
                for e in range(16):
                    for c in range(0, channels, 4):
                        v00, v01, v02, v03 = v[e, 0, c], v[e, 0, c + 1], v[e, 0, c + 2], v[e, 0, c + 3]
                        v10, v11, v12, v13 = v[e, 1, c], v[e, 1, c + 1], v[e, 1, c + 2], v[e, 1, c + 3]
                        v20, v21, v22, v23 = v[e, 2, c], v[e, 2, c + 1], v[e, 2, c + 2], v[e, 2, c + 3]
                        v30, v31, v32, v33 = v[e, 3, c], v[e, 3, c + 1], v[e, 3, c + 2], v[e, 3, c + 3]
                        for o in range(out_channels):
                            d0, d1, d2, d3 = dm[e, 0, o], dm[e, 1, o], dm[e, 2, o], dm[e, 3, o]
                            partial[band, e, c, o] += v00 * d0 + v10 * d1 + v20 * d2 + v30 * d3
                            partial[band, e, c + 1, o] += v01 * d0 + v11 * d1 + v21 * d2 + v31 * d3
                            partial[band, e, c + 2, o] += v02 * d0 + v12 * d1 + v22 * d2 + v32 * d3
                            partial[band, e, c + 3, o] += v03 * d0 + v13 * d1 + v23 * d2 + v33 * d3


def _padded(x, pad_top, pad_left, out_h, out_w):
    """x in the zero frame the tiles read: 2*tiles + 2 rows and columns."""
    return pad_input(x, pad_top, pad_left, 2 * ((out_h + 1) // 2) + 2, 2 * ((out_w + 1) // 2) + 2)


def conv2d_forward(x, kernel, bias, geometry, relu=False):
    """Winograd twin of ``reference.conv2d_forward`` for a 3x3 kernel, stride 1: y (N, out_h, out_w, OC)."""
    out_h, out_w, out_channels = geometry.out_h, geometry.out_w, kernel.shape[3]
    x_pad = _padded(x, geometry.pad_top, geometry.pad_left, out_h, out_w)
    u = transform_kernel(kernel, x_pad.shape[3])
    if bias is None:
        bias = np.zeros(out_channels, dtype=x.dtype)
    # Whole tiles, so the kernel's stores need no bounds tests (which would stop LLVM from
    # vectorising them); an odd OH or OW is cropped afterwards (never in the U-Nets).
    tiles_h, tiles_w = (out_h + 1) // 2, (out_w + 1) // 2
    y = np.empty((x.shape[0], 2 * tiles_h, 2 * tiles_w, out_channels), dtype=x.dtype)
    _forward_kernel(x_pad, u, np.ascontiguousarray(bias), y, bool(relu))
    if (2 * tiles_h, 2 * tiles_w) != (out_h, out_w):
        y = np.ascontiguousarray(y[:, :out_h, :out_w])
    return y


def conv2d_input_grad(dz, kernel, x_shape, geometry):
    """dx of a 3x3 stride-1 convolution: this file's forward on dZ with the flipped kernel."""
    return conv2d_forward(dz, flip_kernel(kernel, np), None, geometry.flipped(x_shape[1], x_shape[2]))


def conv2d_kernel_grad(x, dz, geometry):
    """Winograd twin of ``reference.conv2d_kernel_grad`` for a 3x3 kernel, stride 1: dW (3, 3, C, OC)."""
    n_batch, _, _, channels = x.shape
    _, out_h, out_w, out_channels = dz.shape
    x_pad = _padded(x, geometry.pad_top, geometry.pad_left, out_h, out_w)
    if out_h % 2 or out_w % 2:   # a zero row / column completes the last tiles (it adds nothing)
        dz = np.pad(dz, ((0, 0), (0, out_h % 2), (0, out_w % 2), (0, 0)))
    padded_channels = x_pad.shape[3]
    bands = partial_bands(n_batch * ((out_h + 1) // 2), 16 * padded_channels * out_channels * x.dtype.itemsize)
    partial = np.zeros((bands, 16, padded_channels, out_channels), dtype=x.dtype)
    _kernel_grad_kernel(x_pad, np.ascontiguousarray(dz), partial)
    return untransform_kernel_grad(partial.sum(axis=0), channels)
