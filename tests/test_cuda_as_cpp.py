"""The C++ harness that runs gpu.py's CUDA source on the CPU (tests/cuda_cpp.py), and gpu.py's source against the op table.

No GPU or nvcc needed: ``cuda_cpp.CppModule`` compiles the exact strings of ``gpu.cuda_source`` and runs
each kernel serially over its 1-D grid (see the header comment in cuda_cpp.py for why that is faithful).
The CUDA twins themselves are checked against the reference, through gpu.py's own public functions on the
CPU stand-in for CuPy, by tests/test_kernels.py's one parametrized test over the op table; this file
checks the harness (it must fail where the GPU would) and that the table and the source name the same kernels.
"""
from __future__ import annotations

import numpy as np
import pytest

from cuda_cpp import CompileError, CppModule
from minitensor.kernels import gpu, reference, table


def test_the_source_compiles_exactly_the_kernels_of_the_tables_cuda_column():
    """Every CUDA kernel gpu.py compiles is an op whose CUDA column is gpu.py's own code, and the other way
    round, for both C types; so the parametrized test over the table reaches every kernel."""
    in_table = {op for op, row in table.TABLE.items() if isinstance(row["cuda"], table.Own) and row["cuda"].module is gpu}
    for c_type, source in gpu.cuda_sources().items():
        assert set(CppModule(source).params) == in_table, c_type


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
    """upsample_forward's arguments for x (1, 2, 3, 1) and y (1, 4, 6, 1), as CudaProgram.launch builds them."""
    return (x, y) + tuple(np.int32(v) for v in (1, 2, 3, 1, 2, 2))


def test_kernel_checks_its_arguments():
    kernel = CppModule(gpu.cuda_source("float")).get_function("upsample_forward")
    x = np.arange(6, dtype=np.float32).reshape(1, 2, 3, 1)
    y = np.zeros((1, 4, 6, 1), np.float32)
    kernel((1,), (gpu.THREADS_PER_BLOCK,), _upsample_args(DeviceArray(x), DeviceArray(y)))
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
