"""minitensor.losses: float64 central differences, live Keras/TensorFlow, the clip, and input errors."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported

import numpy as np
import pytest

from minitensor import backend, losses

# name -> (constructor, what y_pred holds, the matching Keras loss given keras and a dtype name)
LOSSES = {
    "bce": (losses.BinaryCrossentropy, "probabilities",
            lambda keras, dtype: keras.losses.BinaryCrossentropy(dtype=dtype)),
    "bce_logits": (lambda: losses.BinaryCrossentropy(from_logits=True), "logits",
                   lambda keras, dtype: keras.losses.BinaryCrossentropy(from_logits=True, dtype=dtype)),
    "cce": (losses.CategoricalCrossentropy, "probabilities",
            lambda keras, dtype: keras.losses.CategoricalCrossentropy(dtype=dtype)),
    "cce_logits": (lambda: losses.CategoricalCrossentropy(from_logits=True), "logits",
                   lambda keras, dtype: keras.losses.CategoricalCrossentropy(from_logits=True, dtype=dtype)),
    "softmax_ce": (losses.SoftmaxCrossEntropy, "logits",
                   lambda keras, dtype: keras.losses.CategoricalCrossentropy(from_logits=True, dtype=dtype)),
}

# N = 1 and N > 1, odd H and W, K = 1..4 classes, and one plain (batch, classes) shape.
SHAPES = [(1, 1, 1, 1), (1, 3, 5, 2), (2, 3, 3, 3), (2, 5, 3, 4), (4, 3)]


@pytest.fixture(scope="module")
def tf_keras():
    tf = pytest.importorskip("tensorflow")
    import keras

    return tf, keras


def make_prediction(rng, shape, kind, dtype=np.float64):
    if kind == "probabilities":
        # Away from the clip bounds, and deliberately not summing to 1 over the last axis:
        # CategoricalCrossentropy must renormalise as Keras does.
        return rng.uniform(0.05, 0.95, shape).astype(dtype)
    return (2.0 * rng.standard_normal(shape)).astype(dtype)


def make_target(rng, shape, kind, dtype=np.float64):
    num_classes = shape[-1]
    if kind == "one_hot":
        target = np.eye(num_classes)[rng.integers(0, num_classes, shape[:-1])]
    elif kind == "distribution":
        target = rng.uniform(0.1, 1.0, shape)
        target /= target.sum(axis=-1, keepdims=True)
    else:  # "any": soft values in [0, 1] not summing to 1, to test the derivations in general
        target = rng.uniform(0.0, 1.0, shape)
    return target.astype(dtype)


def make_weight(rng, shape, dtype=np.float64):
    return rng.uniform(0.5, 2.0, shape[:-1]).astype(dtype)


def numerical_gradient(f, x, h=1e-6):
    """Central differences of the scalar f() with respect to every entry of x (changed in place)."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        saved = x[index]
        x[index] = saved + h
        f_plus = f()
        x[index] = saved - h
        f_minus = f()
        x[index] = saved
        grad[index] = (f_plus - f_minus) / (2 * h)
    return grad


def assert_close(actual, expected, rtol):
    """Entry-wise relative error below rtol, with an absolute floor of rtol times the largest entry,
    so that entries that are zero by design are not divided by zero."""
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.max(np.abs(expected)))


# ----- central differences, float64 ------------------------------------------------------------

@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", LOSSES)
def test_gradient_matches_central_differences(name, shape, weighted):
    make_loss, prediction_kind, _ = LOSSES[name]
    rng = np.random.default_rng(0)
    y_pred = make_prediction(rng, shape, prediction_kind)
    y_true = make_target(rng, shape, "any")
    weight = make_weight(rng, shape) if weighted else None

    loss = make_loss()
    loss.forward(y_pred, y_true, weight)
    analytic = loss.backward()
    numeric = numerical_gradient(lambda: loss.forward(y_pred, y_true, weight), y_pred)
    assert_close(analytic, numeric, 1e-6)


# ----- against live Keras / TensorFlow ----------------------------------------------------------

# Keras warns that K = 1 makes little sense for a categorical loss; we test it on purpose.
@pytest.mark.filterwarnings("ignore:In loss categorical_crossentropy:SyntaxWarning")
@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-5), (np.float64, 1e-10)], ids=["float32", "float64"])
@pytest.mark.parametrize("target_kind", ["one_hot", "distribution"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 5, 3, 1)], ids=str)
@pytest.mark.parametrize("name", LOSSES)
def test_value_and_gradient_match_keras(tf_keras, name, shape, weighted, target_kind, dtype, rtol):
    tf, keras = tf_keras
    make_loss, prediction_kind, make_keras_loss = LOSSES[name]
    rng = np.random.default_rng(7)
    y_pred = make_prediction(rng, shape, prediction_kind, dtype)
    y_true = make_target(rng, shape, target_kind, dtype)
    weight = make_weight(rng, shape, dtype) if weighted else None

    # A plain tf.constant carries no _keras_logits, so Keras takes y_pred at its word.
    y_pred_tf = tf.constant(y_pred)
    with tf.GradientTape() as tape:
        tape.watch(y_pred_tf)
        keras_value = make_keras_loss(keras, np.dtype(dtype).name)(
            tf.constant(y_true), y_pred_tf, sample_weight=None if weight is None else tf.constant(weight))
    keras_grad = tape.gradient(keras_value, y_pred_tf).numpy()

    loss = make_loss()
    value = loss(y_pred, y_true, weight)
    grad = loss.backward()
    assert isinstance(value, float)
    assert value == pytest.approx(float(keras_value), rel=rtol)
    assert grad.dtype == dtype and grad.shape == shape
    assert_close(grad, keras_grad, rtol)


def test_keras_bce_on_a_softmax_output_uses_the_logits(tf_keras):
    """keras.activations.softmax stores its input as _keras_logits, and Keras's BCE then computes
    sigmoid-BCE of those logits, value and gradient, instead of BCE of the probabilities."""
    tf, keras = tf_keras
    rng = np.random.default_rng(3)
    shape = (2, 3, 5, 4)
    logits = make_prediction(rng, shape, "logits", np.float32)
    y_true = make_target(rng, shape, "one_hot", np.float32)

    logits_tf = tf.constant(logits)
    with tf.GradientTape() as tape:
        tape.watch(logits_tf)
        probabilities = keras.activations.softmax(logits_tf)
        keras_loss = keras.losses.BinaryCrossentropy()(tf.constant(y_true), probabilities)
    keras_grad = tape.gradient(keras_loss, logits_tf).numpy()
    keras_value = float(keras_loss)
    assert probabilities._keras_logits is logits_tf
    assert not hasattr(tf.nn.softmax(logits_tf), "_keras_logits")

    on_logits = losses.BinaryCrossentropy(from_logits=True)
    assert keras_value == pytest.approx(on_logits(logits, y_true), rel=1e-5)
    # The gradient reaches the logits as (sigmoid(z) - t) / K: it never goes through the softmax.
    assert_close(keras_grad, on_logits.backward(), 1e-5)

    on_probabilities = losses.BinaryCrossentropy()(probabilities.numpy(), y_true)
    assert on_probabilities != pytest.approx(keras_value, rel=0.01)

    # Any new tensor (here tf.identity) has lost the attribute: then Keras uses the probabilities.
    copy = tf.identity(probabilities)
    assert not hasattr(copy, "_keras_logits")
    assert float(keras.losses.BinaryCrossentropy()(tf.constant(y_true), copy)) == pytest.approx(
        on_probabilities, rel=1e-5)


def test_compiled_keras_model_with_softmax_output_reports_bce_of_the_logits(tf_keras):
    """The seed's situation: Conv2D(activation="softmax") compiled with BinaryCrossentropy()."""
    tf, keras = tf_keras
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 5, 3, 3)).astype(np.float32)
    y_true = make_target(rng, (2, 5, 3, 4), "one_hot", np.float32)
    inputs = keras.Input(x.shape[1:])
    outputs = keras.layers.Conv2D(4, 1, activation="softmax")(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(loss=keras.losses.BinaryCrossentropy(), jit_compile=False)
    reported = model.evaluate(x, y_true, verbose=0)

    kernel, bias = model.layers[-1].get_weights()
    logits = x @ kernel[0, 0] + bias
    assert reported == pytest.approx(losses.BinaryCrossentropy(from_logits=True)(logits, y_true), rel=1e-5)
    probabilities = model.predict(x, verbose=0)
    assert reported != pytest.approx(losses.BinaryCrossentropy()(probabilities, y_true), rel=0.01)


# ----- the clip on probabilities ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_boundaries_match_tensorflow(tf_keras, dtype):
    """Zero gradient strictly outside [1e-7, 1 - 1e-7] (as rounded to the dtype), full gradient on it."""
    tf, keras = tf_keras
    low, high = dtype(1e-7), dtype(1 - 1e-7)
    zero, one = dtype(0), dtype(1)
    p = np.array([zero, np.nextafter(low, zero), low, np.nextafter(low, one), dtype(0.5),
                  np.nextafter(high, zero), high, np.nextafter(high, one), one], dtype)
    y_pred = np.stack([p, p], axis=-1)
    y_true = np.stack([np.ones_like(p), np.zeros_like(p)], axis=-1)

    y_pred_tf = tf.constant(y_pred)
    with tf.GradientTape() as tape:
        tape.watch(y_pred_tf)
        keras_value = keras.losses.BinaryCrossentropy(dtype=np.dtype(dtype).name)(tf.constant(y_true), y_pred_tf)
    keras_grad = tape.gradient(keras_value, y_pred_tf).numpy()

    loss = losses.BinaryCrossentropy()
    rtol = 1e-5 if dtype == np.float32 else 1e-10
    assert loss(y_pred, y_true) == pytest.approx(float(keras_value), rel=rtol)
    grad = loss.backward()
    np.testing.assert_array_equal(grad == 0, keras_grad == 0)
    np.testing.assert_array_equal(grad[[0, 1, 7, 8]], 0)
    np.testing.assert_allclose(grad, keras_grad, rtol=rtol)  # entry-wise: gradients here span 1e6


@pytest.mark.parametrize("make_loss", [losses.BinaryCrossentropy, losses.CategoricalCrossentropy])
def test_probabilities_of_exactly_0_and_1_give_finite_loss_and_zero_gradient(make_loss):
    y_pred = np.array([[[0.0, 1.0], [1.0, 0.0]]], np.float32)
    y_true = np.array([[[0.0, 1.0], [0.0, 1.0]]], np.float32)  # one pixel right, one confidently wrong
    loss = make_loss()
    value = loss(y_pred, y_true)
    assert np.isfinite(value) and value > 0
    np.testing.assert_array_equal(loss.backward(), 0)


# ----- dtypes, devices, errors, get() ----------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("name", LOSSES)
def test_gpu_matches_cpu(name):
    make_loss, prediction_kind, _ = LOSSES[name]
    rng = np.random.default_rng(9)
    shape = (2, 3, 5, 4)
    inputs = (make_prediction(rng, shape, prediction_kind), make_target(rng, shape, "one_hot"), make_weight(rng, shape))
    loss = make_loss()
    cpu_value = loss(*inputs)
    cpu_grad = loss.backward()
    gpu_value = loss(*(backend.to_device(array, "gpu") for array in inputs))
    gpu_grad = loss.backward()
    assert backend.device_of(gpu_grad) == "gpu" and gpu_grad.dtype == np.float64
    assert gpu_value == pytest.approx(cpu_value, rel=1e-12)
    assert_close(backend.to_numpy(gpu_grad), cpu_grad, 1e-12)


@pytest.mark.parametrize("name", LOSSES)
def test_keeps_the_dtype_of_y_pred_whatever_the_target_and_weight(name):
    make_loss, prediction_kind, _ = LOSSES[name]
    rng = np.random.default_rng(5)
    shape = (2, 3, 3, 3)
    y_pred = make_prediction(rng, shape, prediction_kind, np.float32)
    y_true = make_target(rng, shape, "one_hot", np.float64)
    loss = make_loss()
    loss(y_pred, y_true, make_weight(rng, shape, np.float64))
    assert loss.backward().dtype == np.float32
    # An integer mask is a valid target: same numbers as the float one.
    value = loss(y_pred, y_true.astype(np.uint8))
    assert value == loss(y_pred, y_true.astype(np.float32))


def test_sample_weight_is_sum_over_batch_size():
    """sum(w * l) / number_of_pixels, not divided by sum(w): weights of 2 double the loss."""
    rng = np.random.default_rng(6)
    shape = (2, 3, 3, 2)
    y_pred = make_prediction(rng, shape, "logits")
    y_true = make_target(rng, shape, "one_hot")
    loss = losses.SoftmaxCrossEntropy()
    unweighted = loss(y_pred, y_true)
    unweighted_grad = loss.backward()
    assert loss(y_pred, y_true, np.full(shape[:-1], 2.0)) == pytest.approx(2 * unweighted)
    np.testing.assert_allclose(loss.backward(), 2 * unweighted_grad)


def test_softmax_cross_entropy_gradient_is_softmax_minus_one_hot():
    rng = np.random.default_rng(8)
    shape = (1, 3, 5, 4)
    logits = make_prediction(rng, shape, "logits")
    y_true = make_target(rng, shape, "one_hot")
    loss = losses.SoftmaxCrossEntropy()
    loss(logits, y_true)
    softmax = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(loss.backward(), (softmax - y_true) / 15, rtol=1e-12)


@pytest.mark.parametrize("name", LOSSES)
def test_input_errors(name):
    loss = LOSSES[name][0]()
    y_pred = np.full((2, 3, 3, 2), 0.5, np.float32)
    with pytest.raises(ValueError, match="shape"):
        loss(y_pred, np.zeros((2, 3, 3, 3), np.float32))
    with pytest.raises(ValueError, match="sample_weight"):
        loss(y_pred, y_pred, np.ones((2, 3, 3, 1), np.float32))
    with pytest.raises(ValueError, match="sample_weight"):
        loss(y_pred, y_pred, np.ones(2, np.float32))
    for dtype in (np.int32, np.float16):
        with pytest.raises(TypeError, match="float32 or float64"):
            loss(y_pred.astype(dtype), y_pred)
    with pytest.raises(TypeError, match="array"):
        loss(y_pred, y_pred.tolist())
    with pytest.raises(RuntimeError, match="forward"):
        loss.backward()


def test_backward_frees_the_forward_cache():
    loss = losses.BinaryCrossentropy()
    y = np.full((1, 2), 0.5)
    loss(y, y)
    loss.backward()
    with pytest.raises(RuntimeError, match="forward"):
        loss.backward()


@pytest.mark.parametrize("name, cls, from_logits", [
    ("bce", losses.BinaryCrossentropy, False),
    ("binary_crossentropy", losses.BinaryCrossentropy, False),
    ("bce_logits", losses.BinaryCrossentropy, True),
    ("categorical_crossentropy", losses.CategoricalCrossentropy, False),
    ("softmax_cross_entropy", losses.SoftmaxCrossEntropy, True),
])
def test_get_by_name(name, cls, from_logits):
    loss = losses.get(name)
    assert type(loss) is cls and loss.from_logits is from_logits
    assert losses.get(loss) is loss
    assert losses.get(name) is not loss  # a new instance each time: losses hold a forward cache


def test_get_unknown_name():
    with pytest.raises(ValueError, match="unknown loss 'mse'.*bce"):
        losses.get("mse")
