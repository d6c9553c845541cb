"""unet.weights: the paper's border-weight map, its cache, and the weighted losses it feeds."""
import os
import pathlib

import cv2 as cv
import numpy as np
import pytest
from conftest import rel_error

from minitensor import gradcheck, losses
from unet import weights
from unet.data import one_hot

W0, SIGMA = 10.0, 5.0


def two_squares(gap, size=40, side=8, top=16, left=8, classes=(1, 1)):
    """Two side x side squares on one row of a size x size mask, ``gap`` background columns apart."""
    mask = np.zeros((size, size), np.uint8)
    mask[top:top + side, left:left + side] = classes[0]
    second = left + side + gap
    mask[top:top + side, second:second + side] = classes[1]
    return mask


def border(d1, d2):
    return W0 * np.exp(-((d1 + d2) ** 2) / (2 * SIGMA ** 2))


def test_class_weights_balance_and_average_to_one():
    mask = two_squares(gap=4)
    w_c = weights.class_balance_weights(mask, 4)
    counts = np.bincount(mask.ravel(), minlength=4)
    np.testing.assert_allclose(w_c[:2], mask.size / (2 * counts[:2]))
    assert w_c[2] == w_c[3] == 0.0
    np.testing.assert_allclose(w_c[mask].mean(), 1.0)
    np.testing.assert_allclose(w_c[0] * counts[0], w_c[1] * counts[1])   # each class weighs the same in all


@pytest.mark.parametrize("gap", [1, 2, 4, 7])
def test_weight_in_the_gap_matches_the_formula(gap):
    mask = two_squares(gap)
    w_c = weights.class_balance_weights(mask, 4)[0]
    w = weights.weight_map(mask, num_classes=4, w0=W0, sigma=SIGMA)
    # Row 20 crosses both squares; the gap's pixel j columns right of the left square is j px
    # from it and gap + 1 - j px from the right one: d1 + d2 = gap + 1 all across the gap.
    for j in range(1, gap + 1):
        np.testing.assert_allclose(w[20, 15 + j], w_c + border(j, gap + 1 - j), rtol=1e-6)
    if gap == 1:
        assert w[20, 16] > w_c + 0.9 * W0   # almost touching: close to w_c + w0


def test_weight_falls_off_with_sigma():
    mask = two_squares(gap=4)
    w_c = weights.class_balance_weights(mask, 4)[0]
    w = weights.weight_map(mask, w0=W0, sigma=SIGMA)
    # 3 px left of the left square (column 5): d1 = 3 to it, d2 = 3 + 8 + 4 = 15 to the right one.
    np.testing.assert_allclose(w[20, 5], w_c + border(3, 15), rtol=1e-6)
    # 4 rows above the squares (row 12), over the gap (column 18): the nearest pixels are the
    # squares' inner top corners (16, 15) and (16, 20), sqrt(4^2 + 3^2) and sqrt(4^2 + 2^2) away.
    np.testing.assert_allclose(w[12, 18], w_c + border(np.hypot(4, 3), np.hypot(4, 2)), rtol=1e-6)


def test_far_from_objects_and_inside_objects_the_weight_is_w_c():
    mask = two_squares(gap=4, size=80)
    w_c = weights.class_balance_weights(mask, 4)
    w = weights.weight_map(mask)
    np.testing.assert_allclose(w[75, 75], w_c[0], rtol=1e-6)    # d1 + d2 > 80: the term is e^-128
    np.testing.assert_allclose(w[mask == 1], w_c[1], rtol=1e-6)  # objects get no border term


def test_one_object_has_no_border_term_and_classes_are_separate_objects():
    single = np.zeros((20, 20), np.uint8)
    single[5:10, 5:10] = 2
    np.testing.assert_array_equal(weights.border_weights(single), 0.0)
    touching = two_squares(gap=0)                      # one 8x16 block of class 1: one object
    np.testing.assert_array_equal(weights.border_weights(touching), 0.0)
    two_classes = two_squares(gap=0, classes=(1, 3))   # a circle touching a square is two objects
    # Just above the junction: 1 px from one square, sqrt(2) from the other.
    np.testing.assert_allclose(weights.border_weights(two_classes)[15, 16], border(1, np.sqrt(2)), rtol=1e-6)


def test_fixed_class_weights():
    mask = two_squares(gap=30, size=60)
    w = weights.weight_map(mask, class_weights=[1.0, 2.0, 3.0, 4.0])
    assert w[mask == 1].tolist() == [2.0] * int((mask == 1).sum())
    np.testing.assert_allclose(w[0, 59], 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="class_weights"):
        weights.weight_map(mask, class_weights=[1.0, 2.0])


def test_dataset_class_weights_count_every_mask_together(tmp_path):
    small, large = np.zeros((10, 10), np.uint8), np.zeros((10, 10), np.uint8)
    small[0, 0] = 2                      # 1 triangle pixel
    large[:5] = 1                        # 50 circle pixels
    paths = []
    for index, mask in enumerate((small, large)):
        paths.append(tmp_path / f"{index}.png")
        cv.imwrite(str(paths[-1]), mask)
    w = weights.dataset_class_weights(paths, num_classes=4)
    counts = np.array([149, 50, 1, 0])    # of 200 pixels; squares absent
    np.testing.assert_allclose(w, [200 / (3 * 149), 200 / (3 * 50), 200 / 3, 0.0])
    assert np.isclose((w * counts).sum() / counts.sum(), 1.0)          # the mean weight over the pixels is 1
    # per mask, the single triangle pixel would get 100 / (2 * 1) = 50 in its own image
    assert weights.class_balance_weights(small)[2] == 50.0


def test_batch_of_one_hot_masks():
    masks = np.stack([two_squares(2), two_squares(5)])
    maps = weights.weight_maps(one_hot(masks, 4))
    assert maps.shape == (2, 40, 40) and maps.dtype == np.float32
    np.testing.assert_array_equal(maps[1], weights.weight_map(masks[1]))


# ----- the cache --------------------------------------------------------------------------------

def test_weight_maps_are_the_same_bits_every_time_and_exact_distances():
    """OpenCV's precise distance transform varies by ~1e-6 from call to call; the maps must not (a
    resumed run recomputes them). Distances between pixel centres are square roots of integers."""
    from unet.shapes import make_sample

    for index in range(6):
        mask = make_sample(22, index, 64)[1]
        first = weights.weight_map(mask)
        assert all(np.array_equal(first, weights.weight_map(mask)) for _ in range(5)), index
    outside = np.ones((9, 9), np.uint8)
    outside[4, 4] = 0
    rows, cols = np.indices(outside.shape)
    np.testing.assert_array_equal(weights.exact_distances(outside),
                                  np.sqrt((rows - 4) ** 2 + (cols - 4) ** 2).astype(np.float32))


@pytest.fixture
def mask_files(tmp_path):
    folder = tmp_path / "train_mask"
    folder.mkdir()
    for index, gap in enumerate((2, 5)):
        cv.imwrite(str(folder / f"{index}.png"), two_squares(gap))
    return folder


def count_computations(monkeypatch):
    calls = []
    original = weights.weight_map
    monkeypatch.setattr(weights, "weight_map", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_cache_is_written_once_and_reused(mask_files, tmp_path, monkeypatch):
    calls = count_computations(monkeypatch)
    before = sorted(p.name for p in mask_files.iterdir())
    first = weights.batch_weights([0, 1], mask_files, tmp_path / "cache")
    cache = pathlib.Path(weights.weight_cache_path(mask_files / "0.png", tmp_path / "cache"))
    assert cache.exists() and len(calls) == 2
    assert cache.parent.parent == tmp_path / "cache" and cache.parent.name.startswith(mask_files.name + "-")
    assert sorted(p.name for p in mask_files.iterdir()) == before     # nothing written into the data
    assert not (mask_files.parent / "train_weight").exists()
    written = cache.stat().st_mtime_ns
    second = weights.batch_weights([0, 1], mask_files, tmp_path / "cache")
    assert len(calls) == 2 and cache.stat().st_mtime_ns == written
    np.testing.assert_array_equal(first, second)
    assert first.shape == (2, 40, 40) and first.dtype == np.float32
    np.testing.assert_array_equal(first[1], weights.weight_map(two_squares(5)))


def test_cache_recomputes_when_mask_or_parameters_change(mask_files, tmp_path, monkeypatch):
    mask_path = mask_files / "0.png"
    weights.cached_weight_map(mask_path, tmp_path)
    calls = count_computations(monkeypatch)
    cv.imwrite(str(mask_path), two_squares(3))
    os.utime(mask_path, ns=(1, os.stat(mask_path).st_mtime_ns + 10**9))
    np.testing.assert_array_equal(weights.cached_weight_map(mask_path, tmp_path), weights.weight_map(two_squares(3)))
    assert len(calls) == 2   # the cached one, and the reference just above
    weights.cached_weight_map(mask_path, tmp_path, sigma=3.0)
    assert len(calls) == 3
    weights.cached_weight_map(mask_path, tmp_path, sigma=3.0)
    assert len(calls) == 3


def test_a_damaged_cache_file_is_recomputed(mask_files, tmp_path):
    expected = weights.cached_weight_map(mask_files / "1.png", tmp_path)
    cache = weights.weight_cache_path(mask_files / "1.png", tmp_path)
    with open(cache, "wb") as f:
        f.write(b"not a zip")
    np.testing.assert_array_equal(weights.cached_weight_map(mask_files / "1.png", tmp_path), expected)


def test_two_mask_folders_of_one_name_get_their_own_cache_files(tmp_path):
    paths = []
    for root, squares in (("a", 2), ("b", 3)):
        (tmp_path / root / "train_mask").mkdir(parents=True)
        cv.imwrite(str(tmp_path / root / "train_mask" / "0.png"), two_squares(squares))
        paths.append(tmp_path / root / "train_mask" / "0.png")
    assert weights.weight_cache_path(paths[0], tmp_path / "c") != weights.weight_cache_path(paths[1], tmp_path / "c")
    for path, squares in zip(paths, (2, 3)):
        np.testing.assert_array_equal(weights.cached_weight_map(path, tmp_path / "c"), weights.weight_map(two_squares(squares)))


# ----- the weighted losses: float64 central differences and live TensorFlow --------------------

def weighted_example(dtype=np.float64):
    masks = np.stack([two_squares(2, size=12, side=4, top=4, left=1), two_squares(1, size=12, side=3, top=2, left=3)])
    rng = np.random.default_rng(0)
    logits = (2.0 * rng.standard_normal((*masks.shape, 4))).astype(dtype)
    return logits, one_hot(masks, 4, dtype), weights.weight_maps(one_hot(masks, 4)).astype(dtype)


@pytest.mark.parametrize("loss", [losses.SoftmaxCrossEntropy(), losses.CategoricalCrossentropy(from_logits=True),
                                  losses.BinaryCrossentropy(from_logits=True), losses.BinaryCrossentropy()],
                         ids=repr)
def test_weighted_loss_gradient_check(loss):
    logits, y_true, w = weighted_example()
    assert w.max() > 5.0   # the border term is really in there
    y_pred = logits if loss.from_logits else 1 / (1 + np.exp(-logits))
    result = gradcheck.check_loss(loss, y_pred, y_true, sample_weight=w)
    assert result.passed, result.report()


KERAS_PAIRS = {
    "softmax_ce": (losses.SoftmaxCrossEntropy,
                   lambda keras, dtype: keras.losses.CategoricalCrossentropy(from_logits=True, dtype=dtype)),
    "bce_logits": (lambda: losses.BinaryCrossentropy(from_logits=True),
                   lambda keras, dtype: keras.losses.BinaryCrossentropy(from_logits=True, dtype=dtype)),
    "bce": (losses.BinaryCrossentropy, lambda keras, dtype: keras.losses.BinaryCrossentropy(dtype=dtype)),
}


@pytest.mark.parametrize("dtype, tolerance", [(np.float32, 1e-5), (np.float64, 1e-10)])
@pytest.mark.parametrize("name", sorted(KERAS_PAIRS))
def test_weighted_loss_matches_tensorflow(tf, keras, name, dtype, tolerance):
    make_ours, make_keras = KERAS_PAIRS[name]
    ours = make_ours()
    logits, y_true, w = weighted_example(dtype)
    y_pred = logits if ours.from_logits else (1 / (1 + np.exp(-logits))).astype(dtype)
    value = ours.forward(y_pred, y_true, sample_weight=w)
    gradient = ours.backward()
    prediction = tf.Variable(y_pred)
    keras_loss = make_keras(keras, np.dtype(dtype).name)
    with tf.GradientTape() as tape:
        expected = keras_loss(tf.constant(y_true), prediction, sample_weight=tf.constant(w))
    expected_gradient = tape.gradient(expected, prediction).numpy()
    assert rel_error(value, expected.numpy()) < tolerance
    assert rel_error(gradient, expected_gradient) < tolerance
