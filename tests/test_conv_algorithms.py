"""The CPU's fast convolutions (Winograd F(2x2, 3x3) and the direct kernel) against their plain twin.

The chain of trust: reference.conv2d_forward / conv2d_kernel_grad (im2col + GEMM) equal the loops
of kernels/naive.py; cpu_winograd.py and cpu_conv.py equal the reference on many shapes, in
float32 and float64; and Conv2D under every ``conv_algorithm`` passes the float64
central-difference check and matches live TensorFlow (test_layers.py's cases).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import rel_error
import test_layers
from test_layers import CONV_CASES, conv_case_id

from minitensor import kernels, layers
from minitensor.kernels import cpu_conv, cpu_winograd, naive, reference
from minitensor.layers.conv2d import prefers_winograd

ALGORITHMS = ["gemm", "winograd", "direct"]


@pytest.fixture(autouse=True)
def fast_kernels():
    """The numba kernels, not the reference, and 'auto', whatever MINITENSOR_KERNELS / _CONV say."""
    previous = kernels.using_reference()
    kernels.use_reference(False)
    with kernels.conv_algorithm("auto"):
        yield
    kernels.use_reference(previous)

FAST = ["winograd", "direct"]
#: Largest |fast - reference| / max|reference| allowed (Winograd's transforms add a few roundings).
RELATIVE = {np.float32: 2e-6, np.float64: 1e-13}

# (N, H, W, C, OC, kernel, padding): odd sizes (half tiles), widths that leave 1-3 pixels over
# the 4-pixel blocks, channels that are not a multiple of 4, and OC around the U-Nets' 32.
SHAPES = [
    (1, 5, 5, 1, 1, 3, "same"),
    (2, 9, 11, 3, 5, 3, "same"),
    (2, 10, 13, 8, 7, 3, "valid"),
    (1, 7, 7, 4, 32, 3, "same"),
    (2, 6, 17, 5, 32, 3, "same"),
    (1, 8, 9, 6, 31, 3, "valid"),
    (1, 6, 10, 12, 33, 3, "same"),
    (2, 4, 4, 16, 64, 3, "same"),
    (1, 6, 7, 3, 4, 2, "valid"),
    (1, 6, 7, 3, 4, 2, "same"),         # even kernel: no padding on top, one row below
    (1, 8, 8, 4, 6, 5, "same"),
]


def shape_id(shape):
    n, h, w, c, oc, k, padding = shape
    return f"n{n}-{h}x{w}x{c}-oc{oc}-k{k}-{padding}"


def geometry(h, w, k, padding):
    if padding == "valid":
        return h - k + 1, w - k + 1, 0, 0
    return h, w, (k - 1) // 2, (k - 1) // 2


def operands(shape, dtype, seed=0):
    n, h, w, c, oc, k, padding = shape
    rng = np.random.default_rng(seed)
    out_h, out_w, pad_top, pad_left = geometry(h, w, k, padding)
    x = rng.standard_normal((n, h, w, c)).astype(dtype)
    kernel = rng.standard_normal((k, k, c, oc)).astype(dtype)
    bias = rng.standard_normal(oc).astype(dtype)
    dz = rng.standard_normal((n, out_h, out_w, oc)).astype(dtype)
    return x, kernel, bias, dz, (pad_top, pad_left, out_h, out_w)


def assert_close(ours, plain, dtype):
    assert ours.shape == plain.shape and ours.dtype == plain.dtype
    assert np.abs(ours - plain).max() <= RELATIVE[dtype] * np.abs(plain).max()


def algorithms_for(shape):
    return FAST if shape[5] == 3 else ["direct"]


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_reference_equals_the_plain_loops(shape):
    x, kernel, bias, dz, (pad_top, pad_left, out_h, out_w) = operands(shape, np.float64)
    y = reference.conv2d_forward(x, kernel, bias, pad_top, pad_left, out_h, out_w)
    np.testing.assert_allclose(y, naive.conv2d_forward(x, kernel, bias, 1, pad_top, pad_left, out_h, out_w),
                               rtol=1e-12, atol=1e-12)
    _, grad_kernel, _ = naive.conv2d_backward(dz, x, kernel, 1, pad_top, pad_left)
    np.testing.assert_allclose(reference.conv2d_kernel_grad(x, dz, kernel.shape[0], kernel.shape[1], pad_top, pad_left),
                               grad_kernel, rtol=1e-12, atol=1e-12)
    relu = reference.conv2d_forward(x, kernel, bias, pad_top, pad_left, out_h, out_w, relu=True)
    np.testing.assert_array_equal(relu, np.maximum(y, 0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_fast_kernels_match_reference(shape, dtype):
    x, kernel, bias, dz, (pad_top, pad_left, out_h, out_w) = operands(shape, dtype)
    kernel_h, kernel_w = kernel.shape[:2]
    for algorithm in algorithms_for(shape):
        for use_bias, relu in ((True, False), (False, True), (True, True)):
            b = bias if use_bias else None
            ours = kernels.conv2d_forward(x, kernel, b, pad_top, pad_left, out_h, out_w, relu=relu, algorithm=algorithm)
            assert_close(ours, reference.conv2d_forward(x, kernel, b, pad_top, pad_left, out_h, out_w, relu=relu),
                         dtype)
        ours = kernels.conv2d_kernel_grad(x, dz, kernel_h, kernel_w, pad_top, pad_left, algorithm=algorithm)
        assert_close(ours, reference.conv2d_kernel_grad(x, dz, kernel_h, kernel_w, pad_top, pad_left), dtype)


@pytest.mark.parametrize("algorithm", FAST)
def test_fast_kernels_repeat_bit_for_bit_whatever_the_thread_count(algorithm):
    """Sums are split by the shape (tiles, pixel blocks, row bands), never by the threads."""
    import numba

    previous = numba.get_num_threads()
    if previous == 1:
        pytest.skip("numba has one thread here: nothing to compare")
    x, kernel, bias, dz, (pad_top, pad_left, out_h, out_w) = operands((3, 20, 18, 8, 32, 3, "same"), np.float32)
    runs = []
    try:
        for threads in sorted({1, previous}):
            numba.set_num_threads(threads)
            runs.append((kernels.conv2d_forward(x, kernel, bias, pad_top, pad_left, out_h, out_w, algorithm=algorithm),
                         kernels.conv2d_kernel_grad(x, dz, 3, 3, pad_top, pad_left, algorithm=algorithm)))
    finally:
        numba.set_num_threads(previous)
    runs.append((kernels.conv2d_forward(x, kernel, bias, pad_top, pad_left, out_h, out_w, algorithm=algorithm),
                 kernels.conv2d_kernel_grad(x, dz, 3, 3, pad_top, pad_left, algorithm=algorithm)))
    for y, grad in runs[1:]:
        np.testing.assert_array_equal(y, runs[0][0])
        np.testing.assert_array_equal(grad, runs[0][1])


@pytest.mark.parametrize("algorithm", FAST)
def test_fast_kernels_take_non_contiguous_input(algorithm):
    x, kernel, bias, dz, (pad_top, pad_left, out_h, out_w) = operands((2, 8, 12, 4, 8, 3, "same"), np.float64)
    cropped = np.concatenate([x, x], axis=2)[:, :, 6:18]       # a strided view, as Cropping2D hands on
    assert not cropped.flags.c_contiguous
    ours = kernels.conv2d_forward(cropped, kernel, bias, pad_top, pad_left, out_h, out_w, algorithm=algorithm)
    plain = reference.conv2d_forward(np.ascontiguousarray(cropped), kernel, bias, pad_top, pad_left, out_h, out_w)
    assert_close(ours, plain, np.float64)
    ours = kernels.conv2d_kernel_grad(cropped, dz, 3, 3, pad_top, pad_left, algorithm=algorithm)
    assert_close(ours, reference.conv2d_kernel_grad(np.ascontiguousarray(cropped), dz, 3, 3, pad_top, pad_left),
                 np.float64)


@pytest.mark.gpu
def test_the_gpu_keeps_im2col_and_gemm_under_every_algorithm(gpu_backend):
    from minitensor import backend

    x = np.random.default_rng(5).standard_normal((1, 128, 128, 8)).astype(np.float32)
    for algorithm in ALGORITHMS:
        with kernels.conv_algorithm(algorithm):
            layer = layers.Conv2D(8, 3, 1, "same", activation="relu", seed=0)
            layer.build((128, 128, 8))
            layer.to("gpu")
            x_gpu = backend.to_device(x, "gpu")
            assert layer._fast_algorithm(x_gpu, 128, 128) is None
            assert layer._fast_algorithm(x, 128, 128) == (None if algorithm == "gemm" else algorithm)
            assert backend.get_array_module(layer.forward(x_gpu)) is not np


def test_kernel_gradient_bands_split_the_sum_without_changing_it(monkeypatch):
    x, _, _, dz, (pad_top, pad_left, _, _) = operands((2, 12, 10, 4, 8, 3, "same"), np.float64)
    one_band = {}
    for algorithm in FAST:
        monkeypatch.setattr(cpu_conv, "MAX_BANDS", 1)
        one_band[algorithm] = kernels.conv2d_kernel_grad(x, dz, 3, 3, pad_top, pad_left, algorithm=algorithm)
        monkeypatch.setattr(cpu_conv, "MAX_BANDS", 7)
        many = kernels.conv2d_kernel_grad(x, dz, 3, 3, pad_top, pad_left, algorithm=algorithm)
        np.testing.assert_allclose(many, one_band[algorithm], rtol=1e-13, atol=1e-13)
    assert cpu_conv.partial_bands(rows=3, partial_bytes=10) == 3
    assert cpu_conv.partial_bands(rows=1000, partial_bytes=cpu_conv.BANDS_BYTES // 2) == 2


def test_winograd_transforms_are_the_papers():
    """U = G g G^T of a one-hot 3x3 kernel, and dW = G^T dU G undoing the sum over the tile."""
    kernel = np.zeros((3, 3, 1, 1))
    kernel[1, 1, 0, 0] = 1.0                   # the centre tap: G[:, 1] outer G[:, 1]
    u = cpu_winograd.transform_kernel(kernel, 4)[:, 0, 0].reshape(4, 4)
    middle = np.array([0.0, 0.5, -0.5, 0.0])
    np.testing.assert_array_equal(u, np.outer(middle, middle))
    grad_u = np.random.default_rng(0).standard_normal((16, 4, 2))
    g = np.array(cpu_winograd._G)
    expected = np.einsum("ai,abco,bj->ijco", g, grad_u.reshape(4, 4, 4, 2), g)[:, :, :3]
    np.testing.assert_allclose(cpu_winograd.untransform_kernel_grad(grad_u, 3), expected)


@pytest.mark.parametrize("algorithm", FAST)
@pytest.mark.parametrize("case", CONV_CASES, ids=conv_case_id)
def test_conv2d_gradcheck_under_every_algorithm(case, algorithm):
    """test_layers.py's float64 central-difference check (there under 'auto'), under each fast path."""
    with kernels.conv_algorithm(algorithm):
        test_layers.test_conv2d_gradcheck(case)


@pytest.mark.parametrize("algorithm", FAST)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CONV_CASES, ids=conv_case_id)
def test_conv2d_matches_tensorflow_under_every_algorithm(tf, keras, case, dtype, algorithm):
    """test_layers.py's live TensorFlow comparison, under each fast path."""
    with kernels.conv_algorithm(algorithm):
        test_layers.test_conv2d_matches_tensorflow(tf, keras, case, dtype)


def test_each_layer_takes_the_algorithm_it_should():
    def chosen(choice, kernel=3, stride=1, images=1, size=128, channels=32, filters=32, product="forward"):
        layer = layers.Conv2D(filters, kernel, stride, "same", seed=0)
        layer.build((size, size, channels))
        with kernels.conv_algorithm(choice):
            return layer._fast_algorithm(np.zeros((images, size, size, channels), np.float32), size, size, product)

    assert chosen("auto") == "winograd" and chosen("auto", product="kernel_grad") == "winograd"
    assert chosen("auto", size=64) is None                    # too few pixels to repay the transforms
    assert chosen("auto", size=64, images=2) == "winograd"    # ... unless the batch makes them up
    assert chosen("auto", channels=3) == "winograd"           # the first layer too
    assert chosen("auto", channels=512, filters=512) == "winograd"                 # the forward holds U only
    assert chosen("auto", channels=512, filters=512, product="kernel_grad") is None  # dW's partial sums
    assert chosen("auto", channels=1024, filters=512) is None
    assert chosen("auto", kernel=1) is None and chosen("auto", stride=2) is None and chosen("auto", kernel=5) is None
    assert chosen("winograd", size=8) == "winograd" and chosen("winograd", kernel=5) is None
    assert chosen("direct", kernel=5, size=8) == "direct" and chosen("direct", kernel=1) is None
    assert chosen("gemm") is None
    assert prefers_winograd(8192, 8, 32) and not prefers_winograd(8191, 8, 32)


def test_a_unet_step_is_the_same_under_every_algorithm():
    """One small_unet step at 128 px (where 'auto' takes Winograd on the full-resolution layers):
    every algorithm gives the gemm path's loss and weights, to float64 rounding."""
    import minitensor
    from unet import small_unet

    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (1, 128, 128, 3))
    y = np.eye(4)[rng.integers(0, 4, (1, 128, 128))]
    results = {}
    for algorithm in ALGORITHMS + ["auto"]:
        with kernels.conv_algorithm(algorithm):
            minitensor.set_seed(0)
            model = small_unet(base_filters=8, dtype="float64")
            model.compile(minitensor.optimizers.Adam(1e-3), minitensor.losses.BinaryCrossentropy(from_logits=True))
            results[algorithm] = (model.train_on_batch(x, y), [w.copy() for w in model.get_weights()])
    loss, weights = results["gemm"]
    for algorithm, (other_loss, other_weights) in results.items():
        assert abs(other_loss - loss) < 1e-12, algorithm
        assert max(rel_error(a, b) for a, b in zip(other_weights, weights)) < 1e-9, algorithm


@pytest.mark.parametrize("call, error, message", [
    (lambda x, k: kernels.conv2d_forward(x, k[:2, :2], None, 0, 0, 5, 5, algorithm="winograd"), ValueError,
     "needs a 3x3 kernel"),
    (lambda x, k: kernels.conv2d_forward(x, k, None, 1, 1, 6, 6, algorithm="fft"), ValueError, "algorithm must be"),
    (lambda x, k: kernels.conv2d_forward(x, k.astype(np.float64), None, 1, 1, 6, 6), TypeError, "use one dtype"),
    (lambda x, k: kernels.conv2d_forward(x, k, np.zeros(3, np.float32), 1, 1, 6, 6), ValueError, "bias must have"),
    (lambda x, k: kernels.conv2d_forward(x, k, np.zeros(4), 1, 1, 6, 6), TypeError, "bias is float64"),
    (lambda x, k: kernels.conv2d_forward(x[..., :1], k, None, 1, 1, 6, 6), ValueError, "input channels"),
    (lambda x, k: kernels.conv2d_kernel_grad(x, x[:1], 3, 3, 1, 1), ValueError, "images"),
])
def test_bad_arguments_are_clear_errors(call, error, message):
    x = np.zeros((2, 6, 6, 2), np.float32)
    kernel = np.zeros((3, 3, 2, 4), np.float32)
    with pytest.raises(error, match=message):
        call(x, kernel)


def test_the_algorithm_switch():
    assert kernels.get_conv_algorithm() == "auto"
    with kernels.conv_algorithm("gemm"):
        assert kernels.get_conv_algorithm() == "gemm"
    assert kernels.get_conv_algorithm() == "auto"
    with pytest.raises(ValueError, match="expected one of auto, winograd, direct, gemm"):
        kernels.set_conv_algorithm("fastest")
    environment = dict(os.environ, MINITENSOR_CONV="nope")
    result = subprocess.run([sys.executable, "-c", "import minitensor"], env=environment, capture_output=True,
                            text=True)
    assert result.returncode != 0 and "MINITENSOR_CONV='nope'" in result.stderr
    environment["MINITENSOR_CONV"] = "Direct"
    result = subprocess.run([sys.executable, "-c", "import minitensor; print(minitensor.kernels.get_conv_algorithm())"],
                            env=environment, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "direct"


def run_python(code, **environment):
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_THREAD_TIMEOUT", "OMP_WAIT_POLICY", "MINITENSOR_CPU_DEFAULTS")}
    env.update(environment)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return result.stdout.strip()


def test_cpu_defaults_apply_when_minitensor_comes_before_numpy():
    code = "import minitensor, os; s = minitensor.cpu_runtime.status(); print(os.environ['OPENBLAS_THREAD_TIMEOUT'], " \
           "s['OPENBLAS_THREAD_TIMEOUT']['in_effect'], os.environ['OMP_WAIT_POLICY'])"
    assert run_python(code) == "4 True PASSIVE"
    late = "import numpy, minitensor, os; s = minitensor.cpu_runtime.status(); " \
           "print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'), s['OPENBLAS_THREAD_TIMEOUT']['in_effect'])"
    assert run_python(late) == "None False"
    assert run_python(late, OPENBLAS_THREAD_TIMEOUT="8") == "8 True"      # the user's own setting wins
    assert run_python("import unet, os; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])") == "4"
    off = "import minitensor, os; print(os.environ.get('OMP_WAIT_POLICY'), minitensor.cpu_runtime.KEEPS_FREED_MEMORY)"
    assert run_python(off, MINITENSOR_CPU_DEFAULTS="0") == "None False"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_big_arrays_come_back_without_fresh_pages():
    """With the allocator setting, a freed 64 MiB array's memory is reused: no new page faults."""
    code = ("import minitensor, numpy as np, resource\n"
            "faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "a = np.ones(1 << 24, np.float32); del a\n"
            "before = faults(); b = np.ones(1 << 24, np.float32); print(faults() - before)")
    kept, fresh = int(run_python(code)), int(run_python(code, MINITENSOR_CPU_DEFAULTS="0"))
    assert kept <= 16 < fresh or kept * 10 < fresh, (kept, fresh)   # 4 KiB or 2 MiB pages, if fresh


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_backward_kernel_is_numpys_product(dtype):
    rng = np.random.default_rng(4)
    dy = rng.standard_normal((2, 5, 7, 3)).astype(dtype)
    y = np.maximum(rng.standard_normal(dy.shape), 0).astype(dtype)
    dy[0, 0, 0, :] = [np.nan, -1.0, np.inf]
    y[0, 0, 0, :] = [0.0, 0.0, 1.0]                   # NaN * 0 stays NaN, -1 * 0 is -0.0, as in NumPy
    ours, plain = kernels.relu_backward(dy, y), reference.relu_backward(dy, y)
    assert ours.dtype == dtype
    np.testing.assert_array_equal(ours, plain)
    assert np.array_equal(np.signbit(ours), np.signbit(plain))
    with pytest.raises(ValueError, match="one shape"):
        kernels.relu_backward(dy, y[..., :2])
    with pytest.raises(TypeError, match="use one dtype"):
        kernels.relu_backward(dy, y.astype(np.float16))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_kernel_matches_reference(dtype):
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((2, 6, 5, 7)) * 10).astype(dtype)
    x[0, 0, 0] = [1000, 0, -1000, 3, 3, 3, 3]             # no overflow: the max is subtracted first
    x[0, 0, 1, 2] = np.nan                                  # a NaN spoils its own pixel only
    ours, plain = kernels.softmax_forward(x), reference.softmax_forward(x)
    assert ours.dtype == dtype
    np.testing.assert_allclose(ours, plain, rtol=4 * np.finfo(dtype).eps, atol=0)
    assert np.isnan(ours[0, 0, 1]).all() and np.isfinite(np.delete(ours.reshape(-1, 7), 1, axis=0)).all()
    np.testing.assert_allclose(ours.sum(axis=-1)[np.isfinite(ours.sum(axis=-1))], 1, rtol=1e-5)
    with pytest.raises(ValueError, match="non-empty last axis"):
        kernels.softmax_forward(np.zeros((2, 0)))
