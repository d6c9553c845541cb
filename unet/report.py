"""What a training run leaves behind for a person to read: history.csv, training.png, predictions.png."""
from __future__ import annotations

import csv
import os

import numpy as np

from .data import PALETTE, colorize_mask

HISTORY_FIELDS = ("epoch", "loss", "val_loss", "lr", "seconds", "images_per_second")


def write_history_csv(path, history):
    """One row per epoch (1-based), the columns of HISTORY_FIELDS."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


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
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, path)
