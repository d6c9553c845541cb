"""Test-time augmentation: predict each flip and quarter turn of an image, turn the answers back, average.

A flipped image's segmentation, flipped back, is as valid an answer as the plain one, since no
shape changes class under the square's 8 symmetries (``unet.augment.dihedral``). Where the network is
sure, the views agree and the mean changes nothing. Where it is unsure (a partly hidden
triangle, a circle that might be a square) the views disagree, and their mean probability
outvotes any single view's mistake. The cost is one forward pass per view.

    probabilities = predict_views(lambda x: model.predict(x), images, num_views=8)
"""
from __future__ import annotations

import numpy as np

from .augment import dihedral, undo_dihedral

VIEW_COUNTS = (1, 2, 4, 8)   # symmetries 0..n-1: plain; + left-right flip; + up-down flips; + transposes


def predict_views(predict, images, num_views=8):
    """Mean of ``predict`` over the first ``num_views`` symmetries of every image, each answer turned back.

    Args:
        predict: f(images (N, H, W, C)) -> per-pixel outputs (N, H, W, K), e.g. softmax probabilities.
        images: (N, H, W, C) array.
        num_views: 1 (just ``predict(images)``), 2, 4 (the flips) or 8 (flips and quarter turns;
            needs square images).
    Returns:
        (N, H, W, K) mean of the views, in the orientation of ``images``.
    """
    if num_views not in VIEW_COUNTS:
        raise ValueError(f"num_views must be one of {VIEW_COUNTS}, not {num_views}")
    if num_views == 8 and images.shape[1] != images.shape[2]:
        raise ValueError(f"8 views turn the image a quarter, which needs a square image, not "
                         f"{images.shape[1]}x{images.shape[2]}; use num_views=4 (the flips alone)")
    if num_views == 1:
        return predict(images)   # the plain prediction, with no copies
    total = None
    for index in range(num_views):
        view = np.stack([dihedral(image, index) for image in images])
        answer = np.stack([undo_dihedral(output, index) for output in predict(view)])
        total = answer.astype(np.float64) if total is None else total + answer
    return (total / num_views).astype(answer.dtype)
