"""Print the numbers of docs/worked_example_1d.md: one 1-D convolution, forward and backward, by hand.

    python docs/worked_example_1d.py

Every sum is written out term by term, then checked against minitensor's Conv2D on the same
numbers (a 1 x 5 image, a 1 x 3 kernel) and against central differences; tests/test_docs.py runs
this script and checks that the page quotes it exactly.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import minitensor  # noqa: E402  (the repository root is put on the path first)
import numpy as np  # noqa: E402  (after minitensor, which sets the CPU's threads up before NumPy loads)

X = [1, 2, -1, 3, 0]          # the input, length 5
W = [2, -1, 1]                # the kernel, K = 3
B = 0.5                       # the bias
DY = [1, -1, 2]               # dL/dy, the upstream gradient


def listing(values):
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def g(value):
    return f"{value:g}" if value >= 0 else f"({value:g})"


def main():
    x, w, dy = np.array(X, float), np.array(W, float), np.array(DY, float)
    k, out = len(w), len(x) - len(w) + 1
    print("== forward: y[i] = x[i] w[0] + x[i+1] w[1] + x[i+2] w[2] + b")
    y = np.array([x[i:i + k] @ w + B for i in range(out)])
    for i in range(out):
        terms = " + ".join(f"{g(x[i + j])}*{g(w[j])}" for j in range(k))
        print(f"y[{i}] = {terms} + {B:g} = {y[i]:g}")
    print("== backward, given dy = " + listing(dy))
    print("dw[j] = sum over i of dy[i] x[i+j]")
    dw = np.array([dy @ x[j:j + out] for j in range(k)])
    for j in range(k):
        terms = " + ".join(f"{g(dy[i])}*{g(x[i + j])}" for i in range(out))
        print(f"dw[{j}] = {terms} = {dw[j]:g}")
    db = dy.sum()
    print("db = " + " + ".join(g(v) for v in dy) + f" = {db:g}")
    print("dx[m] = sum over i of dy[i] w[m-i] (the outputs that read x[m])")
    dx = np.zeros_like(x)
    for m in range(len(x)):
        pairs = [(i, m - i) for i in range(out) if 0 <= m - i < k]
        dx[m] = sum(dy[i] * w[j] for i, j in pairs)
        terms = " + ".join(f"dy[{i}] w[{j}]" for i, j in pairs)
        values = " + ".join(f"{g(dy[i])}*{g(w[j])}" for i, j in pairs)
        print(f"dx[{m}] = {terms} = {values} = {dx[m]:g}")
    print("== the same dx as a convolution: dy padded by K-1 = 2 zeros, the kernel flipped")
    padded = np.concatenate([np.zeros(k - 1), dy, np.zeros(k - 1)])
    flipped = w[::-1]
    print(f"padded dy = {listing(padded)}, flipped w = {listing(flipped)}")
    by_convolution = np.array([padded[m:m + k] @ flipped for m in range(len(x))])
    print("dx = " + listing(by_convolution))

    layer = minitensor.Conv2D(1, (1, k), dtype="float64")
    layer.build((1, len(x), 1))
    layer.set_weights([w.reshape(1, k, 1, 1), np.array([B])])
    y_layer = layer.forward(x.reshape(1, 1, -1, 1))
    dx_layer = layer.backward(dy.reshape(1, 1, -1, 1))
    same = (np.allclose(y_layer.ravel(), y) and np.allclose(dx_layer.ravel(), dx) and np.allclose(by_convolution, dx)
            and np.allclose(layer.grads[0].ravel(), dw) and np.allclose(layer.grads[1], db))
    print("== checks")
    print(f"minitensor's Conv2D on a 1 x 5 image gives the same y, dx, dw, db: {same}")
    h = 1e-6
    loss = lambda xs: sum(DY[i] * (xs[i:i + k] @ w + B) for i in range(out))   # noqa: E731  L = sum(dy * y)
    numeric = [(loss(x + h * np.eye(len(x))[m]) - loss(x - h * np.eye(len(x))[m])) / (2 * h) for m in range(len(x))]
    print(f"central differences of L = sum(dy * y), h = {h:g}, give dx = {listing(np.round(numeric, 6))}")

    print("== im2col: one row per output, the window it reads")
    cols = np.stack([x[i:i + k] for i in range(out)])
    print(f"im2col(x) = {', '.join(listing(row) for row in cols)}; im2col(x) @ w + b = {listing(cols @ w + B)}")
    print(f"dw = im2col(x)^T dy = {listing(cols.T @ dy)}")


if __name__ == "__main__":
    main()
