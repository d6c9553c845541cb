"""The U-Net's kernels as plain loops: slow, obvious, and the place to start reading.

Each function is the definition of its operation written out one output element at a time, as
CS231n's ``*_naive`` exercises are, with no vectorisation to see through. ``reference.py`` is the
next step (the same numbers with one array operation per kernel offset), then ``cpu.py`` (numba)
and ``gpu.py`` (CUDA). tests/test_kernels.py checks reference against these loops, and the fast
twins against reference; tests/test_layers.py checks the convolution loops against the layer.

Layout as everywhere in minitensor: x (N, H, W, C), kernels W (KH, KW, C, OC) "HWIO", and a
position outside the input reads as 0 ("zero padding": pad_top rows above, pad_left columns left).
Use small shapes: a 32x32 convolution with 16 channels is already a million loop steps.
"""
from __future__ import annotations

import itertools

import numpy as np


def _inside(h, w, x_shape):
    return 0 <= h < x_shape[1] and 0 <= w < x_shape[2]


# ----- convolution ------------------------------------------------------------------------------

def conv2d_forward(x, w, b, stride, pad_top, pad_left, out_h, out_w):
    """z[n, oh, ow, o] = b[o] + sum_{i, j, c} x[n, oh*S + i - PT, ow*S + j - PL, c] * w[i, j, c, o]."""
    n_batch, _, _, channels = x.shape
    kh, kw, _, filters = w.shape
    z = np.zeros((n_batch, out_h, out_w, filters), dtype=x.dtype)
    for n, oh, ow, o in itertools.product(range(n_batch), range(out_h), range(out_w), range(filters)):
        total = b[o] if b is not None else 0.0
        for i, j, c in itertools.product(range(kh), range(kw), range(channels)):
            h, v = oh * stride + i - pad_top, ow * stride + j - pad_left
            if _inside(h, v, x.shape):
                total += x[n, h, v, c] * w[i, j, c, o]
        z[n, oh, ow, o] = total
    return z


def conv2d_backward(dz, x, w, stride, pad_top, pad_left):
    """(dx, dw, db) of conv2d_forward for the upstream gradient dz = dL/dz (N, OH, OW, OC).

    Every product x[...] * w[...] in the forward sum sends dz[n, oh, ow, o] times its partner to
    each factor: that is the whole rule, applied term by term.
    """
    n_batch, out_h, out_w, filters = dz.shape
    kh, kw, channels, _ = w.shape
    dx, dw = np.zeros_like(x), np.zeros_like(w)
    db = dz.sum(axis=(0, 1, 2))
    for n, oh, ow, o in itertools.product(range(n_batch), range(out_h), range(out_w), range(filters)):
        for i, j, c in itertools.product(range(kh), range(kw), range(channels)):
            h, v = oh * stride + i - pad_top, ow * stride + j - pad_left
            if _inside(h, v, x.shape):
                dx[n, h, v, c] += dz[n, oh, ow, o] * w[i, j, c, o]
                dw[i, j, c, o] += dz[n, oh, ow, o] * x[n, h, v, c]
    return dx, dw, db


# ----- im2col (the forward's windows as rows) ---------------------------------------------------------

def im2col(x, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w):
    """cols[(n, oh, ow), (i, j, c)] = x[n, oh*sh + i - pad_top, ow*sw + j - pad_left, c]."""
    n_batch, _, _, channels = x.shape
    cols = np.zeros((n_batch * out_h * out_w, kh * kw * channels), dtype=x.dtype)
    for n, oh, ow, i, j, c in itertools.product(range(n_batch), range(out_h), range(out_w),
                                                range(kh), range(kw), range(channels)):
        h, w = oh * sh + i - pad_top, ow * sw + j - pad_left
        if _inside(h, w, x.shape):
            cols[(n * out_h + oh) * out_w + ow, (i * kw + j) * channels + c] = x[n, h, w, c]
    return cols


# ----- max pooling -------------------------------------------------------------------------------------

def maxpool_forward(x, ph, pw, sh, sw, pad_top, pad_left, out_h, out_w):
    """(y, argmax): the largest value of each window and its offset i*pw + j (the first on a tie).

    Padding never wins: only cells inside x take part, as in TensorFlow.
    """
    n_batch, _, _, channels = x.shape
    y = np.empty((n_batch, out_h, out_w, channels), dtype=x.dtype)
    argmax = np.empty(y.shape, dtype=np.int32)
    for n, oh, ow, c in itertools.product(range(n_batch), range(out_h), range(out_w), range(channels)):
        cells = [(x[n, h, w, c], i * pw + j) for i in range(ph) for j in range(pw)
                 for h, w in [(oh * sh + i - pad_top, ow * sw + j - pad_left)] if _inside(h, w, x.shape)]
        y[n, oh, ow, c] = max(value for value, _ in cells)
        argmax[n, oh, ow, c] = min(offset for value, offset in cells if value == y[n, oh, ow, c])
    return y, argmax


def maxpool_backward(dy, argmax, x_shape, ph, pw, sh, sw, pad_top, pad_left):
    """dx: each window's gradient goes to the one cell that won it; the others get nothing."""
    dx = np.zeros(x_shape, dtype=dy.dtype)
    for n, oh, ow, c in itertools.product(*map(range, dy.shape)):
        i, j = divmod(int(argmax[n, oh, ow, c]), pw)
        dx[n, oh * sh + i - pad_top, ow * sw + j - pad_left, c] += dy[n, oh, ow, c]
    return dx


# ----- nearest-neighbour upsampling ------------------------------------------------------------------

def upsample_forward(x, sh, sw):
    """y[n, h, w, c] = x[n, h // sh, w // sw, c]: every pixel repeated into an sh x sw block."""
    n_batch, height, width, channels = x.shape
    y = np.empty((n_batch, height * sh, width * sw, channels), dtype=x.dtype)
    for n, h, w, c in itertools.product(*map(range, y.shape)):
        y[n, h, w, c] = x[n, h // sh, w // sw, c]
    return y


def upsample_backward(dy, sh, sw):
    """dx[n, h, w, c] = the sum of dy over the sh x sw block that pixel was copied into."""
    n_batch, out_h, out_w, channels = dy.shape
    dx = np.zeros((n_batch, out_h // sh, out_w // sw, channels), dtype=dy.dtype)
    for n, h, w, c in itertools.product(*map(range, dy.shape)):
        dx[n, h // sh, w // sw, c] += dy[n, h, w, c]
    return dx
