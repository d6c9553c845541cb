"""Shared fixtures: TensorFlow imported once (quietly), where the GPU tests run, small helpers."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")   # oneDNN reorders float sums; keep TF's reference kernels

# The fixed rules for the convolutions' algorithms, not 'auto''s timings: a test's numbers must not depend on
# how busy the machine was (tests/test_conv_plan.py tests 'auto' itself), and no test writes the user's
# plan cache. Subprocesses (train.py, predict.py, MPI ranks) inherit both.
os.environ.setdefault("MINITENSOR_CONV", "rules")
_PLAN_CACHE = tempfile.mkdtemp(prefix="minitensor-test-cache-")
os.environ.setdefault("MINITENSOR_CACHE_DIR", _PLAN_CACHE)
atexit.register(shutil.rmtree, _PLAN_CACHE, ignore_errors=True)

import minitensor  # noqa: E402, F401  before NumPy, as train.py does (minitensor/cpu_runtime.py)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from minitensor import backend  # noqa: E402


@pytest.fixture(scope="session")
def tf():
    import tensorflow

    tensorflow.config.set_visible_devices([], "GPU")   # compare with TF on the CPU, always
    return tensorflow


@pytest.fixture(scope="session")
def keras(tf):
    import keras as keras_module

    return keras_module


def pytest_configure(config):
    """With ``MINITENSOR_REQUIRE_GPU=1`` (bench/gpu_check.sh sets it) a GPU that is not usable stops the
    session before any test runs, naming why: the gpu tests must not pass quietly on the CPU stand-in."""
    if backend.gpu_required() and not backend.is_gpu_available():
        raise pytest.UsageError(
            f"{backend.REQUIRE_GPU_VARIABLE}=1 but the GPU is not usable: {backend.gpu_status()[1]}. "
            f"Without {backend.REQUIRE_GPU_VARIABLE} the gpu tests would run on the CPU stand-in for CuPy instead.")


def pytest_report_header(config):
    if not backend.is_gpu_available():
        where = "the CPU stand-in for CuPy (tests/cupy_standin.py)" if shutil.which("g++") else "nowhere (skipped)"
        return f"gpu tests run on: {where}; no usable GPU: {backend.gpu_status()[1]}"
    cupy = backend.cupy_module()
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())["name"]
    return f"gpu tests run on: {name.decode() if isinstance(name, bytes) else name} (CuPy {cupy.__version__})"


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests run on the real GPU where one is usable, else on the CPU stand-in for CuPy
    (tests/cupy_standin.py, which needs g++ for the CUDA kernels); only without either are they skipped.
    ``MINITENSOR_REQUIRE_GPU=1`` allows the real GPU only (``pytest_configure``)."""
    if backend.is_gpu_available() or shutil.which("g++"):
        return
    skip = pytest.mark.skip(reason=f"no usable GPU ({backend.gpu_status()[1]}) and no g++ for the CPU stand-in")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def gpu_backend(request, monkeypatch):
    """For a ``gpu`` test on a machine without a usable GPU: CuPy is the strict CPU stand-in."""
    if request.node.get_closest_marker("gpu") is None or backend.is_gpu_available():
        yield None
        return
    import cupy_standin
    from minitensor.kernels import gpu

    yield cupy_standin.install(monkeypatch)
    gpu.PROGRAM.forget_compiled()     # the stand-in's compiled modules must not outlive it


@pytest.fixture
def fast_kernels():
    """numba / CUDA and the 'rules' convolution choice for one test, whatever MINITENSOR_KERNELS /
    MINITENSOR_CONV say (a whole suite may be run in learning mode, MINITENSOR_KERNELS=reference)."""
    from minitensor import kernels

    previous = kernels.using_reference()
    kernels.use_reference(False)
    with kernels.conv_algorithm("rules"):
        yield
    kernels.use_reference(previous)


def rel_error(actual, expected):
    """max |actual - expected| / max |expected|: the normwise relative error used across the tests."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(np.max(np.abs(expected), initial=0.0), 1e-30)
    return float(np.max(np.abs(actual - expected), initial=0.0) / scale)
