"""Data augmentation from the U-Net paper: elastic deformation, shift and rotation, gray values.

Ronneberger, Fischer and Brox (2015) trained on as few as 30 images. They made up for it by
teaching the network the invariances the task has: "shift and rotation invariance as well as
robustness to deformations and gray value variations", and call random elastic deformations
"the key concept to train a segmentation network with very few annotated images", because a
slightly bent cell (or circle) is still a cell, and tissue really does deform like that.

Everything here is a *backward map*, a displacement field ``field`` of shape (H, W, 2):

    output[y, x] = input[y + field[y, x, 1], x + field[y, x, 0]]       (field[..., 0] = dx)

sampled with ``cv2.remap``. The image is interpolated bilinearly (bicubic could overshoot the
[-1, 1] range), the label mask with nearest neighbour (so a label stays a label: no class 1.5 on
the border between class 1 and class 2), both with the same field, so they move together.
Outside the image, both are mirrored (BORDER_REFLECT_101, as the paper mirrors for its tiles).

The elastic field follows the paper: random displacement vectors on a coarse 3x3 grid, each
component drawn from a Gaussian with 10 px standard deviation, upsampled to one vector per pixel
by bicubic interpolation. The random shift and rotation add an affine field to it, so the image
is resampled only once. Gray values are jittered afterwards, on the image only.

    augmenter = Augmenter(seed=0)
    images, masks = augmenter(images, masks)          # float32 NHWC in [-1, 1], one-hot (N, H, W, K)

``python -m unet.augment --figure docs/paper_ideas.png`` draws the picture in docs/paper_ideas.md.
"""
from __future__ import annotations

import argparse
import copy

import cv2 as cv
import numpy as np

from .data import one_hot

ELASTIC_GRID = 3            # the paper's coarse 3x3 grid of random displacement vectors
ELASTIC_SIGMA = 10.0        # their standard deviation in pixels (the paper's images are 512x512)
MAX_ROTATION_DEGREES = 15.0
MAX_SHIFT_FRACTION = 0.1    # of the image side
CONTRAST_RANGE = (0.8, 1.2)
BRIGHTNESS_RANGE = (-0.1, 0.1)   # in units of the [-1, 1] image range: +-0.1 is +-12.75 gray levels

# OpenCV's bicubic kernel parameter (cv2.resize INTER_CUBIC uses a = -0.75, Keys's is -0.5).
CUBIC_A = -0.75


# ----- the displacement fields ----------------------------------------------------------------

def _cubic_kernel(t):
    """OpenCV's cubic convolution weight for a tap at distance t (exact at t = 0, zero from t = 2)."""
    t = np.abs(t)
    near = ((CUBIC_A + 2) * t - (CUBIC_A + 3)) * t * t + 1
    far = ((CUBIC_A * t - 5 * CUBIC_A) * t + 8 * CUBIC_A) * t - 4 * CUBIC_A
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def cubic_upsampling_matrix(num_points, size):
    """The (size, num_points) matrix that bicubically interpolates ``num_points`` grid values to
    ``size`` pixels, with grid point i at pixel i * (size - 1) / (num_points - 1).

    So the first and last grid points sit on the first and last pixel (the image's corners) and
    the middle one of three on the centre. ``cv2.resize`` uses the same kernel but aligns pixel
    *centres*, which would put the outer points of a 3x3 grid a sixth of the way in from each
    side; hence our own matrix (tests/test_augment.py checks it against cv2.resize where the two
    alignments coincide). Taps beyond the grid repeat the edge value, as in cv2.resize.
    """
    position = np.arange(size) * (num_points - 1) / max(size - 1, 1)
    base = np.floor(position).astype(np.int64)
    matrix = np.zeros((size, num_points))
    for offset in (-1, 0, 1, 2):
        tap = base + offset
        np.add.at(matrix, (np.arange(size), np.clip(tap, 0, num_points - 1)), _cubic_kernel(position - tap))
    return matrix


def elastic_field(rng, shape, grid=ELASTIC_GRID, sigma=ELASTIC_SIGMA):
    """A smooth random displacement field (H, W, 2), float32, for an image of ``shape`` (H, W).

    ``grid`` x ``grid`` random vectors with N(0, sigma^2) components (in pixels), placed evenly
    with the outer ones on the image's corners, interpolated bicubically to every pixel.
    """
    height, width = shape[:2]
    coarse = rng.normal(0.0, sigma, size=(grid, grid, 2))
    rows, cols = cubic_upsampling_matrix(grid, height), cubic_upsampling_matrix(grid, width)
    return np.einsum("yi,ijc,xj->yxc", rows, coarse, cols, optimize=True).astype(np.float32)


def affine_field(rng, shape, max_rotation=MAX_ROTATION_DEGREES, max_shift=MAX_SHIFT_FRACTION):
    """The displacement field (H, W, 2), float32, of a random rotation about the image centre
    (uniform in +-max_rotation degrees) followed by a random shift (uniform in +-max_shift of
    each side)."""
    height, width = shape[:2]
    angle = np.deg2rad(rng.uniform(-max_rotation, max_rotation))
    shift = rng.uniform(-max_shift, max_shift, size=2) * (width, height)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    y -= (height - 1) / 2
    x -= (width - 1) / 2
    cos, sin = np.cos(angle), np.sin(angle)
    dx = cos * x - sin * y - x + shift[0]
    dy = sin * x + cos * y - y + shift[1]
    return np.stack([dx, dy], axis=-1).astype(np.float32)


# ----- applying a field ---------------------------------------------------------------------

def warp(array, field, interpolation):
    """Resample ``array`` (H, W) or (H, W, C) through ``field`` (H, W, 2) with cv2.remap.

    Returns an array of the same shape and dtype. Mirrored border (BORDER_REFLECT_101).
    """
    height, width = field.shape[:2]
    if array.shape[:2] != (height, width):
        raise ValueError(f"array of shape {array.shape} and field of shape {field.shape} differ in (H, W)")
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    warped = cv.remap(array, x + field[..., 0], y + field[..., 1], interpolation,
                      borderMode=cv.BORDER_REFLECT_101)
    return warped.reshape(array.shape)   # remap drops a trailing channel axis of size 1


def apply_field(image, mask, field):
    """Move ``image`` (H, W, C) float and ``mask`` (H, W) uint8 class indices together.

    The image is interpolated bilinearly, the mask takes its nearest pixel's label, so it holds
    only labels it held before. Returns ``(image, mask)``.
    """
    return warp(image, field, cv.INTER_LINEAR), warp(mask, field, cv.INTER_NEAREST)


def dihedral(array, index):
    """One of the square's 8 symmetries (``index`` 0..7) applied to ``array`` (H, W, ...).

    Bit 0 flips left-right, bit 1 flips up-down, bit 2 swaps the rows and columns (a transpose;
    with the flips it makes the 90 and 270 degree turns). Pixels only move, nothing is
    interpolated, so a mask stays exact and a square, a triangle or a circle keeps its straight
    edges and corners: the class of every shape is unchanged, which a bent square cannot promise.
    """
    if not 0 <= index < 8:
        raise ValueError(f"a square has 8 symmetries (index 0..7), not index {index}")
    if index & 4 and array.shape[0] != array.shape[1]:
        raise ValueError(f"a transpose needs a square image, not {array.shape[0]}x{array.shape[1]}")
    if index & 1:
        array = array[:, ::-1]
    if index & 2:
        array = array[::-1]
    if index & 4:
        array = array.swapaxes(0, 1)
    return np.ascontiguousarray(array)


# Every symmetry undoes itself except the two quarter turns (5: flip left-right then transpose,
# 6: flip up-down then transpose), which undo each other.
_INVERSE_SYMMETRY = (0, 1, 2, 3, 4, 6, 5, 7)


def undo_dihedral(array, index):
    """The inverse of ``dihedral(array, index)``: ``undo_dihedral(dihedral(a, i), i)`` is ``a``."""
    if not 0 <= index < 8:
        raise ValueError(f"a square has 8 symmetries (index 0..7), not index {index}")
    return dihedral(array, _INVERSE_SYMMETRY[index])


def jitter_intensity(image, contrast, brightness):
    """Gray-value variation on a [-1, 1] image: ``contrast * image + brightness``, clipped back to [-1, 1]."""
    return np.clip(contrast * image + brightness, -1.0, 1.0).astype(image.dtype)


# ----- a batch augmenter with a resumable random state ---------------------------------------

class Augmenter:
    """Random elastic + affine deformations, flips and gray-value jitter for training batches.

    Args:
        seed: seed of the augmenter's own ``numpy.random.Generator``; the same seed and the same
            batches give the same augmented batches.
        elastic, affine, intensity: switch each of the paper's three augmentations on or off.
        flips: a random one of the 8 flips and quarter turns (``dihedral``) first, on square images.
        grid, sigma: the elastic grid (3x3) and its displacement standard deviation (10 px).
        max_rotation, max_shift: affine ranges, in degrees and in fractions of the image side.

    Random streams. Called with ``keys`` (one tuple of ints per sample, the trainer's
    ``(epoch, image id)``), each sample draws from its own generator, seeded by ``(seed, *key)``:
    its deformation depends on nothing else, not on the batch it came in, the samples before it
    or how many processes share the batch (a data-parallel run augments every image as one
    process would). Without ``keys``, the samples draw one after another from the augmenter's
    own generator, whose ``get_state()`` / ``set_state()`` (JSON-serialisable) let a resumed run
    continue its stream exactly (the trainer before per-sample streams; one's own loops).
    """

    def __init__(self, seed=0, elastic=True, affine=True, intensity=True, flips=False, grid=ELASTIC_GRID,
                 sigma=ELASTIC_SIGMA, max_rotation=MAX_ROTATION_DEGREES, max_shift=MAX_SHIFT_FRACTION):
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.elastic, self.affine, self.intensity, self.flips = elastic, affine, intensity, flips
        self.grid, self.sigma = grid, sigma
        self.max_rotation, self.max_shift = max_rotation, max_shift

    def draw_field(self, shape, rng=None):
        """One random displacement field (H, W, 2): elastic plus affine, whichever are on."""
        rng = self.rng if rng is None else rng
        field = np.zeros((*shape[:2], 2), np.float32)
        if self.elastic:
            field += elastic_field(rng, shape, self.grid, self.sigma)
        if self.affine:
            field += affine_field(rng, shape, self.max_rotation, self.max_shift)
        return field

    def augment_one(self, image, labels, weights=None, rng=None):
        """One sample: image (H, W, C) float, labels (H, W) uint8, optional weights (H, W) float.

        Returns ``(image, labels, weights)`` flipped and deformed by one random field (weights
        bilinearly, so a border-weight map follows its mask); ``weights`` stays None if not given.
        ``rng``: the generator to draw from (default: the augmenter's own).
        """
        rng = self.rng if rng is None else rng
        if self.flips:
            symmetry = int(rng.integers(8))
            image, labels = dihedral(image, symmetry), dihedral(labels, symmetry)
            weights = None if weights is None else dihedral(weights, symmetry)
        if self.elastic or self.affine:   # without either the field is zero: no resampling at all
            field = self.draw_field(image.shape, rng)
            image, labels = apply_field(image, labels, field)
            if weights is not None:
                weights = warp(weights, field, cv.INTER_LINEAR)
        if self.intensity:
            image = jitter_intensity(image, rng.uniform(*CONTRAST_RANGE), rng.uniform(*BRIGHTNESS_RANGE))
        return image, labels, weights

    def __call__(self, images, masks, weights=None, keys=None):
        """Augment a batch: images (N, H, W, C) float32 in [-1, 1], masks (N, H, W, K) one-hot or
        (N, H, W) uint8 class indices.

        Optional ``weights`` (N, H, W), e.g. precomputed border-weight maps, are deformed with
        their sample's field. ``keys``: a tuple of ints per sample, for per-sample random streams
        (see the class doc). Returns new arrays, ``(images, masks)`` or, with weights,
        ``(images, masks, weights)``, with the input shapes and dtypes.
        """
        as_labels = masks.ndim == images.ndim - 1
        num_classes = None if as_labels else masks.shape[-1]
        if as_labels and masks.dtype != np.uint8:
            raise ValueError(f"class-index masks must be uint8 (what cv2.remap moves), got {masks.dtype}")
        if not as_labels and num_classes > 256:
            raise ValueError(f"masks with {num_classes} classes do not fit the uint8 labels cv2.remap moves")
        labels = masks if as_labels else masks.argmax(axis=-1).astype(np.uint8)
        if keys is not None and len(keys) != len(images):
            raise ValueError(f"{len(keys)} keys for {len(images)} samples: give one key per sample")
        out_images, out_labels, out_weights = [], [], []
        for index in range(len(images)):
            rng = None if keys is None else self.sample_generator(keys[index])
            image, label, weight = self.augment_one(images[index], labels[index],
                                                    None if weights is None else weights[index], rng)
            out_images.append(image)
            out_labels.append(label)
            out_weights.append(weight)
        out_labels = np.stack(out_labels)
        result = (np.stack(out_images), out_labels if as_labels else one_hot(out_labels, num_classes, masks.dtype))
        return result if weights is None else result + (np.stack(out_weights),)

    def sample_generator(self, key):
        """The generator of the sample with this key (a tuple of non-negative ints): seeded by
        ``(seed, *key)`` through NumPy's SeedSequence, so nearby keys give unrelated streams."""
        return np.random.default_rng([self.seed, *(int(part) for part in key)])

    def get_state(self):
        return {"rng": copy.deepcopy(self.rng.bit_generator.state)}

    def set_state(self, state):
        self.rng.bit_generator.state = copy.deepcopy(state["rng"])


# ----- the picture in docs/paper_ideas.md ----------------------------------------------------

def _closest_objects_sample(seed, image_size, candidates=200):
    """The index (among the first ``candidates``) of the sample with the most border weight in
    all: the one with the longest narrow gaps between shapes."""
    from .shapes import make_sample
    from .weights import border_weights

    return max(range(candidates), key=lambda index: border_weights(make_sample(seed, index, image_size)[1]).sum())


def _rgb(bgr):
    return np.ascontiguousarray(bgr[..., ::-1])


def save_figure(path, seed=0, image_size=128, num_deformations=3):
    """Draw a sample, ``num_deformations`` elastic deformations of it with their masks, and its
    border-weight map, into the PNG ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data import colorize_mask
    from .shapes import make_sample
    from .weights import SIGMA, W0, border_weights, weight_map

    index = _closest_objects_sample(seed, image_size)
    image, mask = make_sample(seed, index, image_size)
    augmenter = Augmenter(seed, affine=False, intensity=False)
    figure, axes = plt.subplots(2, num_deformations + 2, figsize=(3 * (num_deformations + 2), 6.8))
    axes[0, 0].imshow(_rgb(image))
    axes[1, 0].imshow(_rgb(colorize_mask(mask)))
    axes[0, 0].set_title(f"shape sample {index}")
    axes[1, 0].set_title("its mask")
    grid_y, grid_x = np.meshgrid(*(np.linspace(0, side - 1, ELASTIC_GRID) for side in image.shape[:2]), indexing="ij")
    for column in range(1, num_deformations + 1):
        field = augmenter.draw_field(image.shape)
        warped_image, warped_mask = apply_field(image, mask, field)
        axes[0, column].imshow(_rgb(warped_image))
        axes[1, column].imshow(_rgb(colorize_mask(warped_mask)))
        # The grid's random vectors: output pixel p shows input pixel p + d, so draw each arrow from
        # p + d to p, the way the content moved (drawn to scale).
        d = field[grid_y.round().astype(int), grid_x.round().astype(int)]
        axes[0, column].set_autoscale_on(False)   # arrows leaving the image must not widen the panel
        axes[0, column].quiver(grid_x + d[..., 0], grid_y + d[..., 1], -d[..., 0], -d[..., 1], color="yellow",
                               angles="xy", scale_units="xy", scale=1, width=0.012)
        axes[0, column].set_title(f"elastic deformation {column}")
        axes[1, column].set_title("the same field on the mask")
    for row, (values, title) in enumerate([(weight_map(mask), "weight map w(x)"),
                                            (border_weights(mask), "its border term")]):
        shown = axes[row, -1].imshow(values, cmap="inferno")
        figure.colorbar(shown, ax=axes[row, -1], fraction=0.046)
        axes[row, -1].set_title(title)
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(f"elastic: {ELASTIC_GRID}x{ELASTIC_GRID} grid of random vectors (arrows, to scale), "
                    f"sigma {ELASTIC_SIGMA:g} px, bicubic.   weights: w0 = {W0:g}, sigma = {SIGMA:g} px")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m unet.augment",
                                     description="Draw the paper-ideas figure (elastic deformations, weight map).")
    parser.add_argument("--figure", required=True, help="PNG file to write, e.g. docs/paper_ideas.png")
    parser.add_argument("--seed", type=int, default=0, help="data set and deformation seed (default: 0)")
    parser.add_argument("--image-size", type=int, default=128, help="sample size in pixels (default: 128)")
    args = parser.parse_args(argv)
    print(f"wrote {save_figure(args.figure, args.seed, args.image_size)}")


if __name__ == "__main__":
    main()
