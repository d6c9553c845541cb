"""Boundaries and error paths that the mutation check (bench/mutation_check.py, docs/mutation_check.md)
found open: each test here kills mutants that passed every other test of their module."""
import numpy as np
import pytest

import minitensor as mt
from minitensor import layers, losses
from minitensor.gradcheck import skip_model
from minitensor.layers.base import window_output_and_padding
from minitensor.optimizers import Adam


def skip_model_batch(seed, nan=False):
    """A batch for gradcheck.skip_model: x (2, 10, 10, 2) and one-hot targets (2, 8, 8, 3), one NaN if asked."""
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((2, 10, 10, 2)), np.eye(3)[rng.integers(0, 3, (2, 8, 8))]
    if nan:
        y[0, 1, 2, 0] = np.nan
    return x, y


@pytest.mark.parametrize("size, window, stride, padding, expected", [
    # 'valid': out = floor((size - window) / stride) + 1, no padding
    (7, 3, 2, "valid", (3, 0, 0)),
    # 'same': out = ceil(size / stride); total = max((out - 1) * stride + window - size, 0), the odd pixel after
    (7, 3, 2, "same", (4, 1, 1)),      # total (4 - 1) * 2 + 3 - 7 = 2
    (6, 3, 2, "same", (3, 0, 1)),      # total 1: nothing before, one after (TensorFlow's rule)
    (8, 4, 1, "same", (8, 1, 2)),      # total 3
    (4, 1, 2, "same", (2, 0, 0)),      # (2 - 1) * 2 + 1 - 4 = -1: no padding, not a negative one
])
def test_window_output_and_padding_put_the_odd_pixel_after(size, window, stride, padding, expected):
    """The padding after (bottom/right) is what ONNX export writes; the layers only read the padding before."""
    assert window_output_and_padding(size, window, stride, padding) == expected


def test_an_output_of_one_pixel_is_allowed_and_an_empty_one_in_either_axis_is_an_error():
    x = np.zeros((1, 3, 4, 2), np.float32)
    assert layers.Conv2D(2, (3, 4)).forward(x).shape == (1, 1, 1, 2)                      # exactly 1 x 1
    assert layers.MaxPool2D((3, 4)).forward(x).shape == (1, 1, 1, 2)
    with pytest.raises(ValueError, match="smaller than the 3x5 kernel"):
        layers.Conv2D(2, (3, 5)).forward(x)                                                # too narrow only
    with pytest.raises(ValueError, match="smaller than the 4x4 kernel"):
        layers.Conv2D(2, (4, 4)).forward(x)                                                # too short only
    with pytest.raises(ValueError, match="smaller than the 3x5 pool window"):
        layers.MaxPool2D((3, 5)).forward(x)
    with pytest.raises(ValueError, match="smaller than the 4x4 pool window"):
        layers.MaxPool2D((4, 4)).forward(x)


def test_cropping_output_shape_of_a_non_square_input_and_cropping_everything():
    crop = layers.Cropping2D(((1, 2), (0, 3)))
    assert crop.compute_output_shape((6, 9, 2)) == (3, 6, 2)
    assert crop.forward(np.zeros((1, 6, 9, 2), np.float32)).shape == (1, 3, 6, 2)
    for cropping in (((2, 1), (0, 0)), ((0, 0), (2, 2))):                # every row, then every column
        with pytest.raises(ValueError, match="removes all of a 3x4 input"):
            layers.Cropping2D(cropping).compute_output_shape((3, 4, 1))


@pytest.mark.parametrize("make", [
    lambda: layers.Cropping2D(1), lambda: layers.MaxPool2D(2), lambda: layers.UpSampling2D(2),
    lambda: layers.ReLU(), lambda: layers.Softmax(),
], ids=["Cropping2D", "MaxPool2D", "UpSampling2D", "ReLU", "Softmax"])
def test_every_layer_checks_its_input(make):
    with pytest.raises(TypeError, match="dtype='float64'"):
        make().forward(np.zeros((1, 4, 4, 2), np.float64))
    with pytest.raises(ValueError, match="4-D input"):
        make().forward(np.zeros((4, 4, 2), np.float32))


def test_an_array_like_without_a_dtype_is_refused_by_name():
    """A memoryview has ndim but no dtype: the layer says what it expected, not an AttributeError."""
    with pytest.raises(TypeError, match="expected a NumPy or CuPy array as input, got memoryview"):
        layers.ReLU().forward(memoryview(np.zeros((1, 2, 2, 1), np.float32)))


def test_concatenate_checks_each_input():
    a = np.zeros((1, 4, 4, 2), np.float32)
    with pytest.raises(TypeError, match="input 1"):
        layers.Concatenate().forward([a, a.astype(np.float64)])


def test_layer_to_returns_the_layer():
    layer = layers.Conv2D(2, 3)
    assert layer.to("cpu") is layer


def test_register_layer_refuses_a_class_that_is_not_a_layer():
    with pytest.raises(TypeError, match="register_layer takes a Layer subclass"):
        mt.register_layer(int)
    assert "int" not in layers.LAYER_CLASSES


@pytest.mark.parametrize("shape", [(2, 0), (0, 3)])
def test_a_loss_of_no_elements_is_an_error(shape):
    empty = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match="at least one element"):
        losses.BinaryCrossentropy().forward(empty, empty)


def test_training_asks_for_no_input_gradient(monkeypatch):
    """Every train step skips dL/d(images): the first layer's dx would cost as much as its dW, for nothing."""
    model = skip_model().compile(Adam(), losses.SoftmaxCrossEntropy())
    asked, backward = [], model.backward
    monkeypatch.setattr(model, "backward", lambda dy, **options: asked.append(options) or backward(dy, **options))
    model.train_on_batch(*skip_model_batch(0))
    assert [options["input_grad"] for options in asked] == [False]


@pytest.mark.gpu
def test_a_non_finite_loss_on_the_gpu_counts_no_step():
    """On the GPU the fused update skips a NaN step without a read back; train_on_batch then takes the step
    back off Adam's count, so the next good step is bias-corrected as step 1, as on the CPU."""
    model = skip_model().to("gpu").compile(Adam(), losses.SoftmaxCrossEntropy())
    weights = model.get_weights()
    assert not np.isfinite(model.train_on_batch(*skip_model_batch(0, nan=True)))
    assert model.optimizer.iterations == 0
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)
    assert np.isfinite(model.train_on_batch(*skip_model_batch(1))) and model.optimizer.iterations == 1
