"""Exercise 2: max-pool's backward, routing each window's gradient to its maximum.

2x2 max-pooling with stride 2, 'valid': y[n, oh, ow, c] = max of the window
x[n, 2*oh:2*oh + 2, 2*ow:2*ow + 2, c]. x (N, H, W, C) with H and W even; y (N, H/2, W/2, C).

Given x and dy = dL/dy, return dx. Inside a window y is a copy of one cell, its maximum, so dy/dx
is 1 for that cell and 0 for the other three: the whole dy[n, oh, ow, c] goes to the cell that
held the maximum. On a tie (the maximum twice in one window) max is not differentiable; like
TensorFlow, give all of it to the first one in row-major order (np.argmax's choice on the
flattened window). minitensor/layers/pooling.py derives it.

Check: python -m exercises 2
"""
import numpy as np  # noqa: F401  (for your code)


def maxpool2d_backward(x, dy):
    """dx of 2x2, stride-2 max-pooling, given its input x and dy = dL/dy."""
    raise NotImplementedError("exercise 2: write maxpool2d_backward in exercises/ex2_maxpool_routing.py")
