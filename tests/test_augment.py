"""unet.augment: the paper's elastic deformation, shift/rotation and gray-value augmentation."""
import json

import cv2 as cv
import numpy as np
import pytest

from unet import augment
from unet.data import one_hot
from unet.shapes import make_sample


def sample_batch(num=2, size=32, num_classes=4):
    images, masks = zip(*(make_sample(5, index, size) for index in range(num)))
    images = np.stack(images).astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return images, one_hot(np.stack(masks), num_classes)


def test_upsampling_matrix_puts_grid_points_on_corners_and_centre():
    matrix = augment.cubic_upsampling_matrix(3, 9)
    np.testing.assert_allclose(matrix[[0, 4, 8]], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)   # a constant grid stays constant


@pytest.mark.parametrize("size, scale", [(11, 5), (31, 15)])
def test_upsampling_is_opencvs_bicubic(size, scale):
    # cv2.resize aligns pixel centres; resizing 3 -> 3 * scale and cropping (scale - 1) / 2 pixels
    # puts the grid points on the corners too, for these sizes: then both must agree.
    grid = np.random.default_rng(0).normal(size=(3, 3)).astype(np.float32)
    crop = slice((scale - 1) // 2, (scale - 1) // 2 + size)
    expected = cv.resize(grid, (3 * scale, 3 * scale), interpolation=cv.INTER_CUBIC)[crop, crop]
    matrix = augment.cubic_upsampling_matrix(3, size)
    np.testing.assert_allclose(matrix @ grid @ matrix.T, expected, atol=1e-5)


def test_elastic_field_statistics_and_grid_values():
    rng = np.random.default_rng(1)
    field = augment.elastic_field(rng, (65, 33), grid=3, sigma=10.0)
    assert field.shape == (65, 33, 2) and field.dtype == np.float32
    coarse = np.random.default_rng(1).normal(0.0, 10.0, size=(3, 3, 2))
    np.testing.assert_allclose(field[::32, ::16], coarse, atol=1e-4)   # the grid points, exactly
    many = np.stack([augment.elastic_field(rng, (9, 9))[[0, 4, 8]][:, [0, 4, 8]] for _ in range(400)])
    assert abs(many.std() - 10.0) < 0.5


def test_zero_field_is_the_identity():
    images, masks = sample_batch(1)
    labels = masks[0].argmax(-1).astype(np.uint8)
    image, mask = augment.apply_field(images[0], labels, np.zeros((32, 32, 2), np.float32))
    np.testing.assert_array_equal(image, images[0])
    np.testing.assert_array_equal(mask, labels)


def test_a_constant_field_moves_a_dot_in_image_and_mask_alike():
    image = np.full((20, 30, 3), -1.0, np.float32)
    mask = np.zeros((20, 30), np.uint8)
    image[5, 7] = 1.0
    mask[5, 7] = 2
    field = np.zeros((20, 30, 2), np.float32)
    field[..., 0], field[..., 1] = 3.0, -2.0   # output(y, x) = input(y - 2, x + 3)
    moved_image, moved_mask = augment.apply_field(image, mask, field)
    assert np.argwhere(moved_mask == 2).tolist() == [[7, 4]]
    assert np.argwhere(moved_image[..., 0] > 0).tolist() == [[7, 4]]
    np.testing.assert_array_equal(moved_image[7, 4], [1.0, 1.0, 1.0])


def test_masks_keep_only_their_labels_and_stay_one_hot():
    images, masks = sample_batch(3)
    out_images, out_masks = augment.Augmenter(seed=3)(images, masks)
    assert out_images.shape == images.shape and out_images.dtype == np.float32
    assert out_masks.shape == masks.shape and out_masks.dtype == masks.dtype
    np.testing.assert_array_equal(out_masks.sum(-1), 1.0)
    for before, after in zip(masks, out_masks):
        assert set(np.unique(after.argmax(-1))) <= set(np.unique(before.argmax(-1)))
    assert out_images.min() >= -1.0 and out_images.max() <= 1.0
    assert not np.array_equal(out_masks, masks)


def test_deformation_moves_image_and_mask_together():
    # A white square on black: after any augmentation without gray-value jitter, the bright pixels
    # must be (up to the interpolated rim) exactly the mask's square.
    image = np.full((48, 48, 1), -1.0, np.float32)
    image[14:34, 14:34] = 1.0
    mask = one_hot((image[..., 0] > 0).astype(np.uint8), 2)
    out_image, out_mask = augment.Augmenter(seed=4, intensity=False)(image[None], mask[None])
    bright, square = out_image[0, ..., 0] > 0, out_mask[0].argmax(-1) == 1
    assert (bright != square).sum() < 0.1 * square.sum()


def test_same_seed_same_batches_and_weights_follow_the_mask():
    images, masks = sample_batch(2)
    weights = np.ones(masks.shape[:-1], np.float32)
    weights[:, :, 16:] = 3.0
    first = augment.Augmenter(seed=7)(images, masks, weights)
    second = augment.Augmenter(seed=7)(images, masks, weights)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert len(first) == 3 and first[2].shape == weights.shape
    assert first[2].min() >= 1.0 and first[2].max() <= 3.0


def test_get_state_set_state_resumes_exactly():
    images, masks = sample_batch(2)
    augmenter = augment.Augmenter(seed=11)
    augmenter(images, masks)
    state = json.loads(json.dumps(augmenter.get_state()))   # survives a checkpoint file
    expected = [augmenter(images, masks) for _ in range(2)]
    resumed = augment.Augmenter(seed=0)
    resumed.set_state(state)
    for (image_a, mask_a), (image_b, mask_b) in zip(expected, [resumed(images, masks) for _ in range(2)]):
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(mask_a, mask_b)


def test_switches_turn_augmentations_off():
    images, masks = sample_batch(1)
    out_images, out_masks = augment.Augmenter(seed=0, elastic=False, affine=False, intensity=False)(images, masks)
    np.testing.assert_array_equal(out_images, images)
    np.testing.assert_array_equal(out_masks, masks)
    jittered, same_masks = augment.Augmenter(seed=0, elastic=False, affine=False)(images, masks)
    np.testing.assert_array_equal(same_masks, masks)
    assert not np.array_equal(jittered, images)


def test_dihedral_gives_the_eight_rotations_and_reflections():
    square = np.arange(25).reshape(5, 5)
    expected = {np.rot90(a, k).tobytes() for a in (square, square[:, ::-1]) for k in range(4)}
    results = [augment.dihedral(square, index) for index in range(8)]
    assert {r.tobytes() for r in results} == expected            # all 8, each once
    image = np.random.default_rng(0).random((5, 5, 3))
    for index in range(8):   # channels ride along: every channel moves like a 2D array
        np.testing.assert_array_equal(augment.dihedral(image, index)[..., 1], augment.dihedral(image[..., 1], index))


def test_dihedral_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="index 8"):
        augment.dihedral(np.zeros((4, 4)), 8)
    with pytest.raises(ValueError, match="square image, not 4x6"):
        augment.dihedral(np.zeros((4, 6)), 4)
    assert augment.dihedral(np.zeros((4, 6)), 3).shape == (4, 6)   # flips alone are fine


def test_flips_move_image_mask_and_weights_alike_and_draw_every_symmetry():
    images, masks = sample_batch(1, size=16)
    weights = np.random.default_rng(1).random(masks.shape[:-1]).astype(np.float32)
    augmenter = augment.Augmenter(seed=3, elastic=False, affine=False, intensity=False, flips=True)
    seen = set()
    for _ in range(60):
        out_images, out_masks, out_weights = augmenter(images, masks, weights)
        matches = [index for index in range(8) if np.array_equal(out_images[0], augment.dihedral(images[0], index))]
        assert matches, "the image is not a flip or quarter turn of the input"
        index = matches[0]
        np.testing.assert_array_equal(out_masks[0], augment.dihedral(masks[0], index))
        np.testing.assert_array_equal(out_weights[0], augment.dihedral(weights[0], index))
        seen.add(index)
    assert seen == set(range(8))


def test_figure_command(tmp_path):
    path = tmp_path / "ideas.png"
    augment.main(["--figure", str(path), "--image-size", "64"])
    image = cv.imread(str(path))
    assert image is not None and image.shape[0] > 300
