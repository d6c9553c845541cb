"""One check per op of the op table (minitensor/kernels/table.py): an implementation against the reference.

``CHECKS[op](function, twin, dtype, algorithm)`` runs ``function`` (one implementation's code for ``op``)
on many shapes through ``twin``, which moves NumPy arrays to that implementation's device and back,
and compares it with reference.py: copies and the max-pool's choices exactly, sums within
``tolerance``. tests/test_kernels.py parametrizes it over every implementation in the table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from minitensor.kernels import ConvGeometry, reference

def conv_geometry(size, kernel, stride, padding):
    """(output size, padding before) as Keras/TensorFlow compute them.

    'valid': no padding. 'same': out = ceil(size / stride), and the total padding that the
    windows need is split with the odd pixel at the bottom/right (pad_top <= pad_bottom).
    """
    if padding == "valid":
        return (size - kernel) // stride + 1, 0
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2


@dataclass(frozen=True)
class Case:
    n: int
    h: int
    w: int
    c: int
    kh: int
    kw: int
    sh: int
    sw: int
    padding: str

    @property
    def x_shape(self):
        return (self.n, self.h, self.w, self.c)

    @property
    def window(self):
        """(kh, kw, sh, sw, pad_top, pad_left, out_h, out_w), the kernels' integer arguments."""
        out_h, pad_top = conv_geometry(self.h, self.kh, self.sh, self.padding)
        out_w, pad_left = conv_geometry(self.w, self.kw, self.sw, self.padding)
        return self.kh, self.kw, self.sh, self.sw, pad_top, pad_left, out_h, out_w

    def __str__(self):
        return f"x{self.n}x{self.h}x{self.w}x{self.c}-k{self.kh}x{self.kw}-s{self.sh}x{self.sw}-{self.padding}"


CASES = [
    Case(1, 5, 5, 1, 1, 1, 1, 1, "valid"),   # 1x1 kernel, N = C = 1, odd sizes
    Case(2, 6, 8, 3, 2, 2, 2, 2, "valid"),   # 2x2 pooling on even sizes
    Case(1, 7, 5, 2, 2, 2, 2, 2, "valid"),   # odd sizes: the stride skips the last row and column
    Case(2, 5, 7, 3, 2, 2, 2, 2, "same"),    # odd sizes, 'same': pad 0 on top, 1 at the bottom
    Case(1, 5, 6, 4, 2, 2, 1, 1, "same"),    # 2x2 stride 1 'same': overlapping, extra bottom/right pad only
    Case(2, 6, 5, 3, 3, 3, 1, 1, "same"),    # the U-Net conv: 3x3, pad 1 all round
    Case(2, 8, 7, 2, 3, 3, 2, 2, "same"),    # stride 2: pad_top 0 for H = 8, 1 for W = 7
    Case(2, 9, 7, 2, 3, 3, 2, 2, "valid"),   # overlapping windows, no padding
    Case(2, 7, 6, 3, 3, 2, 2, 1, "same"),    # non-square kernel and strides
    Case(1, 4, 9, 2, 1, 3, 1, 2, "valid"),   # 1x3 kernel, stride only across
    Case(1, 3, 3, 2, 3, 3, 1, 1, "valid"),   # one window covers all of x
    Case(3, 6, 6, 16, 3, 3, 1, 1, "same"),   # more channels and a bigger batch
]


def random_x(case, dtype, rng, ties=False):
    """Standard normal x, or (ties=True) small integers so that windows often hold equal maxima."""
    if ties:
        return rng.integers(-2, 3, case.x_shape).astype(dtype)
    return rng.standard_normal(case.x_shape).astype(dtype)


UPSAMPLE_CASES = [(1, 3, 5, 1, 2, 2), (2, 4, 3, 3, 2, 3), (2, 2, 2, 5, 1, 1)]
#: (case, OC): odd sizes (half Winograd tiles), widths that leave 1-3 pixels over the 4-pixel blocks,
#: channels that are not a multiple of 4, OC around the U-Nets' 32; strided, 1x1 and non-square kernels.
CONV_CASES = [(Case(1, 5, 5, 1, 3, 3, 1, 1, "same"), 1), (Case(2, 9, 11, 3, 3, 3, 1, 1, "same"), 5),
              (Case(2, 10, 13, 8, 3, 3, 1, 1, "valid"), 7), (Case(2, 6, 17, 5, 3, 3, 1, 1, "same"), 32),
              (Case(1, 6, 10, 12, 3, 3, 1, 1, "same"), 33), (Case(2, 4, 4, 16, 3, 3, 1, 1, "same"), 64),
              (Case(1, 6, 7, 3, 2, 2, 1, 1, "same"), 4), (Case(1, 8, 8, 4, 5, 5, 1, 1, "same"), 6),
              (Case(2, 8, 7, 2, 3, 3, 2, 2, "same"), 5), (Case(2, 7, 6, 3, 3, 2, 2, 1, "same"), 4),
              (Case(2, 5, 6, 3, 1, 1, 1, 1, "valid"), 3), (Case(2, 6, 5, 3, 1, 1, 2, 2, "valid"), 2)]
#: Largest |ours - reference| / max|reference| for the convolutions (Winograd's transforms add roundings).
CONV_RELATIVE = {np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-13}
# Winograd F(4x4, 3x3)'s transforms scale by up to 5 and 8 and divide by 6 and 24: measured 3.8e-6 (float32)
# and 7e-15 (float64) of the largest output over CONV_CASES, against F(2x2, 3x3)'s 3e-7 and 5e-16.
CONV_RELATIVE_WINOGRAD4 = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 3e-14}


def tolerance(dtype):
    """For sums whose order may differ; copies and argmax are compared exactly."""
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-12}


@dataclass
class Twin:
    """How to reach one implementation's device from NumPy: ``call`` moves arrays there and results back."""

    name: str
    to_device: Callable
    to_host: Callable
    garbage: Callable          # (shape, dtype) -> device memory full of NaN (or -7), as reused memory is

    def call(self, function, *args, **kwargs):
        move = lambda a: self.to_device(a) if isinstance(a, np.ndarray) else a   # noqa: E731
        result = function(*map(move, args), **{k: move(v) for k, v in kwargs.items()})
        return tuple(map(self.to_host, result)) if isinstance(result, tuple) else self.to_host(result)


def assert_same_array(actual, expected, dtype, message="", **tolerances):
    """Same dtype, C-contiguous, same values (exactly unless tolerances are given)."""
    assert actual.dtype == dtype, message
    assert actual.flags.c_contiguous, message
    if tolerances:
        np.testing.assert_allclose(actual, expected, err_msg=message, **tolerances)
    else:
        np.testing.assert_array_equal(actual, expected, err_msg=message)


def check_im2col(function, twin, dtype, algorithm, seed=4):
    for case in CASES:
        x = random_x(case, dtype, np.random.default_rng(seed))   # distinct values: a copy from a wrong cell shows
        expected = reference.im2col(x, *case.window)
        assert_same_array(twin.call(function, x, *case.window), expected, dtype, str(case))
        out = twin.garbage(expected.shape, dtype)                 # reused memory: every cell must be written
        assert function(twin.to_device(x), *case.window, out=out) is out
        assert_same_array(twin.to_host(out), expected, dtype, str(case))


def check_col2im(function, twin, dtype, algorithm, seed=4):
    rng = np.random.default_rng(seed)
    for case in CASES:
        cols = rng.standard_normal(reference.im2col(random_x(case, dtype, rng), *case.window).shape).astype(dtype)
        assert_same_array(twin.call(function, cols, case.x_shape, *case.window),
                          reference.col2im(cols, case.x_shape, *case.window), dtype, str(case), **tolerance(dtype))


def check_maxpool_forward(function, twin, dtype, algorithm, seed=5):
    for case in CASES:
        x = random_x(case, dtype, np.random.default_rng(seed), ties=True)
        y, argmax = twin.call(function, x, *case.window)
        expected_y, expected_argmax = reference.maxpool_forward(x, *case.window)
        assert_same_array(y, expected_y, dtype, str(case))
        assert_same_array(argmax, expected_argmax, np.int32, str(case))


def check_maxpool_backward(function, twin, dtype, algorithm, seed=5):
    rng = np.random.default_rng(seed)
    for case in CASES:
        _, argmax = reference.maxpool_forward(random_x(case, dtype, rng, ties=True), *case.window)
        dy = rng.standard_normal(argmax.shape).astype(dtype)
        assert_same_array(twin.call(function, dy, argmax, case.x_shape, *case.window[:6]),
                          reference.maxpool_backward(dy, argmax, case.x_shape, *case.window[:6]), dtype, str(case),
                          **tolerance(dtype))


def check_upsample_forward(function, twin, dtype, algorithm, seed=6):
    for n, h, w, c, sh, sw in UPSAMPLE_CASES:
        x = np.random.default_rng(seed).standard_normal((n, h, w, c)).astype(dtype)
        assert_same_array(twin.call(function, x, sh, sw), reference.upsample_forward(x, sh, sw), dtype)


def check_upsample_backward(function, twin, dtype, algorithm, seed=6):
    """Contiguous dy, and dy as a U-Net hands it over: a slice of a wider gradient along the channels."""
    for n, h, w, c, sh, sw in UPSAMPLE_CASES:
        wide = np.random.default_rng(seed).standard_normal((n, h * sh, w * sw, c + 3)).astype(dtype)
        for dy in (np.ascontiguousarray(wide[..., :c]), wide[..., 2:c + 2]):
            assert_same_array(twin.call(function, dy, sh, sw), reference.upsample_backward(dy, sh, sw), dtype,
                              **tolerance(dtype))


def check_relu_backward(function, twin, dtype, algorithm, seed=4):
    rng = np.random.default_rng(seed)
    dy = rng.standard_normal((2, 5, 7, 3)).astype(dtype)
    y = np.maximum(rng.standard_normal(dy.shape), 0).astype(dtype)
    dy[0, 0, 0, :] = [np.nan, -1.0, np.inf]
    y[0, 0, 0, :] = [0.0, 0.0, 1.0]                   # NaN * 0 stays NaN, -1 * 0 is -0.0, as in NumPy
    ours, plain = twin.call(function, dy, y), reference.relu_backward(dy, y)
    assert_same_array(ours, plain, dtype)
    assert np.array_equal(np.signbit(ours), np.signbit(plain))


def check_softmax_forward(function, twin, dtype, algorithm, seed=6):
    x = (np.random.default_rng(seed).standard_normal((2, 6, 5, 7)) * 10).astype(dtype)
    x[0, 0, 0] = [1000, 0, -1000, 3, 3, 3, 3]             # no overflow: the max is subtracted first
    x[0, 0, 1, 2] = np.nan                                  # a NaN spoils its own pixel only
    ours = twin.call(function, x)
    assert ours.dtype == dtype
    np.testing.assert_allclose(ours, reference.softmax_forward(x), rtol=4 * np.finfo(dtype).eps, atol=0)
    assert np.isnan(ours[0, 0, 1]).all() and np.isfinite(np.delete(ours.reshape(-1, 7), 1, axis=0)).all()


def check_concatenate(function, twin, dtype, algorithm, seed=7):
    """Along every axis (the U-Net's is the last), three inputs of unequal widths, one of them a strided
    view, and an input of width 0: the reference's very values."""
    rng = np.random.default_rng(seed)
    for axis in (3, -1, 0, 1, 2):
        shapes = [[2, 3, 4, 5], [2, 3, 4, 5], [2, 3, 4, 5]]
        for shape, width in zip(shapes, (1, 4, 0)):
            shape[axis] = width
        arrays = [rng.standard_normal(shape).astype(dtype) for shape in shapes]
        arrays[1] = np.concatenate([arrays[1], arrays[1]], axis=axis)[(slice(None),) * (axis % 4) + (slice(0, 4),)]
        ours = twin.to_host(function([twin.to_device(a) for a in arrays], axis))
        assert_same_array(ours, reference.concatenate(arrays, axis), dtype, f"axis {axis}")


def check_add(function, twin, dtype, algorithm, seed=7):
    """a + b with a a slice of a wider array along its channels (Concatenate's dy), b contiguous, and
    the other way round; NaN and infinities add as NumPy adds them."""
    rng = np.random.default_rng(seed)
    wide = rng.standard_normal((2, 5, 7, 9)).astype(dtype)
    a, b = wide[..., 2:6], rng.standard_normal((2, 5, 7, 4)).astype(dtype)
    b[0, 0, 0] = [np.nan, np.inf, -np.inf, 1.0]
    a[0, 0, 0] = [1.0, -np.inf, -np.inf, -1.0]
    with np.errstate(invalid="ignore"):                        # inf + -inf is NaN, as it should be
        for first, second in ((a, b), (b, a), (b, b)):
            ours = twin.call(function, first, second)
            assert_same_array(ours, reference.add(first, second), dtype)
        assert np.isnan(twin.call(function, a, b)[0, 0, 0, :2]).all()


def check_adam_update(function, twin, dtype, algorithm):
    """Three steps in place, then two that a non-finite guard must skip: the reference's very bits.

    (--fmad=false, -ffp-contract=off.) No value here is subnormal, where a real GPU would differ
    (CuPy compiles with -ftz=true; g++ keeps them)."""
    scalar = np.dtype(dtype).type
    for size in (1, 255, 257, 1000):                  # under, around and over one block of GPU threads
        rng = np.random.default_rng(size)
        expected = {"param": rng.standard_normal(size).astype(dtype), "m": rng.standard_normal(size).astype(dtype),
                    "v": rng.uniform(0, 1, size).astype(dtype)}
        ours = {name: twin.to_device(value.copy()) for name, value in expected.items()}
        for step in range(5):
            grad = (rng.standard_normal(size) * 10.0 ** rng.integers(-8, 2, size)).astype(dtype)
            scalars = (scalar(1e-3 * (step + 1)), scalar(1 - 0.9), scalar(1 - 0.999), scalar(1e-7))
            guard = None if step < 3 else np.array([np.nan, np.inf][step - 3], dtype)
            function(ours["param"], twin.to_device(grad), ours["m"], ours["v"], *scalars,
                     guard=None if guard is None else twin.to_device(guard))
            reference.adam_update(expected["param"], grad, expected["m"], expected["v"], *scalars, guard=guard)
            for name in expected:
                np.testing.assert_array_equal(twin.to_host(ours[name]), expected[name],
                                              err_msg=f"{name}, size {size}, after step {step + 1}")


def conv_operands(case, out_channels, dtype, seed=0):
    rng = np.random.default_rng(seed)
    out_h, pad_top = conv_geometry(case.h, case.kh, case.sh, case.padding)
    out_w, pad_left = conv_geometry(case.w, case.kw, case.sw, case.padding)
    geometry = ConvGeometry(case.kh, case.kw, case.sh, case.sw, pad_top, pad_left, out_h, out_w)
    x = rng.standard_normal(case.x_shape).astype(dtype)
    kernel = rng.standard_normal((case.kh, case.kw, case.c, out_channels)).astype(dtype)
    bias = rng.standard_normal(out_channels).astype(dtype)
    dz = rng.standard_normal((case.n, out_h, out_w, out_channels)).astype(dtype)
    return x, kernel, bias, dz, geometry


def assert_conv_close(ours, plain, message, algorithm=None):
    assert ours.shape == plain.shape and ours.dtype == plain.dtype and ours.flags.c_contiguous, message
    relative = (CONV_RELATIVE_WINOGRAD4 if algorithm == "winograd4" else CONV_RELATIVE)[plain.dtype]
    assert np.abs(ours - plain).max() <= relative * np.abs(plain).max(), message


def conv_cases(algorithm):
    """The cases an algorithm takes: Winograd 3x3 stride 1, direct stride 1, the others everything."""
    for case, out_channels in CONV_CASES:
        unit = (case.sh, case.sw) == (1, 1)
        if algorithm in ("gemm", "reference") or (unit and (algorithm == "direct" or (case.kh, case.kw) == (3, 3))):
            yield case, out_channels


def check_conv2d_forward(function, twin, dtype, algorithm):
    for case, out_channels in conv_cases(algorithm):
        x, kernel, bias, _, geometry = conv_operands(case, out_channels, dtype)
        for b, relu in ((bias, False), (None, True), (bias, True)):
            ours = twin.call(function, x, kernel, b, geometry, relu=relu)
            assert_conv_close(ours, reference.conv2d_forward(x, kernel, b, geometry, relu=relu), f"{case} relu={relu}",
                              algorithm)


def check_conv2d_input_grad(function, twin, dtype, algorithm):
    for case, out_channels in conv_cases(algorithm):
        x, kernel, _, dz, geometry = conv_operands(case, out_channels, dtype)
        assert_conv_close(twin.call(function, dz, kernel, x.shape, geometry),
                          reference.conv2d_input_grad(dz, kernel, x.shape, geometry), str(case), algorithm)


def check_conv2d_kernel_grad(function, twin, dtype, algorithm):
    for case, out_channels in conv_cases(algorithm):
        x, _, _, dz, geometry = conv_operands(case, out_channels, dtype)
        assert_conv_close(twin.call(function, x, dz, geometry), reference.conv2d_kernel_grad(x, dz, geometry),
                          str(case))


CHECKS = {name[len("check_"):]: value for name, value in list(globals().items()) if name.startswith("check_")}
