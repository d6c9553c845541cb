"""The trainer's logged numbers against Keras's ``fit``: two epochs of train.py's run, loss and val_loss.

tests/test_train.py pins the epoch means by hand from our own per-batch losses; this pins them
to an independent implementation. The run is train.py's own assembly (``train.prepare``: the
data set, the shuffling loader, small_unet, Adam 1e-3, the default ``bce-logits`` loss, the
Trainer and its callbacks), driven by ``Trainer.fit``; only the width is narrowed to keep it
cheap. The seed's Keras model (bench/keras_seed.py) starts from the same weights and is given the
same batches: ``fit`` with ``shuffle=False`` on each epoch's images in the order the trainer drew
them, one ``fit`` call per epoch (``initial_epoch``), so Adam's state carries over as in one call.

What makes the comparison bite: 10 training images in batches of 4 are batches of 4, 4 and 2,
and 5 validation images are 4 + 1. Keras 3 weights its loss tracker by the batch size: its
TensorFlow ``train_step`` and ``test_step`` (keras/src/backend/tensorflow/trainer.py, Keras 3.15)
call ``self._loss_tracker.update_state(loss, sample_weight=tf.shape(x)[0])``, and the tracker is a
``metrics.Mean`` (keras/src/trainers/trainer.py), which adds ``loss * batch`` to its total and
``batch`` to its count. So Keras's epoch ``loss`` and ``val_loss`` are means over images; a mean
over batches would give the batch of 2 (and the validation batch of 1) the weight of a batch of 4.
"""
import contextlib
import functools

import numpy as np
import pytest
from conftest import rel_error

import train
from bench.keras_seed import keras_small_unet
from unet import small_unet
from unet.data import NUM_CLASSES

WIDTH = 4            # small_unet's base_filters: 4, 4, 8, 16, 32 channels (train.py's 32 costs more, tests no more)
SIZE = 32            # px, as tests/test_train.py's runs (small_unet's four 2x pools need a multiple of 16)
BATCH = 4
EPOCHS = 2
# float32 on both sides, the same batches, the same Adam: what is left is the order of float32
# sums in convolutions and reductions. test_unet_vs_keras.py holds the loss and the weights after
# three Adam steps to 1e-5; here, after six, the epoch means agree to ~4e-8 relative and the
# weights to < 8e-7 (normwise per weight), so 1e-5 leaves room for other CPUs' summation orders.
# What it must tell apart is far outside: means over batches (each batch once, whatever its
# size) are 7e-3 (loss) and 4e-2 (val_loss) away, and fail this test.
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-5


def test_two_epochs_of_the_trainer_match_keras_fit(tf, keras, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "small_unet", functools.partial(small_unet, base_filters=WIDTH))
    args = train.parse_args(["--num-images", "15", "--num-val", "5", "--num-test", "0", "--image-size", str(SIZE),
                             "--batch-size", str(BATCH), "--epochs", str(EPOCHS), "--quiet", "--device", "cpu",
                             "--data", str(tmp_path / "shape"), "--weights-dir", str(tmp_path / "w"),
                             "--results-dir", str(tmp_path / "r")])
    with contextlib.ExitStack() as stack:
        trainer, _, _ = train.prepare(args, stack, log=lambda message: None)
        ours = trainer.model
        # An output leaning to the background, as a trained model's does: the images' losses then
        # differ with how much of each is background, so the batches' losses differ enough for
        # their weighting to show (at a plain start every pixel costs about log 2).
        kernel, bias = ours.get_layer("conv_softmax").get_weights()
        ours.get_layer("conv_softmax").set_weights([kernel, bias + np.array([2.0, -1.0, -1.0, -1.0], "float32")])

        theirs = keras_small_unet(input_shape=(SIZE, SIZE, 3), num_classes=NUM_CLASSES, base_filters=WIDTH)
        for layer in ours.layers:                    # the same names in both (test_unet_vs_keras.py checks)
            if layer.params:
                theirs.get_layer(layer.name).set_weights(layer.get_weights())
        # The seed's compile(loss=BinaryCrossentropy()) on the softmax output: Keras 3 takes the
        # hidden logits, what bce-logits is (train.LOSSES). Eagerly: no graph to trace (seconds
        # saved for six steps), and no XLA.
        theirs.compile(optimizer=keras.optimizers.Adam(learning_rate=train.DEFAULT_LR),
                       loss=keras.losses.BinaryCrossentropy(), run_eagerly=True)

        orders = []                                  # each epoch's order, as the trainer draws it
        draw = trainer.train_loader.epoch_order
        monkeypatch.setattr(trainer.train_loader, "epoch_order", lambda: orders.append(draw()) or orders[-1])
        assert trainer.fit()

    assert [len(order) for order in orders] == [10] * EPOCHS
    assert not np.array_equal(orders[0], orders[1])  # shuffled: Keras must follow the trainer's order
    val_images, val_masks = trainer.val_loader.read_batch(trainer.val_loader.ids)
    keras_history = {"loss": [], "val_loss": []}
    for epoch, order in enumerate(orders):
        images, masks = trainer.train_loader.read_batch(order)
        logs = theirs.fit(images, masks, batch_size=BATCH, epochs=epoch + 1, initial_epoch=epoch, shuffle=False,
                          validation_data=(val_images, val_masks), validation_batch_size=BATCH, verbose=0).history
        for key in keras_history:
            keras_history[key] += logs[key]

    for key in keras_history:
        for row, expected in zip(trainer.state.history, keras_history[key], strict=True):
            assert row[key] == pytest.approx(expected, rel=LOSS_TOLERANCE), (key, row["epoch"])
    for layer in ours.layers:
        for name, ours_w, keras_w in zip(layer.weight_names, layer.get_weights(),
                                         theirs.get_layer(layer.name).get_weights() if layer.params else []):
            assert rel_error(ours_w, keras_w) < WEIGHT_TOLERANCE, f"{layer.name}/{name}"
