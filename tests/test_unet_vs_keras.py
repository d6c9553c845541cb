"""End to end against live TensorFlow: the seed's Keras models and ours, with the same weights.

The Keras models are the seed's code (bench/keras_seed.py) at a small input and width. Their
weights go through a Keras weights file into minitensor (``load_keras_weights``), and then the
two must agree on the softmax output, the loss, every weight's gradient and the weights after
three Adam steps, for both readings of the seed's ``BinaryCrossentropy()``:

* "logits": what Keras 3 really computes for BCE on a softmax output (sigmoid BCE on the
  pre-softmax logits, which the softmax output carries along); ours: BinaryCrossentropy(from_logits=True).
* "probabilities": the formula the seed reads as (clipped BCE on the probabilities); Keras does
  this when the output is copied first (tf.identity); ours: BinaryCrossentropy().
"""
import numpy as np
import pytest
from conftest import rel_error

from bench.keras_seed import keras_small_unet, keras_unet
from minitensor.losses import BinaryCrossentropy
from minitensor.optimizers import Adam
from unet import small_unet, unet

SMALL = dict(input_shape=(32, 32, 3), num_classes=4, base_filters=4)
ORIGINAL = dict(input_shape=(188, 188, 3), num_classes=3, base_filters=2)   # 188: the smallest valid size
BUILDERS = {"small": (keras_small_unet, small_unet, SMALL), "original": (keras_unet, unet, ORIGINAL)}
TOLERANCE = {"float32": dict(output=1e-5, loss=1e-6, grad=1e-4), "float64": dict(output=1e-10, loss=1e-10, grad=1e-9)}


def save_legacy_h5(keras_model, path):
    """Write weights as the seed's ModelCheckpoint(save_weights_only=True, '.h5') does."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, keras_model)


def make_pair(kind, dtype, tmp_path, layout="h5"):
    import keras

    keras.utils.set_random_seed(3)
    keras_builder, our_builder, config = BUILDERS[kind]
    keras_model = keras_builder(dtype=dtype, **config)
    # Non-zero biases, so that a transposed or misplaced bias cannot hide.
    rng = np.random.default_rng(4)
    keras_model.set_weights([w + (0.05 * rng.standard_normal(w.shape) if w.ndim == 1 else 0)
                             for w in keras_model.get_weights()])
    path = tmp_path / ("weights.h5" if layout == "h5" else "model.weights.h5")
    if layout == "h5":
        save_legacy_h5(keras_model, path)
    else:
        keras_model.save_weights(path)
    ours = our_builder(dtype=dtype, **config)
    ours.load_keras_weights(path)
    return keras_model, ours


def make_batch(model, dtype, seed=0):
    rng = np.random.default_rng(seed)
    batch = 2
    x = rng.uniform(-1, 1, (batch, *model.input_shape[1:])).astype(dtype)
    labels = rng.integers(0, model.output_shape[-1], (batch, *model.output_shape[1:3]))
    y = np.eye(model.output_shape[-1], dtype=dtype)[labels]
    return x, y


def keras_loss(tf, keras, reading, dtype="float32"):
    # Keras losses compute in float32 unless told otherwise, and that cast would also drop the logits.
    bce = keras.losses.BinaryCrossentropy(dtype=dtype)
    if reading == "logits":
        return bce                                     # the seed's compile(loss=BinaryCrossentropy())
    return lambda y_true, y_pred: bce(y_true, tf.identity(y_pred))   # a copy drops the hidden logits


def our_loss(reading):
    return BinaryCrossentropy(from_logits=(reading == "logits"))


@pytest.mark.parametrize("layout", ["h5", "weights.h5"])
def test_keras_weight_files_load_by_layer_name(tf, tmp_path, layout):
    keras_model, ours = make_pair("small", "float32", tmp_path, layout)
    for layer in ours.layers:
        if layer.params:
            for ours_w, keras_w in zip(layer.get_weights(), keras_model.get_layer(layer.name).get_weights()):
                np.testing.assert_array_equal(ours_w, keras_w)


def test_keras_weights_of_the_other_model_are_refused(tf, tmp_path):
    from minitensor import ModelFileError

    keras_model = keras_small_unet(**SMALL)
    save_legacy_h5(keras_model, tmp_path / "small.h5")
    other = unet(**ORIGINAL)
    before = other.get_weights()
    with pytest.raises(ModelFileError, match="encoder_conv1_1/kernel"):
        other.load_keras_weights(tmp_path / "small.h5")
    for a, b in zip(before, other.get_weights()):
        np.testing.assert_array_equal(a, b)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(ModelFileError, match="not a readable Keras weights file"):
        other.load_keras_weights(tmp_path / "junk.h5")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("reading", ["logits", "probabilities"])
@pytest.mark.parametrize("kind", ["small", "original"])
def test_output_loss_and_every_weight_gradient_match_keras(tf, keras, tmp_path, kind, reading, dtype):
    keras_model, ours = make_pair(kind, dtype, tmp_path)
    x, y = make_batch(ours, dtype)
    tolerance = TOLERANCE[dtype]

    with tf.GradientTape() as tape:
        y_keras = keras_model(x)
        loss_keras = keras_loss(tf, keras, reading, dtype)(y, y_keras)
    weight_grads = tape.gradient(loss_keras, keras_model.trainable_weights)
    keras_grads = {w.path: g.numpy() for w, g in zip(keras_model.trainable_weights, weight_grads)}

    ours.compile(Adam(), our_loss(reading))
    loss_ours, uses_logits = ours._loss_and_gradient(x, y, None)
    y_ours = ours.output.producer._cache[1]
    assert rel_error(y_ours, y_keras.numpy()) < tolerance["output"]
    assert abs(loss_ours - float(loss_keras)) < tolerance["loss"] * abs(float(loss_keras))
    ours.backward(ours.loss.backward(), from_logits=uses_logits)
    for layer in ours.layers:
        for name, grad in zip(layer.weight_names, layer.grads):
            assert rel_error(grad, keras_grads[f"{layer.name}/{name}"]) < tolerance["grad"], f"{layer.name}/{name}"


# The original U-Net on probabilities runs with -m slow: its one-step gradients are matched above in both
# dtypes, and its three Adam steps on logits below (the suite's time budget).
@pytest.mark.parametrize("kind,reading", [("small", "logits"), ("small", "probabilities"), ("original", "logits"),
                                          pytest.param("original", "probabilities", marks=pytest.mark.slow)])
def test_three_adam_steps_match_keras_train_on_batch(tf, keras, tmp_path, kind, reading):
    keras_model, ours = make_pair(kind, "float32", tmp_path)
    keras_model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-3), loss=keras_loss(tf, keras, reading))
    ours.compile(Adam(learning_rate=1e-3), our_loss(reading))
    for step in range(3):
        x, y = make_batch(ours, "float32", seed=10 + step)
        loss_keras = float(keras_model.train_on_batch(x, y))
        loss_ours = ours.train_on_batch(x, y)
        assert abs(loss_ours - loss_keras) < 1e-5 * abs(loss_keras)
    for layer in ours.layers:
        for name, ours_w, keras_w in zip(layer.weight_names, layer.get_weights(),
                                         keras_model.get_layer(layer.name).get_weights() if layer.params else []):
            assert rel_error(ours_w, keras_w) < 1e-5, f"{layer.name}/{name}"
