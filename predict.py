"""Segment images of any size with a saved model, by the U-Net paper's overlap-tile strategy.

    python predict.py UNet_weight/last.npz shape/test_imgs --out predictions
    python predict.py model.npz photo.png --out predictions --device gpu --batch-size 8

For every image (.jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp) in INPUT (a folder or one file), writes
OUT/<name>.png: the predicted classes as a colored mask of the image's own size, in the post's
colors (unet.data.PALETTE; more classes get more colors, see ``extended_palette``). The image is
cut into tiles of the model's input size, mirrored at its border for the missing context, and the
tiles' outputs are stitched (unet/tiling.py). Images are read as in training: 8-bit, OpenCV's BGR
order, scaled to [-1, 1], by the reader training uses (unet/imagefiles.py: a file is read by its
content, whatever its name). Anything else in the folder (subfolders, other files) is skipped, and
named on stderr.

Nothing of the user's is written over: an output that is one of the inputs (``--out`` set to the
input folder, however spelled: ``.``, ``imgs/../imgs``, a symlink) is refused before any work, and
so is an existing file in OUT that predict.py did not write (its masks carry a PNG text entry
saying so; they are replaced). Each mask is written under a temporary name and renamed.

Exit status: 0 if every image was segmented, 1 if some could not be (each is named on stderr,
the others are still written), 2 if nothing could start (no model file, no input, an output that
would overwrite a file), 130 on Ctrl-C (the masks written so far stay).
"""
from __future__ import annotations

import argparse
import os
import sys

try:
    import minitensor  # first, before NumPy (cv2 loads it): minitensor/cpu_runtime.py sets what OpenBLAS reads then
except ValueError as error:     # a misspelt MINITENSOR_KERNELS or MINITENSOR_CONV: the message says the fix
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
import cv2 as cv
import numpy as np
from minitensor import backend
from minitensor.files import atomic_write_bytes
from unet.data import PALETTE, colorize_mask
from unet.folders import check_writable_folder
from unet.imagefiles import ImageFileError, png_text, read_image as read_image_file, with_png_text
from unet.tiling import predict_tiled, tile_geometry, tile_grid
from unet.tta import predict_views

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# The PNG text entry (keyword, text) in every mask predict.py writes: it replaces only files that carry it.
MASK_MARK = ("Software", "minitensor predict.py")
SKIPPED_SHOWN = 10


class PredictError(RuntimeError):
    """An input that cannot be segmented; the message names the file and the reason."""


def voc_color(index):
    """The PASCAL VOC color map's color of ``index`` (RGB): its bits spread over the high bits of
    r, g and b, so consecutive indices get clearly different colors."""
    r = g = b = 0
    for bit in range(7, -1, -1):
        r |= (index & 1) << bit
        g |= ((index >> 1) & 1) << bit
        b |= ((index >> 2) & 1) << bit
        index >>= 3
    return r, g, b


def extended_palette(num_classes, palette=PALETTE):
    """``palette`` (BGR) grown to ``num_classes`` distinct colors with the VOC color map's colors
    (the post's 21 classes are VOC's) that it does not already hold; deterministic."""
    colors = [list(color) for color in palette[:num_classes]]
    index = 0
    while len(colors) < num_classes:
        r, g, b = voc_color(index)
        if [b, g, r] not in colors:
            colors.append([b, g, r])
        index += 1
    return colors


def list_images(path):
    """``(images, skipped)``: the image files to segment (``path`` itself, or the images in the folder
    ``path``, sorted) and the folder's other entries, each as "name (why)"."""
    if os.path.isfile(path):
        return [path], []
    if not os.path.isdir(path):
        raise PredictError(f"{path}: no such file or folder")
    images, skipped = [], []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isdir(full):
            skipped.append(f"{name}/ (a folder)")
        elif not name.lower().endswith(IMAGE_EXTENSIONS):
            skipped.append(f"{name} (not a supported image type)")
        elif not os.path.isfile(full):
            skipped.append(f"{name} (not a regular file)")
        else:
            images.append(full)
    if not images:
        raise PredictError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    return images, skipped


def skipped_note(skipped):
    """One line naming what ``list_images`` skipped (the first SKIPPED_SHOWN, then a count)."""
    noun = "entry" if len(skipped) == 1 else "entries"
    shown = ", ".join(skipped[:SKIPPED_SHOWN]) + (f", and {len(skipped) - SKIPPED_SHOWN} more"
                                                   if len(skipped) > SKIPPED_SHOWN else "")
    return f"skipped {len(skipped)} {noun}: {shown}; predict.py reads {', '.join(IMAGE_EXTENSIONS)}"


# Channel conversions as training's cv.imread(IMREAD_COLOR) makes them: gray replicated to BGR, alpha dropped.
CONVERSIONS = {(1, 3): cv.COLOR_GRAY2BGR, (4, 3): cv.COLOR_BGRA2BGR, (3, 1): cv.COLOR_BGR2GRAY,
               (4, 1): cv.COLOR_BGRA2GRAY}


def read_image(path, channels):
    """An 8-bit image file as float32 (H, W, channels) in [-1, 1], or a PredictError saying why not.

    The file is read by training's reader (by its content; a truncated JPEG or PNG is refused), then
    gray and BGRA files are converted to the model's channels as training reads them.
    """
    try:
        image = read_image_file(path, cv.IMREAD_UNCHANGED)
    except ImageFileError as error:
        raise PredictError(str(error)) from None
    if image.dtype != np.uint8:
        raise PredictError(f"{path}: {image.dtype} pixels; the model was trained on 8-bit images")
    if image.ndim == 2:
        image = image[:, :, None]
    found = image.shape[2]
    if found != channels:
        if (found, channels) not in CONVERSIONS:
            raise PredictError(f"{path}: {found} channel(s), but the model takes {channels}; convert it first")
        image = cv.cvtColor(image, CONVERSIONS[found, channels]).reshape(*image.shape[:2], channels)
    return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def output_paths(images, out_dir):
    """OUT/<name>.png for each input; two inputs with the same name (a.jpg, a.png) are refused."""
    outputs = [os.path.join(out_dir, os.path.splitext(os.path.basename(p))[0] + ".png") for p in images]
    if len(set(outputs)) != len(outputs):
        raise PredictError("two inputs differ only in their extension and would write the same mask; "
                           "segment them separately")
    return outputs


def _same_file(a, b):
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def is_own_mask(path):
    """True if ``path`` is a PNG that predict.py wrote (it carries MASK_MARK)."""
    try:
        with open(path, "rb") as f:
            return png_text(f.read()).get(MASK_MARK[0]) == MASK_MARK[1]
    except OSError:
        return False


def check_outputs(images, outputs, out_dir):
    """Refuse, before any work, an output that is one of the inputs (paths compared resolved, so
    ``.``, ``imgs/../imgs``, symlinks and hard links count) or an existing file that predict.py did not write."""
    problems = []
    for output in outputs:
        if not os.path.lexists(output):
            continue
        source = next((other for other in images if _same_file(output, other)), None)
        if source is not None:
            problems.append(f"--out {out_dir}: {os.path.basename(output)} would be written over its own input "
                            f"{source}; give --out a folder that holds no input image (e.g. --out masks)")
        elif not is_own_mask(output):
            problems.append(f"{output}: exists and is not a mask predict.py wrote; move it away or give another "
                            f"--out (predict.py replaces only its own masks)")
    if problems:
        more = f"\n(and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise PredictError("nothing was written:\n" + "\n".join(problems[:5]) + more)


def write_mask(path, labels, palette):
    """The colored mask as a PNG that carries MASK_MARK, written under a temporary name and renamed."""
    ok, encoded = cv.imencode(".png", colorize_mask(labels, palette))
    if not ok:
        raise PredictError(f"{path}: OpenCV could not encode the mask")
    atomic_write_bytes(path, with_png_text(encoded.tobytes(), *MASK_MARK))


def segment(model, image_path, out_path, palette, batch_size=4, overlap=None, tta=False, quiet=False):
    """Predict one image file and write its colored mask; returns the mask's (H, W).

    With ``tta`` the image is also predicted flipped (and, if square, turned) and the views averaged.
    A progress bar on stderr counts the tiles of an image that needs more than one batch of them.
    """
    from tqdm import tqdm

    image = read_image(image_path, model.input_shape[-1])
    num_views = (8 if image.shape[0] == image.shape[1] else 4) if tta else 1
    num_rows, num_cols = tile_grid(model, *image.shape[:2], overlap)
    total = num_views * num_rows * num_cols
    with tqdm(total=total, desc=os.path.basename(image_path), unit="tile", leave=False,
              disable=quiet or total <= batch_size) as bar:
        def predict(images):
            return np.stack([predict_tiled(model, view, batch_size, overlap, progress=bar.update) for view in images])

        labels = predict_views(predict, image[None], num_views)[0].argmax(axis=-1)
    write_mask(out_path, labels, palette)
    return labels.shape


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Segment images of any size with a saved minitensor model (overlap-tile prediction).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", help="a model saved with Model.save (e.g. UNet_weight/last.npz)")
    parser.add_argument("input", help="an image file, or a folder of images")
    parser.add_argument("--out", required=True, help="folder for the colored masks (created if needed)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass")
    parser.add_argument("--overlap", type=int, default=None,
                        help="output pixels discarded on each side of a tile (default: 0 for 'valid' "
                             "models, an eighth of the tile for 'same' ones)")
    parser.add_argument("--tta", action="store_true",
                        help="average over the image's flips (and quarter turns, if square): 4 or 8 times the work")
    parser.add_argument("--quiet", action="store_true", help="no progress bar for images of many tiles")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.overlap is not None and args.overlap < 0:
        parser.error("--overlap must be 0 or more")
    return args


def main(argv=None):
    args = parse_args(argv)
    progress = {"images": None, "written": 0}
    try:
        return run(args, progress)
    except KeyboardInterrupt:   # Ctrl-C: one line, not a traceback; a mask is renamed into place only when whole
        if progress["images"] is None:
            print("interrupted before any image was segmented; nothing was written", file=sys.stderr)
        else:
            print(f"interrupted: {progress['written']} of {progress['images']} masks written to {args.out} (each "
                  f"whole); run the command again to segment the rest", file=sys.stderr)
        return 130


def run(args, progress):
    """main's work; ``progress`` counts the images and the masks written, for main's message on Ctrl-C."""
    try:
        device = backend.resolve_device(args.device)
        model = minitensor.load_model(args.model, device)
        tile_geometry(model, args.overlap)   # a bad --overlap fails here, not once per image
        images, skipped = list_images(args.input)
        outputs = output_paths(images, args.out)
        check_outputs(images, outputs, args.out)
        check_writable_folder(args.out, "--out")
    except (PredictError, minitensor.ModelFileError, RuntimeError, ValueError) as error:   # OutputFolderError too
        print(f"error: {error}", file=sys.stderr)
        return 2
    if skipped:
        print(skipped_note(skipped), file=sys.stderr)
    progress["images"] = len(images)
    palette = extended_palette(model.output_shape[-1])
    failures = 0
    for image_path, out_path in zip(images, outputs):
        try:
            height, width = segment(model, image_path, out_path, palette, args.batch_size, args.overlap,
                                    args.tta, args.quiet)
        except PredictError as error:
            print(f"error: {error}", file=sys.stderr)
            failures += 1
            continue
        progress["written"] += 1
        print(f"{image_path} -> {out_path} ({height}x{width})")
    print(f"segmented {len(images) - failures} of {len(images)} images on {device}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
