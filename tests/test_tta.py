"""unet.tta: predictions averaged over flips and quarter turns, each turned back first."""
import numpy as np
import pytest

from unet.augment import dihedral, undo_dihedral
from unet.tta import predict_views


@pytest.mark.parametrize("index", range(8))
def test_undo_dihedral_inverts_dihedral(index):
    array = np.random.default_rng(index).random((5, 5, 2))
    np.testing.assert_array_equal(undo_dihedral(dihedral(array, index), index), array)
    if index in (5, 6):   # the quarter turns are not their own inverse: undoing must not just repeat
        assert not np.array_equal(dihedral(dihedral(array, index), index), array)


@pytest.mark.parametrize("num_views", [1, 2, 4, 8])
def test_a_pixelwise_predictor_is_unchanged(num_views):
    # A per-pixel function commutes with every flip, so each view, turned back, is the plain answer;
    # any view turned back wrongly would land its pixels elsewhere.
    images = np.random.default_rng(0).random((3, 6, 6, 2)).astype(np.float32)
    np.testing.assert_allclose(predict_views(np.tanh, images, num_views), np.tanh(images), rtol=1e-6)


def test_views_are_averaged():
    # This predictor answers every pixel with the image's top-left pixel. Under the 8 symmetries
    # each corner comes to the top left twice, so the mean is the mean of the four corners.
    images = np.random.default_rng(1).random((2, 5, 5, 1))
    top_left = lambda x: np.broadcast_to(x[:, :1, :1], x.shape).copy()   # noqa: E731
    corners = images[:, [0, 0, -1, -1], [0, -1, 0, -1]].mean(axis=1)
    averaged = predict_views(top_left, images, 8)
    np.testing.assert_allclose(averaged, np.broadcast_to(corners[:, None, None], images.shape))
    flips = predict_views(top_left, images, 2)                             # plain + left-right flip
    np.testing.assert_allclose(flips[:, 3, 1], images[:, 0, [0, -1]].mean(axis=1))


def test_bad_view_counts_are_refused():
    with pytest.raises(ValueError, match="one of"):
        predict_views(np.tanh, np.zeros((1, 4, 4, 1)), 3)
    with pytest.raises(ValueError, match="square image, not 4x6"):
        predict_views(np.tanh, np.zeros((1, 4, 6, 1)), 8)
    assert predict_views(np.tanh, np.zeros((1, 4, 6, 1)), 4).shape == (1, 4, 6, 1)
