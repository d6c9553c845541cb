"""The convolution ops beyond "each algorithm equals the reference" (tests/test_kernels.py checks that):
the policy that picks an algorithm per product, what the fast CPU kernels promise (bit-for-bit repeats,
any strides of input), and whole training steps under every choice.

Conv2D under every choice passes the float64 central-difference check and matches live TensorFlow in
tests/test_layers.py (its ``conv_path`` fixture).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import rel_error
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import Case, conv_operands

from minitensor import backend, kernels, layers
from minitensor.kernels import ConvGeometry, conv_policy, cpu_conv, cpu_winograd, reference

ALGORITHMS = ["gemm", "winograd", "winograd4", "direct"]
FAST = ["winograd", "winograd4", "direct"]
PRODUCTS = ("conv2d_forward", "conv2d_input_grad", "conv2d_kernel_grad")


@pytest.fixture(autouse=True)
def _fast(fast_kernels):
    """Every test here starts from numba / CUDA and 'rules' (conftest.fast_kernels)."""


def operands(n, h, w, c, oc, k=3, stride=1, padding="same", dtype=np.float32, seed=0):
    return conv_operands(Case(n, h, w, c, k, k, stride, stride, padding), oc, dtype, seed)


def products(x, kernel, bias, dz, geometry, algorithm=None):
    """The three products of one convolution: y (with bias and ReLU), dx, dW."""
    return (kernels.conv2d_forward(x, kernel, bias, geometry, relu=True, algorithm=algorithm),
            kernels.conv2d_input_grad(dz, kernel, x.shape, geometry, algorithm=algorithm),
            kernels.conv2d_kernel_grad(x, dz, geometry, algorithm=algorithm))


# (N, H, W, C, OC, kernel, stride) and what 'rules' runs there for (y, dx, dW): small_unet's kind of
# full-resolution layer goes to Winograd (F(4x4, 3x3) from 16 channels, for y and dx); a small map, a 1x1,
# a strided and a 5x5 layer keep im2col + GEMM.
PINNED = [((1, 96, 96, 8, 8, 3, 1), ("winograd",) * 3), ((2, 64, 64, 8, 8, 3, 1), ("winograd",) * 3),
          ((2, 64, 64, 16, 16, 3, 1), ("winograd4", "winograd4", "winograd")),
          ((1, 32, 32, 8, 8, 3, 1), ("gemm",) * 3), ((1, 96, 96, 8, 8, 1, 1), ("gemm",) * 3),
          ((1, 96, 96, 8, 8, 3, 2), ("gemm",) * 3), ((1, 96, 96, 8, 8, 5, 1), ("gemm",) * 3)]


@pytest.mark.parametrize("shape, expected", PINNED, ids=str)
def test_auto_runs_the_algorithm_it_names_and_no_other(shape, expected):
    """Pinned by the numbers, not by the thresholds: each product under 'rules' gives exactly the bits of
    the algorithm it is expected to take (and conv_algorithm_of names), and not those of the others."""
    n, h, w, c, oc, k, stride = shape
    x, kernel, bias, dz, geometry = operands(n, h, w, c, oc, k, stride)
    auto = products(x, kernel, bias, dz, geometry)
    args = {"conv2d_forward": (x, kernel, bias, geometry), "conv2d_input_grad": (dz, kernel, x.shape, geometry),
            "conv2d_kernel_grad": (x, dz, geometry)}
    for op, ours, chosen in zip(PRODUCTS, auto, expected):
        assert kernels.conv_algorithm_of(op, *args[op]) == chosen, op
    for algorithm in ALGORITHMS:
        if algorithm.startswith("winograd") and (k != 3 or stride != 1) or algorithm == "direct" and stride != 1:
            continue
        named = products(x, kernel, bias, dz, geometry, algorithm)
        for op, ours, theirs, chosen in zip(PRODUCTS, auto, named, expected):
            assert np.array_equal(ours, theirs) == (algorithm == chosen), (op, algorithm)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 32), size=st.integers(1, 200), c=st.integers(1, 2048), oc=st.integers(1, 2048),
       k=st.sampled_from([1, 2, 3, 5]), stride=st.sampled_from([1, 2]))
def test_the_policy_is_monotone_and_keeps_gemm_where_nothing_else_runs(n, size, c, oc, k, stride):
    """What 'rules' must do whatever its tuned numbers: more pixels never change a Winograd choice, fewer
    channels never take F(2x2, 3x3) away; dW never goes to Winograd where the forward does not; strided,
    1x1, non-3x3 layers, CuPy arrays and learning mode never reach a numba kernel; and the explicit
    settings are obeyed (the rules give dW no F(4x4, 3x3); the setting 'winograd4' does)."""
    geometry = ConvGeometry(k, k, stride, stride, (k - 1) // 2, (k - 1) // 2, size, size)
    x_shape = (n, size * stride, size * stride, c)
    choose = conv_policy.choose
    winograd_layer = (k, stride) == (3, 1)
    for product in conv_policy.PRODUCTS:
        chosen = choose(product, geometry, x_shape, oc)
        if chosen in ("winograd", "winograd4"):
            assert choose(product, geometry, (2 * n, *x_shape[1:]), oc) == chosen
        if chosen == "winograd":
            assert choose(product, geometry, (*x_shape[:3], max(1, c // 2)), oc) in ("winograd", "winograd4")
        if chosen == "winograd4":
            assert product != "kernel_grad"
        if not winograd_layer:
            assert chosen == "gemm"
        assert choose(product, geometry, x_shape, oc, xp=object()) == "gemm"       # not NumPy: the GPU
        with kernels.conv_algorithm("winograd"):
            assert choose(product, geometry, x_shape, oc) == ("winograd" if winograd_layer else "gemm")
        with kernels.conv_algorithm("winograd4"):
            assert choose(product, geometry, x_shape, oc) == ("winograd4" if winograd_layer else "gemm")
        with kernels.conv_algorithm("direct"):
            assert choose(product, geometry, x_shape, oc) == ("direct" if stride == 1 and k != 1 else "gemm")
        with kernels.conv_algorithm("gemm"):
            assert choose(product, geometry, x_shape, oc) == "gemm"
        with kernels.reference_kernels():
            assert choose(product, geometry, x_shape, oc) == "reference"
    if choose("kernel_grad", geometry, x_shape, oc) == "winograd":
        assert choose("forward", geometry, x_shape, oc) in ("winograd", "winograd4")


def test_learning_mode_runs_the_reference_convolution():
    """Under MINITENSOR_KERNELS=reference the layer's numbers are reference.py's im2col -> GEMM -> col2im, bit for bit."""
    x, kernel, bias, dz, geometry = operands(1, 96, 96, 4, 6)          # 'rules' would take Winograd here
    layer = layers.Conv2D(6, 3, 1, "same", activation="relu", seed=0)
    layer.build((96, 96, 4))
    layer.set_weights([kernel, bias])
    with kernels.reference_kernels():
        y = layer.forward(x)
        dx = layer.backward(dz)
    expected_y = reference.conv2d_forward(x, kernel, bias, geometry, relu=True)
    dz_relu = dz * (expected_y > 0)
    np.testing.assert_array_equal(y, expected_y)
    np.testing.assert_array_equal(dx, reference.conv2d_input_grad(dz_relu, kernel, x.shape, geometry))
    np.testing.assert_array_equal(layer.grads[0], reference.conv2d_kernel_grad(x, dz_relu, geometry))


@pytest.mark.parametrize("algorithm", FAST)
def test_fast_kernels_repeat_bit_for_bit_whatever_the_thread_count(algorithm):
    """Sums are split by the shape (tiles, pixel blocks, row bands), never by the threads."""
    import numba

    previous = numba.get_num_threads()
    if previous == 1:
        pytest.skip("numba has one thread here: nothing to compare")
    x, kernel, bias, dz, geometry = operands(3, 20, 18, 8, 32)
    runs = []
    try:
        for threads in sorted({1, previous}):
            numba.set_num_threads(threads)
            runs.append(products(x, kernel, bias, dz, geometry, algorithm))
    finally:
        numba.set_num_threads(previous)
    runs.append(products(x, kernel, bias, dz, geometry, algorithm))
    for run in runs[1:]:
        for ours, first in zip(run, runs[0]):
            np.testing.assert_array_equal(ours, first)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_takes_non_contiguous_input(algorithm):
    x, kernel, bias, dz, geometry = operands(2, 8, 12, 4, 8, dtype=np.float64)
    cropped = np.concatenate([x, x], axis=2)[:, :, 6:18]       # a strided view, as Cropping2D hands on
    assert not cropped.flags.c_contiguous
    for ours, plain in zip(products(cropped, kernel, bias, dz, geometry, algorithm),
                           products(np.ascontiguousarray(cropped), kernel, bias, dz, geometry, "reference")):
        assert rel_error(ours, plain) < 1e-13


@pytest.mark.gpu
def test_the_gpu_keeps_im2col_and_gemm_under_every_algorithm(gpu_backend):
    x = np.random.default_rng(5).standard_normal((1, 128, 128, 8)).astype(np.float32)
    layer = layers.Conv2D(8, 3, 1, "same", activation="relu", seed=0)
    layer.build((128, 128, 8))
    geometry = layer._geometry(128, 128)
    for algorithm in ALGORITHMS:
        with kernels.conv_algorithm(algorithm):
            layer.to("cpu")
            assert kernels.conv_algorithm_of("conv2d_forward", x, layer.params[0], None, geometry) == algorithm
            layer.to("gpu")
            x_gpu = backend.to_device(x, "gpu")
            assert kernels.conv_algorithm_of("conv2d_forward", x_gpu, layer.params[0], None, geometry) == "gemm"
            assert backend.get_array_module(layer.forward(x_gpu)) is not np
    with pytest.raises(ValueError, match="has no cuda code"):
        kernels.conv2d_forward(x_gpu, layer.params[0], None, geometry, algorithm="winograd")


def test_kernel_gradient_bands_split_the_sum_without_changing_it(monkeypatch):
    x, _, _, dz, geometry = operands(2, 12, 10, 4, 8, dtype=np.float64)
    for algorithm in ("winograd", "direct"):            # the fast kernel gradients (F(4x4, 3x3) has none)
        monkeypatch.setattr(cpu_conv, "MAX_BANDS", 1)
        one_band = kernels.conv2d_kernel_grad(x, dz, geometry, algorithm=algorithm)
        monkeypatch.setattr(cpu_conv, "MAX_BANDS", 7)
        many = kernels.conv2d_kernel_grad(x, dz, geometry, algorithm=algorithm)
        np.testing.assert_allclose(many, one_band, rtol=1e-13, atol=1e-13)
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


def test_winograd4_transforms_are_the_papers_and_its_chunks_change_nothing(monkeypatch):
    """F(4, 3) in one dimension: A^T [(G g) * (B^T d)] is the 3-tap correlation of six inputs, and the
    kernels' B^T and A^T are those matrices; U = G g G^T of the centre tap; and the tiles' chunking
    (CHUNK_BYTES) changes no output by more than rounding."""
    from minitensor.kernels import cpu_winograd4, cpu_winograd4_tiles as tiles

    rng = np.random.default_rng(1)
    d, g = rng.standard_normal(6), rng.standard_normal(3)
    b_t, g_matrix, a_t = (np.array(m, dtype=float) for m in (tiles.B_T, tiles.G, tiles.A_T))
    np.testing.assert_allclose(a_t @ ((g_matrix @ g) * (b_t @ d)), [d[i:i + 3] @ g for i in range(4)], rtol=1e-13)
    np.testing.assert_allclose(tiles.b_t(*d), b_t @ d, rtol=1e-14)        # the kernels' hand-written forms
    np.testing.assert_allclose(tiles.a_t(*d), a_t @ d, rtol=1e-14)
    kernel = np.zeros((3, 3, 1, 1))
    kernel[1, 1, 0, 0] = 1.0
    u = tiles.transform_kernel(kernel, 4)[:, 0, 0].reshape(6, 6)
    np.testing.assert_allclose(u, np.outer(g_matrix[:, 1], g_matrix[:, 1]), rtol=1e-15)
    x, kernel, bias, dz, geometry = operands(3, 13, 22, 5, 7, padding="valid", dtype=np.float64)
    whole = kernels.conv2d_forward(x, kernel, bias, geometry, algorithm="winograd4")
    monkeypatch.setattr(cpu_winograd4, "CHUNK_BYTES", 1)
    monkeypatch.setattr(cpu_winograd4, "MIN_CHUNK_TILES", 7)    # 45 tiles, 3 x 3 x 5: 7 chunks, cut mid-row
    assert cpu_winograd4.chunk_tiles(45, 8, 7, 8) == 7
    chunked = kernels.conv2d_forward(x, kernel, bias, geometry, algorithm="winograd4")
    assert np.abs(chunked - whole).max() <= 1e-14 * np.abs(whole).max()      # BLAS may round a short chunk apart
    plain = reference.conv2d_forward(x, kernel, bias, geometry)
    assert np.abs(whole - plain).max() <= 3e-14 * np.abs(plain).max()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_winograd4_kernel_transforms_match_their_plain_twins(dtype):
    """transform_kernel and untransform_kernel_grad (numba, parallel over channels) against their tensordot
    twins: both sum in float64 and round once, in other orders, so float32 agrees to an ulp of the largest
    entry and float64 to rounding; odd channel counts, zero rows past C, more than one block of 64 outputs."""
    from minitensor.kernels import cpu_winograd4_tiles as tiles

    rng = np.random.default_rng(3)
    bound = {np.float32: 1.2e-7, np.float64: 1e-15}[dtype]
    for in_channels, channels, out_channels in ((5, 8, 7), (3, 4, 32), (64, 64, 130), (1, 4, 1)):
        kernel = rng.standard_normal((3, 3, in_channels, out_channels)).astype(dtype)
        fast, plain = tiles.transform_kernel(kernel, channels), tiles.transform_kernel_plain(kernel, channels)
        assert fast.dtype == dtype and fast.shape == (36, channels, out_channels)
        assert np.abs(fast - plain).max() <= bound * np.abs(plain).max()
        assert not fast.reshape(6, 6, channels, out_channels)[:, :, in_channels:].any()
        grad_u = rng.standard_normal((36, channels, out_channels)).astype(dtype)
        fast = tiles.untransform_kernel_grad(grad_u, in_channels)
        plain = tiles.untransform_kernel_grad_plain(grad_u, in_channels)
        assert fast.dtype == dtype and fast.shape == (3, 3, in_channels, out_channels)
        assert np.abs(fast - plain).max() <= bound * np.abs(plain).max()


def test_winograd4_kernel_gradient_is_the_same_on_any_number_of_threads(monkeypatch):
    """dW by F(4x4, 3x3) sums its chunks in groups fixed by the shape: one thread or two give the same bits
    (a resumed run on a machine with other cores must too), chunked finely or not it is the reference's
    to rounding, and a ragged edge (13 x 22 outputs: tiles of 4 cut at 13 and 22) adds nothing."""
    import numba

    from minitensor.kernels import cpu_winograd4

    x, _, _, dz, geometry = operands(3, 15, 24, 5, 7, padding="valid", dtype=np.float64)
    plain = reference.conv2d_kernel_grad(x, dz, geometry)
    monkeypatch.setattr(cpu_winograd4, "CHUNK_BYTES", 1)
    monkeypatch.setattr(cpu_winograd4, "MIN_CHUNK_TILES", 5)    # 72 tiles, 3 x 4 x 6: 15 chunks, 15 groups
    assert cpu_winograd4.chunk_tiles(72, 8, 7, 8) == 5
    threads = numba.get_num_threads()
    try:
        results = []
        for count in sorted({1, threads}):
            numba.set_num_threads(count)
            results.append(kernels.conv2d_kernel_grad(x, dz, geometry, algorithm="winograd4"))
    finally:
        numba.set_num_threads(threads)
    assert all(np.array_equal(result, results[0]) for result in results)
    assert np.abs(results[0] - plain).max() <= 3e-14 * np.abs(plain).max()


def test_winograd4_leaves_the_blas_thread_count_as_it_found_it():
    """Its chunks run on one BLAS thread each, set by the calling thread and put back there: the im2col + GEMM
    layers after it must get BLAS's threads back (a worker that restored its own count once left the whole
    process on one thread, and GEMM 2x slower)."""
    import numba

    from minitensor import cpu_runtime

    if not cpu_runtime.can_set_local_blas_threads() or numba.get_num_threads() < 2:
        pytest.skip("this BLAS cannot set a thread's count, or numba has one thread: the chunks take turns")
    count = cpu_runtime.set_local_blas_threads(3)
    cpu_runtime.set_local_blas_threads(count)
    x, kernel, bias, _, geometry = operands(4, 32, 32, 16, 16)
    for _ in range(3):
        kernels.conv2d_forward(x, kernel, bias, geometry, algorithm="winograd4")
    assert cpu_runtime.set_local_blas_threads(count) == count


def test_a_unet_step_is_the_same_under_every_algorithm():
    """One small_unet step at 96 px (where 'rules' takes F(2x2, 3x3) on the full-resolution layers and
    F(4x4, 3x3) on the 48 px ones):
    every algorithm, and learning mode, gives the gemm path's loss and weights, to float64 rounding."""
    import minitensor
    from unet import small_unet

    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (1, 96, 96, 3))
    y = np.eye(4)[rng.integers(0, 4, (1, 96, 96))]
    results = {}
    for algorithm in ALGORITHMS + ["rules", "auto", "learning mode"]:
        with kernels.reference_kernels() if algorithm == "learning mode" else kernels.conv_algorithm(algorithm):
            minitensor.set_seed(0)
            model = small_unet((96, 96, 3), base_filters=8, dtype="float64")
            model.compile(minitensor.optimizers.Adam(1e-3), minitensor.losses.BinaryCrossentropy(from_logits=True))
            results[algorithm] = (model.train_on_batch(x, y), [w.copy() for w in model.get_weights()])
    loss, weights = results["gemm"]
    for algorithm, (other_loss, other_weights) in results.items():
        assert abs(other_loss - loss) < 1e-12, algorithm
        assert max(rel_error(a, b) for a, b in zip(other_weights, weights)) < 1e-9, algorithm


@pytest.mark.parametrize("call, error, message", [
    (lambda x, k, g: kernels.conv2d_forward(x, k[:2, :2], None, ConvGeometry(2, 2, 1, 1, 0, 0, 5, 5),
                                            algorithm="winograd"), ValueError, "needs a 3x3 kernel"),
    (lambda x, k, g: kernels.conv2d_forward(x, k[:2, :2], None, ConvGeometry(2, 2, 1, 1, 0, 0, 5, 5),
                                            algorithm="winograd4"), ValueError, r"F\(4x4, 3x3\) needs a 3x3 kernel"),
    (lambda x, k, g: kernels.conv2d_kernel_grad(x, x[:, :5, :5, :1], ConvGeometry(2, 2, 1, 1, 0, 0, 5, 5),
                                                algorithm="winograd4"), ValueError, r"F\(4x4, 3x3\) needs a 3x3 kernel"),
    (lambda x, k, g: kernels.conv2d_forward(x, k, None, ConvGeometry(3, 3, 2, 2, 1, 1, 3, 3), algorithm="direct"),
     ValueError, "needs stride 1"),
    (lambda x, k, g: kernels.conv2d_forward(x, k, None, g, algorithm="fft"), ValueError, "algorithm must be"),
    (lambda x, k, g: kernels.conv2d_forward(x, k, None, (3, 3, 1, 1, 1, 1, 6, 6)), TypeError, "ConvGeometry"),
    (lambda x, k, g: kernels.conv2d_forward(x, k[:2], None, g), ValueError, "geometry is for a 3x3 kernel"),
    (lambda x, k, g: kernels.conv2d_forward(x, k.astype(np.float64), None, g), TypeError, "use one dtype"),
    (lambda x, k, g: kernels.conv2d_forward(x, k, np.zeros(3, np.float32), g), ValueError, "bias must have"),
    (lambda x, k, g: kernels.conv2d_forward(x, k, np.zeros(4), g), TypeError, "bias is float64"),
    (lambda x, k, g: kernels.conv2d_forward(x[..., :1], k, None, g), ValueError, "input channels"),
    (lambda x, k, g: kernels.conv2d_kernel_grad(x, x[:1], g), ValueError, "images"),
    (lambda x, k, g: kernels.conv2d_input_grad(x[..., :3], k, x.shape, g), ValueError, "do not fit"),
    (lambda x, k, g: ConvGeometry(3, 3, 0, 1, 1, 1, 6, 6), ValueError, "stride_h must be an int >= 1"),
])
def test_bad_arguments_are_clear_errors(call, error, message):
    x = np.zeros((2, 6, 6, 2), np.float32)
    kernel = np.zeros((3, 3, 2, 4), np.float32)
    with pytest.raises(error, match=message):
        call(x, kernel, ConvGeometry(3, 3, 1, 1, 1, 1, 6, 6))


def test_the_algorithm_switch():
    assert kernels.get_conv_algorithm() == "rules"
    with kernels.conv_algorithm("gemm"):
        assert kernels.get_conv_algorithm() == "gemm"
    assert kernels.get_conv_algorithm() == "rules"
    with pytest.raises(ValueError, match="expected one of auto, rules, winograd4, winograd, direct, gemm"):
        kernels.set_conv_algorithm("fastest")
    environment = dict(os.environ, MINITENSOR_CONV="nope")
    result = subprocess.run([sys.executable, "-c", "import minitensor"], env=environment, capture_output=True,
                            text=True)
    assert result.returncode != 0 and "MINITENSOR_CONV='nope'" in result.stderr
    environment["MINITENSOR_CONV"] = "Direct"
    result = subprocess.run([sys.executable, "-c", "import minitensor; print(minitensor.kernels.get_conv_algorithm())"],
                            env=environment, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "direct"
    del environment["MINITENSOR_CONV"]          # a user's default: the measured plan (conftest sets 'rules')
    result = subprocess.run([sys.executable, "-c", "import minitensor; print(minitensor.kernels.get_conv_algorithm())"],
                            env=environment, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "auto"


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
