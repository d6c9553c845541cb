"""Exercise 1: a convolution's backward pass, as loops.

A stride-1 'valid' convolution, NHWC input and HWIO kernel as in Keras:

    y[n, oh, ow, f] = sum over i, j, c of x[n, oh + i, ow + j, c] * w[i, j, c, f] + b[f]

x (N, H, W, C), w (KH, KW, C, F), y (N, H - KH + 1, W - KW + 1, F). Given dy = dL/dy, return
(dx, dw, db), the gradients of L with respect to x, w and b.

Hints. L depends on each weight through every output it touches, so its gradient is a sum over
those outputs: differentiate the line above with respect to w[i, j, c, f], to b[f], then to one
input pixel x[n, h, w, c] (which outputs does that pixel reach, and through which weight?). The
derivation is in minitensor/layers/conv2d.py's docstring; minitensor/kernels/naive.py writes it
as loops. Four nested loops over (n, oh, ow, f) and a slice for the window are enough.

Check: python -m exercises 1
"""
import numpy as np  # noqa: F401  (for your code)


def conv2d_backward(x, w, dy):
    """(dx, dw, db) of a stride-1 'valid' convolution, given x, w and dy = dL/dy."""
    raise NotImplementedError("exercise 1: write conv2d_backward in exercises/ex1_conv_backward.py")
