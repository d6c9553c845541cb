"""The seed's Shape data set: generate it, check it, and read it in batches.

The seed trains on a "shape" data set that cannot be downloaded, so we draw our own with OpenCV:
RGB images with circles, triangles and squares, and a mask that gives each pixel its class index
(0 background, 1 circle, 2 triangle, 3 square). The layout on disk is exactly the seed's::

    ROOT/train_imgs/{i}.jpg   ROOT/train_mask/{i}.png    ids 0 .. num_images-num_test-1 (train + val)
    ROOT/test_imgs/{i}.jpg    ROOT/test_mask/{i}.png     the last num_test ids (test)

plus ``ROOT/test_mask`` (the seed has no test masks; we keep them so the test IoU is computed from
files) and ``ROOT/shapes.json``, the generator's parameters, written last as a "complete" marker.

A mask PNG holds the class index in every channel it has, so the seed's
``cv.imread(path)[:, :, 0]`` reads it back (OpenCV's default read turns a 1-channel PNG into 3
equal channels). Images are kept in OpenCV's BGR order, as the seed feeds them to the network.

Generate from the shell with ``python -m unet.data --out shape`` (see ``--help``).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from typing import NamedTuple

import cv2 as cv
import numpy as np

NUM_CLASSES = 4
CLASS_NAMES = ("background", "circle", "triangle", "square")
# The seed's colours for predicted masks, one per class, in OpenCV's BGR order.
PALETTE = [[0, 0, 0], [0, 0, 128], [0, 128, 0], [128, 0, 0]]

MARKER_FILE = "shapes.json"
GENERATOR_KEYS = ("num_images", "num_test", "image_size", "seed")   # what the marker records (and "complete")

# Drawing parameters, for 128x128 images; sizes scale with the image size.
MAX_SHAPES = 4                 # each image holds 1..MAX_SHAPES shapes
SIZE_RANGE_128 = (12, 40)      # circle diameter, square side, triangle height, in pixels
MIN_COLOR_DISTANCE = 80.0      # a shape's colour differs this much (RGB distance) from the background
NOISE_SIGMA_RANGE = (2.0, 8.0)  # Gaussian pixel noise, standard deviation in grey levels
BLUR_PROBABILITY = 0.5         # half the images get a slight 3x3 Gaussian blur
JPEG_QUALITY = 95
SUBPIXEL_BITS = 4              # OpenCV draws with coordinates in 1/16 pixel, so shapes are placed smoothly


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


# ----------------------------------------------------------------------------------------------
# Drawing one sample
# ----------------------------------------------------------------------------------------------

def _as_hw(image_size):
    """``128`` or ``(128, 128)`` -> ``(128, 128)``."""
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    height, width = image_size
    return int(height), int(width)


def _size_range(image_size):
    """Shape sizes for this image size: SIZE_RANGE_128 scaled, never below 4 pixels."""
    scale = min(_as_hw(image_size)) / 128
    low, high = (max(4, round(s * scale)) for s in SIZE_RANGE_128)
    return low, max(low, high)


def _random_color(rng, background=None):
    """A uniformly random colour, redrawn until it stands out from ``background``.

    Every shape gets its own random colour, so colour says nothing about the class: the network
    has to learn the geometry.
    """
    while True:
        color = rng.integers(0, 256, size=3)
        if background is None or np.linalg.norm(color - background) >= MIN_COLOR_DISTANCE:
            return color


def _polygon(class_index, size, angle):
    """Vertices (relative to the centre) of a square (side ``size``) or an equilateral triangle
    (height ``size``), rotated by ``angle`` radians."""
    if class_index == 3:
        radius, start = size / np.sqrt(2), np.pi / 4           # a square's half diagonal
        corners = start + np.arange(4) * np.pi / 2
    else:
        radius, start = size * 2 / 3, -np.pi / 2                # centroid to vertex = 2/3 of the height
        corners = start + np.arange(3) * 2 * np.pi / 3
    corners = corners + angle
    return radius, np.stack([radius * np.cos(corners), radius * np.sin(corners)], axis=1)


def _draw_shape(image, mask, rng, size_range, background):
    """Draw one random shape onto ``image`` (anti-aliased) and ``mask`` (hard edges, class index)."""
    height, width = mask.shape
    class_index = int(rng.integers(1, NUM_CLASSES))
    size = rng.uniform(*size_range)
    color = tuple(int(c) for c in _random_color(rng, background))
    scale = 1 << SUBPIXEL_BITS
    if class_index == 1:
        radius = size / 2
        center = rng.uniform([radius, radius], [width - 1 - radius, height - 1 - radius])
        center_fixed = tuple(int(v) for v in np.round(center * scale))
        radius_fixed = int(round(radius * scale))
        cv.circle(image, center_fixed, radius_fixed, color, -1, cv.LINE_AA, SUBPIXEL_BITS)
        cv.circle(mask, center_fixed, radius_fixed, class_index, -1, cv.LINE_8, SUBPIXEL_BITS)
        return
    radius, vertices = _polygon(class_index, size, rng.uniform(0, 2 * np.pi))
    center = rng.uniform([radius, radius], [width - 1 - radius, height - 1 - radius])
    points = [np.round((vertices + center) * scale).astype(np.int32)]
    cv.fillPoly(image, points, color, cv.LINE_AA, SUBPIXEL_BITS)
    cv.fillPoly(mask, points, class_index, cv.LINE_8, SUBPIXEL_BITS)


def draw_sample(rng, image_size=128):
    """One random ``(image, mask)``: uint8 BGR (H, W, 3) and uint8 class indices (H, W).

    Shapes are drawn one after another, so a later shape hides an earlier one in the image and in
    the mask alike. The last shape is always fully visible: every image holds at least one shape.
    """
    height, width = _as_hw(image_size)
    background = _random_color(rng)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = background
    mask = np.zeros((height, width), np.uint8)
    size_range = _size_range((height, width))
    for _ in range(int(rng.integers(1, MAX_SHAPES + 1))):
        _draw_shape(image, mask, rng, size_range, background)
    if rng.random() < BLUR_PROBABILITY:
        image = cv.GaussianBlur(image, (3, 3), rng.uniform(0.5, 1.0))
    noise = rng.normal(0.0, rng.uniform(*NOISE_SIGMA_RANGE), size=image.shape)
    image = np.clip(np.round(image + noise), 0, 255).astype(np.uint8)
    return image, mask


def make_sample(seed, index, image_size=128):
    """Sample ``index`` of the data set with this ``seed``.

    Each sample has its own generator seeded with ``(seed, index)``, so a sample does not depend on
    which others were drawn before it: regenerating one missing file gives the same bytes.
    """
    return draw_sample(np.random.default_rng([seed, index]), image_size)


# ----------------------------------------------------------------------------------------------
# Writing the data set
# ----------------------------------------------------------------------------------------------

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


def _read_marker(root):
    """The folder's ``shapes.json`` as a dict, or None when there is none."""
    path = os.path.join(os.fspath(root), MARKER_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            marker = json.load(f)
    except (OSError, ValueError) as error:
        raise DatasetError([(path, f"unreadable ({error}); delete it only if this folder was generated")]) from None
    if not isinstance(marker, dict) or not set(GENERATOR_KEYS) <= set(marker):
        raise DatasetError([(path, f"not a marker of unet.data (it needs the keys {', '.join(GENERATOR_KEYS)})")])
    return marker


def _write_marker(root, params, complete):
    """``complete`` False while files are being drawn: an interrupted run is then still known as ours."""
    path = os.path.join(os.fspath(root), MARKER_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump({**params, "complete": complete}, f, indent=2)
    os.replace(path + ".tmp", path)


def _generator_params(num_images, image_size, num_test, seed):
    if not 0 <= num_test < num_images:
        raise ValueError(f"num_test={num_test} must be in 0 .. num_images-1 (num_images={num_images})")
    return {"num_images": int(num_images), "num_test": int(num_test),
            "image_size": list(_as_hw(image_size)), "seed": int(seed)}


def _check_marker(root, params):
    """Refuse to mix files of two different generator settings in one folder."""
    stored = _read_marker(root)
    if stored is not None and {key: stored[key] for key in GENERATOR_KEYS} != params:
        raise ValueError(
            f"{root} holds a shape data set generated with {_params_text(stored)}, not {_params_text(params)}; "
            "pass overwrite=True (--overwrite) to replace it, or choose another folder")


def _params_text(params):
    height, width = params["image_size"]
    return (f"{params['num_images']} images ({params['num_test']} test) of {height}x{width} px, "
            f"seed {params['seed']}")


def _holds_anything(root):
    return os.path.isdir(root) and bool(os.listdir(root))


def generate_shapes(root, num_images=1000, image_size=128, num_test=100, seed=0, overwrite=False):
    """Draw the shape data set into ``root`` in the seed's layout and return a summary dict.

    Deterministic: the same arguments give byte-identical files. Without ``overwrite`` the files
    already there are kept (so an interrupted run resumes where it stopped); a folder generated
    with other parameters is refused rather than mixed, and so is a folder with files that this
    module did not write (it has no ``shapes.json``): they are someone's own data. ``shapes.json``
    is written first, marked incomplete, and marked complete last.
    """
    params = _generator_params(num_images, image_size, num_test, seed)
    root = os.fspath(root)
    if not overwrite:
        _check_marker(root, params)
        if _read_marker(root) is None and _holds_anything(root):
            raise ValueError(f"{root} holds files that unet.data did not write (there is no {MARKER_FILE}); "
                             "choose an empty or new folder, or pass overwrite=True (--overwrite) to draw over them")
    os.makedirs(root, exist_ok=True)
    _write_marker(root, params, complete=False)
    for folder in dataset_dirs(root):
        os.makedirs(folder, exist_ok=True)
    written = kept = 0
    for index in range(num_images):
        image_path, mask_path = sample_paths(root, index, num_images, num_test)
        if not overwrite and os.path.exists(image_path) and os.path.exists(mask_path):
            kept += 1
            continue
        image, mask = make_sample(seed, index, image_size)
        write_image_atomic(image_path, image)
        write_image_atomic(mask_path, mask)
        written += 1
    _write_marker(root, params, complete=True)
    return {"root": root, **params, "written": written, "kept": kept}


def missing_files(root, num_images=1000, num_test=100):
    """The image and mask paths of the layout that do not exist."""
    return [path for index in range(num_images)
            for path in sample_paths(root, index, num_images, num_test) if not os.path.exists(path)]


def ensure_dataset(root, num_images=1000, image_size=128, num_test=100, seed=0, log=print):
    """Use the data set in ``root``; generate it where ``root`` is new or empty, complete it where
    ``unet.data`` wrote it (its ``shapes.json``), and never draw into anyone else's data.

    A generated folder is used with its own seed, whatever ``seed`` says (``seed`` only draws a
    new data set); its sizes must match the ones asked for. A folder without ``shapes.json`` is
    the user's data set: a missing file is a DatasetError naming it. Says what it does through
    ``log``. Returns ``generate_shapes``'s summary, or for a data set used as it is
    ``{"root", "num_images", "num_test", "generated": False}``. Files are not opened here:
    ``check_dataset`` does that.
    """
    root = os.fspath(root)
    params = _generator_params(num_images, image_size, num_test, seed)
    stored = _read_marker(root)
    if stored is None and not _holds_anything(root):
        log(f"dataset: generating the shape data set in {root} ({_params_text(params)}) ...")
        return {**generate_shapes(root, num_images, image_size, num_test, seed), "generated": True}
    if stored is not None:
        if any(stored[key] != params[key] for key in ("num_images", "num_test", "image_size")):
            height, width = stored["image_size"]
            size = f"{height}" if height == width else f"{height}x{width}"
            raise ValueError(f"{root} holds a generated data set of {_params_text(stored)} ({MARKER_FILE}); pass "
                             f"--num-images {stored['num_images']} --num-test {stored['num_test']} --image-size "
                             f"{size} to use it, or another --data folder for a new one")
        params = {key: stored[key] for key in GENERATOR_KEYS}
    missing = missing_files(root, num_images, num_test)
    if not missing and (stored is None or stored.get("complete", True)):
        log(f"dataset: using the {num_images} images found in {root}")
        return {"root": root, "num_images": num_images, "num_test": num_test, "generated": False}
    if stored is None:
        raise DatasetError([(path, "missing") for path in missing],
                           hint=f"{root} has no {MARKER_FILE}, so it is read as your own data set and nothing is "
                                f"drawn into it: add the missing files, pass the --num-images and --num-test it "
                                f"has, or give --data a new folder to generate the shape data set there")
    log(f"dataset: {len(missing)} of {2 * num_images} files missing in {root}; "
        f"completing the generated data set ({_params_text(stored)}) ...")
    summary = generate_shapes(root, num_images, image_size, num_test, params["seed"])
    log(f"dataset: wrote {summary['written']} images and masks, kept {summary['kept']}")
    return {**summary, "generated": True}


# ----------------------------------------------------------------------------------------------
# Reading and checking files
# ----------------------------------------------------------------------------------------------

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
    if image_size is not None and array.shape[:2] != _as_hw(image_size):
        height, width = _as_hw(image_size)
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


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------

class BatchLoader:
    """Batches ``(images, masks)`` read from disk: float32 NHWC images in [-1, 1] and float32
    one-hot masks (N, H, W, num_classes).

    Every epoch is one pass over ``ids`` in a fresh order (a permutation of a copy of the ids, drawn
    from the loader's own seeded ``numpy.random.Generator``); the last batch is smaller unless
    ``drop_last``. The seed's generator instead streams across epoch boundaries, so with 100
    validation images and batch 16 its "epoch" saw a different 96 of them each time; aligning
    batches with epochs makes every epoch see every image once, and makes resuming exact.

    Resuming: ``epoch_batches()`` draws the epoch's order from the generator as soon as it is
    called. So ``get_state()`` taken between two epochs, saved (it is JSON-serialisable), and given
    to ``set_state()`` of a new loader makes that loader produce exactly the batches the old one
    would have produced from then on. A mid-epoch state is not supported.
    """

    def __init__(self, ids, images_dir, masks_dir, batch_size, num_classes=NUM_CLASSES,
                 shuffle=True, seed=0, image_size=None, drop_last=False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.ids = np.array(list(ids), dtype=np.int64)
        if len(self.ids) == 0 or (drop_last and len(self.ids) < batch_size):
            raise ValueError(f"{len(self.ids)} ids cannot make a batch of {batch_size}")
        self.images_dir = os.fspath(images_dir)
        self.masks_dir = os.fspath(masks_dir)
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.shuffle = shuffle
        self.image_size = image_size
        self.drop_last = drop_last
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        """Batches per epoch."""
        full, rest = divmod(len(self.ids), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def epoch_order(self):
        """The ids in this epoch's order; draws from the generator when shuffling."""
        return self.rng.permutation(self.ids) if self.shuffle else self.ids.copy()

    def epoch_batches(self):
        """An iterator over one epoch's batches. The order is drawn now, not at the first batch."""
        order = self.epoch_order()
        starts = range(0, len(self) * self.batch_size, self.batch_size)
        return (self.read_batch(order[start:start + self.batch_size]) for start in starts)

    def __iter__(self):
        """Epoch after epoch, for ever (the seed's ``while 1`` generator)."""
        while True:
            yield from self.epoch_batches()

    def read_batch(self, batch_ids):
        """Read the given ids into ``(images, one-hot masks)``; a bad file raises DatasetError naming it."""
        images, labels = self.read_labels(batch_ids)
        return images, one_hot(labels, self.num_classes)

    def read_labels(self, batch_ids):
        """``(images, labels)``: labels as uint8 class indices (N, H, W), 1 byte a pixel to move to a GPU."""
        images, masks = [], []
        size = self.image_size
        for index in batch_ids:
            image = load_image(os.path.join(self.images_dir, f"{index}.jpg"), size)
            size = image.shape[:2]  # with no image_size given, the first image sets it for the batch
            images.append(image)
            masks.append(load_mask(os.path.join(self.masks_dir, f"{index}.png"), self.num_classes, size))
        return np.stack(images), np.stack(masks)

    def get_state(self):
        """The shuffling generator's state, a JSON-serialisable dict."""
        return {"rng": copy.deepcopy(self.rng.bit_generator.state)}

    def set_state(self, state):
        self.rng.bit_generator.state = copy.deepcopy(state["rng"])


def batch_generator(ids, images_dir, masks_dir, batch_size, num_classes=NUM_CLASSES,
                    shuffle=True, seed=0, loop=True, image_size=None):
    """The seed's ``generate_arrays_from_file`` as a generator of ``(images, masks)`` batches:
    for ever with ``loop`` (reshuffling each epoch), else one epoch. See BatchLoader, whose
    ``get_state``/``set_state`` are the way to resume; this function is the short form."""
    loader = BatchLoader(ids, images_dir, masks_dir, batch_size, num_classes, shuffle, seed, image_size)
    if loop:
        yield from loader
    else:
        yield from loader.epoch_batches()


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m unet.data",
        description="Generate the shape segmentation data set (circles, triangles, squares) in the seed's layout.")
    parser.add_argument("--out", default="shape", help="data set folder (default: shape)")
    parser.add_argument("--num-images", type=int, default=1000, help="images in all (default: 1000)")
    parser.add_argument("--num-test", type=int, default=100,
                        help="the last this many ids go to test_imgs/test_mask (default: 100)")
    parser.add_argument("--image-size", type=int, default=128, help="square image side in pixels (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="redraw every file, even those already there")
    args = parser.parse_args(argv)
    try:
        summary = generate_shapes(args.out, args.num_images, args.image_size, args.num_test, args.seed,
                                  args.overwrite)
    except (ValueError, OSError) as error:   # DatasetError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {summary['written']} images and masks to {summary['root']}, kept {summary['kept']} "
          f"({args.num_images - args.num_test} in train_imgs/train_mask, {args.num_test} in test_imgs/test_mask)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
