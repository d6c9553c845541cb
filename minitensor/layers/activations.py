"""ReLU and softmax: as functions (fused into Conv2D through ``activation=``) and as layers.

ReLU
    y = max(x, 0), so dy/dx is 1 where x > 0 and 0 elsewhere (we take 0 at x == 0, as
    TensorFlow does). The backward only needs to know *where* the output is positive, so
    we keep the output y, not x: ``dx = dy * (y > 0)``.

Softmax over the last axis
    y_k = exp(x_k) / sum_j exp(x_j). Its Jacobian is dy_k/dx_i = y_k (delta_ki - y_i), so for
    an upstream gradient g:

        dx_i = sum_k g_k y_k (delta_ki - y_i) = y_i (g_i - sum_k g_k y_k)

    One multiply, one reduction, one subtract: the K x K Jacobian is never formed.
"""
from __future__ import annotations

from .. import backend, kernels
from .base import Layer

ACTIVATIONS = (None, "linear", "relu", "softmax")


def relu_forward(x):
    xp = backend.get_array_module(x)
    return xp.maximum(x, 0)


def relu_backward(dy, y):
    """dx = dy where the output was positive, else 0 (y is the forward's output): dy * (y > 0),
    computed by kernels.relu_backward (one numba pass on the CPU)."""
    return kernels.relu_backward(dy, y)


def softmax_forward(x, axis=-1):
    """exp(x - max) / sum(exp(x - max)) along ``axis``; over the channels (the last axis) by
    kernels.softmax_forward (one numba pass per pixel on the CPU)."""
    if axis in (-1, x.ndim - 1):
        return kernels.softmax_forward(x)
    xp = backend.get_array_module(x)
    # Subtracting the max changes nothing mathematically and keeps exp from overflowing.
    shifted = x - x.max(axis=axis, keepdims=True)
    e = xp.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


def softmax_backward(dy, y, axis=-1):
    """dx = y * (dy - sum(dy * y)) along ``axis`` (y is the forward's output)."""
    return y * (dy - (dy * y).sum(axis=axis, keepdims=True))


def check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: expected one of None, 'linear', 'relu', 'softmax'")
    return None if activation == "linear" else activation


def activation_forward(activation, z):
    if activation == "relu":
        return relu_forward(z)
    if activation == "softmax":
        return softmax_forward(z)
    return z


def activation_backward(activation, dy, y):
    if activation == "relu":
        return relu_backward(dy, y)
    if activation == "softmax":
        return softmax_backward(dy, y)
    return dy


class ReLU(Layer):
    """max(x, 0). Forward keeps its output; backward passes dy where that output is positive."""

    gradcheck_examples = {"relu": ({}, [(4, 5, 3)])}
    onnx_operator = "Relu"

    def forward(self, x):
        self._check_input(x)
        y = relu_forward(x)
        self._cache = y
        return y

    def backward(self, dy):
        return relu_backward(dy, self._pop_cache())


class Softmax(Layer):
    """Softmax along ``axis`` (default the channel axis). Backward: y * (dy - sum(dy * y))."""

    gradcheck_examples = {"softmax": ({}, [(4, 5, 3)])}

    def __init__(self, axis=-1, name=None, dtype="float32"):
        super().__init__(name=name, dtype=dtype)
        self.axis = axis

    def forward(self, x):
        self._check_input(x)
        y = softmax_forward(x, self.axis)
        self._cache = y
        return y

    def backward(self, dy):
        return softmax_backward(dy, self._pop_cache(), self.axis)

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}
