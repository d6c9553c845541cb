"""Solution to exercise 5: AvgPool2D; backward spreads dy / 4 over each window."""
import numpy as np

from minitensor.layers import Layer


class AvgPool2D(Layer):
    def compute_output_shape(self, input_shape):
        height, width, channels = input_shape
        return (height // 2, width // 2, channels)

    def forward(self, x):
        self._check_input(x)
        n_batch, height, width, channels = x.shape
        self._cache = x.shape
        return x.reshape(n_batch, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))

    def backward(self, dy):
        self._pop_cache()
        return np.repeat(np.repeat(dy, 2, axis=1), 2, axis=2) / 4
