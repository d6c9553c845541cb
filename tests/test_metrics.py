"""Confusion matrix, IoU, Dice and their means on hand-made examples (unet/metrics.py)."""
import json
import math
import warnings

import cv2 as cv
import numpy as np
import pytest

from unet import metrics, report
from unet.data import PALETTE, DatasetError, colorize_mask

# A 4x4 example worked out by hand: class 3 is in neither map.
TRUE = np.array([[0, 0, 1, 1],
                 [0, 0, 1, 1],
                 [2, 2, 0, 0],
                 [2, 2, 0, 0]])
PRED = np.array([[0, 0, 1, 0],
                 [0, 1, 1, 1],
                 [2, 0, 0, 0],
                 [2, 2, 0, 0]])
# Rows are true classes, columns predicted classes.
CM = [[7, 1, 0, 0],
      [1, 3, 0, 0],
      [1, 0, 3, 0],
      [0, 0, 0, 0]]
# class 0: TP 7, FP 2, FN 1 -> IoU 7/10, Dice 14/17
# class 1: TP 3, FP 1, FN 1 -> IoU 3/5,  Dice 6/8
# class 2: TP 3, FP 0, FN 1 -> IoU 3/4,  Dice 6/7
IOU = [7 / 10, 3 / 5, 3 / 4]
DICE = [14 / 17, 6 / 8, 6 / 7]


def test_confusion_matrix_by_hand():
    np.testing.assert_array_equal(metrics.confusion_matrix(TRUE, PRED, 4), CM)
    batch = metrics.confusion_matrix(np.stack([TRUE, TRUE]), np.stack([PRED, TRUE]), 4)
    np.testing.assert_array_equal(batch, np.add(CM, np.diag([8, 4, 4, 0])))


def test_iou_and_dice_by_hand_with_an_absent_class_as_nan():
    iou, dice = metrics.iou_per_class(CM), metrics.dice_per_class(CM)
    np.testing.assert_allclose(iou[:3], IOU)
    np.testing.assert_allclose(dice[:3], DICE)
    assert math.isnan(iou[3]) and math.isnan(dice[3])


def test_means_leave_out_absent_classes():
    scores = metrics.segmentation_scores(CM)
    assert scores["classes"] == [1, 2, 3]
    assert scores["mean_iou"] == pytest.approx((3 / 5 + 3 / 4) / 2)
    assert scores["mean_dice"] == pytest.approx((6 / 8 + 6 / 7) / 2)
    assert scores["mean_iou_with_background"] == pytest.approx(sum(IOU) / 3)
    assert scores["mean_dice_with_background"] == pytest.approx(sum(DICE) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(13 / 16)
    assert metrics.segmentation_scores(CM, classes=[1])["mean_iou"] == pytest.approx(3 / 5)


def test_a_predicted_but_absent_class_scores_zero():
    truth = np.zeros((3, 3), int)
    prediction = truth.copy()
    prediction[1, 1] = 3
    scores = metrics.segmentation_scores(metrics.confusion_matrix(truth, prediction, 4))
    assert scores["iou"][3] == 0.0 and scores["dice"][3] == 0.0
    assert scores["mean_iou"] == 0.0                     # classes 1 and 2 are NaN, class 3 counts
    assert scores["iou"][0] == pytest.approx(8 / 9)


def test_all_classes_absent_gives_nan_without_warnings():
    truth = np.zeros((2, 2), int)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = metrics.segmentation_scores(metrics.confusion_matrix(truth, truth, 4))
    assert math.isnan(scores["mean_iou"]) and scores["mean_iou_with_background"] == 1.0


def test_bad_label_maps_are_refused():
    with pytest.raises(ValueError, match="differ in size"):
        metrics.confusion_matrix(TRUE, PRED[:3], 4)
    with pytest.raises(ValueError, match="predicted labels"):
        metrics.confusion_matrix(TRUE, PRED + 2, 4)


def test_format_scores_lists_every_class():
    table = metrics.format_scores(metrics.segmentation_scores(CM))
    assert "circle" in table and "0.6000" in table and "nan" in table and "mean IoU 0.6750" in table


def write_masks(folder, masks, colored):
    folder.mkdir()
    for index, mask in masks.items():
        cv.imwrite(str(folder / f"{index}.png"), colorize_mask(mask) if colored else mask.astype(np.uint8))


@pytest.mark.parametrize("colored", [False, True])
def test_scores_from_mask_files_equal_scores_from_arrays(tmp_path, colored):
    truths = {900: TRUE, 901: np.flipud(TRUE)}
    predictions = {900: PRED, 901: np.full((4, 4), 3)}
    write_masks(tmp_path / "true", truths, colored=False)
    write_masks(tmp_path / "pred", predictions, colored)
    palette = PALETTE if colored else None
    scores = metrics.score_mask_files(tmp_path / "true", tmp_path / "pred", [900, 901], 4, palette)
    expected = metrics.confusion_matrix(np.stack(list(truths.values())), np.stack(list(predictions.values())), 4)
    np.testing.assert_equal(scores, metrics.segmentation_scores(expected))   # NaN equals NaN here


def test_a_missing_prediction_is_named(tmp_path):
    write_masks(tmp_path / "true", {0: TRUE}, colored=False)
    (tmp_path / "pred").mkdir()
    with pytest.raises(DatasetError, match="0.png: missing"):
        metrics.score_mask_files(tmp_path / "true", tmp_path / "pred", [0], 4, PALETTE)


def test_classes_absent_from_the_truth_or_the_prediction_are_named():
    """A test set without squares scores square nan: the table and metrics.json say why, and a class
    never predicted is named too."""
    cm = np.array([[10, 0, 0, 2],      # square predicted on 2 background pixels, never true
                   [0, 0, 0, 0],       # circle: absent from both
                   [1, 0, 3, 0],       # triangle: true and predicted
                   [0, 0, 0, 0]])
    scores = metrics.segmentation_scores(cm)
    assert scores["absent_from_truth"] == [1, 3] and scores["absent_from_prediction"] == [1]
    table = metrics.format_scores(scores)
    assert "absent from the true masks: circle, square" in table
    assert "in neither the true masks nor the predictions: circle (IoU and Dice undefined, nan" in table
    assert "never predicted: circle" in table
    text = json.loads(report.json_text(scores))
    assert text["absent_from_truth"] == [1, 3] and text["absent_from_prediction"] == [1]


def test_a_table_where_every_class_occurs_says_nothing_more():
    table = metrics.format_scores(metrics.segmentation_scores(np.diag([5, 1, 1, 1])))
    assert "absent" not in table and "never" not in table


def test_a_test_set_without_any_shape_says_it_cannot_score_the_model():
    table = metrics.format_scores(metrics.segmentation_scores(np.diag([16, 0, 0, 0])))
    assert "pixel accuracy 1.0000" in table
    assert "no shape class (circle, triangle, square) occurs in the true masks or the predictions" in table
