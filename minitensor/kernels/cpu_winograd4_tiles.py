"""The tile transforms of Winograd F(4x4, 3x3) (cpu_winograd4.py derives them and runs them chunk by chunk):

    U = G g G^T      the kernel, once per call (transform_kernel), in float64 rounded once
    V = B^T d B      each 6x6 input tile (transform_inputs)
    Y = A^T M A      each 6x6 product tile back to its 4x4 outputs, with bias and ReLU (transform_outputs)
    dM = A dY A^T    each 4x4 block of the output gradient, for the kernel gradient (transform_output_grads)
    dW = G^T dU G    the kernel gradient from its transformed sum (untransform_kernel_grad)

b_t, a_t and a are B^T, A^T and A applied to one column of values, written out by hand (the matrices G, B_T
and A_T are here for reading and for the tests, which check the hand-written forms against them). The tile
loops are serial numba without the GIL: cpu_winograd4.py's worker threads run one chunk of tiles each.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

# Serial and without the GIL: the parallelism is cpu_winograd4.py's own worker threads, one chunk of tiles each.
_serial = njit(nogil=True, cache=True, fastmath={"contract"})
# The kernel's transforms run once per call, before the workers start: parallel over the channels.
_parallel = njit(parallel=True, cache=True, fastmath={"contract"})

_KERNEL_BLOCK = 64               # output channels per step of the *_plain twins' tensordots

G = ((1 / 4, 0.0, 0.0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
     (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0.0, 0.0, 1.0))
# B^T and A^T as matrices, for reading and for the tests: the kernels use their hand-written forms b_t, a_t.
B_T = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
A_T = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))


def transform_kernel(kernel, channels):
    """U = G g G^T for every (c, o): kernel (3, 3, C, OC) -> (36, channels, OC), zero rows past C.

    Computed in float64 and rounded once, so that G's sixths and twenty-fourths add no float32 error of
    their own. Performance contract: one parallel numba pass that reads the kernel once and writes U once
    (_kernel_transform), where transform_kernel_plain's tensordots, transposes and strided stores cost as much
    as a 16 px layer's products at batch 4 (docs/benchmarks.md, "The transformed kernel", has the timings)."""
    _, _, in_channels, out_channels = kernel.shape
    u = np.empty((6, 6, channels, out_channels), dtype=kernel.dtype)
    u[:, :, in_channels:] = 0
    _kernel_transform(np.ascontiguousarray(kernel), np.array(G), u)
    return u.reshape(36, channels, out_channels)


@_parallel
def _kernel_transform(kernel, g, u):
    """u[a, b, c, o] = sum_j (sum_i g[a, i] kernel[i, j, c, o]) g[b, j] in float64, for c < C: one task per
    (c, a), the rows of G g first (the three columns' a-th values), then their six sums with G^T's columns."""
    in_channels, out_channels = kernel.shape[2], kernel.shape[3]
    for task in prange(in_channels * 6):
        c, a = divmod(np.int64(task), 6)
        ga0, ga1, ga2 = g[a, 0], g[a, 1], g[a, 2]
        rows = np.empty((3, out_channels), dtype=np.float64)
        for j in range(3):
            row, top, middle, bottom = rows[j], kernel[0, j, c], kernel[1, j, c], kernel[2, j, c]
            for o in range(out_channels):
                row[o] = ga0 * top[o] + ga1 * middle[o] + ga2 * bottom[o]
        first, second, third = rows[0], rows[1], rows[2]
        for b in range(6):
            gb0, gb1, gb2, out = g[b, 0], g[b, 1], g[b, 2], u[a, b, c]
            for o in range(out_channels):
                out[o] = first[o] * gb0 + second[o] * gb1 + third[o] * gb2


def transform_kernel_plain(kernel, channels):
    """U = G g G^T for every (c, o): kernel (3, 3, C, OC) -> (36, channels, OC), zero rows past C; the plain
    twin of transform_kernel (two tensordots), which the tests hold it to.

    Computed in float64 and rounded once, so that G's sixths and twenty-fourths add no float32 error of
    their own; a block of output channels at a time, so that the float64 temporaries stay small (whole,
    they were 0.5 GiB for unet's 1024 -> 512 layer)."""
    _, _, in_channels, out_channels = kernel.shape
    g = np.array(G)
    u = np.zeros((6, 6, channels, out_channels), dtype=kernel.dtype)
    for first in range(0, out_channels, _KERNEL_BLOCK):
        block = kernel[..., first:first + _KERNEL_BLOCK].astype(np.float64)
        rows = np.tensordot(g, block, (1, 0))                                              # (a, j, c, o) = G g
        u[:, :, :in_channels, first:first + _KERNEL_BLOCK] = np.tensordot(g, rows, (1, 1)).transpose(1, 0, 2, 3)
    return u.reshape(36, channels, out_channels)


@njit(cache=True, inline="always")
def b_t(d0, d1, d2, d3, d4, d5):
    """B^T d for one column (or row) of six values."""
    # Constants of the values' own type: a bare 4 would make float32 arithmetic float64 (numba promotes
    # int * float32 so), half as many lanes per vector plus a conversion at every store.
    two, four, five = type(d0)(2), type(d0)(4), type(d0)(5)
    return (four * d0 - five * d2 + d4, d3 + d4 - four * (d1 + d2), four * (d1 - d2) - d3 + d4,
            two * (d3 - d1) + d4 - d2, two * (d1 - d3) + d4 - d2, four * d1 - five * d3 + d5)


@njit(cache=True, inline="always")
def a_t(m0, m1, m2, m3, m4, m5):
    """A^T m for one column (or row) of six values: four outputs."""
    two, four, eight = type(m0)(2), type(m0)(4), type(m0)(8)         # in the values' type, as in b_t
    sum_12, difference_12 = m1 + m2, m1 - m2
    sum_34, difference_34 = m3 + m4, m3 - m4
    return (m0 + sum_12 + sum_34, difference_12 + two * difference_34, sum_12 + four * sum_34,
            difference_12 + eight * difference_34 + m5)


@_serial
def transform_inputs(x_rows, channels, tiles_h, tiles_w, start, count, v, columns_done):
    """v[:, t] = B^T d B for the tiles start .. start + count - 1 of all images (numbered image by image,
    row by row); x_rows (N, rows, cols * C) is the padded input with each row's pixels and channels in
    one axis, v (36, >= count, C), columns_done (6, (4 * tiles_w + 2) * C) scratch.

    The tiles of one tile row share a strip of six input rows, and neighbours share two columns: B^T d
    runs down the strip once for every column the run of tiles covers, as one loop over the row's
    pixels and channels together; then B along each tile's six columns, vectorised over the channels.
    The loops index views that start where they read (a counter from range is never negative, so numba
    adds no wrap-around test, which made LLVM gather the loads: 1.7-2.7x slower in float32)."""
    per_image = tiles_h * tiles_w
    t = 0
    while t < count:
        n, index = divmod(np.int64(start + t), per_image)
        tile_row, tile_col = divmod(index, tiles_w)
        run = min(count - t, tiles_w - tile_col)              # the chunk's tiles left in this tile row
        row, first_column = 4 * tile_row, 4 * tile_col * channels
        x0, x1, x2 = x_rows[n, row, first_column:], x_rows[n, row + 1, first_column:], x_rows[n, row + 2, first_column:]
        x3, x4, x5 = (x_rows[n, row + 3, first_column:], x_rows[n, row + 4, first_column:],
                      x_rows[n, row + 5, first_column:])
        d0, d1, d2, d3, d4, d5 = (columns_done[0], columns_done[1], columns_done[2], columns_done[3],
                                  columns_done[4], columns_done[5])
        for q in range((4 * run + 2) * channels):           # B^T d for every column of the strip
            d0[q], d1[q], d2[q], d3[q], d4[q], d5[q] = b_t(x0[q], x1[q], x2[q], x3[q], x4[q], x5[q])
        for k in range(run):                                  # (B^T d) B, tile by tile, row by row
            for i in range(6):
                done = columns_done[i, 4 * k * channels:]
                c0, c1, c2 = done[:channels], done[channels:2 * channels], done[2 * channels:3 * channels]
                c3, c4, c5 = (done[3 * channels:4 * channels], done[4 * channels:5 * channels],
                              done[5 * channels:6 * channels])
                v0, v1, v2 = v[6 * i, t + k], v[6 * i + 1, t + k], v[6 * i + 2, t + k]
                v3, v4, v5 = v[6 * i + 3, t + k], v[6 * i + 4, t + k], v[6 * i + 5, t + k]
                for c in range(channels):
                    v0[c], v1[c], v2[c], v3[c], v4[c], v5[c] = b_t(c0[c], c1[c], c2[c], c3[c], c4[c], c5[c])
        t += run


def input_rows(x_pad, tiles_w):
    """x_pad as transform_inputs reads it, and its scratch row of column transforms."""
    n_batch, rows, cols, channels = x_pad.shape
    return x_pad.reshape(n_batch, rows, cols * channels), np.empty((6, (4 * tiles_w + 2) * channels), x_pad.dtype)


@_serial
def transform_outputs(m, bias, relu, start, count, y, cols_done):
    """The output tiles start .. start + count - 1: y = relu?(A^T M A + bias); m (36, >= count, OC),
    y (N, 4*tiles_h, 4*tiles_w, OC)."""
    out_channels = m.shape[2]
    tiles_w = y.shape[2] // 4
    per_image = (y.shape[1] // 4) * tiles_w
    for t in range(count):
        n, index = divmod(np.int64(start + t), per_image)
        tile_row, tile_col = divmod(index, tiles_w)
        oh, ow = 4 * tile_row, 4 * tile_col
        # A^T M: the six columns of the 6x6 M, four rows each; then A^T along each row
        for j in range(6):
            for o in range(out_channels):
                p0, p1, p2, p3 = a_t(m[j, t, o], m[6 + j, t, o], m[12 + j, t, o],
                                     m[18 + j, t, o], m[24 + j, t, o], m[30 + j, t, o])
                cols_done[0, j, o], cols_done[1, j, o], cols_done[2, j, o], cols_done[3, j, o] = p0, p1, p2, p3
        for k in range(4):
            for o in range(out_channels):
                y0, y1, y2, y3 = a_t(cols_done[k, 0, o], cols_done[k, 1, o], cols_done[k, 2, o],
                                     cols_done[k, 3, o], cols_done[k, 4, o], cols_done[k, 5, o])
                y0, y1, y2, y3 = y0 + bias[o], y1 + bias[o], y2 + bias[o], y3 + bias[o]
                if relu:
                    zero = type(y0)(0)
                    y0, y1, y2, y3 = max(y0, zero), max(y1, zero), max(y2, zero), max(y3, zero)
                y[n, oh + k, ow, o] = y0
                y[n, oh + k, ow + 1, o] = y1
                y[n, oh + k, ow + 2, o] = y2
                y[n, oh + k, ow + 3, o] = y3


@njit(cache=True, inline="always")
def a(y0, y1, y2, y3):
    """A y for one column (or row) of four output gradients: six values (A is A^T's transpose)."""
    two, four, eight = type(y0)(2), type(y0)(4), type(y0)(8)         # in the values' type, as in b_t
    even, odd = y0 + four * y2, two * y1 + eight * y3
    return y0, y0 + y1 + y2 + y3, y0 - y1 + y2 - y3, even + odd, even - odd, y3


@_serial
def transform_output_grads(dz, tiles_w, start, count, dm, cols_done):
    """dm[:, t] = A dY A^T for the 4x4 tiles dY of dz (N, 4*tiles_h, 4*tiles_w, OC), tiles start ..
    start + count - 1; dm (36, >= count, OC). The transpose of transform_outputs' A^T M A."""
    out_channels = dz.shape[3]
    per_image = (dz.shape[1] // 4) * tiles_w
    for t in range(count):
        n, index = divmod(np.int64(start + t), per_image)
        tile_row, tile_col = divmod(index, tiles_w)
        oh, ow = 4 * tile_row, 4 * tile_col
        for j in range(4):          # A dY: each of the four columns becomes six rows
            for o in range(out_channels):
                p0, p1, p2, p3, p4, p5 = a(dz[n, oh, ow + j, o], dz[n, oh + 1, ow + j, o],
                                           dz[n, oh + 2, ow + j, o], dz[n, oh + 3, ow + j, o])
                cols_done[0, j, o], cols_done[1, j, o], cols_done[2, j, o] = p0, p1, p2
                cols_done[3, j, o], cols_done[4, j, o], cols_done[5, j, o] = p3, p4, p5
        for i in range(6):          # (A dY) A^T: each of the six rows becomes six values
            for o in range(out_channels):
                q0, q1, q2, q3, q4, q5 = a(cols_done[i, 0, o], cols_done[i, 1, o], cols_done[i, 2, o],
                                           cols_done[i, 3, o])
                dm[6 * i, t, o], dm[6 * i + 1, t, o], dm[6 * i + 2, t, o] = q0, q1, q2
                dm[6 * i + 3, t, o], dm[6 * i + 4, t, o], dm[6 * i + 5, t, o] = q3, q4, q5


def untransform_kernel_grad(grad_u, in_channels):
    """dW = G^T dU G for every (c, o): (36, C4, OC) -> (3, 3, in_channels, OC), in float64 rounded once (as
    transform_kernel). Performance contract: one parallel numba pass over dU (_kernel_grad_untransform), as
    transform_kernel is to transform_kernel_plain."""
    _, channels, out_channels = grad_u.shape
    grad = np.empty((3, 3, in_channels, out_channels), dtype=grad_u.dtype)
    _kernel_grad_untransform(np.ascontiguousarray(grad_u).reshape(6, 6, channels, out_channels), np.array(G), grad)
    return grad


@_parallel
def _kernel_grad_untransform(grad_u, g, grad):
    """grad[i, j, c, o] = sum_b (sum_a g[a, i] grad_u[a, b, c, o]) g[b, j] in float64: one task per (c, i)."""
    in_channels, out_channels = grad.shape[2], grad.shape[3]
    for task in prange(in_channels * 3):
        c, i = divmod(np.int64(task), 3)
        rows = np.zeros((6, out_channels), dtype=np.float64)       # rows[b] = (G^T dU)[i, b]
        for a in range(6):
            gai = g[a, i]
            for b in range(6):
                row, source = rows[b], grad_u[a, b, c]
                for o in range(out_channels):
                    row[o] += gai * source[o]
        for j in range(3):
            out = grad[i, j, c]
            g0, g1, g2, g3, g4, g5 = g[0, j], g[1, j], g[2, j], g[3, j], g[4, j], g[5, j]
            r0, r1, r2, r3, r4, r5 = rows[0], rows[1], rows[2], rows[3], rows[4], rows[5]
            for o in range(out_channels):
                out[o] = r0[o] * g0 + r1[o] * g1 + r2[o] * g2 + r3[o] * g3 + r4[o] * g4 + r5[o] * g5


def untransform_kernel_grad_plain(grad_u, in_channels):
    """dW = G^T dU G for every (c, o): (36, C4, OC) -> (3, 3, in_channels, OC), in float64 rounded once
    (as transform_kernel), a block of output channels at a time; the plain twin of untransform_kernel_grad."""
    _, channels, out_channels = grad_u.shape
    g = np.array(G)
    grad = np.empty((3, 3, in_channels, out_channels), dtype=grad_u.dtype)
    grad_u = grad_u.reshape(6, 6, channels, out_channels)
    for first in range(0, out_channels, _KERNEL_BLOCK):
        block = grad_u[:, :, :in_channels, first:first + _KERNEL_BLOCK].astype(np.float64)
        rows = np.tensordot(g, block, (0, 0))                                          # (i, b, c, o) = G^T dU
        grad[..., first:first + _KERNEL_BLOCK] = np.tensordot(g, rows, (0, 1)).transpose(1, 0, 2, 3)
    return grad
