"""Solution to exercise 2: max-pool's gradient goes to each window's (first) maximum."""
import numpy as np


def maxpool2d_backward(x, dy):
    dx = np.zeros_like(x)
    n_batch, out_h, out_w, channels = dy.shape
    for n in range(n_batch):
        for oh in range(out_h):
            for ow in range(out_w):
                for c in range(channels):
                    window = x[n, 2 * oh:2 * oh + 2, 2 * ow:2 * ow + 2, c]
                    i, j = np.unravel_index(np.argmax(window), window.shape)     # the first maximum
                    dx[n, 2 * oh + i, 2 * ow + j, c] += dy[n, oh, ow, c]
    return dx
