"""The seed's Shape data set on disk: its layout, and reading and checking its files.

The seed trains on a "shape" data set that cannot be downloaded, so we draw our own
(``unet/shapes.py``): RGB images with circles, triangles and squares, and a mask that gives each
pixel its class index (0 background, 1 circle, 2 triangle, 3 square). The layout on disk is
exactly the seed's::

    ROOT/train_imgs/{i}.jpg   ROOT/train_mask/{i}.png    ids 0 .. num_images-num_test-1 (train + val)
    ROOT/test_imgs/{i}.jpg    ROOT/test_mask/{i}.png     the last num_test ids (test)

(the seed has no test masks; we keep them so the test IoU is computed from files), and a folder
the generator wrote also holds ``ROOT/shapes.json``, its parameters. A user's own data set in the
same layout is read the same way.

A mask PNG holds the class index in every channel it has, so the seed's
``cv.imread(path)[:, :, 0]`` reads it back (OpenCV's default read turns a 1-channel PNG into 3
equal channels). Images are kept in OpenCV's BGR order, as the seed feeds them to the network.
Batches are read by ``unet/batches.py``.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import cv2 as cv
import numpy as np

NUM_CLASSES = 4
CLASS_NAMES = ("background", "circle", "triangle", "square")
# The seed's colours for predicted masks, one per class, in OpenCV's BGR order.
PALETTE = [[0, 0, 0], [0, 0, 128], [0, 128, 0], [128, 0, 0]]
JPEG_QUALITY = 95


class DatasetError(ValueError):
    """One or more data set files are missing, unreadable, the wrong size or hold bad labels.

    ``problems`` is a list of ``(path, reason)`` pairs; the message lists them (the first SHOWN, then
    a count), so a broken data set is fixed in one go instead of one crash at a time; ``hint``, a
    line after them, says what to do.
    """

    SHOWN = 20   # problems listed in the message; a folder with thousands of missing files gives a count

    def __init__(self, problems, hint=None):
        self.problems = list(problems)
        lines = [f"  {path}: {reason}" for path, reason in self.problems[:self.SHOWN]]
        if len(self.problems) > self.SHOWN:
            lines.append(f"  ... and {len(self.problems) - self.SHOWN} more")
        noun = "file" if len(self.problems) == 1 else "files"
        super().__init__(f"{len(self.problems)} bad data set {noun}:\n" + "\n".join(lines)
                         + (f"\n{hint}" if hint else ""))


class DatasetDirs(NamedTuple):
    train_images: str
    train_masks: str
    test_images: str
    test_masks: str


def dataset_dirs(root) -> DatasetDirs:
    """The four folders of the seed's layout under ``root``."""
    root = os.fspath(root)
    return DatasetDirs(*(os.path.join(root, name) for name in ("train_imgs", "train_mask", "test_imgs", "test_mask")))


def split_ids(num_images=1000, num_test=100, num_val=100):
    """The seed's split by id: ``(train_ids, val_ids, test_ids)`` as consecutive ranges.

    With the defaults: range(0, 800), range(800, 900), range(900, 1000). Train and val ids live in
    the train folders, test ids in the test folders.
    """
    num_train = num_images - num_val - num_test
    if num_val < 0 or num_test < 0 or num_train < 1:
        raise ValueError(f"cannot split {num_images} images into {num_val} val, {num_test} test and at least 1 train")
    return range(0, num_train), range(num_train, num_train + num_val), range(num_train + num_val, num_images)


def sample_paths(root, index, num_images=1000, num_test=100):
    """``(image_path, mask_path)`` of image ``index``: test folders for the last ``num_test`` ids."""
    dirs = dataset_dirs(root)
    is_test = index >= num_images - num_test
    images_dir, masks_dir = (dirs.test_images, dirs.test_masks) if is_test else (dirs.train_images, dirs.train_masks)
    return os.path.join(images_dir, f"{index}.jpg"), os.path.join(masks_dir, f"{index}.png")


def as_hw(image_size):
    """``128`` or ``(128, 128)`` -> ``(128, 128)``."""
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    height, width = image_size
    return int(height), int(width)


def write_image_atomic(path, array):
    """Encode ``array`` by the extension of ``path`` and write it under a temporary name first,
    so an interrupted run never leaves a half-written file under the real name."""
    extension = os.path.splitext(path)[1]
    params = [cv.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if extension == ".jpg" else []
    ok, encoded = cv.imencode(extension, array, params)
    if not ok:
        raise OSError(f"OpenCV could not encode {path}")
    temporary = path + ".tmp"
    with open(temporary, "wb") as f:
        f.write(encoded.tobytes())
    os.replace(temporary, path)


def _is_truncated(data, path):
    """True if a JPEG or PNG file lacks its end marker: OpenCV would decode the part that is
    there without complaint (filling the rest with grey), so we look for the marker ourselves."""
    tail = data[-16:].tobytes().rstrip(b"\x00")
    if path.lower().endswith((".jpg", ".jpeg")):
        return not tail.endswith(b"\xff\xd9")
    if path.lower().endswith(".png"):
        return not tail.endswith(b"IEND\xaeB`\x82")
    return False


def read_bgr(path):
    """Read an image file as uint8 BGR (H, W, 3), as ``cv.imread`` does, or raise DatasetError."""
    path = os.fspath(path)
    try:
        data = np.fromfile(path, np.uint8)
    except FileNotFoundError:
        raise DatasetError([(path, "missing")]) from None
    except OSError as exc:
        raise DatasetError([(path, f"unreadable ({exc.strerror})")]) from None
    if data.size == 0 or _is_truncated(data, path):
        raise DatasetError([(path, "corrupt (empty or truncated file)")])
    image = cv.imdecode(data, cv.IMREAD_COLOR)
    if image is None:
        raise DatasetError([(path, "corrupt (OpenCV cannot decode it)")])
    return image


def _check_size(path, array, image_size):
    if image_size is not None and array.shape[:2] != as_hw(image_size):
        height, width = as_hw(image_size)
        raise DatasetError([(path, f"wrong size {array.shape[0]}x{array.shape[1]}, expected {height}x{width}")])


def load_image(path, image_size=None):
    """An image as float32 (H, W, 3) in [-1, 1] (the seed's ``img / 127.5 - 1``), BGR order.

    With ``image_size`` (an int or (H, W)) a different size raises DatasetError; nothing is resized.
    """
    image = read_bgr(path)
    _check_size(os.fspath(path), image, image_size)
    return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def load_mask(path, num_classes=NUM_CLASSES, image_size=None):
    """A mask as uint8 class indices (H, W), read as the seed does: channel 0 of ``cv.imread``.

    Raises DatasetError for a value outside 0 .. num_classes-1 or (with ``image_size``) a wrong size.
    """
    path = os.fspath(path)
    mask = read_bgr(path)[:, :, 0]
    _check_size(path, mask, image_size)
    if mask.max() >= num_classes:
        bad = sorted(int(v) for v in np.unique(mask[mask >= num_classes]))
        raise DatasetError([(path, f"mask values {bad} outside 0..{num_classes - 1}")])
    return mask


def one_hot(mask, num_classes, dtype=np.float32):
    """Class indices (...,) -> one-hot (..., num_classes): channel c is 1 where the class is c."""
    mask = np.asarray(mask)
    if mask.size and (mask.min() < 0 or mask.max() >= num_classes):
        raise ValueError(f"class indices must be in 0..{num_classes - 1}, got {mask.min()}..{mask.max()}")
    return np.eye(num_classes, dtype=dtype)[mask]


def colorize_mask(mask, palette=PALETTE):
    """Class indices (H, W) -> uint8 colour image (H, W, 3), the seed's way of saving predictions."""
    return np.asarray(palette, np.uint8)[np.asarray(mask)]


def decolorize_mask(color_image, palette=PALETTE):
    """The inverse of ``colorize_mask``: a colour image (H, W, 3) -> class indices (H, W), uint8.

    Colours must match a palette entry exactly (PNG is lossless); any other colour raises
    ValueError, since it means the file is not a colourised mask.
    """
    color_image = np.asarray(color_image)
    mask = np.zeros(color_image.shape[:2], np.uint8)
    matched = np.zeros(color_image.shape[:2], bool)
    for class_index, color in enumerate(palette):
        hit = np.all(color_image == np.asarray(color, color_image.dtype), axis=-1)
        mask[hit] = class_index
        matched |= hit
    if not matched.all():
        raise ValueError(f"{int((~matched).sum())} pixels have colours that are not in the palette {palette}")
    return mask


def _problems(load, path, *args):
    """The (path, reason) pairs that ``load(path, *args)`` raises, or []."""
    try:
        load(path, *args)
    except DatasetError as error:
        return error.problems
    return []


def check_files(images_dir, masks_dir, ids, num_classes=NUM_CLASSES, image_size=None):
    """Open ``{id}.jpg`` and ``{id}.png`` for every id and return every problem as (path, reason)."""
    problems = []
    for index in ids:
        problems += _problems(load_image, os.path.join(images_dir, f"{index}.jpg"), image_size)
        problems += _problems(load_mask, os.path.join(masks_dir, f"{index}.png"), num_classes, image_size)
    return problems


def check_dataset(root, num_images=1000, num_test=100, num_classes=NUM_CLASSES, image_size=128, ids=None):
    """Scan the data set in ``root`` (all ids, or just ``ids``) and raise one DatasetError that
    lists every bad file with its reason: missing, corrupt, wrong size, or mask values outside
    0 .. num_classes-1. Returns the number of samples checked when all is well."""
    ids = range(num_images) if ids is None else ids
    dirs = dataset_dirs(root)
    first_test = num_images - num_test
    train_ids = [i for i in ids if i < first_test]
    test_ids = [i for i in ids if i >= first_test]
    problems = (check_files(dirs.train_images, dirs.train_masks, train_ids, num_classes, image_size)
                + check_files(dirs.test_images, dirs.test_masks, test_ids, num_classes, image_size))
    if problems:
        raise DatasetError(problems)
    return len(ids)
