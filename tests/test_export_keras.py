"""Keras 3 weights out (``Model.save_keras_weights``, minitensor/keras_io.py), checked in live Keras.

The post's own Keras models (bench/keras_seed.py) load the file with ``load_weights`` and must
predict what minitensor predicts; with ``load_keras_weights`` the weights go round both ways
unchanged. Keras reads the file by its keys (``layers/conv2d_3``: class and counter, in the order
its Functional model lists the layers), not by the layer names, so a graph whose calls come in
another order than Keras lists its layers is checked too.
"""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

import minitensor
from bench.keras_seed import keras_small_unet, keras_unet
from minitensor import Concatenate, Conv2D, Input, Model, ModelFileError
from unet import small_unet, unet

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                                reason="TensorFlow is not installed (pip install 'minitensor[test]')")

SMALL = dict(input_shape=(32, 32, 3), num_classes=4, base_filters=4)
ORIGINAL = dict(input_shape=(188, 188, 3), num_classes=3, base_filters=2)   # 188: the smallest valid size
BUILDERS = {"small_unet": (keras_small_unet, small_unet, SMALL), "unet": (keras_unet, unet, ORIGINAL)}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def randomized(model, seed=0):
    rng = np.random.default_rng(seed)
    model.set_weights([w + 0.05 * rng.standard_normal(w.shape).astype(w.dtype) for w in model.get_weights()])
    return model


def assert_same_predictions(keras_model, ours, seed=1):
    x = np.random.default_rng(seed).uniform(-1, 1, (2, *ours.input.shape)).astype(np.float32)
    expected = ours.predict(x)
    assert expected.std() > 1e-3
    np.testing.assert_allclose(keras_model.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_the_posts_keras_model_loads_the_file_and_predicts_as_minitensor(keras, tmp_path, kind):
    keras_builder, our_builder, config = BUILDERS[kind]
    ours = randomized(our_builder(**config))
    path = ours.save_keras_weights(tmp_path / "model.weights.h5")
    keras_model = keras_builder(**config)
    keras_model.load_weights(path)
    for layer in ours.layers:
        for our_weight, keras_weight in zip(layer.get_weights(), keras_model.get_layer(layer.name).get_weights(),
                                            strict=True):
            np.testing.assert_array_equal(keras_weight, our_weight)
    assert_same_predictions(keras_model, ours)


def test_weights_go_round_both_ways_unchanged(keras, tmp_path):
    keras.utils.set_random_seed(7)
    keras_model = keras_unet(**ORIGINAL)
    keras_model.save_weights(tmp_path / "from_keras.weights.h5")
    ours = unet(**ORIGINAL)
    ours.load_keras_weights(tmp_path / "from_keras.weights.h5")
    minitensor.save_keras_weights(ours, tmp_path / "from_minitensor.weights.h5")
    again = keras_unet(**ORIGINAL)
    again.load_weights(tmp_path / "from_minitensor.weights.h5")
    for a, b in zip(keras_model.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    back = unet(**ORIGINAL)
    back.load_keras_weights(tmp_path / "from_minitensor.weights.h5")
    for a, b in zip(ours.get_weights(), back.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def branches(layers):
    """x -> b = conv_b(x); a = conv_a(x); c = conv_c(a); [c, b] -> head: conv_b is called before conv_a,
    but Keras lists conv_a first (it is further from the output), so their keys swap."""
    x = layers.Input((8, 8, 3), name="input")
    b = layers.Conv2D(4, 3, padding="same", name="conv_b")(x)
    a = layers.Conv2D(4, 3, padding="same", name="conv_a")(x)
    c = layers.Conv2D(4, 1, name="conv_c")(a)
    return x, layers.Conv2D(2, 1, activation="softmax", name="head")(layers.Concatenate(name="join")([c, b]))


class _Ours:
    Input, Conv2D, Concatenate = Input, Conv2D, Concatenate


def test_keys_follow_keras_layer_order_not_the_call_order(keras, tmp_path):
    x, y = branches(_Ours)
    ours = randomized(Model(x, y, name="branches"))
    keras_model = keras.Model(*branches(keras.layers), name="branches")
    assert [layer.name for layer in minitensor.keras_io.keras_layer_order(ours)] == \
        [layer.name for layer in keras_model.layers]
    keras_model.load_weights(ours.save_keras_weights(tmp_path / "branches.weights.h5"))
    assert_same_predictions(keras_model, ours)


def test_a_name_keras_would_not_read_as_keras_3_weights_is_refused(tmp_path):
    model = small_unet((16, 16, 3), base_filters=2)
    with pytest.raises(ModelFileError, match=r"\*\.weights\.h5.*model\.weights\.h5"):
        model.save_keras_weights(tmp_path / "model.h5")
    (tmp_path / "folder.weights.h5").mkdir()
    with pytest.raises(ModelFileError, match="is a folder"):
        model.save_keras_weights(tmp_path / "folder.weights.h5")
    assert os.listdir(tmp_path) == ["folder.weights.h5"]


def test_the_command_writes_keras_weights_the_posts_model_loads(keras, tmp_path):
    ours = randomized(small_unet(**SMALL))
    ours.save(tmp_path / "best.npz")
    done = subprocess.run([sys.executable, "-m", "minitensor.export", str(tmp_path / "best.npz"),
                           str(tmp_path / "unet.weights.h5")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    keras_model = keras_small_unet(**SMALL)
    keras_model.load_weights(tmp_path / "unet.weights.h5")
    assert_same_predictions(keras_model, ours)
