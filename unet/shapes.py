"""Draw the Shape data set: circles, triangles and squares on random backgrounds, with their masks.

``generate_shapes`` writes a whole data set in the post's layout (``unet/data.py``);
``ensure_dataset`` is what ``train.py`` calls: it generates a data set where the folder is new or
empty, completes one this module wrote (its ``shapes.json``, marked incomplete while drawing), and
never draws into anyone else's folder. From the shell: ``python -m unet.shapes --out shape``
(see ``--help``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import cv2 as cv
import numpy as np

from minitensor.files import TEMPORARY_PREFIX, atomic_write_bytes, remove_stale_temporaries

from .data import NUM_CLASSES, DatasetError, as_hw, dataset_dirs, sample_paths, write_image_atomic
from .folders import LOCK_FILE, FolderLock

MARKER_FILE = "shapes.json"
GENERATOR_KEYS = ("num_images", "num_test", "image_size", "seed")   # what the marker records (and "complete")

# Drawing parameters, for 128x128 images; sizes scale with the image size.
MAX_SHAPES = 4                 # each image holds 1..MAX_SHAPES shapes
SIZE_RANGE_128 = (12, 40)      # circle diameter, square side, triangle height, in pixels
MIN_COLOR_DISTANCE = 80.0      # a shape's colour differs this much (RGB distance) from the background
NOISE_SIGMA_RANGE = (2.0, 8.0)  # Gaussian pixel noise, standard deviation in grey levels
BLUR_PROBABILITY = 0.5         # half the images get a slight 3x3 Gaussian blur
SUBPIXEL_BITS = 4              # OpenCV draws with coordinates in 1/16 pixel, so shapes are placed smoothly


def _size_range(image_size):
    """Shape sizes for this image size: SIZE_RANGE_128 scaled, never below 4 pixels."""
    scale = min(as_hw(image_size)) / 128
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
    height, width = as_hw(image_size)
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
        raise DatasetError([(path, f"not a marker of unet.shapes (it needs the keys {', '.join(GENERATOR_KEYS)})")])
    return marker


def _write_marker(root, params, complete):
    """``complete`` False while files are being drawn: an interrupted run is then still known as ours."""
    path = os.path.join(os.fspath(root), MARKER_FILE)
    atomic_write_bytes(path, json.dumps({**params, "complete": complete}, indent=2).encode())


def _generator_params(num_images, image_size, num_test, seed):
    if not 0 <= num_test < num_images:
        raise ValueError(f"num_test={num_test} must be in 0 .. num_images-1 (num_images={num_images})")
    return {"num_images": int(num_images), "num_test": int(num_test),
            "image_size": list(as_hw(image_size)), "seed": int(seed)}


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
    """Whether ``root`` holds files, beside a generating run's lock and temporary files."""
    return os.path.isdir(root) and any(name != LOCK_FILE and not name.startswith(TEMPORARY_PREFIX)
                                       for name in os.listdir(root))


def generate_shapes(root, num_images=1000, image_size=128, num_test=100, seed=0, overwrite=False):
    """Draw the shape data set into ``root`` in the post's layout and return a summary dict.

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
            raise ValueError(f"{root} holds files that unet.shapes did not write (there is no {MARKER_FILE}); "
                             "choose an empty or new folder, or pass overwrite=True (--overwrite) to draw over them")
    os.makedirs(root, exist_ok=True)
    _write_marker(root, params, complete=False)
    for folder in dataset_dirs(root):
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(folder)     # files of a run killed while writing them
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
    ``unet.shapes`` wrote it (its ``shapes.json``), and never draw into anyone else's data.

    A generated folder is used with its own seed, whatever ``seed`` says (``seed`` only draws a
    new data set); its sizes must match the ones asked for. A folder without ``shapes.json`` is
    the user's data set: a missing file is a DatasetError naming it. Says what it does through
    ``log``. Returns ``generate_shapes``'s summary, or for a data set used as it is
    ``{"root", "num_images", "num_test", "generated": False}``. Files are not opened here:
    ``check_dataset`` does that.
    """
    root = os.fspath(root)
    params = _generator_params(num_images, image_size, num_test, seed)
    if _read_marker(root) is None and _holds_anything(root):      # the user's data: read, never locked or written
        return _ensure(root, params, log)
    with FolderLock(root, "--data", "generating the shape data set").acquire(wait=True, log=log):
        return _ensure(root, params, log)


def _ensure(root, params, log):
    num_images, num_test, image_size, seed = (params[key] for key in GENERATOR_KEYS)
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
# Command line
# ----------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m unet.shapes",
        description="Generate the shape segmentation data set (circles, triangles, squares) in the post's layout.")
    parser.add_argument("--out", default="shape", help="data set folder (default: shape)")
    parser.add_argument("--num-images", type=int, default=1000, help="images in all (default: 1000)")
    parser.add_argument("--num-test", type=int, default=100,
                        help="the last this many ids go to test_imgs/test_mask (default: 100)")
    parser.add_argument("--image-size", type=int, default=128, help="square image side in pixels (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="redraw every file, even those already there")
    args = parser.parse_args(argv)
    try:
        with FolderLock(args.out, "--out", "python -m unet.shapes").acquire():
            summary = generate_shapes(args.out, args.num_images, args.image_size, args.num_test, args.seed,
                                      args.overwrite)
    except ValueError as error:   # DatasetError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: --out {args.out}: cannot write the data set there ({error.strerror or error}: "
              f"{error.filename}); give a new or empty folder", file=sys.stderr)
        return 2
    print(f"wrote {summary['written']} images and masks to {summary['root']}, kept {summary['kept']} "
          f"({args.num_images - args.num_test} in train_imgs/train_mask, {args.num_test} in test_imgs/test_mask)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
