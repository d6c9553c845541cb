"""Winograd F(4x4, 3x3) on the CPU (numba): the forward and input gradient of a 3x3 stride-1 Conv2D with
4x fewer multiplications than the direct sum (F(2x2, 3x3) in cpu_winograd.py saves 2.25x).

Read cpu_winograd.py first: it works F(2, 3) out by hand and derives the layer's form, which is
the same here with larger tiles. F(4, 3) computes four outputs of a 3-tap correlation from six
inputs with six multiplications, by evaluating at the points 0, 1, -1, 2, -2 and infinity
(Lavin & Gray 2016):

    y (4) = A^T [ (G g) * (B^T d) ]

    B^T = [[4,  0, -5,  0, 1, 0],          G = [[ 1/4,     0,    0],     A^T = [[1, 1,  1, 1,  1, 0],
           [0, -4, -4,  1, 1, 0],               [-1/6,  -1/6, -1/6],            [0, 1, -1, 2, -2, 0],
           [0,  4, -4, -1, 1, 0],               [-1/6,   1/6, -1/6],            [0, 1,  1, 4,  4, 0],
           [0, -2, -1,  2, 1, 0],               [1/24,  1/12,  1/6],            [0, 1, -1, 8, -8, 1]]
           [0,  2, -1, -2, 1, 0],               [1/24, -1/12,  1/6],
           [0,  4,  0, -5, 0, 1]]               [   0,     0,    1]]

(tests/test_conv_algorithms.py checks these against the direct sum.) Nested in both directions,
one 6x6 input tile d and one 3x3 kernel g give a 4x4 output block with 36 multiplications
instead of 144; over C input channels the 36 positions e are 36 matrix products

    M[e, tile, o] = sum_c V[e, tile, c] * U[e, c, o],   U = G g G^T,   V = B^T d B,   Y = A^T M A.

Neighbouring tiles overlap by 2 pixels: tile (th, tw) reads rows 4*th .. 4*th + 5 of the
zero-padded input and writes output rows 4*th .. 4*th + 3.

Numerics: the transforms multiply by up to 5 (B^T) and 8 (A^T) and divide by 6 and 24 (G), so
float32 rounding grows about 12x over F(2x2, 3x3)'s: 3.8e-6 of the largest output over the kernel
tests' shapes (their bound for it is 1e-5), against 3e-7; float64 7e-15. The transformed kernel is
computed in float64 and rounded once. kernels/conv_policy.py gives it only the products where it
measured faster.

Chunks. The 36 products are matrix products (tiles x C) @ (C x OC), which BLAS runs near its peak
where a numba loop over broadcast tiles stays load-bound. The tiles of all images are numbered
image by image, row by row, and cut into chunks (``CHUNK_BYTES`` of V and M together, at least
``MIN_CHUNK_TILES`` tiles). Each worker thread (one per numba thread) takes every n-th chunk and, for
each, transforms its inputs (serial numba without the GIL), runs ``np.matmul`` over the 36 positions
on one BLAS thread, and transforms its outputs back into y. The chunk stays in the cache between the
three steps; the whole 2.25x-sized transformed image is never built.

Contract. Memory: the padded input (scratch memory), the output, the transformed kernel (36 x C x
OC, 4x the kernel) and one chunk's V and M. Every output element is written once; the sums run in an
order fixed by the shape and the chunk size (OpenBLAS splits a product over threads by rows and
columns, not by the summed axis). The kernel gradient stays with F(2x2, 3x3) or GEMM (its
partial sums would be 36 x C x OC).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import njit

from .. import cpu_runtime
from .cpu_conv import pad_input
from .geometry import flip_kernel

# Serial and without the GIL: the parallelism is this file's own worker threads, one chunk of tiles each.
_serial = njit(nogil=True, cache=True, fastmath={"contract"})

#: The transformed tiles of one chunk, V and M together, in bytes: what one round of transform, BLAS
#: products and inverse transform keeps in the cache.
CHUNK_BYTES = 2 << 20
#: The fewest tiles a chunk takes: on the deep layers (512 channels and more) the rows of U read per chunk
#: cost more than a chunk that leaves the cache (unet's 66 px, 512 -> 512 layer: 159 ms at 16, 138 at 64).
MIN_CHUNK_TILES = 64
_KERNEL_BLOCK = 64               # output channels per step of transform_kernel

_G = ((1 / 4, 0.0, 0.0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0.0, 0.0, 1.0))
# B^T and A^T as matrices, for reading and for the tests: the kernels use their hand-written forms _b_t, _a_t.
_B_T = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
        (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_A_T = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))


def transform_kernel(kernel, channels):
    """U = G g G^T for every (c, o): kernel (3, 3, C, OC) -> (36, channels, OC), zero rows past C.

    Computed in float64 and rounded once, so that G's sixths and twenty-fourths add no float32 error of
    their own; a block of output channels at a time, so that the float64 temporaries stay small (whole,
    they were 0.5 GiB for unet's 1024 -> 512 layer)."""
    _, _, in_channels, out_channels = kernel.shape
    g = np.array(_G)
    u = np.zeros((6, 6, channels, out_channels), dtype=kernel.dtype)
    for first in range(0, out_channels, _KERNEL_BLOCK):
        block = kernel[..., first:first + _KERNEL_BLOCK].astype(np.float64)
        rows = np.tensordot(g, block, (1, 0))                                              # (a, j, c, o) = G g
        u[:, :, :in_channels, first:first + _KERNEL_BLOCK] = np.tensordot(g, rows, (1, 1)).transpose(1, 0, 2, 3)
    return u.reshape(36, channels, out_channels)


@njit(cache=True, inline="always")
def _b_t(d0, d1, d2, d3, d4, d5):
    """B^T d for one column (or row) of six values."""
    return (4 * d0 - 5 * d2 + d4, d3 + d4 - 4 * (d1 + d2), 4 * (d1 - d2) - d3 + d4,
            2 * (d3 - d1) + d4 - d2, 2 * (d1 - d3) + d4 - d2, 4 * d1 - 5 * d3 + d5)


@njit(cache=True, inline="always")
def _a_t(m0, m1, m2, m3, m4, m5):
    """A^T m for one column (or row) of six values: four outputs."""
    sum_12, difference_12 = m1 + m2, m1 - m2
    sum_34, difference_34 = m3 + m4, m3 - m4
    return (m0 + sum_12 + sum_34, difference_12 + 2 * difference_34, sum_12 + 4 * sum_34,
            difference_12 + 8 * difference_34 + m5)


@njit(cache=True, fastmath={"contract"}, inline="always")
def _input_tile(x_pad, n, row, col, t, rows_done, v):
    """v[e, t, c] = (B^T d B)[e] for the 6x6 input tile d at rows row..row+5, columns col..col+5 of
    image n; ``rows_done`` (6, 6, C) holds B^T d. Vectorised over the contiguous channels c."""
    channels = x_pad.shape[3]
    for j in range(6):
        for c in range(channels):
            r0, r1, r2, r3, r4, r5 = _b_t(x_pad[n, row, col + j, c], x_pad[n, row + 1, col + j, c],
                                          x_pad[n, row + 2, col + j, c], x_pad[n, row + 3, col + j, c],
                                          x_pad[n, row + 4, col + j, c], x_pad[n, row + 5, col + j, c])
            rows_done[0, j, c], rows_done[1, j, c], rows_done[2, j, c] = r0, r1, r2
            rows_done[3, j, c], rows_done[4, j, c], rows_done[5, j, c] = r3, r4, r5
    for i in range(6):
        for c in range(channels):
            q0, q1, q2, q3, q4, q5 = _b_t(rows_done[i, 0, c], rows_done[i, 1, c], rows_done[i, 2, c],
                                          rows_done[i, 3, c], rows_done[i, 4, c], rows_done[i, 5, c])
            v[6 * i, t, c], v[6 * i + 1, t, c], v[6 * i + 2, t, c] = q0, q1, q2
            v[6 * i + 3, t, c], v[6 * i + 4, t, c], v[6 * i + 5, t, c] = q3, q4, q5


@_serial
def _transform_inputs(x_pad, tiles_h, tiles_w, start, count, v, rows_done):
    """v[:, t] = B^T d B for the tiles start .. start + count - 1 of all images (numbered image by image,
    row by row); v (36, >= count, C4)."""
    per_image = tiles_h * tiles_w
    for t in range(count):
        n, index = divmod(np.int64(start + t), per_image)
        tile_row, tile_col = divmod(index, tiles_w)
        _input_tile(x_pad, n, 4 * tile_row, 4 * tile_col, t, rows_done, v)


@_serial
def _transform_outputs(m, bias, relu, start, count, y, cols_done):
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
                p0, p1, p2, p3 = _a_t(m[j, t, o], m[6 + j, t, o], m[12 + j, t, o],
                                      m[18 + j, t, o], m[24 + j, t, o], m[30 + j, t, o])
                cols_done[0, j, o], cols_done[1, j, o], cols_done[2, j, o], cols_done[3, j, o] = p0, p1, p2, p3
        for k in range(4):
            for o in range(out_channels):
                y0, y1, y2, y3 = _a_t(cols_done[k, 0, o], cols_done[k, 1, o], cols_done[k, 2, o],
                                      cols_done[k, 3, o], cols_done[k, 4, o], cols_done[k, 5, o])
                y0, y1, y2, y3 = y0 + bias[o], y1 + bias[o], y2 + bias[o], y3 + bias[o]
                if relu:
                    y0, y1, y2, y3 = max(y0, 0), max(y1, 0), max(y2, 0), max(y3, 0)
                y[n, oh + k, ow, o] = y0
                y[n, oh + k, ow + 1, o] = y1
                y[n, oh + k, ow + 2, o] = y2
                y[n, oh + k, ow + 3, o] = y3


def chunk_tiles(channels, out_channels, itemsize):
    """Tiles per chunk: V (36 x tiles x C) and M (36 x tiles x OC) of about CHUNK_BYTES together, and never
    fewer than MIN_CHUNK_TILES, since each chunk reads all of U (36 x C x OC) once."""
    return max(MIN_CHUNK_TILES, CHUNK_BYTES // (36 * (channels + out_channels) * itemsize))


def _run_chunks(starts, x_pad, u, bias, relu, tiles_h, tiles_w, total, chunk, y):
    """Transform, multiply and transform back the chunks that begin at ``starts``."""
    channels, out_channels = x_pad.shape[3], u.shape[2]
    v = np.zeros((36, chunk, channels), dtype=y.dtype)        # zeros: a short chunk's spare rows stay finite
    m = np.empty((36, chunk, out_channels), dtype=y.dtype)
    rows_done = np.empty((6, 6, channels), dtype=y.dtype)
    cols_done = np.empty((4, 6, out_channels), dtype=y.dtype)
    for start in starts:
        count = min(chunk, total - start)
        _transform_inputs(x_pad, tiles_h, tiles_w, start, count, v, rows_done)
        np.matmul(v, u, out=m)              # the 36 products M[e] = V[e] @ U[e], by BLAS
        _transform_outputs(m, bias, relu, start, count, y, cols_done)


def _run_chunks_on_one_blas_thread(*args):
    """A worker's share. Where the BLAS's thread count is truly per thread, this worker's is set here too."""
    cpu_runtime.set_local_blas_threads(1)
    _run_chunks(*args)


_pool, _pool_size = None, 0


def _workers():
    """The worker threads and their number, one per numba thread (an MPI rank's share of the cores), or one
    (the calling thread) where the BLAS's thread count cannot be set to one for the chunks."""
    global _pool, _pool_size
    count = numba.get_num_threads() if runs_in_parallel() else 1
    if count != _pool_size:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool = ThreadPoolExecutor(count - 1, thread_name_prefix="minitensor-winograd4") if count > 1 else None
        _pool_size = count
    return _pool, count


def runs_in_parallel():
    """Whether the chunks can run side by side, each on one BLAS thread (cpu_runtime.set_local_blas_threads,
    OpenBLAS 0.3.27 on). Elsewhere each chunk's products share BLAS's threads, one chunk at a time, which
    measured slower than F(2x2, 3x3) (kernels/conv_policy.py asks this)."""
    return cpu_runtime.can_set_local_blas_threads()


def conv2d_forward(x, kernel, bias, geometry, relu=False):
    """F(4x4, 3x3) twin of ``reference.conv2d_forward`` for a 3x3 kernel, stride 1: y (N, out_h, out_w, OC)."""
    out_h, out_w, out_channels = geometry.out_h, geometry.out_w, kernel.shape[3]
    tiles_h, tiles_w = -(-out_h // 4), -(-out_w // 4)
    x_pad = pad_input(x, geometry.pad_top, geometry.pad_left, 4 * tiles_h + 2, 4 * tiles_w + 2)
    u = transform_kernel(kernel, x_pad.shape[3])
    if bias is None:
        bias = np.zeros(out_channels, dtype=x.dtype)
    # Whole tiles, so the stores need no bounds tests; a ragged OH or OW is cropped afterwards.
    y = np.empty((x.shape[0], 4 * tiles_h, 4 * tiles_w, out_channels), dtype=x.dtype)
    bias = np.ascontiguousarray(bias)
    total = x.shape[0] * tiles_h * tiles_w
    chunk = min(total, chunk_tiles(x_pad.shape[3], out_channels, x.dtype.itemsize))
    starts = list(range(0, total, chunk))
    pool, count = _workers()
    work = [starts[worker::count] for worker in range(min(count, len(starts)))]
    # The chunks are fixed by the shape; which thread runs one changes no bit of it.
    # One BLAS thread per chunk while they run side by side, set and put back by this thread alone
    # (cpu_runtime.set_local_blas_threads: in NumPy's OpenBLAS the count is the process's).
    previous = cpu_runtime.set_local_blas_threads(1)
    try:
        futures = [pool.submit(_run_chunks_on_one_blas_thread, mine, x_pad, u, bias, bool(relu), tiles_h, tiles_w,
                               total, chunk, y) for mine in work[1:]]
        _run_chunks(work[0], x_pad, u, bias, bool(relu), tiles_h, tiles_w, total, chunk, y)
        for future in futures:
            future.result()
    finally:
        if previous is not None:
            cpu_runtime.set_local_blas_threads(previous)
    if (4 * tiles_h, 4 * tiles_w) != (out_h, out_w):
        y = np.ascontiguousarray(y[:, :out_h, :out_w])
    return y


def conv2d_input_grad(dz, kernel, x_shape, geometry):
    """dx of a 3x3 stride-1 convolution: this file's forward on dZ with the flipped kernel."""
    return conv2d_forward(dz, flip_kernel(kernel, np), None, geometry.flipped(x_shape[1], x_shape[2]))
