"""Code the exercises give you, written out: im2col, and the geometry of a convolution.

Read im2col before exercise 4: col2im, which you write there, undoes its copying.
"""
import numpy as np

from minitensor.layers.base import window_output_and_padding


def geometry(x_shape, w_shape, stride, padding):
    """(kh, kw, sh, sw, pad_top, pad_left, out_h, out_w) of a convolution, as TensorFlow pads:
    'same' pads to out = ceil(size / stride), the odd pixel at the bottom/right."""
    (kh, kw), (_, height, width, _) = w_shape[:2], x_shape
    out_h, pad_top, _ = window_output_and_padding(height, kh, stride, padding)
    out_w, pad_left, _ = window_output_and_padding(width, kw, stride, padding)
    return kh, kw, stride, stride, pad_top, pad_left, out_h, out_w


def im2col(x, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w):
    """x (N, H, W, C) -> cols (N*out_h*out_w, kh*kw*C): one row per output pixel, holding its window.

    Row r = (n*out_h + oh)*out_w + ow, column q = (i*kw + j)*C + c, and
    cols[r, q] = x[n, oh*sh + i - pad_top, ow*sw + j - pad_left, c], or 0 where that is outside x
    (the padding). Then a convolution is one matrix product: cols @ w.reshape(kh*kw*C, F).
    """
    n_batch, height, width, channels = x.shape
    cols = np.zeros((n_batch, out_h, out_w, kh, kw, channels), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            for oh in range(out_h):
                for ow in range(out_w):
                    h, w = oh * sh + i - pad_top, ow * sw + j - pad_left
                    if 0 <= h < height and 0 <= w < width:
                        cols[:, oh, ow, i, j, :] = x[:, h, w, :]
    return cols.reshape(n_batch * out_h * out_w, kh * kw * channels)
