"""Winograd F(4x4, 3x3) on the CPU (numba): the three products of a 3x3 stride-1 Conv2D with 4x fewer
multiplications than the direct sum (F(2x2, 3x3) in cpu_winograd.py saves 2.25x).

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

The kernel gradient is cpu_winograd.py's derivation with these matrices: Y = A^T M A gives
dM = A dY A^T (6x6 from each 4x4 block of dZ), M[e] = V[e] U[e] gives dU[e] = sum over tiles of
V[e]^T dM[e] (36 products (C x tiles) @ (tiles x OC)), and U = G g G^T gives dW = G^T dU G.

Numerics: the transforms multiply by up to 5 (B^T) and 8 (A^T) and divide by 6 and 24 (G), so
float32 rounding grows about 12x over F(2x2, 3x3)'s: 3.8e-6 of the largest output over the kernel
tests' shapes (their bound for it is 1e-5), against 3e-7; float64 7e-15; the kernel gradient 4-8e-6
of its largest entry on small_unet's layers in float32. The transformed kernel, and dW from dU, are
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
columns, not by the summed axis). The kernel gradient sums its chunks into partial sums of dU (36 x C
x OC each) over groups of consecutive chunks, as many as the size allows (cpu_conv.partial_bands: a
function of the shape, never of the thread count), then adds the groups in order: the same bits on
any number of threads. It is tried only up to KERNEL_GRAD_MAX_CHANNEL_PRODUCT.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import njit

from .. import cpu_runtime
from .cpu_conv import pad_input, partial_bands
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
#: The largest C x OC whose kernel gradient the measured plan tries here: its partial sums are 36 x C x OC
#: per group of chunks plus one product per worker (19 MiB each in float32 at this bound; unet's 1024 x
#: 1024 layer would take 151 MiB each, one group, one busy core).
KERNEL_GRAD_MAX_CHANNEL_PRODUCT = 512 * 256

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
    # Constants of the values' own type: a bare 4 would make float32 arithmetic float64 (numba promotes
    # int * float32 so), half as many lanes per vector plus a conversion at every store.
    two, four, five = type(d0)(2), type(d0)(4), type(d0)(5)
    return (four * d0 - five * d2 + d4, d3 + d4 - four * (d1 + d2), four * (d1 - d2) - d3 + d4,
            two * (d3 - d1) + d4 - d2, two * (d1 - d3) + d4 - d2, four * d1 - five * d3 + d5)


@njit(cache=True, inline="always")
def _a_t(m0, m1, m2, m3, m4, m5):
    """A^T m for one column (or row) of six values: four outputs."""
    two, four, eight = type(m0)(2), type(m0)(4), type(m0)(8)         # in the values' type, as in _b_t
    sum_12, difference_12 = m1 + m2, m1 - m2
    sum_34, difference_34 = m3 + m4, m3 - m4
    return (m0 + sum_12 + sum_34, difference_12 + two * difference_34, sum_12 + four * sum_34,
            difference_12 + eight * difference_34 + m5)


@_serial
def _transform_inputs(x_rows, channels, tiles_h, tiles_w, start, count, v, columns_done):
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
            d0[q], d1[q], d2[q], d3[q], d4[q], d5[q] = _b_t(x0[q], x1[q], x2[q], x3[q], x4[q], x5[q])
        for k in range(run):                                  # (B^T d) B, tile by tile, row by row
            for i in range(6):
                done = columns_done[i, 4 * k * channels:]
                c0, c1, c2 = done[:channels], done[channels:2 * channels], done[2 * channels:3 * channels]
                c3, c4, c5 = (done[3 * channels:4 * channels], done[4 * channels:5 * channels],
                              done[5 * channels:6 * channels])
                v0, v1, v2 = v[6 * i, t + k], v[6 * i + 1, t + k], v[6 * i + 2, t + k]
                v3, v4, v5 = v[6 * i + 3, t + k], v[6 * i + 4, t + k], v[6 * i + 5, t + k]
                for c in range(channels):
                    v0[c], v1[c], v2[c], v3[c], v4[c], v5[c] = _b_t(c0[c], c1[c], c2[c], c3[c], c4[c], c5[c])
        t += run


def _input_rows(x_pad, tiles_w):
    """x_pad as _transform_inputs reads it, and its scratch row of column transforms."""
    n_batch, rows, cols, channels = x_pad.shape
    return x_pad.reshape(n_batch, rows, cols * channels), np.empty((6, (4 * tiles_w + 2) * channels), x_pad.dtype)


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
                    zero = type(y0)(0)
                    y0, y1, y2, y3 = max(y0, zero), max(y1, zero), max(y2, zero), max(y3, zero)
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
    x_rows, columns_done = _input_rows(x_pad, tiles_w)
    cols_done = np.empty((4, 6, out_channels), dtype=y.dtype)
    for start in starts:
        count = min(chunk, total - start)
        _transform_inputs(x_rows, channels, tiles_h, tiles_w, start, count, v, columns_done)
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


@njit(cache=True, inline="always")
def _a(y0, y1, y2, y3):
    """A y for one column (or row) of four output gradients: six values (A is A^T's transpose)."""
    two, four, eight = type(y0)(2), type(y0)(4), type(y0)(8)         # in the values' type, as in _b_t
    even, odd = y0 + four * y2, two * y1 + eight * y3
    return y0, y0 + y1 + y2 + y3, y0 - y1 + y2 - y3, even + odd, even - odd, y3


@_serial
def _transform_output_grads(dz, tiles_w, start, count, dm, cols_done):
    """dm[:, t] = A dY A^T for the 4x4 tiles dY of dz (N, 4*tiles_h, 4*tiles_w, OC), tiles start ..
    start + count - 1; dm (36, >= count, OC). The transpose of _transform_outputs' A^T M A."""
    out_channels = dz.shape[3]
    per_image = (dz.shape[1] // 4) * tiles_w
    for t in range(count):
        n, index = divmod(np.int64(start + t), per_image)
        tile_row, tile_col = divmod(index, tiles_w)
        oh, ow = 4 * tile_row, 4 * tile_col
        for j in range(4):          # A dY: each of the four columns becomes six rows
            for o in range(out_channels):
                p0, p1, p2, p3, p4, p5 = _a(dz[n, oh, ow + j, o], dz[n, oh + 1, ow + j, o],
                                            dz[n, oh + 2, ow + j, o], dz[n, oh + 3, ow + j, o])
                cols_done[0, j, o], cols_done[1, j, o], cols_done[2, j, o] = p0, p1, p2
                cols_done[3, j, o], cols_done[4, j, o], cols_done[5, j, o] = p3, p4, p5
        for i in range(6):          # (A dY) A^T: each of the six rows becomes six values
            for o in range(out_channels):
                q0, q1, q2, q3, q4, q5 = _a(cols_done[i, 0, o], cols_done[i, 1, o], cols_done[i, 2, o],
                                            cols_done[i, 3, o])
                dm[6 * i, t, o], dm[6 * i + 1, t, o], dm[6 * i + 2, t, o] = q0, q1, q2
                dm[6 * i + 3, t, o], dm[6 * i + 4, t, o], dm[6 * i + 5, t, o] = q3, q4, q5


def untransform_kernel_grad(grad_u, in_channels):
    """dW = G^T dU G for every (c, o): (36, C4, OC) -> (3, 3, in_channels, OC), in float64 rounded once
    (as transform_kernel), a block of output channels at a time."""
    _, channels, out_channels = grad_u.shape
    g = np.array(_G)
    grad = np.empty((3, 3, in_channels, out_channels), dtype=grad_u.dtype)
    grad_u = grad_u.reshape(6, 6, channels, out_channels)
    for first in range(0, out_channels, _KERNEL_BLOCK):
        block = grad_u[:, :, :in_channels, first:first + _KERNEL_BLOCK].astype(np.float64)
        rows = np.tensordot(g, block, (0, 0))                                          # (i, b, c, o) = G^T dU
        grad[..., first:first + _KERNEL_BLOCK] = np.tensordot(g, rows, (0, 1)).transpose(1, 0, 2, 3)
    return grad


def _kernel_grad_groups(groups, x_pad, dz, tiles_h, tiles_w, total, chunk, partial):
    """partial[g] = group g's share of dU, for each (g, its chunks' starts) in ``groups``: per chunk, V and
    dM, then dU[e] += V[e]^T dM[e] for the 36 positions by BLAS."""
    channels, out_channels = x_pad.shape[3], dz.shape[3]
    v = np.zeros((36, chunk, channels), dtype=dz.dtype)      # zeros: a short chunk's spare rows add nothing
    dm = np.zeros((36, chunk, out_channels), dtype=dz.dtype)
    product = np.empty((36, channels, out_channels), dtype=dz.dtype)
    x_rows, columns_done = _input_rows(x_pad, tiles_w)
    cols_done = np.empty((6, 4, out_channels), dtype=dz.dtype)
    for group, starts in groups:
        for number, start in enumerate(starts):
            count = min(chunk, total - start)
            if count < chunk:
                v[:, count:] = 0
                dm[:, count:] = 0
            _transform_inputs(x_rows, channels, tiles_h, tiles_w, start, count, v, columns_done)
            _transform_output_grads(dz, tiles_w, start, count, dm, cols_done)
            if number == 0:
                np.matmul(v.transpose(0, 2, 1), dm, out=partial[group])
            else:
                np.matmul(v.transpose(0, 2, 1), dm, out=product)
                partial[group] += product


def _kernel_grad_groups_on_one_blas_thread(*args):
    cpu_runtime.set_local_blas_threads(1)
    _kernel_grad_groups(*args)


def conv2d_kernel_grad(x, dz, geometry):
    """F(4x4, 3x3) twin of ``reference.conv2d_kernel_grad`` for a 3x3 kernel, stride 1: dW (3, 3, C, OC).

    The chunks of tiles as in the forward; their sums go to partial sums of dU (36 x C4 x OC) over groups
    of consecutive chunks, as many as cpu_conv.partial_bands allows for the size (a function of the shape,
    never of the thread count: the same bits on every machine); each worker takes whole groups."""
    n_batch, _, _, in_channels = x.shape
    _, out_h, out_w, out_channels = dz.shape
    tiles_h, tiles_w = -(-out_h // 4), -(-out_w // 4)
    x_pad = pad_input(x, geometry.pad_top, geometry.pad_left, 4 * tiles_h + 2, 4 * tiles_w + 2)
    if (4 * tiles_h, 4 * tiles_w) != (out_h, out_w):    # zero rows and columns complete the last tiles
        dz = np.pad(dz, ((0, 0), (0, 4 * tiles_h - out_h), (0, 4 * tiles_w - out_w), (0, 0)))
    dz = np.ascontiguousarray(dz)
    channels = x_pad.shape[3]
    total = n_batch * tiles_h * tiles_w
    chunk = min(total, chunk_tiles(channels, out_channels, x.dtype.itemsize))
    starts = list(range(0, total, chunk))
    group_count = partial_bands(len(starts), 36 * channels * out_channels * x.dtype.itemsize)
    groups = [(g, starts[g * len(starts) // group_count:(g + 1) * len(starts) // group_count])
              for g in range(group_count)]
    partial = np.empty((group_count, 36, channels, out_channels), dtype=x.dtype)
    pool, count = _workers()
    work = [groups[worker::count] for worker in range(min(count, group_count))]
    previous = cpu_runtime.set_local_blas_threads(1)
    try:
        futures = [pool.submit(_kernel_grad_groups_on_one_blas_thread, mine, x_pad, dz, tiles_h, tiles_w, total,
                               chunk, partial) for mine in work[1:]]
        _kernel_grad_groups(work[0], x_pad, dz, tiles_h, tiles_w, total, chunk, partial)
        for future in futures:
            future.result()
    finally:
        if previous is not None:
            cpu_runtime.set_local_blas_threads(previous)
    return untransform_kernel_grad(partial.sum(axis=0), in_channels)
