"""Solution to exercise 4: col2im, and a convolution's dx as col2im(dZ @ W_col^T)."""
import numpy as np

from ..given import geometry, im2col  # noqa: F401


def col2im(cols, x_shape, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w):
    n_batch, height, width, channels = x_shape
    patches = cols.reshape(n_batch, out_h, out_w, kh, kw, channels)
    dx = np.zeros(x_shape, dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            for oh in range(out_h):
                for ow in range(out_w):
                    h, w = oh * sh + i - pad_top, ow * sw + j - pad_left
                    if 0 <= h < height and 0 <= w < width:              # else it came from the padding
                        dx[:, h, w, :] += patches[:, oh, ow, i, j, :]
    return dx


def conv2d_input_grad(dy, w, x_shape, stride, padding):
    kh, kw, sh, sw, pad_top, pad_left, out_h, out_w = geometry(x_shape, w.shape, stride, padding)
    filters = w.shape[-1]
    dcols = dy.reshape(-1, filters) @ w.reshape(-1, filters).T
    return col2im(dcols, x_shape, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w)
