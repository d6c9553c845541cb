"""What a training run leaves behind for a person to read: the test set's colored masks, metrics.json,
history.csv, training.png and predictions.png."""
from __future__ import annotations

import csv
import io
import json
import math
import os

import numpy as np

from minitensor.distributed import SingleProcess
from minitensor.files import atomic_write_bytes

from .data import CLASS_NAMES, NUM_CLASSES, PALETTE, colorize_mask, load_mask, read_bgr, write_image_atomic
from .metrics import format_scores, score_mask_files
from .tiling import crop_output, fit_to_model
from .tta import predict_views

HISTORY_FIELDS = ("epoch", "loss", "val_loss", "lr", "seconds", "images_per_second", "save_seconds")


def write_history_csv(path, history):
    """One row per epoch (1-based), the columns of HISTORY_FIELDS."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(path, text.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")   # files only: no display needed, none is assumed
    import matplotlib.pyplot as plt

    return plt


def plot_history(path, history):
    """Loss and val_loss per epoch (left axis) and the learning rate (right axis, log scale)."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    fig, loss_axis = plt.subplots(figsize=(7, 4), dpi=100)
    loss_axis.plot(epochs, [row["loss"] for row in history], "o-", label="loss")
    loss_axis.plot(epochs, [row["val_loss"] for row in history], "s-", label="val_loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("loss")
    lr_axis = loss_axis.twinx()
    lr_axis.step(epochs, [row["lr"] for row in history], "g--", where="post", label="learning rate")
    lr_axis.set_yscale("log")
    lr_axis.set_ylabel("learning rate")
    handles = loss_axis.get_legend_handles_labels()[0] + lr_axis.get_legend_handles_labels()[0]
    loss_axis.legend(handles, [h.get_label() for h in handles], loc="upper right")
    loss_axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_predictions(path, images, true_masks, predicted_masks, titles, palette=PALETTE):
    """A grid: one row per sample with the image, its true mask and the predicted mask.

    Args:
        images: (N, H, W, 3) uint8 BGR images as read from disk.
        true_masks, predicted_masks: (N, H, W) class indices.
    """
    plt = _pyplot()
    count = len(images)
    fig, axes = plt.subplots(count, 3, figsize=(7.5, 2.5 * count), dpi=100, squeeze=False)
    for row, (image, truth, prediction, title) in enumerate(zip(images, true_masks, predicted_masks, titles)):
        panels = [image, colorize_mask(truth, palette), colorize_mask(prediction, palette)]
        names = [title, "true mask", "prediction"]
        for axis, panel, name in zip(axes[row], panels, names):
            axis.imshow(np.ascontiguousarray(panel[..., ::-1]))   # BGR (OpenCV) -> RGB (matplotlib)
            axis.set_title(name, fontsize=9)
            axis.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_text_atomic(path, text):
    atomic_write_bytes(path, text.encode())


def json_text(value):
    """``json.dumps`` that writes NaN (a score of a class absent from truth and prediction) as null,
    so the file is valid JSON for every reader."""
    def clean(item):
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: clean(v) for key, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(v) for v in item]
        return item

    return json.dumps(clean(value), indent=2, allow_nan=False)


def predict_test_set(model, test_ids, dirs, results_dir, batch_size, tta=False, world=None):
    """Colored masks of every test image into ``results_dir``; returns the label maps, in test_ids order.

    With a data-parallel ``world`` (minitensor/distributed.py), batch b is predicted by rank
    b mod N and the label maps (uint8) are gathered; rank 0 writes every mask and gets them all,
    the other ranks get None."""
    world = world or SingleProcess()

    def predict(images):
        (inputs,) = fit_to_model(model, images)
        return crop_output(model.predict(inputs, batch_size=batch_size), images.shape[1])

    starts = list(range(0, len(test_ids), batch_size))
    mine = {}
    for start in starts[world.rank::world.size]:
        ids = test_ids[start:start + batch_size]
        batch = np.stack([read_bgr(os.path.join(dirs.test_images, f"{i}.jpg")) for i in ids])
        probabilities = predict_views(predict, batch.astype(np.float32) / 127.5 - 1, 8 if tta else 1)
        mine[start] = probabilities.argmax(axis=-1).astype(np.uint8)
    gathered = {start: labels for part in world.allgather(mine) for start, labels in part.items()}
    if not world.is_writer:
        return None
    predictions = [label_map for start in starts for label_map in gathered[start]]
    for index, label_map in zip(test_ids, predictions):
        write_image_atomic(os.path.join(results_dir, f"{index}.png"), colorize_mask(label_map, PALETTE))
    return predictions


def write_results(model, history, test_ids, dirs, results_dir, batch_size, tta=False, log=print, weights=None,
                  world=None):
    """Everything a finished run leaves in ``results_dir``: masks, metrics.json (scored from the mask
    files, with ``weights``: which weights predicted them), history.csv, training.png,
    predictions.png. Returns the scores (None without test images).

    Data-parallel: every rank of ``world`` calls it; they share out the predictions, and rank 0
    alone writes (the others return None)."""
    world = world or SingleProcess()
    if not world.is_writer:
        if test_ids:
            predict_test_set(model, test_ids, dirs, results_dir, batch_size, tta, world)
        return None
    os.makedirs(results_dir, exist_ok=True)
    write_history_csv(os.path.join(results_dir, "history.csv"), history)
    if history:
        plot_history(os.path.join(results_dir, "training.png"), history)
    if not test_ids:
        log(f"no test images (--num-test 0): wrote history.csv and training.png to {results_dir}, no predictions")
        return None
    predictions = predict_test_set(model, test_ids, dirs, results_dir, batch_size, tta, world)
    scores = score_mask_files(dirs.test_masks, results_dir, test_ids, NUM_CLASSES, palette=PALETTE)
    log(f"Test set (from the files in {results_dir} against {dirs.test_masks}):")
    log(format_scores(scores, CLASS_NAMES))
    write_text_atomic(os.path.join(results_dir, "metrics.json"),
                      json_text({**scores, "weights": weights} if weights else scores))
    shown = min(4, len(test_ids))
    truths = [load_mask(os.path.join(dirs.test_masks, f"{i}.png"), NUM_CLASSES) for i in test_ids[:shown]]
    images = [read_bgr(os.path.join(dirs.test_images, f"{i}.jpg")) for i in test_ids[:shown]]
    plot_predictions(os.path.join(results_dir, "predictions.png"), images, truths, predictions[:shown],
                     [f"test image {i}" for i in test_ids[:shown]])
    log(f"wrote {len(test_ids)} colored masks, metrics.json, history.csv, training.png and predictions.png "
        f"to {results_dir}")
    return scores
