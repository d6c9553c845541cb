"""Cropping2D: cut rows and columns off the border, and a backward that pads them back with zeros.

Shapes: x (N, H, W, C) -> y (N, H - top - bottom, W - left - right, C).

Forward is a slice, y = x[:, top:H-bottom, left:W-right, :]. Each kept value is copied once,
so its gradient is copied back; the cropped-away border did not influence the loss at all,
so its gradient is zero: dx = zeros, with dx[:, top:H-bottom, left:W-right, :] = dy.
The original U-Net crops the encoder's feature maps this way before each skip concatenation.
"""
from __future__ import annotations

from .. import backend
from .base import Layer


def normalize_cropping(cropping):
    """int, (sym_height, sym_width) or ((top, bottom), (left, right)) -> ((top, bottom), (left, right))."""
    try:
        if isinstance(cropping, int):
            result = ((cropping, cropping), (cropping, cropping))
        elif all(isinstance(c, int) for c in cropping):
            height, width = cropping
            result = ((height, height), (width, width))
        else:
            (top, bottom), (left, right) = cropping
            result = ((top, bottom), (left, right))
    except (TypeError, ValueError):
        raise ValueError("cropping must be an int, a pair (height, width) or ((top, bottom), (left, right)), "
                         f"got {cropping!r}") from None
    if any(int(c) < 0 for pair in result for c in pair):
        raise ValueError(f"cropping must not be negative, got {cropping!r}")
    return tuple(tuple(int(c) for c in pair) for pair in result)


class Cropping2D(Layer):
    """``Cropping2D(cropping)`` with Keras's three forms of ``cropping``."""

    gradcheck_examples = {"cropping2d": ({"cropping": ((1, 2), (0, 1))}, [(6, 5, 2)])}

    def __init__(self, cropping=((0, 0), (0, 0)), name=None, dtype="float32"):
        super().__init__(name=name, dtype=dtype)
        self.cropping = normalize_cropping(cropping)

    def compute_output_shape(self, input_shape):
        (top, bottom), (left, right) = self.cropping
        height, width = input_shape[0] - top - bottom, input_shape[1] - left - right
        if height <= 0 or width <= 0:
            raise ValueError(f"layer {self.name!r}: cropping {self.cropping} removes all of a "
                             f"{input_shape[0]}x{input_shape[1]} input")
        return (height, width, input_shape[2])

    def forward(self, x):
        """x (N, H, W, C) -> y (N, H-top-bottom, W-left-right, C)."""
        self._check_input(x)
        self.compute_output_shape(x.shape[1:])
        (top, bottom), (left, right) = self.cropping
        self._cache = x.shape
        return x[:, top:x.shape[1] - bottom, left:x.shape[2] - right, :]

    def backward(self, dy):
        """dy (N, H', W', C) -> dx (N, H, W, C): dy in the middle, zeros on the cropped border."""
        x_shape = self._pop_cache()
        (top, bottom), (left, right) = self.cropping
        xp = backend.get_array_module(dy)
        dx = xp.zeros(x_shape, dtype=dy.dtype)
        dx[:, top:x_shape[1] - bottom, left:x_shape[2] - right, :] = dy
        return dx

    def get_config(self):
        return {**super().get_config(), "cropping": [list(p) for p in self.cropping]}
