"""Segmentation scores: the confusion matrix, IoU and Dice per class, and their means.

All scores come from one confusion matrix accumulated over every pixel of every image (as the
PASCAL VOC benchmark does), not from a mean of per-image scores: a small image with one
misclassified pixel does not weigh as much as a whole image.

For a class c, with TP, FP, FN its true positives, false positives and false negatives::

    IoU(c)  = TP / (TP + FP + FN)
    Dice(c) = 2 TP / (2 TP + FP + FN)

A class absent from both the truth and the prediction has 0 / 0: its score is NaN, meaning "no
evidence", and it is left out of the means (a class that is predicted but absent scores 0, and
counts). The headline means are over the shape classes 1 .. num_classes-1 (circle, triangle,
square): the background covers ~90% of the pixels and would flatter every model. The means with
the background are reported beside them.

A score over nothing is no score: the classes absent from the true masks (``absent_from_truth``)
and never predicted (``absent_from_prediction``) are listed with the scores, and ``format_scores``
names them, so a nan (or a pixel accuracy of 1.0 on a test set of background only) does not pass
for a result.
"""
from __future__ import annotations

import os

import numpy as np

from minitensor.backend import to_numpy
from unet.data import CLASS_NAMES, NUM_CLASSES, DatasetError, decolorize_mask, load_mask, read_bgr


def confusion_matrix(y_true, y_pred, num_classes=NUM_CLASSES):
    """Counts (num_classes, num_classes), int64: entry [t, p] is the number of pixels of true
    class t predicted as p. Takes integer label maps of any equal shape (one image or a batch),
    NumPy or CuPy."""
    y_true = to_numpy(y_true).astype(np.int64, copy=False).ravel()
    y_pred = to_numpy(y_pred).astype(np.int64, copy=False).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"label maps differ in size: {y_true.size} true and {y_pred.size} predicted pixels")
    for name, labels in (("true", y_true), ("predicted", y_pred)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{name} labels must be in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    # Pair (t, p) -> one number t*C + p, so a single bincount counts every pair.
    counts = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _ratio(numerator, denominator):
    """numerator / denominator, NaN where the denominator is 0 (without a warning)."""
    numerator = numerator.astype(np.float64)
    out = np.full(numerator.shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def iou_per_class(cm):
    """IoU of every class from a confusion matrix; NaN for a class absent from truth and prediction."""
    cm = np.asarray(cm)
    tp = np.diag(cm)
    return _ratio(tp, cm.sum(axis=0) + cm.sum(axis=1) - tp)


def dice_per_class(cm):
    """Dice (F1) of every class from a confusion matrix; NaN for a class absent from both."""
    cm = np.asarray(cm)
    tp = np.diag(cm)
    return _ratio(2 * tp, cm.sum(axis=0) + cm.sum(axis=1))


def mean_over(per_class, classes):
    """Mean of ``per_class[classes]`` ignoring NaN; NaN if every one of them is NaN."""
    values = np.asarray(per_class, np.float64)[list(classes)]
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def segmentation_scores(cm, classes=None):
    """Every score of a confusion matrix, as a dict of plain Python numbers and lists:
    ``iou``/``dice`` per class, ``mean_iou``/``mean_dice`` over ``classes`` (default the shape
    classes 1 .. num_classes-1), ``mean_iou_with_background``/``mean_dice_with_background`` over
    all classes, ``pixel_accuracy``, the classes ``absent_from_truth`` and ``absent_from_prediction``
    (lists of class indices) and the ``confusion_matrix`` itself."""
    cm = np.asarray(cm)
    num_classes = cm.shape[0]
    classes = list(range(1, num_classes) if classes is None else classes)
    iou, dice = iou_per_class(cm), dice_per_class(cm)
    every_class = range(num_classes)
    total = cm.sum()
    return {
        "iou": iou.tolist(),
        "dice": dice.tolist(),
        "classes": classes,
        "mean_iou": mean_over(iou, classes),
        "mean_dice": mean_over(dice, classes),
        "mean_iou_with_background": mean_over(iou, every_class),
        "mean_dice_with_background": mean_over(dice, every_class),
        "pixel_accuracy": float(np.trace(cm) / total) if total else float("nan"),
        "absent_from_truth": [int(c) for c in np.flatnonzero(cm.sum(axis=1) == 0)],
        "absent_from_prediction": [int(c) for c in np.flatnonzero(cm.sum(axis=0) == 0)],
        "confusion_matrix": cm.tolist(),
    }


def score_mask_files(true_dir, pred_dir, ids, num_classes=NUM_CLASSES, palette=None, classes=None):
    """Scores of the predictions ``pred_dir/{id}.png`` against ``true_dir/{id}.png``.

    True masks hold class indices (the data set's masks). Predictions are read as class indices
    too, unless ``palette`` is given: then they are colour images as the seed saves them
    (``colorize_mask``) and are turned back into indices with ``decolorize_mask``. A missing or
    bad file raises DatasetError naming it.
    """
    cm = np.zeros((num_classes, num_classes), np.int64)
    for index in ids:
        true_path = os.path.join(os.fspath(true_dir), f"{index}.png")
        pred_path = os.path.join(os.fspath(pred_dir), f"{index}.png")
        truth = load_mask(true_path, num_classes)
        if palette is None:
            prediction = load_mask(pred_path, num_classes, truth.shape)
        else:
            prediction = _load_colored_mask(pred_path, palette, truth.shape)
        cm += confusion_matrix(truth, prediction, num_classes)
    return segmentation_scores(cm, classes)


def _load_colored_mask(path, palette, shape):
    image = read_bgr(path)
    if image.shape[:2] != shape:
        raise DatasetError([(path, f"wrong size {image.shape[0]}x{image.shape[1]}, expected {shape[0]}x{shape[1]}")])
    try:
        return decolorize_mask(image, palette)
    except ValueError as error:
        raise DatasetError([(path, str(error))]) from None


def format_scores(scores, class_names=CLASS_NAMES):
    """A small table of per-class IoU and Dice followed by the means, for logs and reports, and a
    line for each kind of absent class (see ``absent_notes``)."""
    lines = [f"{'class':<12}{'IoU':>8}{'Dice':>8}"]
    for name, iou, dice in zip(class_names, scores["iou"], scores["dice"]):
        lines.append(f"{name:<12}{iou:>8.4f}{dice:>8.4f}")
    shape_names = ", ".join(class_names[c] for c in scores["classes"])
    lines.append(f"mean IoU {scores['mean_iou']:.4f}, mean Dice {scores['mean_dice']:.4f} ({shape_names})")
    lines.append(f"with background: mean IoU {scores['mean_iou_with_background']:.4f}, "
                 f"mean Dice {scores['mean_dice_with_background']:.4f}; pixel accuracy {scores['pixel_accuracy']:.4f}")
    return "\n".join(lines + absent_notes(scores, class_names))


def absent_notes(scores, class_names=CLASS_NAMES):
    """Lines naming the classes absent from the true masks, those in neither (scored nan, left out
    of the means) and those never predicted; none when every class occurs in both."""
    def names(classes):
        return ", ".join(class_names[c] for c in classes)

    truth, prediction = scores.get("absent_from_truth", []), scores.get("absent_from_prediction", [])
    neither = [c for c in truth if c in prediction]
    notes = []
    if truth:
        pronoun = "they are" if len(truth) > 1 else "it is"
        notes.append(f"note: absent from the true masks: {names(truth)} (this test set cannot show how well "
                     f"{pronoun} found)")
    if neither:
        notes.append(f"note: in neither the true masks nor the predictions: {names(neither)} (IoU and Dice "
                     f"undefined, nan, left out of the means)")
    if prediction:
        notes.append(f"note: never predicted: {names(prediction)}")
    if all(c in neither for c in scores["classes"]):
        notes.append(f"note: no shape class ({names(scores['classes'])}) occurs in the true masks or the "
                     f"predictions: the means are nan and the pixel accuracy counts background only; this test "
                     f"set cannot score the model")
    return notes
