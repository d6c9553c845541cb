"""Tests of minitensor.kernels.

The chain of trust: the reference kernels are checked against the plain loops of
minitensor/kernels/naive.py (the formulas of docs/CONTRACTS.md, one element at a time); the numba
kernels and the CUDA kernels (on a GPU, on the CPU stand-in for CuPy, and compiled as C++ in
test_cuda_as_cpp.py) are then checked against the reference on many shapes, in float32 and float64.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minitensor import backend, kernels
from minitensor.kernels import cpu, gpu, naive, reference

DTYPES = [np.float32, np.float64]


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


def tolerance(dtype):
    """For sums whose order may differ; copies and argmax are compared exactly."""
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-12}


# --- the reference against the plain loops of kernels/naive.py -----------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_im2col_matches_contract(case):
    x = random_x(case, np.float64, np.random.default_rng(0))
    np.testing.assert_array_equal(reference.im2col(x, *case.window), naive.im2col(x, *case.window))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_im2col_col2im_are_adjoint(case):
    """<im2col(x), cols> == <x, col2im(cols)>: col2im is the transpose of the linear map im2col."""
    rng = np.random.default_rng(1)
    x = random_x(case, np.float64, rng)
    cols = rng.standard_normal(reference.im2col(x, *case.window).shape)
    for module in (reference, cpu):
        lhs = np.vdot(module.im2col(x, *case.window), cols)
        rhs = np.vdot(x, module.col2im(cols, case.x_shape, *case.window))
        assert lhs == pytest.approx(rhs, rel=1e-12), module.__name__


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_maxpool_matches_contract(case):
    rng = np.random.default_rng(2)
    x = random_x(case, np.float64, rng, ties=True)
    y, argmax = reference.maxpool_forward(x, *case.window)
    expected_y, expected_argmax = naive.maxpool_forward(x, *case.window)
    np.testing.assert_array_equal(y, expected_y)
    np.testing.assert_array_equal(argmax, expected_argmax)
    assert argmax.dtype == np.int32
    dy = rng.standard_normal(y.shape)
    np.testing.assert_allclose(reference.maxpool_backward(dy, argmax, case.x_shape, *case.window[:6]),
                               naive.maxpool_backward(dy, argmax, case.x_shape, *case.window[:6]), rtol=1e-12)


def test_maxpool_ties_route_the_gradient_like_tensorflow():
    """All-equal x, 2x2 pool, stride 1: every window's maximum is its top-left cell.

    The expected dx is what tf.nn.max_pool2d's gradient gives for the same input.
    """
    x = np.ones((1, 3, 3, 1))
    window = (2, 2, 1, 1, 0, 0, 2, 2)
    for module in (reference, cpu):
        y, argmax = module.maxpool_forward(x, *window)
        np.testing.assert_array_equal(argmax, 0)
        dx = module.maxpool_backward(np.ones_like(y), argmax, x.shape, *window[:6])
        np.testing.assert_array_equal(dx[0, :, :, 0], [[1, 1, 0], [1, 1, 0], [0, 0, 0]])


def test_maxpool_tie_in_padded_window_goes_to_first_cell_inside_x():
    """3x3 pool with pad 1 on all-equal x: the corner window's first cell inside x is (1, 1)."""
    x = np.full((1, 4, 4, 2), 7.0)
    for module in (reference, cpu):
        y, argmax = module.maxpool_forward(x, 3, 3, 2, 2, 1, 1, 2, 2)
        np.testing.assert_array_equal(y, 7.0)
        np.testing.assert_array_equal(argmax[0, 0, 0], [1 * 3 + 1] * 2)   # padded top row and left column
        np.testing.assert_array_equal(argmax[0, 1, 1], [0, 0])            # window fully inside x


@pytest.mark.parametrize("sh, sw", [(1, 1), (2, 2), (3, 2)])
def test_reference_upsample_matches_contract(sh, sw):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4, 2))
    h_index = np.arange(3 * sh) // sh
    w_index = np.arange(4 * sw) // sw
    y = reference.upsample_forward(x, sh, sw)
    np.testing.assert_array_equal(y, x[:, h_index][:, :, w_index])
    np.testing.assert_array_equal(y, naive.upsample_forward(x, sh, sw))
    dy = rng.standard_normal(y.shape)
    assert np.vdot(y, dy) == pytest.approx(np.vdot(x, reference.upsample_backward(dy, sh, sw)), rel=1e-12)
    np.testing.assert_allclose(reference.upsample_backward(dy, sh, sw), naive.upsample_backward(dy, sh, sw),
                               rtol=1e-12)


# --- numba against the reference ------------------------------------------------------------

def assert_same_array(actual, expected, dtype, **tolerances):
    """Same dtype, C-contiguous, same values (exactly unless tolerances are given)."""
    assert actual.dtype == dtype
    assert actual.flags.c_contiguous
    if tolerances:
        np.testing.assert_allclose(actual, expected, **tolerances)
    else:
        np.testing.assert_array_equal(actual, expected)


UPSAMPLE_CASES = [(1, 3, 5, 1, 2, 2), (2, 4, 3, 3, 2, 3), (2, 2, 2, 5, 1, 1)]


def direct(function, *args):
    return function(*args)


# One check per kernel pair, for every twin of the reference: numba here, CUDA on a GPU (or the
# stand-in) below, CUDA compiled as C++ in test_cuda_as_cpp.py. ``run(function, *args)`` calls a twin
# with NumPy arrays and returns NumPy arrays (``on_gpu`` moves them to the device and back).
def check_im2col_col2im(module, case, dtype, seed, run=direct):
    rng = np.random.default_rng(seed)
    x = random_x(case, dtype, rng)   # distinct values: a copy from a wrong cell shows
    expected = reference.im2col(x, *case.window)
    assert_same_array(run(module.im2col, x, *case.window), expected, dtype)
    cols = rng.standard_normal(expected.shape).astype(dtype)
    assert_same_array(run(module.col2im, cols, case.x_shape, *case.window),
                      reference.col2im(cols, case.x_shape, *case.window), dtype, **tolerance(dtype))


def check_maxpool(module, case, dtype, seed, run=direct):
    rng = np.random.default_rng(seed)
    x = random_x(case, dtype, rng, ties=True)
    y, argmax = run(module.maxpool_forward, x, *case.window)
    expected_y, expected_argmax = reference.maxpool_forward(x, *case.window)
    assert_same_array(y, expected_y, dtype)
    assert_same_array(argmax, expected_argmax, np.int32)
    dy = rng.standard_normal(y.shape).astype(dtype)
    assert_same_array(run(module.maxpool_backward, dy, argmax, case.x_shape, *case.window[:6]),
                      reference.maxpool_backward(dy, argmax, case.x_shape, *case.window[:6]), dtype,
                      **tolerance(dtype))


def check_upsample(module, shape, dtype, seed, run=direct):
    n, h, w, c, sh, sw = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h, w, c)).astype(dtype)
    assert_same_array(run(module.upsample_forward, x, sh, sw), reference.upsample_forward(x, sh, sw), dtype)
    dy = rng.standard_normal((n, h * sh, w * sw, c)).astype(dtype)
    assert_same_array(run(module.upsample_backward, dy, sh, sw), reference.upsample_backward(dy, sh, sw), dtype,
                      **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_im2col_col2im_match_reference(case, dtype):
    check_im2col_col2im(cpu, case, dtype, seed=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_maxpool_matches_reference(case, dtype):
    check_maxpool(cpu, case, dtype, seed=5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", UPSAMPLE_CASES)
def test_cpu_upsample_matches_reference(shape, dtype):
    check_upsample(cpu, shape, dtype, seed=6)


@st.composite
def random_cases(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    return Case(n=draw(st.integers(1, 3)), h=draw(st.integers(kh, 9)), w=draw(st.integers(kw, 9)),
                c=draw(st.integers(1, 4)), kh=kh, kw=kw, sh=draw(st.integers(1, 3)), sw=draw(st.integers(1, 3)),
                padding=draw(st.sampled_from(["valid", "same"])))


@settings(max_examples=60, deadline=None)
@given(case=random_cases(), seed=st.integers(0, 2**32 - 1))
def test_cpu_matches_reference_on_random_shapes(case, seed):
    rng = np.random.default_rng(seed)
    x = random_x(case, np.float64, rng, ties=True)
    cols = cpu.im2col(x, *case.window)
    np.testing.assert_array_equal(cols, reference.im2col(x, *case.window))
    np.testing.assert_allclose(cpu.col2im(cols, case.x_shape, *case.window),
                               reference.col2im(cols, case.x_shape, *case.window), rtol=1e-12)
    y, argmax = cpu.maxpool_forward(x, *case.window)
    expected_y, expected_argmax = reference.maxpool_forward(x, *case.window)
    np.testing.assert_array_equal(y, expected_y)
    np.testing.assert_array_equal(argmax, expected_argmax)
    dy = rng.standard_normal(y.shape)
    np.testing.assert_allclose(cpu.maxpool_backward(dy, argmax, case.x_shape, *case.window[:6]),
                               reference.maxpool_backward(dy, argmax, case.x_shape, *case.window[:6]), rtol=1e-12)


def test_cpu_accepts_non_contiguous_input():
    x = np.random.default_rng(7).standard_normal((2, 5, 6, 3)).astype(np.float32)[:, ::-1, :, ::2]
    window = (3, 3, 1, 1, 1, 1, 5, 6)
    assert_same_array(cpu.im2col(x, *window), reference.im2col(x, *window), np.float32)
    assert_same_array(cpu.maxpool_forward(x, *window)[0], reference.maxpool_forward(x, *window)[0], np.float32)


# --- the dispatcher ----------------------------------------------------------------------

@pytest.fixture
def fast_kernels():
    """Dispatch to numba / CUDA for the test, even when MINITENSOR_KERNELS=reference is set."""
    previous = kernels.using_reference()
    kernels.use_reference(False)
    yield
    kernels.use_reference(previous)


def test_dispatch_picks_numba_for_numpy_and_reference_on_request(fast_kernels):
    x = np.zeros((1, 2, 2, 1), dtype=np.float32)
    assert kernels._implementation(x) is cpu
    with kernels.reference_kernels():
        assert kernels.using_reference()
        assert kernels._implementation(x) is reference
    assert not kernels.using_reference()
    assert kernels._implementation(x) is cpu


def test_environment_variable_selects_reference(monkeypatch):
    monkeypatch.setenv("MINITENSOR_KERNELS", "reference")
    assert kernels._reference_requested_by_environment()
    monkeypatch.setenv("MINITENSOR_KERNELS", "auto")
    assert not kernels._reference_requested_by_environment()
    monkeypatch.setenv("MINITENSOR_KERNELS", "numbaa")
    with pytest.raises(ValueError, match="MINITENSOR_KERNELS"):
        kernels._reference_requested_by_environment()


def test_dispatcher_results_match_reference(fast_kernels):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    window = (2, 2, 2, 2, 0, 0, 2, 2)
    cols = kernels.im2col(x, *window)
    np.testing.assert_array_equal(cols, reference.im2col(x, *window))
    np.testing.assert_allclose(kernels.col2im(cols, x.shape, *window), reference.col2im(cols, x.shape, *window))
    y, argmax = kernels.maxpool_forward(x, *window)
    np.testing.assert_array_equal(kernels.maxpool_backward(y, argmax, x.shape, *window[:6]),
                                  reference.maxpool_backward(y, argmax, x.shape, *window[:6]))
    np.testing.assert_array_equal(kernels.upsample_backward(kernels.upsample_forward(x, 2, 2), 2, 2), 4 * x)


@pytest.mark.parametrize("call, error, message", [
    (lambda x: kernels.im2col(x[0], 3, 3, 1, 1, 1, 1, 4, 4), ValueError, "4-D"),
    (lambda x: kernels.im2col(x.astype(np.int64), 3, 3, 1, 1, 1, 1, 4, 4), TypeError, "float32 or float64"),
    (lambda x: kernels.im2col(x, 3, 3, 0, 1, 1, 1, 4, 4), ValueError, "sh must be an int >= 1"),
    (lambda x: kernels.im2col(x, 3, 3, 1, 1, -1, 1, 4, 4), ValueError, "pad_top must be an int >= 0"),
    (lambda x: kernels.col2im(np.zeros((16, 8)), x.shape, 3, 3, 1, 1, 1, 1, 4, 4), ValueError, "needs"),
    (lambda x: kernels.maxpool_backward(x, np.zeros(x.shape, np.int64), x.shape, 1, 1, 1, 1, 0, 0),
     ValueError, "int32"),
    (lambda x: kernels.upsample_backward(x, 3, 1), ValueError, "whole 3x1 blocks"),
])
def test_dispatcher_rejects_bad_arguments(call, error, message):
    x = np.zeros((2, 4, 4, 3))
    with pytest.raises(error, match=message):
        call(x)


# --- CUDA: sources compile anywhere nvcc is; kernels run on a GPU machine -------------------

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("c_type", ["float", "double"])
def test_gpu_sources_compile_with_nvcc(c_type, tmp_path):
    source = tmp_path / f"kernels_{c_type}.cu"
    source.write_text(gpu.cuda_sources()[c_type])
    result = subprocess.run(["nvcc", "-arch=sm_90", "-Werror", "all-warnings", "-c", str(source),
                             "-o", str(tmp_path / f"kernels_{c_type}.o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def on_gpu(function, *args):
    """Call ``function`` with every NumPy argument moved to the GPU; results come back as NumPy."""
    cupy = backend.cupy_module()
    result = function(*(cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in args))
    if isinstance(result, tuple):
        return tuple(cupy.asnumpy(part) for part in result)
    return cupy.asnumpy(result)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gpu_im2col_col2im_match_reference(case, dtype):
    check_im2col_col2im(gpu, case, dtype, seed=9, run=on_gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gpu_maxpool_matches_reference(case, dtype):
    check_maxpool(gpu, case, dtype, seed=10, run=on_gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", UPSAMPLE_CASES)
def test_gpu_upsample_matches_reference(shape, dtype):
    check_upsample(gpu, shape, dtype, seed=11, run=on_gpu)


@pytest.mark.gpu
def test_gpu_dispatch_and_mixed_devices(fast_kernels):
    cupy = backend.cupy_module()
    x = np.zeros((1, 2, 2, 1), dtype=np.float32)
    assert kernels._implementation(cupy.asarray(x)) is gpu
    y, argmax = kernels.maxpool_forward(cupy.asarray(x), 1, 1, 1, 1, 0, 0, 2, 2)
    with pytest.raises(TypeError, match="different devices"):
        kernels.maxpool_backward(y, argmax.get(), x.shape, 1, 1, 1, 1, 0, 0)


@pytest.mark.parametrize("serial_below", [0, 1 << 40])     # force the parallel, then the serial compiled kernel
def test_im2col_serial_and_parallel_versions_agree_with_reference(monkeypatch, serial_below):
    monkeypatch.setattr(cpu, "SERIAL_BELOW_ELEMENTS", serial_below)
    x = np.random.default_rng(0).standard_normal((3, 7, 6, 4)).astype(np.float32)
    for args in [(3, 3, 1, 1, 1, 1, 7, 6), (3, 3, 2, 2, 0, 1, 3, 3), (2, 3, 1, 2, 0, 0, 6, 2)]:
        expected = reference.im2col(x, *args)
        scratch = np.full(expected.shape, np.nan, dtype=np.float32)     # garbage in reused memory
        np.testing.assert_array_equal(cpu.im2col(x, *args, out=scratch), expected)
