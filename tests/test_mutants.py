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


# -- unet/trainer.py and unet/trainer_checkpoints.py (every test name says "trainer": the mutation check's fast
# set for these modules takes test_mutants.py's tests by that word) --

TINY_TRAINING = ["--num-images", "12", "--num-val", "2", "--num-test", "2", "--image-size", "16", "--batch-size", "4",
                 "--quiet"]      # 8 training images: 2 batches an epoch; 2 validation images: 1 batch


def prepared_trainer(tmp_path, stack, *flags, log=lambda message: None):
    """train.py's Trainer for a tiny run in ``tmp_path`` (restored with --resume), without its predictions."""
    import train

    args = train.parse_args(TINY_TRAINING + ["--data", str(tmp_path / "shape"), "--weights-dir", str(tmp_path / "w"),
                                             "--results-dir", str(tmp_path / "r"), *flags])
    return train.prepare(args, stack, log=log)[0]


def test_a_trainer_made_without_a_world_is_one_process_with_the_seeds_callbacks(tmp_path):
    """The post's callbacks (docs/training.md, unet/callbacks.py: ModelCheckpoint(period=3) of the best,
    ReduceLROnPlateau(factor=0.5, patience=3), EarlyStopping(min_delta=0, patience=10)), seen through the
    Trainer's own callbacks' decisions, and one process when no world is given: 12 epochs that
    each improve val_loss by 0.001 (an improvement for min_delta 0, and above ReduceLROnPlateau's 1e-4),
    then a plateau. The rate halves at the 3rd, 6th and 9th flat epoch, training stops at the 10th, and
    only epochs 3, 6, 9 and 12 are saved."""
    from minitensor.distributed import SingleProcess
    from unet.batches import BatchLoader
    from unet.trainer import Trainer

    model = skip_model().compile(Adam(learning_rate=1e-3), losses.SoftmaxCrossEntropy())
    loader = BatchLoader(range(4), tmp_path, tmp_path, 2)          # never read: no epoch is trained
    trainer = Trainer(model, loader, loader, epochs=30, weights_dir=tmp_path, quiet=True, log=lambda message: None)
    assert isinstance(trainer.world, SingleProcess)
    val_losses = [1.0 - 0.001 * epoch for epoch in range(12)] + [0.989] * 10
    rates, stopped = [], []
    for epoch, val_loss in enumerate(val_losses):
        for callback in trainer.callbacks:
            callback.on_epoch_end(epoch, {"loss": val_loss, "val_loss": val_loss, "lr": model.optimizer.learning_rate})
        rates.append(model.optimizer.learning_rate)
        stopped.append(bool(model.stop_training))
    assert rates == [1e-3] * 14 + [5e-4] * 3 + [2.5e-4] * 3 + [1.25e-4] * 2
    assert stopped == [False] * 21 + [True]
    saved = sorted(path.name[:5] for path in tmp_path.glob("ep*.npz"))
    assert saved == ["ep003", "ep006", "ep009", "ep012"]


def test_trainer_logs_each_epochs_mean_loss_over_that_epochs_images_only(tmp_path, monkeypatch):
    """Epoch 2's loss is the mean over epoch 2's batches: the sums start from 0 at each epoch."""
    import contextlib

    steps = []
    real_train_step = mt.Model.train_step
    monkeypatch.setattr(mt.Model, "train_step", lambda self, x, y, sample_weight=None: steps.append(
        (len(x), float(value := real_train_step(self, x, y, sample_weight)))) or value)
    with contextlib.ExitStack() as stack:
        trainer = prepared_trainer(tmp_path, stack, "--epochs", "2")
        assert trainer.fit()
    assert [size for size, _ in steps] == [4, 4, 4, 4]
    for row, epoch_steps in zip(trainer.state.history, (steps[:2], steps[2:]), strict=True):
        assert row["loss"] == pytest.approx(sum(size * value for size, value in epoch_steps) / 8, rel=1e-12)


def test_trainer_resumes_its_callbacks_state_and_says_from_where(tmp_path):
    """Stopped at epoch 2's first batch, the run resumes with the callbacks' state after epoch 1 (their
    bests, counters), not with fresh callbacks, and says where it goes on."""
    import contextlib

    def stop_in_epoch_2(trainer):
        if trainer.state.epoch == 1:
            trainer.stop.requested = True

    with contextlib.ExitStack() as stack:
        first = prepared_trainer(tmp_path, stack, "--epochs", "2")
        first.on_batch_end = stop_in_epoch_2
        assert not first.fit()
        after_epoch_1 = [callback.get_state() for callback in first.callbacks]
    assert after_epoch_1[1]["best"] == first.state.history[0]["val_loss"]     # ReduceLROnPlateau's
    said = []
    with contextlib.ExitStack() as stack:
        resumed = prepared_trainer(tmp_path, stack, "--epochs", "2", "--resume", log=said.append)
        assert [callback.get_state() for callback in resumed.callbacks] == after_epoch_1
    assert f"resumed from {resumed.resume_path}: epoch 2, batch 1" in said


def test_trainer_counts_every_checkpoint_write_in_the_epochs_save_seconds(tmp_path, monkeypatch):
    """The epoch line's "checkpoints N s" and history's save_seconds add up every write of the epoch: with
    --checkpoint-minutes 0 and 2 batches, the save after batch 1, best.npz and the epoch's last.npz. A clock
    that moves 1 s per reading makes each write take exactly 1 s."""
    import contextlib
    import types

    from unet import trainer_checkpoints

    readings = iter(range(1_000_000))
    clock = types.SimpleNamespace(perf_counter=lambda: float(next(readings)),
                                  monotonic=trainer_checkpoints.time.monotonic)
    monkeypatch.setattr(trainer_checkpoints, "time", clock)
    with contextlib.ExitStack() as stack:
        trainer = prepared_trainer(tmp_path, stack, "--epochs", "1", "--checkpoint-minutes", "0")
        assert trainer.fit()
    assert trainer.state.history[0]["save_seconds"] == 3.0
