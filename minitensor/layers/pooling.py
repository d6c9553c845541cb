"""MaxPool2D: the largest value of each window, and a backward that routes the gradient to it.

Shapes: x (N, H, W, C) -> y (N, OH, OW, C); pooling acts on each channel separately.

Forward
    y[n, oh, ow, c] = max over i < PH, j < PW of x[n, oh*SH + i - PT, ow*SW + j - PL, c],
    the window's top-left corner at (oh*SH - PT, ow*SW - PL), where PT, PL are the top and left
    padding ('same' only; 0 for 'valid'); window cells outside x are left out, as if padded
    with -inf. We also keep *where* the maximum was (``argmax``, the offset i*PW + j inside
    the window).

Backward
    Within a window, y is a copy of one input cell, so dy/dx is 1 for that cell and 0 for the
    others: the whole gradient goes to the argmax cell, ``dx[argmax] += dy``. When windows
    overlap (strides < pool_size), one cell can be the maximum of several windows and receives
    the sum of their gradients.

Ties are a choice, not a law: if a window holds its maximum twice, max is not differentiable
there. Like TensorFlow we route the whole gradient to one element, the first maximum in
row-major window order (tests/test_layers.py pins this against TensorFlow).
"""
from __future__ import annotations

from .. import kernels
from .base import Layer, check_padding, normalize_pair, window_output_and_padding


class MaxPool2D(Layer):
    """``MaxPool2D(pool_size=2, strides=None, padding='valid')``; strides default to pool_size."""

    gradcheck_examples = {"maxpool2d": ({"pool_size": 2}, [(6, 7, 3)])}

    def __init__(self, pool_size=2, strides=None, padding="valid", name=None, dtype="float32"):
        super().__init__(name=name, dtype=dtype)
        self.pool_size = normalize_pair(pool_size, "pool_size")
        self.strides = self.pool_size if strides is None else normalize_pair(strides, "strides")
        self.padding = check_padding(padding)

    def _geometry(self, height, width):
        (pool_h, pool_w), (stride_h, stride_w) = self.pool_size, self.strides
        out_h, pad_top, _ = window_output_and_padding(height, pool_h, stride_h, self.padding)
        out_w, pad_left, _ = window_output_and_padding(width, pool_w, stride_w, self.padding)
        if out_h <= 0 or out_w <= 0:
            raise ValueError(f"layer {self.name!r}: input of {height}x{width} is smaller than the "
                             f"{pool_h}x{pool_w} pool window")
        return out_h, out_w, pad_top, pad_left

    def compute_output_shape(self, input_shape):
        out_h, out_w, _, _ = self._geometry(input_shape[0], input_shape[1])
        return (out_h, out_w, input_shape[2])

    def forward(self, x):
        """x (N, H, W, C) -> y (N, OH, OW, C)."""
        self._check_input(x)
        out_h, out_w, pad_top, pad_left = geometry = self._geometry(x.shape[1], x.shape[2])
        y, argmax = kernels.maxpool_forward(x, *self.pool_size, *self.strides, pad_top, pad_left, out_h, out_w)
        self._cache = (x.shape, argmax, geometry)
        return y

    def backward(self, dy):
        """dy (N, OH, OW, C) -> dx (N, H, W, C): dy added at each window's argmax."""
        x_shape, argmax, (_, _, pad_top, pad_left) = self._pop_cache()
        return kernels.maxpool_backward(dy, argmax, x_shape, *self.pool_size, *self.strides, pad_top, pad_left)

    def get_config(self):
        return {**super().get_config(), "pool_size": list(self.pool_size), "strides": list(self.strides),
                "padding": self.padding}
