"""Our callbacks make the same decisions as Keras's own, driven with the same val_loss sequences.

Keras's real ReduceLROnPlateau, EarlyStopping and ModelCheckpoint run beside ours on a fake model;
the learning rates, the stop epoch and the saved files must agree. Keras 3 has no ``period`` for
ModelCheckpoint, so the seed's ``period=3`` is checked against a hand-computed expectation.
"""
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

keras = pytest.importorskip("keras")

from unet import callbacks  # noqa: E402


class FakeOptimizer:
    def __init__(self, learning_rate):
        self.learning_rate = learning_rate


class FakeModel:
    """Just what a callback may touch: the optimizer's learning rate, stop_training and save."""

    def __init__(self, learning_rate=1e-3):
        self.optimizer = FakeOptimizer(learning_rate)
        self.stop_training = False
        self.saved = []

    def save(self, path, overwrite=True):
        self.saved.append(os.path.basename(path))


def drive(callback, val_losses, model=None):
    """Run a callback through the epochs as fit() does; return [(lr, stop_training)] per epoch."""
    model = model or FakeModel()
    callback.set_model(model)
    callback.on_train_begin()
    history = []
    for epoch, val_loss in enumerate(val_losses):
        if hasattr(callback, "on_epoch_begin"):          # Keras's ModelCheckpoint wants it
            callback.on_epoch_begin(epoch)
        logs = {"loss": val_loss + 0.125, "val_loss": val_loss, "lr": model.optimizer.learning_rate}
        callback.on_epoch_end(epoch, logs)
        history.append((model.optimizer.learning_rate, model.stop_training))
        if model.stop_training:
            break
    callback.on_train_end()
    return history


def random_walk(seed, epochs=60):
    """A noisy, flattening val_loss curve. Rounded to 3 decimals, so no two values are within
    float32 rounding of a min_delta apart (Keras 3 compares in float32, we in float64)."""
    rng = np.random.default_rng(seed)
    steps = rng.normal(0.0, 0.02, epochs) - 0.03 * np.exp(-np.arange(epochs) / 15)
    return [round(float(v), 3) for v in 1.0 + np.cumsum(steps)]


HAND_MADE = [1.0, 0.8, 0.7, 0.7, 0.69995, 0.6999, 0.71, 0.65, 0.65, 0.65, 0.65, 0.649, 0.66,
             0.6495, 0.66, 0.66, 0.6, 0.6, 0.60005, 0.6, 0.6, 0.61, 0.62, 0.63, 0.64, 0.65, 0.66,
             0.67, 0.68, 0.69, 0.7, 0.71]
SEQUENCES = [HAND_MADE] + [random_walk(seed) for seed in range(6)]
SEQUENCE_IDS = ["hand-made"] + [f"walk{seed}" for seed in range(6)]

REDUCE_LR_SETTINGS = [
    dict(monitor="val_loss", factor=0.5, patience=3),                                # the seed's
    dict(monitor="val_loss", factor=0.1, patience=2, cooldown=2, min_lr=1e-5),
    dict(monitor="val_loss", factor=0.8, patience=1, cooldown=2),
    dict(monitor="val_loss", factor=0.5, patience=1, min_delta=0.0),
]
EARLY_STOPPING_SETTINGS = [
    dict(monitor="val_loss", min_delta=0, patience=10),                              # the seed's
    dict(monitor="val_loss", min_delta=0.0125, patience=3),
    dict(monitor="val_loss", patience=0),
]


@pytest.mark.parametrize("settings", REDUCE_LR_SETTINGS)
@pytest.mark.parametrize("val_losses", SEQUENCES, ids=SEQUENCE_IDS)
def test_reduce_lr_on_plateau_matches_keras(settings, val_losses):
    ours = drive(callbacks.ReduceLROnPlateau(**settings), val_losses)
    theirs = drive(keras.callbacks.ReduceLROnPlateau(**settings), val_losses)
    assert ours == theirs


@pytest.mark.parametrize("settings", EARLY_STOPPING_SETTINGS)
@pytest.mark.parametrize("val_losses", SEQUENCES, ids=SEQUENCE_IDS)
def test_early_stopping_matches_keras(settings, val_losses):
    ours, theirs = callbacks.EarlyStopping(**settings), keras.callbacks.EarlyStopping(**settings)
    assert drive(ours, val_losses) == drive(theirs, val_losses)
    assert (ours.stopped_epoch, ours.best_epoch) == (theirs.stopped_epoch, theirs.best_epoch)


def test_early_stopping_in_max_mode_matches_keras():
    accuracies = [1.0 - v for v in HAND_MADE]
    ours = callbacks.EarlyStopping(monitor="val_loss", mode="max", patience=4)
    theirs = keras.callbacks.EarlyStopping(monitor="val_loss", mode="max", patience=4)
    assert drive(ours, accuracies) == drive(theirs, accuracies)


@pytest.mark.parametrize("val_losses", SEQUENCES, ids=SEQUENCE_IDS)
def test_checkpoint_every_epoch_matches_keras(tmp_path, val_losses):
    """With period=1 our ModelCheckpoint saves the same epochs under the same names as Keras 3's."""
    pattern = "ep{epoch:03d}-loss{loss:.3f}-val_loss{val_loss:.3f}"
    ours_model, theirs_model = FakeModel(), FakeModel()
    drive(callbacks.ModelCheckpoint(tmp_path, pattern, ".keras", period=1), val_losses, ours_model)
    keras_checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / (pattern + ".keras")),
                                                       monitor="val_loss", save_best_only=True)
    drive(keras_checkpoint, val_losses, theirs_model)
    assert ours_model.saved == theirs_model.saved and len(ours_model.saved) > 1


def test_checkpoint_with_the_seeds_period_3_looks_only_every_third_epoch(tmp_path):
    """Keras 2 semantics, worked out by hand: epochs 3, 6, 9 (1-based) are considered. Epoch 3
    (0.8) beats +inf and is saved; epoch 6 (0.75) beats 0.8 and is saved; epoch 9 (0.76) does not
    beat 0.75. Epoch 5's 0.7, the true minimum, is never looked at; epoch 10 is not a 3rd epoch."""
    val_losses = [1.0, 0.9, 0.8, 0.85, 0.7, 0.75, 0.72, 0.71, 0.76, 0.6]
    model, messages = FakeModel(), []
    checkpoint = callbacks.ModelCheckpoint(tmp_path, verbose=1, log=messages.append)
    drive(checkpoint, val_losses, model)
    assert model.saved == ["ep003-loss0.925-val_loss0.800.npz", "ep006-loss0.875-val_loss0.750.npz"]
    assert checkpoint.last_saved_path == os.path.join(str(tmp_path), model.saved[-1])
    assert messages == [
        f"Epoch 00003: val_loss improved from inf to 0.80000, saving model to {tmp_path}/{model.saved[0]}",
        f"Epoch 00006: val_loss improved from 0.80000 to 0.75000, saving model to {tmp_path}/{model.saved[1]}",
        "Epoch 00009: val_loss did not improve from 0.75000",
    ]


def test_checkpoint_without_save_best_only_saves_every_period(tmp_path):
    model = FakeModel()
    drive(callbacks.ModelCheckpoint(tmp_path, "ep{epoch:03d}", save_best_only=False, period=2), [1.0] * 7, model)
    assert model.saved == ["ep002.npz", "ep004.npz", "ep006.npz"]


def test_messages_in_keras_words():
    messages = []
    model = FakeModel(1e-3)
    reduce_lr = callbacks.ReduceLROnPlateau(factor=0.5, patience=3, verbose=1, log=messages.append)
    drive(reduce_lr, [1.0, 0.9, 0.8, 0.7, 0.7, 0.7, 0.7], model)
    assert messages == ["Epoch 00007: ReduceLROnPlateau reducing learning rate to 0.0005."]
    assert model.optimizer.learning_rate == 0.0005
    messages.clear()
    history = drive(callbacks.EarlyStopping(patience=2, verbose=1, log=messages.append), [1.0, 0.9, 0.95, 0.95, 0.8])
    assert messages == ["Epoch 00004: early stopping"] and len(history) == 4


def test_lr_stops_at_min_lr():
    model = FakeModel(1e-3)
    drive(callbacks.ReduceLROnPlateau(factor=0.1, patience=1, min_lr=2e-5), [1.0] * 10, model)
    assert model.optimizer.learning_rate == 2e-5


def test_auto_mode_only_guesses_for_a_loss():
    with pytest.raises(ValueError, match="mode='min' or 'max'"):
        callbacks.EarlyStopping(monitor="val_iou")
    assert callbacks.EarlyStopping(monitor="loss").mode == "min"


def make_callbacks(log, directory):
    """The seed's three callbacks, in the seed's order."""
    return [callbacks.ModelCheckpoint(directory, period=3, verbose=1, log=log),
            callbacks.ReduceLROnPlateau(factor=0.5, patience=3, verbose=1, log=log),
            callbacks.EarlyStopping(min_delta=0, patience=10, verbose=1, log=log)]


def train(callback_list, model, val_losses, first_epoch=0):
    """A fit() loop with several callbacks; returns [(lr, stop_training)] per epoch."""
    for callback in callback_list:
        callback.set_model(model)
        if first_epoch == 0:
            callback.on_train_begin()
    history = []
    for epoch, val_loss in enumerate(val_losses, start=first_epoch):
        logs = {"loss": val_loss + 0.125, "val_loss": val_loss, "lr": model.optimizer.learning_rate}
        for callback in callback_list:
            callback.on_epoch_end(epoch, logs)
        history.append((model.optimizer.learning_rate, model.stop_training))
        if model.stop_training:
            break
    for callback in callback_list:
        callback.on_train_end()
    return history


@pytest.mark.parametrize("stop_after", [1, 4, 8, 13, 20])
@pytest.mark.parametrize("val_losses", SEQUENCES[:3], ids=SEQUENCE_IDS[:3])
def test_resuming_from_saved_state_makes_the_same_decisions(tmp_path, val_losses, stop_after):
    messages = []
    model = FakeModel()
    expected = train(make_callbacks(messages.append, tmp_path), model, val_losses)
    expected_messages, expected_saved = list(messages), list(model.saved)

    messages.clear()
    first_model = FakeModel()
    first_run = make_callbacks(messages.append, tmp_path)
    history = train(first_run, first_model, val_losses[:stop_after])
    # Only the decisions made so far survive the restart: the states (as JSON), the learning rate.
    saved_states = json.loads(json.dumps([callback.get_state() for callback in first_run]))
    resumed_model = FakeModel(first_model.optimizer.learning_rate)
    resumed_model.saved = list(first_model.saved)
    resumed = make_callbacks(messages.append, tmp_path)
    for callback, state in zip(resumed, saved_states):
        callback.set_model(resumed_model)
        callback.on_train_begin()
        callback.set_state(state)
    if not first_model.stop_training:
        history += train(resumed, resumed_model, val_losses[stop_after:], first_epoch=stop_after)
    assert history == expected
    assert resumed_model.saved == expected_saved
    # "early stopping" is said at the end of the run that stopped; ignore the interrupted run's end.
    assert [m for m in messages if "early stopping" not in m] == [m for m in expected_messages
                                                                    if "early stopping" not in m]
