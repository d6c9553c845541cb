"""The CUDA kernels of minitensor/kernels/gpu.py, compiled as C++ by g++, against the reference.

No GPU or nvcc needed: ``cuda_cpp.CppModule`` compiles the exact strings of ``gpu.cuda_source``
and runs each kernel serially over its 1-D grid (see the header comment in cuda_cpp.py for why
that is faithful). The kernels are reached through gpu.py's own public functions, with
``gpu.cupy_module`` replaced by a NumPy stand-in whose ``RawModule`` is ``CppModule``, so the
launch arguments (grid, block size, argument order, np.int32 sizes) are gpu.py's very own.
The cases are those of the GPU tests in test_kernels.py.
"""
from __future__ import annotations

import types

import numpy as np
import pytest

from cuda_cpp import CompileError, CppModule
from minitensor.kernels import gpu, reference
from test_kernels import (CASES, DTYPES, UPSAMPLE_CASES, assert_same_array, check_im2col_col2im, check_maxpool,
                          check_upsample, random_x)

ARGMAX_GARBAGE = -7   # not a window offset: a cell the kernel forgot to write shows


def _garbage_empty(shape, dtype=np.float64):
    """``cupy.empty`` stand-in: reused device memory holds garbage, so fill with NaN (or -7)."""
    dtype = np.dtype(dtype)
    return np.full(shape, np.nan if dtype.kind == "f" else ARGMAX_GARBAGE, dtype=dtype)


# The cupy attributes that gpu.py's public functions touch, and nothing else: any other use fails.
FAKE_CUPY = types.SimpleNamespace(
    RawModule=CppModule,
    ascontiguousarray=np.ascontiguousarray,
    empty=_garbage_empty,
    int32=np.int32,
    zeros=np.zeros,
)


@pytest.fixture(scope="module", autouse=True)
def cpp_gpu():
    """gpu.py with CuPy replaced by the g++ stand-in; its caches cleared before and after."""
    gpu._kernel.cache_clear()
    gpu._module.cache_clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpu, "cupy_module", lambda: FAKE_CUPY)
        yield
    gpu._kernel.cache_clear()
    gpu._module.cache_clear()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpp_im2col_col2im_match_reference(case, dtype):
    check_im2col_col2im(gpu, case, dtype, seed=9)
    x = random_x(case, dtype, np.random.default_rng(9))
    out = _garbage_empty(reference.im2col(x, *case.window).shape, dtype)   # reused memory holds garbage
    assert gpu.im2col(x, *case.window, out=out) is out
    assert_same_array(out, reference.im2col(x, *case.window), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpp_maxpool_matches_reference(case, dtype):
    check_maxpool(gpu, case, dtype, seed=10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", UPSAMPLE_CASES)
def test_cpp_upsample_matches_reference(shape, dtype):
    check_upsample(gpu, shape, dtype, seed=11)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [1, 255, 257, 1000])    # under, around and over one block of threads
def test_cpp_adam_update_is_bit_identical_to_the_reference(size, dtype):
    """Three steps of the fused kernel against the array code: the same bits (--fmad=false, -ffp-contract=off)."""
    rng = np.random.default_rng(size)
    scalar = np.dtype(dtype).type
    arrays = {name: rng.standard_normal(size).astype(dtype) for name in ("param", "m")}
    arrays["v"] = rng.uniform(0, 1, size).astype(dtype)
    expected = {name: value.copy() for name, value in arrays.items()}
    for step in range(3):
        grad = (rng.standard_normal(size) * 10.0 ** rng.integers(-8, 2, size)).astype(dtype)
        scalars = (scalar(1e-3 * (step + 1)), scalar(1 - 0.9), scalar(1 - 0.999), scalar(1e-7))
        gpu.adam_update(arrays["param"], grad, arrays["m"], arrays["v"], *scalars)
        reference.adam_update(expected["param"], grad, expected["m"], expected["v"], *scalars)
        for name in arrays:
            np.testing.assert_array_equal(arrays[name], expected[name], err_msg=f"{name} after step {step + 1}")
    before = {name: value.copy() for name, value in arrays.items()}
    for bad in (np.nan, np.inf):        # the guard (the step's loss) not finite: nothing may change
        gpu.adam_update(arrays["param"], grad, arrays["m"], arrays["v"], *scalars, guard=np.array(bad, dtype))
        for name in arrays:
            np.testing.assert_array_equal(arrays[name], before[name], err_msg=f"{name} changed under guard {bad}")


def test_every_kernel_of_the_source_is_covered():
    """The tests above reach all kernels that gpu.py compiles, for both C types."""
    for c_type, source in gpu.cuda_sources().items():
        assert set(CppModule(source).params) == {"im2col", "col2im", "maxpool_forward", "maxpool_backward",
                                                 "upsample_forward", "upsample_backward", "adam_update"}, c_type


def test_broken_source_raises_with_the_compiler_message():
    source = gpu.cuda_source("float").replace("return o < out_size ? o : -1;", "return o < out_size ? o : oops;")
    with pytest.raises(CompileError, match="'oops' was not declared"):
        CppModule(source)


def test_compiler_warnings_are_errors():
    with pytest.raises(CompileError, match="unused"):
        CppModule('extern "C" __global__ void f(float* y, int n) { int unused = n; y[0] = 0; }')


class DeviceArray:
    """A device-array stand-in: the kernel reads the NumPy array it holds in ``_data``."""

    def __init__(self, data):
        self._data = data


def _upsample_args(x, y):
    """upsample_forward's arguments for x (1, 2, 3, 1) and y (1, 4, 6, 1), as gpu._launch builds them."""
    return (x, y) + tuple(np.int32(v) for v in (1, 2, 3, 1, 2, 2))


def test_kernel_checks_its_arguments():
    kernel = CppModule(gpu.cuda_source("float")).get_function("upsample_forward")
    x = np.arange(6, dtype=np.float32).reshape(1, 2, 3, 1)
    y = np.zeros((1, 4, 6, 1), np.float32)
    kernel((1,), (gpu._THREADS_PER_BLOCK,), _upsample_args(DeviceArray(x), DeviceArray(y)))
    np.testing.assert_array_equal(y, reference.upsample_forward(x, 2, 2))
    with pytest.raises(TypeError, match="x: expected a float32 array .*got float64"):
        kernel((1,), (256,), _upsample_args(x.astype(np.float64), y))
    with pytest.raises(TypeError, match="y: array is not C-contiguous"):
        kernel((1,), (256,), _upsample_args(x, np.zeros((1, 4, 6, 2), np.float32)[..., :1]))
    with pytest.raises(TypeError, match="sh: expected int32"):
        kernel((1,), (256,), _upsample_args(x, y)[:6] + (np.int64(2), np.int32(2)))
    with pytest.raises(TypeError, match="takes 8 arguments"):
        kernel((1,), (256,), (x, y))
    with pytest.raises(ValueError, match="1-D grid"):
        kernel((1, 2), (256,), _upsample_args(x, y))
