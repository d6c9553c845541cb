"""Solution to exercise 1: the convolution's backward pass as loops (see exercises/ex1_conv_backward.py)."""
import numpy as np


def conv2d_backward(x, w, dy):
    kh, kw = w.shape[:2]
    dx, dw = np.zeros_like(x), np.zeros_like(w)
    n_batch, out_h, out_w, filters = dy.shape
    for n in range(n_batch):
        for oh in range(out_h):
            for ow in range(out_w):
                for f in range(filters):
                    g = dy[n, oh, ow, f]
                    dw[:, :, :, f] += g * x[n, oh:oh + kh, ow:ow + kw, :]      # y's window, times dy
                    dx[n, oh:oh + kh, ow:ow + kw, :] += g * w[:, :, :, f]      # every output a pixel reached
    db = dy.sum(axis=(0, 1, 2))
    return dx, dw, db
