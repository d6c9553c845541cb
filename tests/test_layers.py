"""Every layer: a float64 central-difference gradient check, and the same numbers as live TensorFlow."""
import numpy as np
import pytest
from conftest import rel_error

from minitensor import kernels, layers
from minitensor.gradcheck import check_layer

F64 = "float64"

# (N, H, W, C, filters, kernel, stride, padding, activation, use_bias)
CONV_CASES = [
    (1, 5, 5, 1, 1, 1, 1, "valid", None, True),
    (2, 6, 7, 3, 4, 3, 1, "valid", None, True),
    (2, 7, 6, 2, 3, 3, 2, "same", None, True),       # odd 'same' padding with stride 2: pad 0 top, 1 bottom
    (1, 8, 8, 2, 2, 3, 2, "same", "relu", True),
    (2, 5, 6, 3, 4, 3, 1, "same", "relu", True),
    (2, 4, 5, 3, 4, 1, 1, "same", "softmax", True),
    (1, 7, 7, 2, 3, (2, 3), 2, "valid", None, True),
    (2, 6, 6, 2, 2, 3, 1, "valid", "relu", False),
    (3, 9, 8, 1, 2, 3, 2, "valid", None, True),
]

# (N, H, W, C, pool, stride, padding)
POOL_CASES = [
    (1, 4, 4, 1, 2, None, "valid"),
    (2, 6, 7, 3, 2, None, "valid"),    # odd width: the last column is dropped
    (2, 7, 7, 2, 3, 2, "valid"),       # overlapping windows: gradients add
    (1, 5, 5, 2, 2, None, "same"),     # padded window cells never win
    (2, 6, 8, 1, (2, 3), (1, 2), "valid"),
]


#: The ways a Conv2D's products can run: each CPU algorithm, and learning mode (reference.py's
#: im2col -> GEMM -> col2im). These small cases keep im2col + GEMM under 'rules'.
CONV_PATHS = ["gemm", "winograd", "winograd4", "direct", "learning mode"]


@pytest.fixture(params=CONV_PATHS)
def conv_path(request, fast_kernels):
    """Run the test with Conv2D's products on one path (kernels.set_conv_algorithm or learning mode)."""
    with kernels.reference_kernels() if request.param == "learning mode" else kernels.conv_algorithm(request.param):
        yield request.param


def conv_case_id(case):
    n, h, w, c, f, k, s, p, a, b = case
    return f"n{n}-{h}x{w}x{c}-f{f}-k{k}-s{s}-{p}-{a}-{'bias' if b else 'nobias'}"


def tie_free(rng, shape):
    """Distinct values far apart compared with the finite-difference step, so no window has a tie."""
    return (rng.permutation(int(np.prod(shape))).reshape(shape) * 0.01 + rng.uniform(-1e-3, 1e-3, shape)).astype(
        np.float64)


# ----- gradient checks (float64) ----------------------------------------------------------------

@pytest.mark.parametrize("case", CONV_CASES, ids=conv_case_id)
def test_conv2d_gradcheck(case, conv_path):
    n, h, w, c, filters, kernel, stride, padding, activation, use_bias = case
    rng = np.random.default_rng(0)
    layer = layers.Conv2D(filters, kernel, stride, padding, activation=activation, use_bias=use_bias, dtype=F64,
                          seed=1)
    layer.build((h, w, c))
    if use_bias:   # non-zero bias so its gradient path is exercised with realistic values
        layer.set_weights([layer.params[0], rng.standard_normal(filters) * 0.1])
    result = check_layer(layer, rng.standard_normal((n, h, w, c)), seed=2)
    assert result.passed, result.report()
    assert set(result.errors) == ({"x", "kernel", "bias"} if use_bias else {"x", "kernel"})


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_maxpool_gradcheck(case):
    n, h, w, c, pool, stride, padding = case
    layer = layers.MaxPool2D(pool, stride, padding, dtype=F64)
    result = check_layer(layer, tie_free(np.random.default_rng(0), (n, h, w, c)), seed=3)
    assert result.passed, result.report()


@pytest.mark.parametrize("shape,size", [((1, 3, 3, 1), 2), ((2, 3, 4, 3), 2), ((2, 2, 3, 2), (3, 2))])
def test_upsampling_gradcheck(shape, size):
    result = check_layer(layers.UpSampling2D(size, dtype=F64), np.random.default_rng(0).standard_normal(shape))
    assert result.passed, result.report()


@pytest.mark.parametrize("cropping,shape", [(1, (1, 5, 5, 1)), ((1, 2), (2, 6, 7, 3)), (((0, 2), (1, 0)), (2, 5, 4, 2))])
def test_cropping_gradcheck(cropping, shape):
    result = check_layer(layers.Cropping2D(cropping, dtype=F64), np.random.default_rng(0).standard_normal(shape))
    assert result.passed, result.report()


@pytest.mark.parametrize("channels", [(1, 1), (2, 3), (3, 1, 2)])
def test_concatenate_gradcheck(channels):
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((2, 3, 5, c)) for c in channels]
    result = check_layer(layers.Concatenate(dtype=F64), inputs)
    assert result.passed, result.report()
    assert len(result.errors) == len(channels)


@pytest.mark.parametrize("layer_class", [layers.ReLU, layers.Softmax])
@pytest.mark.parametrize("shape", [(1, 3, 3, 1), (2, 4, 5, 3)])
def test_activation_gradcheck(layer_class, shape):
    result = check_layer(layer_class(dtype=F64), np.random.default_rng(0).standard_normal(shape))
    assert result.passed, result.report()


def test_gradcheck_catches_a_wrong_backward():
    """The checker must be able to fail: break ReLU's backward and see it reported."""
    layer = layers.ReLU(dtype=F64)
    layer.backward = lambda dy: dy          # forgets the mask
    result = check_layer(layer, np.random.default_rng(0).standard_normal((1, 4, 4, 2)))
    assert not result.passed
    assert "FAIL" in result.report()


# ----- against TensorFlow -------------------------------------------------------------------------

TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


def tf_forward_backward(tf, keras_layer, inputs, dout):
    """Keras forward and gradients (inputs, then weights) with a random upstream gradient."""
    tensors = [tf.constant(x) for x in inputs]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        y = keras_layer(tensors if len(tensors) > 1 else tensors[0])
    grads = tape.gradient(y, tensors + list(keras_layer.trainable_weights), output_gradients=tf.constant(dout))
    return y.numpy(), [g.numpy() for g in grads]


def compare_with_tf(tf, ours, keras_layer, inputs, dtype):
    rng = np.random.default_rng(7)
    inputs = [x.astype(dtype) for x in inputs]
    y = ours.forward(inputs if len(inputs) > 1 else inputs[0])
    dout = rng.standard_normal(y.shape).astype(dtype)
    dx = ours.backward(dout)
    dx = dx if isinstance(dx, list) else [dx]
    if ours.params:
        keras_layer.build(inputs[0].shape)
        keras_layer.set_weights(ours.get_weights())
    y_tf, grads_tf = tf_forward_backward(tf, keras_layer, inputs, dout)
    tolerance = TOLERANCE[dtype]
    assert y.dtype == np.dtype(dtype)
    assert rel_error(y, y_tf) < tolerance
    for ours_grad, tf_grad in zip(dx + [np.asarray(g) for g in ours.grads], grads_tf):
        assert rel_error(ours_grad, tf_grad) < tolerance


@pytest.mark.parametrize("stride, padding, kernel", [(1, "same", 3), (1, "valid", 3), (2, "same", 3), (1, "same", 1)])
def test_conv2d_equals_its_plain_loops(stride, padding, kernel):
    """The layer's im2col + GEMM paths (flipped kernel for stride 1, col2im for stride 2, the 1x1
    shortcut) against kernels/naive.py's loops: forward, dx, dW and db."""
    from minitensor.kernels import naive

    rng = np.random.default_rng(12)
    layer = layers.Conv2D(4, kernel, stride, padding, dtype=F64, seed=5)
    x = rng.standard_normal((2, 5, 6, 3))
    z = layer.forward(x)
    dz = rng.standard_normal(z.shape)
    dx = layer.backward(dz)
    _, _, _, _, pad_top, pad_left, out_h, out_w = layer._geometry(5, 6).window
    kernel_w, bias = layer.params
    np.testing.assert_allclose(z, naive.conv2d_forward(x, kernel_w, bias, stride, pad_top, pad_left, out_h, out_w),
                               rtol=1e-12, atol=1e-12)
    for ours, plain in zip((dx, *layer.grads), naive.conv2d_backward(dz, x, kernel_w, stride, pad_top, pad_left)):
        np.testing.assert_allclose(ours, plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CONV_CASES, ids=conv_case_id)
def test_conv2d_matches_tensorflow(tf, keras, case, dtype, conv_path):
    n, h, w, c, filters, kernel, stride, padding, activation, use_bias = case
    rng = np.random.default_rng(1)
    ours = layers.Conv2D(filters, kernel, stride, padding, activation=activation, use_bias=use_bias, dtype=dtype,
                         seed=3)
    ours.build((h, w, c))
    if use_bias:
        ours.set_weights([ours.params[0], rng.standard_normal(filters) * 0.1])
    keras_layer = keras.layers.Conv2D(filters, kernel, stride, padding, activation=activation, use_bias=use_bias,
                                      dtype=dtype)
    compare_with_tf(tf, ours, keras_layer, [rng.standard_normal((n, h, w, c))], dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_maxpool_matches_tensorflow(tf, keras, case, dtype):
    n, h, w, c, pool, stride, padding = case
    x = tie_free(np.random.default_rng(2), (n, h, w, c))
    compare_with_tf(tf, layers.MaxPool2D(pool, stride, padding, dtype=dtype),
                    keras.layers.MaxPool2D(pool, stride, padding, dtype=dtype), [x], dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_maxpool_ties_route_like_tensorflow(tf, keras, dtype):
    """Tied maxima: the whole gradient goes to one element, the same one TensorFlow picks."""
    x = np.zeros((1, 4, 6, 2), dtype=dtype)
    x[0, 2:, 2:4, 0] = 1.0                      # a window that is tied everywhere at 1
    x[0, 0, 4, 1] = x[0, 1, 5, 1] = 2.0         # two tied maxima, not the first cell
    ours = layers.MaxPool2D(2, dtype=dtype)
    ours.forward(x)
    dout = np.arange(1, 1 + 2 * 3 * 2, dtype=dtype).reshape(1, 2, 3, 2)
    dx = ours.backward(dout)
    _, (dx_tf,) = tf_forward_backward(tf, keras.layers.MaxPool2D(2, dtype=dtype), [x], dout)
    np.testing.assert_array_equal(dx, dx_tf)
    window = dx[0, 0:2, 4:6, 1]
    assert np.count_nonzero(window) == 1 and window[0, 0] == dout[0, 0, 2, 1]   # first max, row-major


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape,size", [((2, 3, 4, 3), 2), ((1, 2, 3, 2), (3, 2))])
def test_upsampling_matches_tensorflow(tf, keras, shape, size, dtype):
    x = np.random.default_rng(3).standard_normal(shape)
    compare_with_tf(tf, layers.UpSampling2D(size, dtype=dtype), keras.layers.UpSampling2D(size, dtype=dtype), [x],
                    dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cropping", [1, (1, 2), ((0, 2), (1, 0))])
def test_cropping_matches_tensorflow(tf, keras, cropping, dtype):
    x = np.random.default_rng(4).standard_normal((2, 6, 5, 3))
    compare_with_tf(tf, layers.Cropping2D(cropping, dtype=dtype), keras.layers.Cropping2D(cropping, dtype=dtype), [x],
                    dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_concatenate_matches_tensorflow(tf, keras, dtype):
    rng = np.random.default_rng(5)
    inputs = [rng.standard_normal((2, 4, 3, c)) for c in (2, 3)]
    compare_with_tf(tf, layers.Concatenate(dtype=dtype), keras.layers.Concatenate(dtype=dtype), inputs, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["relu", "softmax"])
def test_activations_match_tensorflow(tf, keras, name, dtype):
    x = np.random.default_rng(6).standard_normal((2, 3, 4, 5))
    ours = layers.ReLU(dtype=dtype) if name == "relu" else layers.Softmax(dtype=dtype)
    theirs = keras.layers.ReLU(dtype=dtype) if name == "relu" else keras.layers.Softmax(dtype=dtype)
    compare_with_tf(tf, ours, theirs, [x], dtype)


def test_glorot_uniform_statistics_and_seed():
    """Keras's initialiser: U(-l, l) with l = sqrt(6 / (fan_in + fan_out)), zero bias, reproducible."""
    layer = layers.Conv2D(64, 3, seed=11)
    layer.build((32, 32, 32))
    kernel, bias = layer.get_weights()
    limit = np.sqrt(6 / (9 * 32 + 9 * 64))
    assert kernel.dtype == np.float32 and kernel.shape == (3, 3, 32, 64)
    assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.99 * limit
    assert abs(kernel.var() - limit ** 2 / 3) < 0.05 * limit ** 2 / 3
    assert not bias.any()
    again = layers.Conv2D(64, 3, seed=11)
    again.build((32, 32, 32))
    np.testing.assert_array_equal(again.get_weights()[0], kernel)


def test_count_params_matches_keras(keras):
    ours = layers.Conv2D(7, (3, 2), dtype="float32")
    ours.build((5, 5, 4))
    theirs = keras.layers.Conv2D(7, (3, 2))
    theirs.build((None, 5, 5, 4))
    assert ours.count_params() == theirs.count_params() == 3 * 2 * 4 * 7 + 7


# ----- bad input ------------------------------------------------------------------------------------

def built_conv():
    layer = layers.Conv2D(4, 3)
    layer.build((8, 8, 3))
    return layer


def test_wrong_rank_is_a_clear_error():
    with pytest.raises(ValueError, match=r"4-D input .*x\[None\]"):
        built_conv().forward(np.zeros((8, 8, 3), np.float32))


def test_channel_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="built for 3 input channels, got 4"):
        built_conv().forward(np.zeros((1, 8, 8, 4), np.float32))


@pytest.mark.parametrize("dtype", [np.float16, np.int32, np.uint8])
def test_wrong_dtype_is_a_clear_error(dtype):
    with pytest.raises(TypeError, match="expected float32 input"):
        built_conv().forward(np.zeros((1, 8, 8, 3), dtype))


def test_float64_input_into_float32_layer_says_how_to_fix():
    with pytest.raises(TypeError, match="dtype='float64'"):
        built_conv().forward(np.zeros((1, 8, 8, 3), np.float64))


def test_input_smaller_than_kernel_is_a_clear_error():
    with pytest.raises(ValueError, match="smaller than the 3x3 kernel"):
        built_conv().forward(np.zeros((1, 2, 2, 3), np.float32))


def test_backward_without_forward_is_a_clear_error():
    with pytest.raises(RuntimeError, match="without a forward"):
        layers.ReLU().backward(np.zeros((1, 2, 2, 1), np.float32))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="padding"):
        layers.Conv2D(4, 3, padding="full")
    with pytest.raises(ValueError, match="activation"):
        layers.Conv2D(4, 3, activation="tanh")
    with pytest.raises(ValueError, match="kernel_size"):
        layers.Conv2D(4, 0)
    with pytest.raises(ValueError, match="cropping"):
        layers.Cropping2D("a lot")


class FakeCupyArray:
    """Stands in for a cupy.ndarray on machines without CuPy: only its type's module matters here."""

    __module__ = "cupy"
    ndim, dtype, shape = 4, np.dtype(np.float32), (1, 8, 8, 3)


def test_gpu_array_into_cpu_layer_is_a_clear_error():
    with pytest.raises(TypeError, match="input is on the gpu but the weights are on the cpu"):
        built_conv().forward(FakeCupyArray())


def test_mixing_devices_in_one_operation_names_both():
    from minitensor import backend

    with pytest.raises(TypeError, match=r"NumPy arrays \(cpu\) and some are CuPy arrays \(gpu\)"):
        backend.get_array_module(np.zeros(3), FakeCupyArray())


@pytest.mark.gpu
def test_cupy_array_into_cpu_layer_on_a_real_gpu():
    import cupy

    with pytest.raises(TypeError, match="input is on the gpu"):
        built_conv().forward(cupy.zeros((1, 8, 8, 3), cupy.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("case", CONV_CASES[:6], ids=conv_case_id)
def test_conv2d_gpu_matches_cpu(case):
    n, h, w, c, filters, kernel, stride, padding, activation, use_bias = case
    rng = np.random.default_rng(8)
    cpu = layers.Conv2D(filters, kernel, stride, padding, activation=activation, use_bias=use_bias, dtype=F64, seed=4)
    gpu = layers.Conv2D(filters, kernel, stride, padding, activation=activation, use_bias=use_bias, dtype=F64, seed=4)
    cpu.build((h, w, c))
    gpu.build((h, w, c))
    gpu.to("gpu")
    x = rng.standard_normal((n, h, w, c))
    from minitensor import backend

    y = cpu.forward(x)
    y_gpu = gpu.forward(backend.to_device(x, "gpu"))
    dout = rng.standard_normal(y.shape)
    dx = cpu.backward(dout)
    dx_gpu = gpu.backward(backend.to_device(dout, "gpu"))
    assert rel_error(backend.to_numpy(y_gpu), y) < 1e-12
    assert rel_error(backend.to_numpy(dx_gpu), dx) < 1e-12
    for g_gpu, g in zip(gpu.grads, cpu.grads):
        assert rel_error(backend.to_numpy(g_gpu), g) < 1e-12


@pytest.mark.parametrize("piece_bytes", [1, 700, 3000])   # one output row per piece, bands, several images
@pytest.mark.parametrize("case", CONV_CASES, ids=conv_case_id)
def test_conv2d_in_cache_sized_pieces_matches_one_piece(monkeypatch, case, piece_bytes, fast_kernels):
    """X_col built band by band (CPU, kernels/conv_gemm.py) gives the same y, dx, dW, db as X_col built whole."""
    from minitensor.kernels import conv_gemm

    n, h, w, c, filters, kernel, stride, padding, activation, use_bias = case
    rng = np.random.default_rng(9)
    x = rng.standard_normal((n, h, w, c))
    results = []
    for budget in (1 << 40, piece_bytes):
        monkeypatch.setattr(conv_gemm, "CPU_PIECE_BYTES", budget)
        layer = layers.Conv2D(filters, kernel, stride, padding, activation=activation, use_bias=use_bias, dtype=F64,
                              seed=5)
        y = layer.forward(x)
        dx = layer.backward(np.random.default_rng(10).standard_normal(y.shape))
        results.append([y, dx] + [g.copy() for g in layer.grads])
    for whole, pieces in zip(*results):
        np.testing.assert_allclose(pieces, whole, rtol=1e-12, atol=1e-12)
    result = check_layer(layer, x, seed=2)     # and the pieces' backward is right, not just consistent
    assert result.passed, result.report()
