"""Concatenate: join feature maps along the channel axis; backward splits the gradient apart.

Shapes: [x_1 (N, H, W, C_1), x_2 (N, H, W, C_2), ...] -> y (N, H, W, C_1 + C_2 + ...).

Every output channel is a copy of exactly one input channel, so the gradient of each input
is the matching slice of dy: dx_i = dy[..., offset_i : offset_i + C_i]. In a U-Net, x_1 is
the (cropped) encoder map of a skip connection: that encoder map also feeds the next
encoder layer, so during backward its gradient is the *sum* of what comes back through the
skip and through the encoder path (Model.backward adds them).
"""
from __future__ import annotations

from .. import kernels
from .base import Layer


class Concatenate(Layer):
    """``Concatenate(axis=-1)([a, b])``; forward takes a list, backward returns a list."""

    gradcheck_examples = {"concatenate": ({}, [(4, 4, 2), (4, 4, 3)])}

    def __init__(self, axis=-1, name=None, dtype="float32"):
        super().__init__(name=name, dtype=dtype)
        self.axis = axis

    def _check_shapes(self, shapes):
        if len(shapes) < 2:
            raise ValueError(f"layer {self.name!r} needs a list of at least two inputs, got {len(shapes)}")
        ranks = {len(s) for s in shapes}
        if len(ranks) != 1:
            raise ValueError(f"layer {self.name!r}: inputs of different ranks {shapes}")
        axis = self.axis % len(shapes[0])
        others = [tuple(d for i, d in enumerate(s) if i != axis) for s in shapes]
        if len(set(others)) != 1:
            raise ValueError(
                f"layer {self.name!r}: inputs must match on every axis but {self.axis}, got shapes {shapes}"
                " (for the valid-padding U-Net, crop the skip connection first)"
            )
        return axis

    def build(self, input_shape):
        self._check_shapes([tuple(s) for s in input_shape])
        self.input_shape = [tuple(s) for s in input_shape]
        self.built = True

    def compute_output_shape(self, input_shape):
        shapes = [tuple(s) for s in input_shape]
        axis = self._check_shapes(shapes)
        out = list(shapes[0])
        out[axis] = sum(s[axis] for s in shapes)
        return tuple(out)

    def forward(self, inputs):
        """[x_i (N, H, W, C_i)] -> y (N, H, W, sum C_i)."""
        if not isinstance(inputs, (list, tuple)):
            raise TypeError(f"layer {self.name!r} takes a list of arrays, got {type(inputs).__name__}")
        for i, x in enumerate(inputs):
            self._check_input(x, what=f"input {i}")
        axis = self._check_shapes([tuple(x.shape[1:]) for x in inputs]) + 1
        self._cache = (axis, [x.shape[axis] for x in inputs])
        return kernels.concatenate(list(inputs), axis)                  # y = [x_1, x_2, ...] along the axis

    def backward(self, dy):
        """dy (N, H, W, sum C_i) -> [dx_i (N, H, W, C_i)], the slices of dy."""
        axis, sizes = self._pop_cache()
        grads, start = [], 0
        for size in sizes:
            index = [slice(None)] * dy.ndim
            index[axis] = slice(start, start + size)
            grads.append(dy[tuple(index)])
            start += size
        return grads

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}
