"""Exercise 5: a whole layer, AvgPool2D, forward and backward.

2x2 average pooling with stride 2, 'valid': y[n, oh, ow, c] is the mean of the window
x[n, 2*oh:2*oh + 2, 2*ow:2*ow + 2, c]; x (N, H, W, C) with H and W even.

Write forward (check the input with self._check_input, keep what backward needs in self._cache)
and backward (take it back with self._pop_cache(); return dx). Each input cell is in one window
and counts 1/4 in its mean: what does it get of that window's dy? The layer has no parameters,
so self.params and self.grads stay empty. docs/your_first_layer.md walks through the Layer
contract with a layer that has one.

Check: python -m exercises 5   (it compares forward with NumPy and backward with central differences)
"""
import numpy as np  # noqa: F401  (for your code)

from minitensor.layers import Layer


class AvgPool2D(Layer):
    """2x2 average pooling, stride 2, 'valid'."""

    def compute_output_shape(self, input_shape):
        height, width, channels = input_shape
        return (height // 2, width // 2, channels)

    def forward(self, x):
        raise NotImplementedError("exercise 5: write AvgPool2D.forward in exercises/ex5_avgpool_layer.py")

    def backward(self, dy):
        raise NotImplementedError("exercise 5: write AvgPool2D.backward in exercises/ex5_avgpool_layer.py")
