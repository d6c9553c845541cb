"""The post's Shape data set on disk: its layout, and reading and checking its files.

The post trains on a "shape" data set that cannot be downloaded, so we draw our own
(``unet/shapes.py``): RGB images with circles, triangles and squares, and a mask that gives each
pixel its class index (0 background, 1 circle, 2 triangle, 3 square). The layout on disk is
exactly the post's::

    ROOT/train_imgs/{i}.jpg   ROOT/train_mask/{i}.png    ids 0 .. num_images-num_test-1 (train + val)
    ROOT/test_imgs/{i}.jpg    ROOT/test_mask/{i}.png     the last num_test ids (test)

(the post has no test masks; we keep them so the test IoU is computed from files), and a folder
the generator wrote also holds ``ROOT/shapes.json``, its parameters. A user's own data set in the
same layout is read the same way.

A mask PNG we write holds the class index in every channel it has, so the post's
``cv.imread(path)[:, :, 0]`` reads it back (OpenCV's default read turns a 1-channel PNG into 3
equal channels). We read masks unchanged instead (``read_mask``), so that a user's masks in the
other usual layouts (16-bit, palette PNGs, the class colours) are read as they are meant, and any
other layout is an error that says what was found: OpenCV's colour read would turn them into
zeros, all background. Files are read by their content (``unet/imagefiles.py``), the reader
predict.py uses too. Images are kept in OpenCV's BGR order, as the post feeds them to the network.
Batches are read by ``unet/batches.py``.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import cv2 as cv
import numpy as np

from minitensor.files import atomic_write_bytes

from .imagefiles import ImageFileError, decode_bytes, is_palette_png, palette_indices, read_checked, read_image

NUM_CLASSES = 4
CLASS_NAMES = ("background", "circle", "triangle", "square")
# The post's colours for predicted masks, one per class, in OpenCV's BGR order.
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
    """The four folders of the post's layout under ``root``."""
    root = os.fspath(root)
    return DatasetDirs(*(os.path.join(root, name) for name in ("train_imgs", "train_mask", "test_imgs", "test_mask")))


def split_ids(num_images=1000, num_test=100, num_val=100):
    """The post's split by id: ``(train_ids, val_ids, test_ids)`` as consecutive ranges.

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
    atomic_write_bytes(path, encoded.tobytes(), sync=False)   # a data set's file: drawn again if lost


def read_bgr(path):
    """Read an image file as uint8 BGR (H, W, 3), as ``cv.imread`` does, or raise DatasetError.

    The file is read by ``unet/imagefiles.py``, as predict.py reads it: by its content, whatever its name.
    """
    try:
        return read_image(path, cv.IMREAD_COLOR)
    except ImageFileError as error:
        raise DatasetError([(error.path, error.reason)]) from None


def _check_size(path, array, image_size):
    if image_size is not None and array.shape[:2] != as_hw(image_size):
        height, width = as_hw(image_size)
        raise DatasetError([(path, f"wrong size {array.shape[0]}x{array.shape[1]}, expected {height}x{width}")])


def load_image(path, image_size=None):
    """An image as float32 (H, W, 3) in [-1, 1] (the post's ``img / 127.5 - 1``), BGR order.

    With ``image_size`` (an int or (H, W)) a different size raises DatasetError; nothing is resized.
    """
    image = read_bgr(path)
    _check_size(os.fspath(path), image, image_size)
    return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def load_mask(path, num_classes=NUM_CLASSES, image_size=None):
    """A mask as uint8 class indices (H, W), from a file in any layout ``read_mask`` accepts.

    Raises DatasetError for a layout it refuses, a value outside 0 .. num_classes-1 or (with
    ``image_size``) a wrong size.
    """
    path = os.fspath(path)
    mask = read_mask(path)
    _check_size(path, mask, image_size)
    if mask.max() >= num_classes:
        bad = sorted(int(v) for v in np.unique(mask[mask >= num_classes]))
        shown = f"{bad[:10]}"[:-1] + (", ...]" if len(bad) > 10 else "]")
        hint = "; 255 is PASCAL VOC's 'void' (object border) label: give those pixels a class" if 255 in bad else ""
        raise DatasetError([(path, f"mask values {shown} outside 0..{num_classes - 1}{hint}")])
    return mask.astype(np.uint8, copy=False)


def read_mask(path, palette=PALETTE):
    """The class index of every pixel of a mask file (H, W), uint8 or uint16, read unchanged.

    Accepted: one channel of 8 or 16 bits (the index itself); a palette PNG (its palette indices);
    three (or four, fully opaque) equal channels, the post's own format read by
    ``cv.imread(path)[:, :, 0]``; and a colour image in the class ``palette`` (what ``colorize_mask``
    writes), mapped back to indices. Anything else raises DatasetError saying what was found:
    OpenCV's colour read would turn a 16-bit or palette mask into zeros, i.e. all background, and
    training would "succeed" on it.
    """
    path = os.fspath(path)
    try:
        data, kind = read_checked(path)
        if kind == "JPEG":
            raise ImageFileError(path, "a JPEG file: its lossy compression changes the class indices near every "
                                       "edge; save masks as PNG")
        if is_palette_png(data):
            return palette_indices(path, data)
        image = decode_bytes(path, data, cv.IMREAD_UNCHANGED)
    except ImageFileError as error:
        raise DatasetError([(error.path, error.reason)]) from None
    return _indices_from_pixels(path, image, palette)


def _indices_from_pixels(path, image, palette):
    """``read_mask``'s rules for a decoded image (``cv.IMREAD_UNCHANGED``)."""
    def refuse(found):
        raise DatasetError([(path, f"{found}; a mask holds one class index per pixel (one channel of 8 or "
                                   f"16 bits, or a palette PNG), or the class colours {_rgb(palette)} (RGB)")])

    if image.dtype not in (np.uint8, np.uint16):
        refuse(f"{image.dtype} pixels")
    if image.ndim == 2:
        return image
    channels = image.shape[2]
    if channels == 4:
        if not (image[:, :, 3] == np.iinfo(image.dtype).max).all():
            refuse("4 channels (colour with transparency)")
        image = image[:, :, :3]
    elif channels != 3:
        refuse(f"{channels} channels")
    if (image[:, :, 0] == image[:, :, 1]).all() and (image[:, :, 1] == image[:, :, 2]).all():
        return image[:, :, 0]
    if image.dtype != np.uint8:
        refuse("a 16-bit colour image (its channels differ)")
    try:
        return decolorize_mask(image, palette)
    except ValueError:
        known = np.zeros(image.shape[:2], bool)
        for color in palette:
            known |= np.all(image == np.asarray(color, np.uint8), axis=-1)
        others = np.unique(image[~known], axis=0)
        shown = ", ".join(str(tuple(int(v) for v in color[::-1])) for color in others[:3])
        refuse(f"a colour image whose colours are not the class palette: {int((~known).sum())} pixels have "
               f"{len(others)} other colour(s), such as {shown} (RGB)")


def _rgb(palette):
    return ", ".join(str(tuple(int(v) for v in color[::-1])) for color in palette)


def one_hot(mask, num_classes, dtype=np.float32):
    """Class indices (...,) -> one-hot (..., num_classes): channel c is 1 where the class is c."""
    mask = np.asarray(mask)
    if mask.size and (mask.min() < 0 or mask.max() >= num_classes):
        raise ValueError(f"class indices must be in 0..{num_classes - 1}, got {mask.min()}..{mask.max()}")
    return np.eye(num_classes, dtype=dtype)[mask]


def colorize_mask(mask, palette=PALETTE):
    """Class indices (H, W) -> uint8 colour image (H, W, 3), the post's way of saving predictions."""
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
