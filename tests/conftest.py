"""Shared fixtures: TensorFlow imported once (quietly), the GPU skip, small helpers."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")   # oneDNN reorders float sums; keep TF's reference kernels

import numpy as np
import pytest

from minitensor import backend


@pytest.fixture(scope="session")
def tf():
    import tensorflow

    tensorflow.config.set_visible_devices([], "GPU")   # compare with TF on the CPU, always
    return tensorflow


@pytest.fixture(scope="session")
def keras(tf):
    import keras as keras_module

    return keras_module


def pytest_collection_modifyitems(config, items):
    if backend.is_gpu_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU with CuPy on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def rel_error(actual, expected):
    """max |actual - expected| / max |expected|: the normwise relative error used across the tests."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(np.max(np.abs(expected), initial=0.0), 1e-30)
    return float(np.max(np.abs(actual - expected), initial=0.0) / scale)
