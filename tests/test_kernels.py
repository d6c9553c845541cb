"""Tests of minitensor.kernels.

The chain of trust: the reference kernels are checked against the plain loops of
minitensor/kernels/naive.py (the formulas of docs/CONTRACTS.md, one element at a time); then every
implementation the op table (kernels/table.py) names, numba and CUDA (on a GPU, or compiled as C++
on the CPU stand-in for CuPy), is checked against the reference by one parametrized test, in float32
and float64. The table itself is checked against the code and the docs.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minitensor import backend, kernels
from kernel_checks import CASES, CHECKS, CONV_CASES, Case, Twin, assert_same_array, conv_operands, random_x
from minitensor.kernels import cpu, gpu, naive, reference, switches, table

DTYPES = [np.float32, np.float64]


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


@pytest.mark.parametrize("case, out_channels", [c for c in CONV_CASES if c[0].sh == c[0].sw], ids=str)
def test_reference_convolution_matches_contract(case, out_channels):
    """reference.py's im2col -> GEMM -> col2im convolution, any stride and padding, against naive.py's loops."""
    x, kernel, bias, dz, geometry = conv_operands(case, out_channels, np.float64)
    _, _, stride, _, pad_top, pad_left, out_h, out_w = geometry.window
    y = reference.conv2d_forward(x, kernel, bias, geometry)
    np.testing.assert_allclose(y, naive.conv2d_forward(x, kernel, bias, stride, pad_top, pad_left, out_h, out_w),
                               rtol=1e-12, atol=1e-12)
    dx, dw, _ = naive.conv2d_backward(dz, x, kernel, stride, pad_top, pad_left)
    np.testing.assert_allclose(reference.conv2d_input_grad(dz, kernel, x.shape, geometry), dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(reference.conv2d_kernel_grad(x, dz, geometry), dw, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(reference.conv2d_forward(x, kernel, bias, geometry, relu=True), np.maximum(y, 0))


# --- every implementation in the op table against the reference ---------------------------------------------------

def _implementations():
    for op, column, algorithm, own in table.own_entries():
        if column in ("numba", "cuda"):
            name = f"{op}-{column}" + (f"-{algorithm}" if algorithm else "")
            yield pytest.param(op, column, algorithm, own, id=name, marks=[pytest.mark.gpu] if column == "cuda" else [])


def make_twin(column, gpu_backend, monkeypatch):
    """numba: NumPy arrays as they are. cuda: a real GPU, else the CPU stand-in for CuPy, which runs gpu.py's
    CUDA source compiled as C++ (tests/cupy_standin.py), its ``empty`` returning NaN-filled memory (-7 for
    ints) as reused device memory would, so that a cell a kernel forgot to write shows."""
    def numpy_garbage(shape, dtype):
        return np.full(shape, np.nan if np.dtype(dtype).kind == "f" else -7, dtype=dtype)
    if column == "numba":
        return Twin("numba", lambda a: a, lambda a: a, numpy_garbage)
    cupy = backend.cupy_module()
    if gpu_backend is not None:
        monkeypatch.setattr(gpu_backend, "empty", lambda shape, dtype=np.float64: gpu_backend.ndarray(
            numpy_garbage(shape, dtype)), raising=False)
    return Twin("cuda", cupy.asarray, cupy.asnumpy, lambda shape, dtype: cupy.asarray(numpy_garbage(shape, dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op, column, algorithm, own", list(_implementations()))
def test_every_implementation_matches_the_reference(op, column, algorithm, own, dtype, gpu_backend, monkeypatch):
    """The one kernel test: each piece of numba or CUDA code the op table names, on that op's cases."""
    CHECKS[op](own.resolve(op), make_twin(column, gpu_backend, monkeypatch), dtype, algorithm)


# --- the op table is true ---------------------------------------------------------------------------------------

def test_the_table_names_real_code_and_every_op():
    for op, column, algorithm, own in table.own_entries():
        assert callable(own.resolve(op)), (op, column, algorithm)
    for op, row in table.TABLE.items():
        assert set(row) == set(table.IMPLEMENTATIONS) and isinstance(row["reference"], table.Own), op
        for column in ("numba", "cuda"):
            assert row[column] is not None, f"{op} has nothing for {column}: add code or a Uses fallback"
            if isinstance(row[column], table.Uses):
                assert isinstance(row[row[column].implementation], table.Own) and row[column].why, op
        assert op in kernels.__all__ and callable(getattr(kernels, op)), op
    assert set(CHECKS) == set(table.TABLE), "every op needs a check in tests/kernel_checks.py, and no more"


def test_an_elementwise_op_needs_no_code_in_the_dispatcher(monkeypatch):
    """A new elementwise op is a table row and its implementations: kernels/__init__.py writes its public
    function (one shape, one float dtype, then the table's cell for the arrays, learning mode included)."""
    calls = []

    def implementation(column):
        def scale_forward(x, factor):
            """y = factor * x."""
            calls.append(column)
            return x * factor
        return types.SimpleNamespace(scale_forward=scale_forward)

    monkeypatch.setitem(table.TABLE, "scale_forward", {
        "naive": None, "reference": table.Own(implementation("reference")), "numba": table.Own(implementation("numba")),
        "cuda": table.Uses("reference", "a test")})
    scale_forward = kernels._elementwise("scale_forward")
    assert scale_forward.__name__ == "scale_forward" and scale_forward.__doc__ == "y = factor * x."
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(scale_forward(x, 3.0), 3 * x)
    with kernels.reference_kernels():
        np.testing.assert_array_equal(scale_forward(x, 2.0), 2 * x)
    assert calls == ["numba", "reference"]
    with pytest.raises(ValueError, match="scale_forward: the arrays must have one shape"):
        scale_forward(x, x[:, :2])
    with pytest.raises(TypeError, match="must be float32 or float64, got int64"):
        scale_forward(x.astype(np.int64), 2)
    assert calls == ["numba", "reference"]
    assert kernels.relu_backward.__module__ == "minitensor.kernels" and "relu_backward" in kernels.__all__


def test_an_elementwise_op_with_every_kernel_needs_no_line_of_the_table(monkeypatch):
    """An op marked @elementwise in reference.py whose numba and CUDA kernels exist gets its row from the
    files that define it; one without a device kernel is an error that names the file and the other fix."""
    @reference.elementwise
    def scale_forward(x, factor):
        return x * factor

    fake = {name: types.SimpleNamespace(__name__=f"minitensor.kernels.{name}", scale_forward=scale_forward)
            for name in ("reference", "cpu", "gpu")}
    for name, module in fake.items():
        monkeypatch.setattr(table, name, module)
    monkeypatch.setattr(table, "naive", types.SimpleNamespace(__name__="minitensor.kernels.naive"))
    row = table._declared_row("scale_forward")
    assert row["naive"] is None
    assert {column: row[column].module for column in ("reference", "numba", "cuda")} == {
        "reference": fake["reference"], "numba": fake["cpu"], "cuda": fake["gpu"]}
    del fake["gpu"].scale_forward
    with pytest.raises(ImportError, match="scale_forward .* has no cuda kernel: define scale_forward in gpu.py, "
                                          "or give scale_forward a row in kernels/table.py"):
        table._declared_row("scale_forward")
    assert "relu_backward" in table.ELEMENTWISE and isinstance(table.TABLE["relu_backward"]["cuda"], table.Uses)


def test_the_contracts_quote_the_table():
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "CONTRACTS.md")) as f:
        assert table.format_table(markdown=True) in f.read(), \
            "docs/CONTRACTS.md no longer shows kernels.table.format_table(markdown=True): paste it"
    assert table.format_table() in kernels.__doc__


def test_python_m_kernels_prints_what_serves_each_op():
    def run(**environment):
        env = {k: v for k, v in os.environ.items() if k not in ("MINITENSOR_KERNELS", "MINITENSOR_CONV")}
        result = subprocess.run([sys.executable, "-m", "minitensor.kernels"], env={**env, **environment},
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout
    fast = run()
    assert table.format_table() in fast and "learning mode is off" in fast
    assert re.search(r"NumPy arrays.*\n\s+im2col\s+numba", fast)
    assert re.search(r"NumPy arrays.*\n(.*\n)*?\s+adam_update\s+numba", fast)
    assert re.search(r"relu_backward\s+reference\s+fallback", fast)          # CuPy's: a Uses cell
    learning = run(MINITENSOR_KERNELS="reference")
    assert "learning mode is on" in learning
    served = re.findall(r"^    (\w+)\s+(\w+)\s", learning, re.M)
    assert len(served) == 2 * len(table.TABLE) and {column for _, column in served} == {"reference"}


# --- the dispatcher ----------------------------------------------------------------------------------------------

def test_dispatch_follows_the_table_and_learning_mode(fast_kernels):
    x = np.random.default_rng(8).standard_normal((2, 4, 4, 3)).astype(np.float32)
    window = (2, 2, 2, 2, 0, 0, 2, 2)
    for op in table.TABLE:
        assert kernels.implementation_of(op, x) == table.column_for(op, "numpy")[0]
    assert kernels.implementation_of("im2col", x) == "numba" and kernels.implementation_of("adam_update", x) == "numba"
    with kernels.reference_kernels():
        assert kernels.using_reference()
        assert {kernels.implementation_of(op, x) for op in table.TABLE} == {"reference"}
    assert not kernels.using_reference()
    cols = kernels.im2col(x, *window)
    np.testing.assert_array_equal(cols, reference.im2col(x, *window))
    np.testing.assert_allclose(kernels.col2im(cols, x.shape, *window), reference.col2im(cols, x.shape, *window))
    y, argmax = kernels.maxpool_forward(x, *window)
    np.testing.assert_array_equal(kernels.maxpool_backward(y, argmax, x.shape, *window[:6]),
                                  reference.maxpool_backward(y, argmax, x.shape, *window[:6]))
    np.testing.assert_array_equal(kernels.upsample_backward(kernels.upsample_forward(x, 2, 2), 2, 2), 4 * x)


def test_environment_variable_selects_learning_mode(monkeypatch):
    monkeypatch.setenv("MINITENSOR_KERNELS", "reference")
    assert switches.reference_requested_by_environment()
    monkeypatch.setenv("MINITENSOR_KERNELS", "auto")
    assert not switches.reference_requested_by_environment()
    monkeypatch.setenv("MINITENSOR_KERNELS", "numbaa")
    with pytest.raises(ValueError, match="MINITENSOR_KERNELS"):
        switches.reference_requested_by_environment()


@pytest.mark.parametrize("call, error, message", [
    (lambda x: kernels.im2col(x[0], 3, 3, 1, 1, 1, 1, 4, 4), ValueError, "4-D"),
    (lambda x: kernels.im2col(x.astype(np.int64), 3, 3, 1, 1, 1, 1, 4, 4), TypeError, "float32 or float64"),
    (lambda x: kernels.im2col(x, 3, 3, 0, 1, 1, 1, 4, 4), ValueError, "sh must be an int >= 1"),
    (lambda x: kernels.im2col(x, 3, 3, 1, 1, -1, 1, 4, 4), ValueError, "pad_top must be an int >= 0"),
    (lambda x: kernels.col2im(np.zeros((16, 8)), x.shape, 3, 3, 1, 1, 1, 1, 4, 4), ValueError, "needs"),
    (lambda x: kernels.maxpool_backward(x, np.zeros(x.shape, np.int64), x.shape, 1, 1, 1, 1, 0, 0),
     ValueError, "int32"),
    (lambda x: kernels.upsample_backward(x, 3, 1), ValueError, "whole 3x1 blocks"),
    (lambda x: kernels.relu_backward(x, x[..., :2]), ValueError, "one shape"),
    (lambda x: kernels.relu_backward(x, x.astype(np.float16)), TypeError, "use one dtype"),
    (lambda x: kernels.softmax_forward(np.zeros((2, 0))), ValueError, "non-empty last axis"),
])
def test_dispatcher_rejects_bad_arguments(call, error, message):
    x = np.zeros((2, 4, 4, 3))
    with pytest.raises(error, match=message):
        call(x)


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


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("c_type", ["float", "double"])
def test_gpu_sources_compile_with_nvcc(c_type, tmp_path):
    source = tmp_path / f"kernels_{c_type}.cu"
    source.write_text(gpu.cuda_sources()[c_type])
    result = subprocess.run(["nvcc", "-arch=sm_90", "-Werror", "all-warnings", "-c", str(source),
                             "-o", str(tmp_path / f"kernels_{c_type}.o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.gpu
def test_gpu_dispatch_and_mixed_devices(fast_kernels):
    cupy = backend.cupy_module()
    x = cupy.asarray(np.zeros((1, 2, 2, 1), dtype=np.float32))
    assert kernels.implementation_of("maxpool_forward", x) == "cuda"
    assert kernels.implementation_of("softmax_forward", x) == "reference"
    y, argmax = kernels.maxpool_forward(x, 1, 1, 1, 1, 0, 0, 2, 2)
    with pytest.raises(TypeError, match="different devices"):
        kernels.maxpool_backward(y, cupy.asnumpy(argmax), x.shape, 1, 1, 1, 1, 0, 0)


@pytest.mark.parametrize("serial_below", [0, 1 << 40])     # force the parallel, then the serial compiled kernel
def test_im2col_serial_and_parallel_versions_agree_with_reference(monkeypatch, serial_below):
    monkeypatch.setattr(cpu, "SERIAL_BELOW_ELEMENTS", serial_below)
    x = np.random.default_rng(0).standard_normal((3, 7, 6, 4)).astype(np.float32)
    for args in [(3, 3, 1, 1, 1, 1, 7, 6), (3, 3, 2, 2, 0, 1, 3, 3), (2, 3, 1, 2, 0, 0, 6, 2)]:
        expected = reference.im2col(x, *args)
        scratch = np.full(expected.shape, np.nan, dtype=np.float32)     # garbage in reused memory
        np.testing.assert_array_equal(cpu.im2col(x, *args, out=scratch), expected)
