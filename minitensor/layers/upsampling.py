"""UpSampling2D: nearest-neighbour enlargement, and its backward, a sum over each block.

Shapes: x (N, H, W, C) -> y (N, H*SH, W*SW, C).

Forward
    y[n, h, w, c] = x[n, h // SH, w // SW, c]: every input pixel is copied into an SH x SW block.

Backward
    One input pixel feeds SH*SW outputs, and a value used several times collects the gradient
    of every use: dx[n, h, w, c] = sum of dy over its block. (The same rule as a skip
    connection, where one tensor feeds two layers and the gradients add.)
"""
from __future__ import annotations

from .. import kernels
from .base import Layer, normalize_pair


class UpSampling2D(Layer):
    """``UpSampling2D(size=2)``, nearest interpolation as the post uses."""

    gradcheck_examples = {"upsampling2d": ({"size": 2}, [(3, 4, 2)])}

    def __init__(self, size=2, interpolation="nearest", name=None, dtype="float32"):
        super().__init__(name=name, dtype=dtype)
        if interpolation != "nearest":
            raise ValueError(f"only interpolation='nearest' is implemented, got {interpolation!r}")
        self.size = normalize_pair(size, "size")

    def compute_output_shape(self, input_shape):
        return (input_shape[0] * self.size[0], input_shape[1] * self.size[1], input_shape[2])

    def forward(self, x):
        """x (N, H, W, C) -> y (N, H*SH, W*SW, C)."""
        self._check_input(x)
        self._cache = True   # nothing to keep: backward only needs the factors
        return kernels.upsample_forward(x, *self.size)

    def backward(self, dy):
        """dy (N, H*SH, W*SW, C) -> dx (N, H, W, C), the sum of each SH x SW block."""
        self._pop_cache()
        return kernels.upsample_backward(dy, *self.size)

    def get_config(self):
        return {**super().get_config(), "size": list(self.size), "interpolation": "nearest"}
