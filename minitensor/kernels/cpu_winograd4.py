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
each, transforms its inputs (serial numba without the GIL, cpu_winograd4_tiles.py), runs ``np.matmul``
over the 36 positions on one BLAS thread (all of BLAS's threads when there is a single chunk), and
transforms its outputs back into y. The chunk stays in the cache between the three steps; the whole
2.25x-sized transformed image is never built.

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

from .. import cpu_runtime
from . import cpu_winograd4_tiles as tiles
from .cpu_conv import pad_input, partial_bands
from .geometry import flip_kernel

#: The transformed tiles of one chunk, V and M together, in bytes: what one round of transform, BLAS
#: products and inverse transform keeps in the cache.
CHUNK_BYTES = 2 << 20
#: The fewest tiles a chunk takes: on the deep layers (512 channels and more) the rows of U read per chunk
#: cost more than a chunk that leaves the cache (unet's 66 px, 512 -> 512 layer: 159 ms at 16, 138 at 64).
MIN_CHUNK_TILES = 64
#: The largest C x OC whose kernel gradient the measured plan tries here: its partial sums are 36 x C x OC
#: per group of chunks plus one product per worker (19 MiB each in float32 at this bound; unet's 1024 x
#: 1024 layer would take 151 MiB each, one group, one busy core).
KERNEL_GRAD_MAX_CHANNEL_PRODUCT = 512 * 256

def chunk_tiles(total, channels, out_channels, itemsize):
    """Tiles per chunk, of ``total``: V (36 x tiles x C) and M (36 x tiles x OC) of about CHUNK_BYTES together,
    and never fewer than MIN_CHUNK_TILES, since each chunk reads all of U (36 x C x OC) once."""
    return min(total, max(MIN_CHUNK_TILES, CHUNK_BYTES // (36 * (channels + out_channels) * itemsize)))


def _run_chunks(starts, x_pad, u, bias, relu, tiles_h, tiles_w, total, chunk, y):
    """Transform, multiply and transform back the chunks that begin at ``starts``."""
    channels, out_channels = x_pad.shape[3], u.shape[2]
    v = np.zeros((36, chunk, channels), dtype=y.dtype)        # zeros: a short chunk's spare rows stay finite
    m = np.empty((36, chunk, out_channels), dtype=y.dtype)
    x_rows, columns_done = tiles.input_rows(x_pad, tiles_w)
    cols_done = np.empty((4, 6, out_channels), dtype=y.dtype)
    for start in starts:
        count = min(chunk, total - start)
        tiles.transform_inputs(x_rows, channels, tiles_h, tiles_w, start, count, v, columns_done)
        np.matmul(v, u, out=m)              # the 36 products M[e] = V[e] @ U[e], by BLAS
        tiles.transform_outputs(m, bias, relu, start, count, y, cols_done)


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
    u = tiles.transform_kernel(kernel, x_pad.shape[3])
    if bias is None:
        bias = np.zeros(out_channels, dtype=x.dtype)
    # Whole tiles, so the stores need no bounds tests; a ragged OH or OW is cropped afterwards.
    y = np.empty((x.shape[0], 4 * tiles_h, 4 * tiles_w, out_channels), dtype=x.dtype)
    bias = np.ascontiguousarray(bias)
    total = x.shape[0] * tiles_h * tiles_w
    chunk = chunk_tiles(total, x_pad.shape[3], out_channels, x.dtype.itemsize)
    starts = list(range(0, total, chunk))
    pool, count = _workers()
    work = [starts[worker::count] for worker in range(min(count, len(starts)))]
    # The chunks are fixed by the shape; which thread runs one changes no bit of it.
    # One BLAS thread per chunk while they run side by side, set and put back by this thread alone
    # (cpu_runtime.set_local_blas_threads: in NumPy's OpenBLAS the count is the process's). A lone chunk
    # keeps all of BLAS's threads, which split each product by rows and columns: the same bits.
    previous = cpu_runtime.set_local_blas_threads(1) if len(work) > 1 else None
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


def _kernel_grad_groups(groups, x_pad, dz, tiles_h, tiles_w, total, chunk, partial):
    """partial[g] = group g's share of dU, for each (g, its chunks' starts) in ``groups``: per chunk, V and
    dM, then dU[e] += V[e]^T dM[e] for the 36 positions by BLAS."""
    channels, out_channels = x_pad.shape[3], dz.shape[3]
    v = np.zeros((36, chunk, channels), dtype=dz.dtype)      # zeros: a short chunk's spare rows add nothing
    dm = np.zeros((36, chunk, out_channels), dtype=dz.dtype)
    product = np.empty((36, channels, out_channels), dtype=dz.dtype)
    x_rows, columns_done = tiles.input_rows(x_pad, tiles_w)
    cols_done = np.empty((6, 4, out_channels), dtype=dz.dtype)
    for group, starts in groups:
        for number, start in enumerate(starts):
            count = min(chunk, total - start)
            if count < chunk:
                v[:, count:] = 0
                dm[:, count:] = 0
            tiles.transform_inputs(x_rows, channels, tiles_h, tiles_w, start, count, v, columns_done)
            tiles.transform_output_grads(dz, tiles_w, start, count, dm, cols_done)
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
    chunk = chunk_tiles(total, channels, out_channels, x.dtype.itemsize)
    starts = list(range(0, total, chunk))
    group_count = partial_bands(len(starts), 36 * channels * out_channels * x.dtype.itemsize)
    groups = [(g, starts[g * len(starts) // group_count:(g + 1) * len(starts) // group_count])
              for g in range(group_count)]
    partial = np.empty((group_count, 36, channels, out_channels), dtype=x.dtype)
    pool, count = _workers()
    work = [groups[worker::count] for worker in range(min(count, group_count))]
    previous = cpu_runtime.set_local_blas_threads(1) if len(work) > 1 else None    # as in the forward
    try:
        futures = [pool.submit(_kernel_grad_groups_on_one_blas_thread, mine, x_pad, dz, tiles_h, tiles_w, total,
                               chunk, partial) for mine in work[1:]]
        _kernel_grad_groups(work[0], x_pad, dz, tiles_h, tiles_w, total, chunk, partial)
        for future in futures:
            future.result()
    finally:
        if previous is not None:
            cpu_runtime.set_local_blas_threads(previous)
    return tiles.untransform_kernel_grad(partial.sum(axis=0), in_channels)
