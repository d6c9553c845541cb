"""The U-Net paper's weight map: balance the classes, and make the gaps between objects count.

Ronneberger et al. (2015) segment touching cells. A network trained with plain cross-entropy
happily paints two touching cells as one blob: the few background pixels between them are a
tiny fraction of the loss. So each pixel x gets a weight (the paper's equation 2)

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))        w0 = 10, sigma = 5 px

with d1 and d2 the distances to the nearest and the second-nearest object. In a narrow gap
between two objects d1 + d2 is small and the weight approaches w_c + w0; a few sigma away from
any gap it is just w_c. The loss is the existing weighted cross-entropy: pass the map as
``sample_weight`` (minitensor's losses take one weight per pixel, (N, H, W)).

Our choices, where the paper leaves them open:

* ``w_c`` balances class frequencies (the paper's "weight map to balance the class frequencies"):
  w_c(c) = P / (K_present * count(c)) for the K_present classes that occur among the P pixels,
  so the mean of w_c over the pixels is exactly 1 and the loss keeps the scale of the unweighted
  loss. By default the counts are those of *this mask*; pass ``class_weights`` (one per class)
  for fixed weights instead: ``dataset_class_weights`` counts over the whole training set, and
  ``train.py --class-weights`` chooses (see its help for what each did on the Shape data).
* An *object* is a connected region (8-connectivity) of one foreground class. The paper has one
  foreground class, cells, whose instances its labels keep apart; we have several classes, and
  a circle touching a square is still two objects. (Two touching shapes of the *same* class
  merge into one object: without instance labels nothing can tell them apart.)
* Distances are exact Euclidean distances between pixel centres (cv2.distanceTransform with
  DIST_MASK_PRECISE), computed once per object on the complement of that object.
* The border term is added to *background* pixels only. Inside an object d1 = 0, and the term
  would mostly weight the object's own rim; the paper's figure 3d shows the weight in the gaps.
* With fewer than two objects there is no gap, and the border term is 0.

Weight maps depend only on the mask, so they are computed once and cached in a folder of the
caller's (train.py: the run's weights folder, never the user's data set):
``ROOT/train_mask/7.png`` -> ``CACHE/train_mask-<hash of ROOT/train_mask>/7.npz`` (see ``cached_weight_map``).
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile

import cv2 as cv
import numpy as np

from minitensor.files import atomic_savez

from .data import NUM_CLASSES, load_mask

W0 = 10.0
SIGMA = 5.0
CACHE_FORMAT = 2   # bump when the computation changes, to invalidate every cached map


def class_balance_weights(mask, num_classes=NUM_CLASSES):
    """w_c per class (num_classes,), float64: P / (K_present * count(c)), 0 for absent classes.

    Normalised so that the mean over the mask's pixels of w_c[mask] is exactly 1.
    """
    return _balancing_weights(np.bincount(np.asarray(mask).ravel(), minlength=num_classes))


def _balancing_weights(counts):
    """P / (K_present * count(c)) per class from pixel counts, 0 where a class is absent."""
    present = counts > 0
    weights = np.zeros(len(counts))
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def dataset_class_weights(mask_paths, num_classes=NUM_CLASSES):
    """w_c per class (num_classes,), float64, from the class frequencies of many masks together:
    P / (K_present * count(c)) over all their pixels, as ``class_balance_weights`` does for one.

    Per-mask balancing gives a 60-pixel triangle in a 16384-pixel image a weight above 100; over
    the whole training set each class weight is the same for every image.
    """
    counts = np.zeros(num_classes, np.int64)
    for path in mask_paths:
        counts += np.bincount(load_mask(path, num_classes).ravel(), minlength=num_classes)
    return _balancing_weights(counts)


def object_labels(mask):
    """Number the objects of a class-index mask (H, W): each connected region (8-connectivity) of
    one foreground class. Returns ``(labels, count)``: int32 (H, W), 0 on the background."""
    labels = np.zeros(mask.shape, np.int32)
    count = 0
    for class_index in np.unique(mask):
        if class_index == 0:
            continue
        num, components = cv.connectedComponents((mask == class_index).astype(np.uint8), connectivity=8)
        inside = components > 0
        labels[inside] = components[inside] + count
        count += num - 1
    return labels, count


def exact_distances(outside):
    """Euclidean distance (H, W) float32 from every pixel to the nearest 0 pixel of ``outside``.

    Between pixel centres a squared distance is an integer, so the distance is sqrt(integer).
    OpenCV's precise transform (DIST_MASK_PRECISE) finds it up to float noise of ~1e-6, and that
    noise differs from call to call (OpenCV 5.0: 50 of 50 repeated calls on one 32x32 mask
    differed somewhere), which made the weight maps, and a resumed run that recomputed them, not
    repeatable. Rounding the square to its integer (an error of 2 d 1e-6 is far below 0.5 for any
    image size here) gives the exact distance, the same bits every time.
    """
    distance = cv.distanceTransform(outside, cv.DIST_L2, cv.DIST_MASK_PRECISE).astype(np.float64)
    return np.sqrt(np.rint(distance * distance)).astype(np.float32)


def two_nearest_distances(labels, count):
    """d1, d2 (H, W) float32: per pixel, the distances to the nearest and second-nearest object.

    One distance transform per object (distance of every pixel to that object's pixels), kept as
    a running pair of minima, so memory stays two maps whatever the number of objects.
    """
    d1 = np.full(labels.shape, np.inf, np.float32)
    d2 = np.full(labels.shape, np.inf, np.float32)
    for k in range(1, count + 1):
        outside = (labels != k).astype(np.uint8)
        distance = exact_distances(outside)
        d2 = np.minimum(d2, np.maximum(d1, distance))
        d1 = np.minimum(d1, distance)
    return d1, d2


def border_weights(mask, w0=W0, sigma=SIGMA):
    """The border term (H, W) float32: w0 exp(-(d1 + d2)^2 / (2 sigma^2)) on background pixels, 0 elsewhere."""
    labels, count = object_labels(mask)
    if count < 2:
        return np.zeros(mask.shape, np.float32)
    d1, d2 = two_nearest_distances(labels, count)
    border = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma ** 2))
    border[mask != 0] = 0.0
    return border.astype(np.float32)


def weight_map(mask, num_classes=NUM_CLASSES, w0=W0, sigma=SIGMA, class_weights=None):
    """The paper's w(x) = w_c(x) + border term, float32 (H, W), for a class-index mask (H, W).

    ``class_weights`` (num_classes,) replaces the per-mask class balancing when given.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"weight_map takes class indices (H, W), got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() >= num_classes):
        raise ValueError(f"mask values must be in 0..{num_classes - 1}, got {mask.min()}..{mask.max()}")
    if class_weights is None:
        class_weights = class_balance_weights(mask, num_classes)
    class_weights = np.asarray(class_weights, np.float64)
    if class_weights.shape != (num_classes,):
        raise ValueError(f"class_weights must hold {num_classes} values, got shape {class_weights.shape}")
    return (class_weights[mask] + border_weights(mask, w0, sigma)).astype(np.float32)


def weight_maps(masks, w0=W0, sigma=SIGMA, class_weights=None):
    """Weight maps (N, H, W) float32 for a batch of one-hot masks (N, H, W, K), as the loaders give.

    For masks that were just augmented: the gaps moved, so their maps are computed afresh
    (a few milliseconds for a 128x128 mask with a handful of shapes).
    """
    num_classes = masks.shape[-1]
    labels = np.asarray(masks).argmax(axis=-1)
    return np.stack([weight_map(label, num_classes, w0, sigma, class_weights) for label in labels])


# ----- the cache, outside the data set ----------------------------------------------------------

def weight_cache_path(mask_path, cache_dir):
    """Where the map of a mask is cached: ``ROOT/train_mask/7.png`` -> ``CACHE/train_mask-<hash>/7.npz``,
    the hash that of the mask folder's resolved path, so two data sets never share a file."""
    folder, name = os.path.split(os.path.realpath(os.fspath(mask_path)))
    digest = hashlib.sha1(folder.encode()).hexdigest()[:10]
    return os.path.join(os.fspath(cache_dir), f"{os.path.basename(folder)}-{digest}",
                        os.path.splitext(name)[0] + ".npz")


def _cache_key(mask_path, num_classes, w0, sigma, class_weights):
    """Everything the cached map depends on, as a string: the parameters and the mask file's
    modification time and size (so an edited or regenerated mask invalidates its map)."""
    stat = os.stat(mask_path)
    return json.dumps({
        "format": CACHE_FORMAT, "num_classes": int(num_classes), "w0": float(w0), "sigma": float(sigma),
        "class_weights": None if class_weights is None else [float(w) for w in class_weights],
        "mask": os.path.realpath(mask_path), "mask_mtime_ns": stat.st_mtime_ns, "mask_size": stat.st_size,
    }, sort_keys=True)


def _read_cache(path, key):
    """The cached map if ``path`` holds one made with ``key``, else None (also for a damaged file)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) == key:
                return data["weight"]
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
        pass
    return None


def cached_weight_map(mask_path, cache_dir, num_classes=NUM_CLASSES, w0=W0, sigma=SIGMA, class_weights=None,
                      write_cache=True):
    """``weight_map`` of the mask file ``mask_path``, read from its cache file when that is current.

    The cache (``weight_cache_path``) stores the map and the key it was made with; a different
    key (parameters changed, mask file modified) recomputes and rewrites it, atomically (a
    temporary file renamed into place), so an interrupted run never leaves half a map.
    ``write_cache=False`` reads a current cache file but never writes one (the ranks of a
    data-parallel run other than rank 0, which write nothing).
    """
    mask_path = os.fspath(mask_path)
    key = _cache_key(mask_path, num_classes, w0, sigma, class_weights)
    path = weight_cache_path(mask_path, cache_dir)
    weights = _read_cache(path, key)
    if weights is None:
        weights = weight_map(load_mask(mask_path, num_classes), num_classes, w0, sigma, class_weights)
        if write_cache:
            atomic_savez(path, {"weight": weights, "key": np.array(key)})
    return weights


def batch_weights(ids, masks_dir, cache_dir, num_classes=NUM_CLASSES, w0=W0, sigma=SIGMA, class_weights=None,
                  write_cache=True):
    """Cached weight maps (N, H, W) float32 of the masks ``masks_dir/{id}.png``, for ``sample_weight``."""
    return np.stack([cached_weight_map(os.path.join(os.fspath(masks_dir), f"{index}.png"), cache_dir, num_classes,
                                       w0, sigma, class_weights, write_cache) for index in ids])
