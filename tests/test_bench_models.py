"""The benchmark's Keras models are the seed's networks, the same as minitensor's.

Cheap checks only (no timing): parameter counts at full size and output shapes on a narrow copy.
tests/test_unet_vs_keras.py checks them against minitensor number by number. The PyTorch models
are checked in bench/test_torch_models.py (`python -m pytest bench`, with the bench extra).
"""
import pytest

from unet import small_unet, unet

FULL_PARAMS = {"small": 1_993_188, "original": 31_380_245}
SMALL = dict(input_shape=(32, 32, 3), num_classes=4, base_filters=4)
ORIGINAL = dict(input_shape=(188, 188, 3), num_classes=3, base_filters=2)   # 188: the smallest valid size
CONFIGS = {"small": (small_unet, SMALL), "original": (unet, ORIGINAL)}
EXPECTED_OUTPUT = {"small": (32, 32, 4), "original": (4, 4, 3)}


def test_keras_full_size_param_counts(keras):
    from bench.keras_seed import keras_small_unet, keras_unet

    assert keras_small_unet().count_params() == FULL_PARAMS["small"]
    assert keras_unet().count_params() == FULL_PARAMS["original"]


@pytest.mark.parametrize("kind", ["small", "original"])
def test_keras_output_shapes_match_minitensor(keras, kind):
    from bench.keras_seed import keras_small_unet, keras_unet

    builder, config = CONFIGS[kind]
    keras_builder = keras_small_unet if kind == "small" else keras_unet
    model = keras_builder(**config)
    assert tuple(model.output_shape) == builder(**config).output_shape == (None, *EXPECTED_OUTPUT[kind])
    assert model.count_params() == builder(**config).count_params()
