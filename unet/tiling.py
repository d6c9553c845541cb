"""Overlap-tile prediction: segment an image of any size with a network of fixed input size.

The U-Net paper's third idea (its figure 2). With 'valid' convolutions every output pixel sees a
full window of real input, so the 572x572 network predicts only the central 388x388 pixels: it
needs a margin of context, 92 px on each side, that it does not label. To segment a large image,
cut it into output tiles, feed each with its margin around it, and put the outputs side by side;
where the margin falls outside the image, "the missing context is extrapolated by mirroring the
input image". Every output pixel then had all of its context, and no padding artefact can show.

The geometry comes from the model, never from constants:

* ``margin`` = (input size - output size) / 2, per axis: 92 for 572 -> 388, 0 for 'same' convolutions.
* ``step``, the output pixels kept per tile, is rounded down to a multiple of the network's total
  pooling factor (16 for four 2x2 max-pools) when the tile is big enough: 384 of 388. Then every
  tile starts at a multiple of 16 and pools its input in the same phase as one forward pass of a
  bigger network over the whole mirrored image would, so the stitched map is *exactly* that
  bigger network's output, with no seams at all (tests/test_tiling.py checks it). The paper steps
  by the full 388, so neighbouring tiles pool in different phases and differ slightly at the seams.
* ``discard``: output pixels dropped on each side before the kept part (2 of 388 for the step above).

For a 'same'-padding network such as ``small_unet`` the output is as large as the input, but
pixels near a tile's edge were computed with zero padding instead of real neighbours, so we
discard ``overlap`` pixels on each side of every tile (default: an eighth of the tile, 16 px of
128) and overlap the tiles by that much: only the well-informed centres are kept.

Mirroring is ``np.pad(mode="reflect")``, OpenCV's BORDER_REFLECT_101: the edge row is not
repeated (d c b | a b c d | c b a), so the mirrored image has no doubled edge pixels and stays
smooth across the border, as the paper's figure 2 shows. NumPy reflects repeatedly when the
margin is wider than the image (a 1x1 image simply repeats its pixel), so tiny images work too.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from minitensor import MaxPool2D


class AxisTiling(NamedTuple):
    """How one axis (rows or columns) of the image is cut into tiles."""

    tile: int      # the model's input size
    output: int    # the model's output size
    margin: int    # context the model consumes on each side: (tile - output) / 2
    discard: int   # output pixels dropped before the kept part
    step: int      # output pixels kept per tile = distance between neighbouring tiles

    @property
    def context(self) -> int:
        """Input pixels before the first kept output pixel: the mirrored border needed in front."""
        return self.margin + self.discard


def pooling_factor(model):
    """(rows, cols): the product of the strides of the model's max-pools (16 for the U-Nets)."""
    pools = [layer.strides for layer in model.layers if isinstance(layer, MaxPool2D)]
    return math.prod(s[0] for s in pools), math.prod(s[1] for s in pools)


def _axis_tiling(tile, output, pool, overlap):
    if output > tile or (tile - output) % 2:
        raise ValueError(f"cannot tile a model whose output ({output} px) is not centred in its input ({tile} px)")
    margin = (tile - output) // 2
    if overlap is None:
        overlap = 0 if margin > 0 else output // 8   # 'valid' outputs need no extra overlap
    usable = output - 2 * overlap
    if usable < 1:
        raise ValueError(f"overlap {overlap} leaves nothing of a {output} px output tile")
    step = usable - usable % pool if usable >= pool else usable
    return AxisTiling(tile, output, margin, (output - step) // 2, step)


def tile_geometry(model, overlap=None):
    """``(rows, cols)``: an AxisTiling per axis, from the model's input and output shapes.

    ``overlap``: output pixels to discard at least on each side of a tile; None for the default
    (0 when the output is smaller than the input, i.e. 'valid' convolutions; else output // 8).
    """
    (_, in_h, in_w, _), (_, out_h, out_w, _) = model.input_shape, model.output_shape
    pool_h, pool_w = pooling_factor(model)
    return _axis_tiling(in_h, out_h, pool_h, overlap), _axis_tiling(in_w, out_w, pool_w, overlap)


def mirror(array, rows, cols, axis=0):
    """Mirror-pad axis ``axis`` (height) by ``rows`` = (before, after) pixels and axis ``axis + 1``
    (width) by ``cols``. The project's one mirroring (see the module doc): training and tiled
    prediction both use it, so a model is trained on the borders it predicts with."""
    padding = [(0, 0)] * array.ndim
    padding[axis], padding[axis + 1] = tuple(rows), tuple(cols)
    return np.pad(array, padding, mode="reflect")


def mirror_pad(image, rows, cols, num_rows, num_cols):
    """Mirror ``image`` (H, W, C) into the canvas that ``num_rows`` x ``num_cols`` tiles read:
    ``context`` pixels in front, enough behind for the last tile. Returns (H', W', C)."""
    height, width = image.shape[:2]
    padding = [(axis.context, (count - 1) * axis.step + axis.tile - axis.context - size)
               for axis, count, size in ((rows, num_rows, height), (cols, num_cols, width))]
    return mirror(image, *padding)


def _centred(size, target):
    before = (target - size) // 2
    return before, target - size - before


def fit_to_model(model, images, *targets):
    """Mirror-pad a batch of images (N, H, W, C), and per-pixel targets (masks, weights), so that the
    model's output covers the image.

    small_unet keeps the size, so nothing changes. The original unet's 'valid' convolutions lose
    a margin, so, as in the paper, the missing context is supplied by mirroring the border; the
    targets are mirrored too, to the output's size. None targets stay None.
    """
    in_size, out_size = model.input_shape[1], model.output_shape[1]
    size = images.shape[1]
    if in_size == size:
        return (images, *targets)
    image_pad, target_pad = _centred(size, in_size), _centred(size, out_size)
    return (mirror(images, image_pad, image_pad, axis=1),
            *(None if t is None else mirror(t, target_pad, target_pad, axis=1) for t in targets))


def crop_output(probabilities, size):
    """The centre ``size`` x ``size`` of a batch of outputs (N, H', W', K): the image's own pixels."""
    start = (probabilities.shape[1] - size) // 2
    return probabilities[:, start:start + size, start:start + size]


def tile_grid(model, height, width, overlap=None):
    """``(num_rows, num_cols)``: the tiles that cover a ``height`` x ``width`` image."""
    rows, cols = tile_geometry(model, overlap)
    return math.ceil(height / rows.step), math.ceil(width / cols.step)


def predict_tiled(model, image, batch_size=4, overlap=None, progress=None):
    """Class probabilities (H, W, num_classes) for one image (H, W, C) of any size.

    ``image`` is already normalised as in training (float, [-1, 1] for the Shape data). The
    tiles run through ``model.predict`` ``batch_size`` at a time, on the model's device;
    ``progress(n)``, if given, is called with the number of tiles of each batch done.
    """
    image = np.asarray(image)
    channels = model.input_shape[-1]
    if image.ndim != 3 or image.shape[-1] != channels:
        raise ValueError(f"the model takes images of shape (H, W, {channels}), got {image.shape}")
    rows, cols = tile_geometry(model, overlap)
    height, width = image.shape[:2]
    num_rows, num_cols = tile_grid(model, height, width, overlap)
    canvas = mirror_pad(image, rows, cols, num_rows, num_cols)
    # Tile (r, c) reads the canvas from (r * step, c * step); its kept output lands at the same
    # place in the stitched map, because the canvas starts ``context`` pixels before the image.
    origins = [(r * rows.step, c * cols.step) for r in range(num_rows) for c in range(num_cols)]
    stitched = np.empty((num_rows * rows.step, num_cols * cols.step, model.output_shape[-1]), model.dtype)
    for start in range(0, len(origins), batch_size):
        batch = origins[start:start + batch_size]
        tiles = np.stack([canvas[y:y + rows.tile, x:x + cols.tile] for y, x in batch])
        for (y, x), output in zip(batch, model.predict(tiles, batch_size)):
            stitched[y:y + rows.step, x:x + cols.step] = output[rows.discard:rows.discard + rows.step,
                                                                cols.discard:cols.discard + cols.step]
        if progress is not None:
            progress(len(batch))
    return stitched[:height, :width]
