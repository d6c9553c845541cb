"""The checks behind ``python -m exercises``: each takes the module you wrote (or a solution) and
raises AssertionError, saying what is wrong, unless it computes what minitensor computes.

They are small on purpose (a few hundred numbers each, well under a second): loops are fine.
"""
from __future__ import annotations

import minitensor  # noqa: F401  (first: the CPU settings it applies before NumPy loads)
import numpy as np

from minitensor import layers, losses
from minitensor.gradcheck import check_layer
from minitensor.optimizers import Adam

F64 = "float64"


def close(name, got, want, rtol=1e-9, atol=1e-12):
    got = np.asarray(got)
    assert got.shape == np.shape(want), f"{name}: shape {got.shape}, expected {np.shape(want)}"
    if not np.allclose(got, want, rtol=rtol, atol=atol):
        worst = np.unravel_index(np.argmax(np.abs(got - want)), got.shape)
        raise AssertionError(f"{name} is wrong: at {tuple(int(i) for i in worst)} you have {got[worst]:.6g}, "
                             f"expected {np.asarray(want)[worst]:.6g}")


def conv_layer(x, w, strides=1, padding="valid"):
    """minitensor's Conv2D with the kernel w and zero bias, on x: (layer, y)."""
    layer = layers.Conv2D(w.shape[-1], w.shape[:2], strides=strides, padding=padding, dtype=F64)
    layer.build(x.shape[1:])
    layer.set_weights([w, np.zeros(w.shape[-1])])
    return layer, layer.forward(x)


def check_ex1_conv_backward(module):
    rng = np.random.default_rng(1)
    for kernel in ((3, 3), (2, 3), (1, 1)):
        x = rng.standard_normal((2, 5, 6, 3))
        w = rng.standard_normal((*kernel, 3, 4))
        layer, y = conv_layer(x, w)
        dy = rng.standard_normal(y.shape)
        dx, dw, db = module.conv2d_backward(x, w, dy)
        want_dx = layer.backward(dy)
        close(f"dx (kernel {kernel})", dx, want_dx)
        close(f"dw (kernel {kernel})", dw, layer.grads[0])
        close(f"db (kernel {kernel})", db, layer.grads[1])


def check_ex2_maxpool_routing(module):
    rng = np.random.default_rng(2)
    x = rng.permutation(2 * 6 * 4 * 3).reshape(2, 6, 4, 3) * 0.1     # distinct values: no ties
    x[0, 0, 0, 0] = x[0, 1, 1, 0] = 100.0                              # a tie: the first in row-major order wins
    pool = layers.MaxPool2D(2, dtype=F64)
    dy = rng.standard_normal(pool.forward(x).shape)
    want = pool.backward(dy)
    dx = module.maxpool2d_backward(x, dy)
    if np.asarray(dx).shape == want.shape and dx[0, 1, 1, 0] != 0 and want[0, 1, 1, 0] == 0:
        raise AssertionError("on a tie (two equal maxima in one window) the whole gradient goes to the first one, "
                             "in row-major order, as TensorFlow does; you gave some to the second")
    close("dx", dx, want)


def check_ex3_softmax_cross_entropy(module):
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((2, 3, 4, 5)) * 3
    targets = np.eye(5)[rng.integers(0, 5, size=(2, 3, 4))]
    loss = losses.SoftmaxCrossEntropy()
    want_loss = float(loss.forward(logits, targets))
    want_grad = loss.backward()
    value, grad = module.softmax_cross_entropy(logits, targets)
    close("the loss", value, want_loss)
    close("dL/dlogits", grad, want_grad)
    big = logits + 1000.0                                              # the same softmax: must not overflow
    with np.errstate(over="raise", invalid="raise"):
        try:
            value, grad = module.softmax_cross_entropy(big, targets)
        except FloatingPointError as exc:
            raise AssertionError(f"logits near 1000 overflow ({exc}): subtract each pixel's max logit first") from exc
    close("the loss for logits near 1000 (softmax(z + c) = softmax(z))", value, want_loss, rtol=1e-8)


def check_ex4_strided_conv_dx(module):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 7, 8, 2))
    cols_shape = (2 * 4 * 4, 3 * 3 * 2)            # stride 2, 'same' on 7x8: 4x4 outputs, pads (1, 1) and (0, 1)
    cols = rng.standard_normal(cols_shape)
    geometry = (3, 3, 2, 2, 1, 0, 4, 4)            # kh, kw, sh, sw, pad_top, pad_left, out_h, out_w
    back = module.col2im(cols, x.shape, *geometry)
    close("col2im's shape", np.shape(back), x.shape)
    forward = module.im2col(x, *geometry)
    assert np.isclose(np.sum(forward * cols), np.sum(x * back), rtol=1e-10), \
        "col2im is not the adjoint of im2col: <im2col(x), c> must equal <x, col2im(c)> (each entry of c goes " \
        "back to the pixel im2col copied it from; an entry of the padding goes nowhere)"
    for strides in (2, 1):
        w = rng.standard_normal((3, 3, 2, 4))
        layer, y = conv_layer(x, w, strides=strides, padding="same")
        dy = rng.standard_normal(y.shape)
        close(f"dx (stride {strides}, 'same')", module.conv2d_input_grad(dy, w, x.shape, strides, "same"),
              layer.backward(dy))


def check_ex5_avgpool_layer(module):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6, 4, 3))
    layer = module.AvgPool2D(dtype=F64)
    y = layer.forward(x)
    close("forward", y, x.reshape(2, 3, 2, 2, 2, 3).mean(axis=(2, 4)))
    result = check_layer(module.AvgPool2D(dtype=F64), x)
    assert result.passed, "backward disagrees with central differences:\n" + result.report()


def check_ex6_adam_step(module):
    rng = np.random.default_rng(6)
    param = rng.standard_normal((3, 4))
    ours, adam = param.copy(), Adam(1e-2)
    m, v = np.zeros_like(param), np.zeros_like(param)
    for t in (1, 2, 3):
        grad = rng.standard_normal(param.shape)
        before = param.copy()
        ours, m, v = module.adam_step(ours, grad, m, v, t, learning_rate=1e-2)
        adam.step([param], [grad])
        # Keras rounds beta_1, beta_2 and the learning rate to float32 (optimizers.py): a textbook step
        # in float64 differs from it by about 1e-5 relative; a wrong step differs by far more.
        close(f"the step taken at t = {t}", np.asarray(ours) - before, param - before, rtol=1e-4, atol=1e-12)
        ours = param.copy()                        # the next step starts from the same point
