"""The model graph: backward through skip connections, the Keras-style API, saving, resuming, errors."""
import numpy as np
import pytest

import minitensor as mt
from minitensor import Concatenate, Conv2D, Input, MaxPool2D, Model, layers
from minitensor.gradcheck import check_model, skip_model
from minitensor.losses import BinaryCrossentropy, SoftmaxCrossEntropy
from minitensor.checkpoint import read_checkpoint
from minitensor.files import ModelFileError, atomic_savez
from minitensor.optimizers import Adam
from unet import small_unet, unet

F64 = "float64"


def test_backward_through_a_skip_connection_matches_central_differences():
    """The gradient of a tensor used twice is the sum over both paths: checked numerically."""
    result = check_model(skip_model(), np.random.default_rng(0).standard_normal((2, 10, 10, 2)))
    assert result.passed, result.report()


def test_dropping_one_path_of_the_skip_changes_the_input_gradient():
    """If backward forgot the gradient that comes back through the skip, dL/dx would differ."""
    model = skip_model()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 10, 10, 2))
    dout = rng.standard_normal((1, 8, 8, 3))     # not ones: softmax maps a constant upstream gradient to zero
    model.forward(x)
    dx_full = model.backward(dout)
    concat = model.get_layer("concat")
    original = concat.backward
    concat.backward = lambda dy: [np.zeros_like(part) if i == 0 else part for i, part in enumerate(original(dy))]
    model.forward(x)
    dx_without_skip = model.backward(dout)
    assert np.abs(dx_full - dx_without_skip).max() > 1e-3 * np.abs(dx_full).max()


def test_forward_frees_intermediate_values_and_backward_frees_caches():
    model = skip_model()
    x = np.random.default_rng(2).standard_normal((1, 10, 10, 2))
    model.backward(np.ones_like(model.forward(x)))
    assert all(getattr(layer, "_cache", None) is None for layer in model.layers)


def test_summary_counts_and_lookup(capsys):
    model = small_unet()
    text = model.summary()
    assert "Total params: 1,993,188" in text and "conv_softmax (Conv2D)" in capsys.readouterr().out
    assert model.count_params() == 1_993_188
    assert model.get_layer("decoder_upsampling4").size == (2, 2)
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        model.get_layer("nope")


def test_original_unet_parameter_count_and_shapes():
    model = unet()
    assert model.count_params() == 31_380_245          # what Keras prints for the seed's unet((572, 572, 3))
    assert model.output_shape == (None, 388, 388, 21)
    crops = [model.get_layer(f"crop{i}").cropping[0][0] for i in range(1, 5)]
    assert crops == [88, 40, 16, 4]


@pytest.mark.parametrize("size,suggested", [(570, "556, 572"), (100, "188, 204")])
def test_unet_rejects_sizes_that_do_not_line_up(size, suggested):
    with pytest.raises(ValueError, match=f"input height of {size} px does not fit.*{suggested}"):
        unet((size, 572, 3))


def test_small_unet_rejects_sizes_that_are_not_multiples_of_16():
    with pytest.raises(ValueError, match=r"input width of 100 px.*multiple of 16.*96, 112"):
        small_unet((128, 100, 3))


def test_wrong_input_shape_at_run_time_is_a_clear_error():
    model = small_unet((32, 32, 3), base_filters=2)
    with pytest.raises(ValueError, match=r"expects images of shape \(32, 32, 3\)"):
        model.predict(np.zeros((1, 32, 32, 1), np.float32))
    with pytest.raises(ValueError, match="expects a batch"):
        model.predict(np.zeros((32, 32, 3), np.float32))


def test_predict_returns_numpy_probabilities_in_batches():
    model = small_unet((32, 32, 3), base_filters=2)
    x = np.random.default_rng(3).uniform(-1, 1, (5, 32, 32, 3)).astype(np.float32)
    y = model.predict(x, batch_size=2)
    assert isinstance(y, np.ndarray) and y.shape == (5, 32, 32, 4) and y.dtype == np.float32
    np.testing.assert_allclose(y.sum(-1), 1, rtol=1e-5)
    np.testing.assert_allclose(model.predict(x[:1]), y[:1], rtol=1e-6)


def test_predict_on_an_empty_batch_is_a_clear_error():
    model = small_unet((32, 32, 3), base_filters=2)
    with pytest.raises(ValueError, match="empty batch"):
        model.predict(np.zeros((0, 32, 32, 3), np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_loss_changes_no_weight(bad):
    """NaN or inf targets: the loss is returned, the weights and Adam's state stay those of the last good step."""
    mt.set_seed(0)
    model = small_unet((32, 32, 3), base_filters=2).compile(Adam(1e-3), SoftmaxCrossEntropy())
    train_steps(model, 1)
    weights, state = model.get_weights(), model.optimizer.get_state()
    x, y = make_batch(5)
    y[0, 3, 4, 1] = bad
    assert not np.isfinite(model.train_on_batch(x, y))
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)
    assert model.optimizer.get_state()["iterations"] == state["iterations"]
    assert np.isfinite(model.train_on_batch(*make_batch(6)))        # and training can go on


def test_class_index_targets_train_exactly_like_one_hot_ones():
    """uint8 labels (N, H, W) are one-hot encoded on the model's device: the same step, bit for bit."""
    x, y = make_batch(2)
    labels = y.argmax(-1).astype(np.uint8)
    runs = []
    for targets in (y, labels):
        mt.set_seed(0)
        model = small_unet((32, 32, 3), base_filters=2).compile(Adam(1e-3), SoftmaxCrossEntropy())
        runs.append(([model.train_on_batch(x, targets) for _ in range(2)], model.get_weights()))
    assert runs[0][0] == runs[1][0]
    for one_hot, indexed in zip(runs[0][1], runs[1][1]):
        np.testing.assert_array_equal(one_hot, indexed)
    with pytest.raises(ValueError, match=r"class indices must be in 0..3 for a 4-class output, got 0..4"):
        model.train_on_batch(x, np.where(labels == 3, 4, labels).astype(np.uint8))


def test_evaluation_keeps_no_batch_in_the_loss():
    model = small_unet((32, 32, 3), base_filters=2).compile(Adam(1e-3), SoftmaxCrossEntropy())
    model.test_on_batch(*make_batch(0))
    assert model.loss._cache is None
    assert all(not layer._cache for layer in model.layers if hasattr(layer, "_cache"))


def make_batch(seed, shape=(2, 32, 32, 3), classes=4):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, shape).astype(np.float32)
    y = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, shape[:3])]
    return x, y


def train_steps(model, steps, start=0):
    return [model.train_on_batch(*make_batch(start + i)) for i in range(steps)]


def test_training_reduces_the_loss():
    mt.set_seed(0)
    model = small_unet((32, 32, 3), base_filters=4).compile(Adam(1e-2), SoftmaxCrossEntropy())
    x, _ = make_batch(0)
    y = np.eye(4, dtype=np.float32)[(x[..., 0] > 0).astype(int) + 2 * (x[..., 1] > 0)]   # a learnable rule
    losses = [model.train_on_batch(x, y) for _ in range(30)]
    assert losses[-1] < 0.8 * losses[0]


def test_save_load_and_continue_is_bit_identical(tmp_path):
    """Train 4 steps; or train 2, save, load in a new model, train 2 more: the same weights, bit for bit."""
    mt.set_seed(5)
    straight = small_unet((32, 32, 3), base_filters=4).compile(Adam(), BinaryCrossentropy())
    initial = straight.get_weights()
    train_steps(straight, 4)

    first = small_unet((32, 32, 3), base_filters=4).compile(Adam(), BinaryCrossentropy())
    first.set_weights(initial)
    train_steps(first, 2)
    first.save(tmp_path / "half.npz", extra={"epoch": 2})

    resumed = mt.load_model(tmp_path / "half.npz")
    assert read_checkpoint(tmp_path / "half.npz").extra == {"epoch": 2} and resumed.optimizer.iterations == 2
    resumed.compile(resumed.optimizer, BinaryCrossentropy())
    train_steps(resumed, 2, start=2)
    for a, b in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_load_weights_refuses_the_other_model(tmp_path):
    small_unet((32, 32, 3), base_filters=4).save(tmp_path / "small.npz")
    other = unet((188, 188, 3), num_classes=4, base_filters=2)
    with pytest.raises(ModelFileError, match="no weight 'encoder_conv1_1/kernel'|shape"):
        other.load_weights(tmp_path / "small.npz")
    wider = small_unet((32, 32, 3), base_filters=8)
    with pytest.raises(ModelFileError, match=r"'encoder_conv1_1/kernel' has shape \(3, 3, 3, 4\).*needs \(3, 3, 3, 8\)"):
        wider.load_weights(tmp_path / "small.npz")


def test_a_refused_file_changes_nothing(tmp_path):
    model = small_unet((32, 32, 3), base_filters=4)
    before = model.get_weights()
    wrong = small_unet((32, 32, 3), num_classes=3, base_filters=4)
    wrong.save(tmp_path / "wrong.npz")
    with pytest.raises(ModelFileError, match="conv_softmax"):
        model.load_weights(tmp_path / "wrong.npz")
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_truncated_or_missing_npz_is_a_clear_error(tmp_path):
    model = small_unet((32, 32, 3), base_filters=4)
    model.save(tmp_path / "model.npz")
    data = (tmp_path / "model.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        mt.load_model(tmp_path / "cut.npz")
    with pytest.raises(ModelFileError, match="no such file"):
        model.load_weights(tmp_path / "absent.npz")


def test_save_is_atomic_an_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    atomic_savez(path, {"a": np.arange(3)})
    original = path.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(KeyboardInterrupt):
        atomic_savez(path, {"a": np.arange(5)})
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]     # no temporary left behind


def test_model_construction_errors():
    inputs = Input((8, 8, 1))
    with pytest.raises(TypeError, match="symbolic tensors"):
        Model(inputs, np.zeros(3))
    conv = Conv2D(2, 3, name="twice")
    hidden = conv(inputs)
    with pytest.raises(ValueError, match="used twice"):
        Model(inputs, conv(hidden))
    with pytest.raises(ValueError, match="inputs must match on every axis but -1"):
        Concatenate()([inputs, MaxPool2D(2)(inputs)])


def test_from_logits_loss_needs_a_conv_output():
    inputs = Input((4, 4, 2))
    model = Model(inputs, layers.Softmax()(inputs)).compile(Adam(), BinaryCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="keeps its logits"):
        model.train_on_batch(np.zeros((1, 4, 4, 2), np.float32), np.zeros((1, 4, 4, 2), np.float32))


@pytest.mark.gpu
def test_small_unet_gpu_forward_backward_matches_cpu():
    mt.set_seed(3)
    cpu = small_unet((32, 32, 3), base_filters=4, dtype=F64).compile(Adam(), BinaryCrossentropy(from_logits=True))
    gpu = small_unet((32, 32, 3), base_filters=4, dtype=F64)
    gpu.set_weights(cpu.get_weights())
    gpu.to("gpu").compile(Adam(), BinaryCrossentropy(from_logits=True))
    x, y = make_batch(9)
    for _ in range(3):
        loss_cpu, loss_gpu = cpu.train_on_batch(x, y), gpu.train_on_batch(x, y)
        assert abs(loss_cpu - loss_gpu) < 1e-10 * abs(loss_cpu)
    for a, b in zip(cpu.get_weights(), gpu.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gpu.predict(x), cpu.predict(x), rtol=1e-9, atol=1e-12)


@pytest.mark.gpu
def test_original_unet_gpu_matches_cpu():
    mt.set_seed(4)
    cpu = unet((188, 188, 3), num_classes=3, base_filters=2, dtype=F64)
    gpu = unet((188, 188, 3), num_classes=3, base_filters=2, dtype=F64)
    gpu.set_weights(cpu.get_weights())
    gpu.to("gpu")
    x = np.random.default_rng(0).uniform(-1, 1, (1, 188, 188, 3))
    y = cpu.forward(x)
    dout = np.random.default_rng(1).standard_normal(y.shape)
    dx = cpu.backward(dout)
    y_gpu = gpu.forward(mt.to_device(x, "gpu"))
    dx_gpu = gpu.backward(mt.to_device(dout, "gpu"))
    np.testing.assert_allclose(mt.to_numpy(y_gpu), y, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mt.to_numpy(dx_gpu), dx, rtol=1e-8, atol=1e-12)
    for a, b in zip(cpu.grads, gpu.grads):
        np.testing.assert_allclose(mt.to_numpy(b), a, rtol=1e-8, atol=1e-12)


def test_training_skips_the_input_gradient_but_not_the_weight_gradients():
    model = skip_model()
    rng = np.random.default_rng(3)
    x, dout = rng.standard_normal((2, 10, 10, 2)), rng.standard_normal((2, 8, 8, 3))
    model.forward(x)
    assert model.backward(dout).shape == x.shape
    full = [g.copy() for g in model.grads]
    model.forward(x)
    assert model.backward(dout, input_grad=False) is None
    for a, b in zip(full, model.grads):
        np.testing.assert_array_equal(a, b)


# ----- the layer registry: a saved model names its layers' classes ---------------------------------------

class Doubling(layers.Layer):
    """A user's layer: y = 2x, dx = 2 dy (no weights)."""

    def compute_output_shape(self, input_shape):
        return input_shape

    def build(self, input_shape):
        self.input_shape = tuple(input_shape)
        self.built = True

    def forward(self, x, training=False):
        return 2 * x

    def backward(self, dy, input_grad=True):
        return 2 * dy


def doubling_model():
    inputs = Input((4, 4, 2))
    return Model(inputs, Doubling(name="double")(Conv2D(3, 1, name="conv", seed=1)(inputs)))


def test_a_users_layer_loads_with_custom_objects_or_registration(tmp_path):
    model = doubling_model()
    model.save(tmp_path / "m.npz")
    with pytest.raises(ModelFileError) as caught:
        mt.load_model(tmp_path / "m.npz")
    message = str(caught.value)
    assert "unknown layer class 'Doubling'" in message and "custom_objects={'Doubling': Doubling}" in message
    assert "@minitensor.register_layer" in message and "Conv2D" in message
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 2)).astype(np.float32)
    loaded = mt.load_model(tmp_path / "m.npz", custom_objects={"Doubling": Doubling})
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    try:
        mt.register_layer(Doubling)
        np.testing.assert_array_equal(mt.load_model(tmp_path / "m.npz").predict(x), model.predict(x))
        other = type("Doubling", (layers.Layer,), {})
        with pytest.raises(ValueError, match="a layer class named 'Doubling' is registered already"):
            mt.register_layer(other)
    finally:
        layers.LAYER_CLASSES.pop("Doubling", None)


def test_every_registered_layer_has_a_gradient_check_example(monkeypatch):
    """The registry is the one list of layers; python -m minitensor.gradcheck must cover each."""
    from minitensor import gradcheck

    checked = set()
    monkeypatch.setattr(gradcheck, "check_layer", lambda layer, *a, **k: checked.add(type(layer)))
    monkeypatch.setattr(gradcheck, "check_loss", lambda *a, **k: None)
    monkeypatch.setattr(gradcheck, "check_model", lambda *a, **k: None)
    for run in gradcheck.EXAMPLES.values():
        run(np.random.default_rng(0), 2)
    own = {cls for cls in layers.LAYER_CLASSES.values() if cls.__module__.startswith("minitensor.")}
    assert own - {layers.InputLayer} <= checked
