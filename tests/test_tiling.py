"""unet.tiling and predict.py: overlap-tile prediction of images of any size."""
import os
import subprocess
import sys

import cv2 as cv
import numpy as np
import pytest

import predict
from minitensor import set_seed
from unet import small_unet, tiling, unet
from unet.data import PALETTE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def valid_unet(size, seed=0):
    set_seed(seed)
    return unet(size, num_classes=3, base_filters=2)


def same_weights(model, input_shape, build):
    """A copy of ``model`` for another input size (conv weights do not depend on it)."""
    other = build(input_shape)
    other.set_weights(model.get_weights())
    return other


def random_image(height, width, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (height, width, 3)).astype(np.float32)


def rel_error(actual, expected):
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.fixture(scope="module")
def unet188():
    return valid_unet((188, 188, 3))


def test_geometry_comes_from_the_model_shapes():
    # The paper's network: 572 -> 388, a 92 px margin; 388 kept pixels rounded to 384 = 24 * 16.
    rows, cols = tiling.tile_geometry(unet((572, 572, 3), num_classes=2, base_filters=1))
    assert rows == cols == tiling.AxisTiling(tile=572, output=388, margin=92, discard=2, step=384)
    assert rows.context == 94
    # The smallest valid input: 188 -> 4, too small to align to 16, so every output pixel is kept.
    rows, cols = tiling.tile_geometry(unet((188, 204, 3), num_classes=2, base_filters=1))
    assert (rows.margin, rows.step, rows.discard) == (92, 4, 0)
    assert (cols.margin, cols.step, cols.discard) == (92, 16, 2)
    # 'same' padding: no margin, an eighth of the tile discarded on each side.
    rows, _ = tiling.tile_geometry(small_unet((128, 128, 3), base_filters=1))
    assert (rows.margin, rows.discard, rows.step) == (0, 16, 96)
    assert tiling.pooling_factor(small_unet((32, 32, 3), base_filters=1)) == (16, 16)


def test_each_tile_is_the_model_on_the_mirrored_image(unet188):
    # 9x6 with 4x4 output tiles: 3x2 tiles, the last ones only partly inside the image.
    image = random_image(9, 6)
    stitched = tiling.predict_tiled(unet188, image, batch_size=4)
    assert stitched.shape == (9, 6, 3) and stitched.dtype == np.float32
    mirrored = np.pad(image, ((92, 92 + 3), (92, 92 + 2), (0, 0)), mode="reflect")
    for r in range(3):
        for c in range(2):
            window = mirrored[None, 4 * r:4 * r + 188, 4 * c:4 * c + 188]
            expected = unet188.predict(window)[0][:9 - 4 * r, :6 - 4 * c]
            assert rel_error(stitched[4 * r:4 * r + 4, 4 * c:4 * c + 4], expected) < 1e-6


def test_stitched_tiles_equal_one_pass_of_a_bigger_network():
    # 204 -> 20 px output, tiles every 16 px (aligned with the four pools), 2 px discarded each
    # side. A 20x13 image needs 2x1 tiles, reading a 220x204 mirrored canvas; the 220x204 network
    # with the same weights computes the whole map in one pass, in the same pooling phase.
    model = valid_unet((204, 204, 3), seed=1)
    image = random_image(20, 13, seed=1)
    stitched = tiling.predict_tiled(model, image, batch_size=1)
    big = same_weights(model, (220, 204, 3), lambda shape: unet(shape, num_classes=3, base_filters=2))
    mirrored = np.pad(image, ((94, 220 - 94 - 20), (94, 204 - 94 - 13), (0, 0)), mode="reflect")
    one_pass = big.predict(mirrored[None])[0]   # output pixel i is input pixel i + 92 = image row i - 2
    assert rel_error(stitched, one_pass[2:22, 2:15]) < 1e-5


def test_constant_image_gives_a_uniform_prediction(unet188):
    # No seams: every tile sees the same mirrored constant, so every pixel gets the same answer.
    stitched = tiling.predict_tiled(unet188, np.full((9, 10, 3), 0.3, np.float32), batch_size=8)
    assert np.ptp(stitched, axis=(0, 1)).max() < 1e-6


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3, 1)])
def test_tiny_images_are_mirrored_far_beyond_their_size(unet188, shape):
    image = random_image(*shape)
    stitched = tiling.predict_tiled(unet188, image)
    assert stitched.shape == (*shape, 3)
    np.testing.assert_allclose(stitched.sum(-1), 1.0, rtol=1e-5)
    # np.pad reflects repeatedly when the margin exceeds the image: 2 rows -> 0 1 0 1 0 ...
    mirrored = np.pad(image, ((92, 92 + 4 - shape[0]), (92, 92 + 4 - shape[1]), (0, 0)), mode="reflect")
    assert rel_error(stitched, unet188.predict(mirrored[None])[0][:shape[0], :shape[1]]) < 1e-6


def test_same_padding_tiles_with_overlap_match_a_full_image_run():
    set_seed(2)
    model = small_unet((32, 32, 3), num_classes=3, base_filters=2)
    image = random_image(64, 48, seed=2)
    full = same_weights(model, (64, 48, 3), lambda shape: small_unet(shape, num_classes=3, base_filters=2))
    expected = full.predict(image[None])[0][16:-16, 16:-16]   # away from the image's own zero padding
    error = {overlap: np.abs(tiling.predict_tiled(model, image, overlap=overlap)[16:-16, 16:-16] - expected).max()
             for overlap in (0, None)}
    assert tiling.tile_geometry(model)[0].discard == 8
    assert error[None] < 0.02 and error[None] < 0.2 * error[0]


def test_wrong_channel_count_is_refused(unet188):
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        tiling.predict_tiled(unet188, np.zeros((5, 5, 1), np.float32))


# ----- predict.py ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    set_seed(3)
    path = tmp_path_factory.mktemp("model") / "small.npz"
    small_unet((32, 32, 3), base_filters=2).save(path)
    return str(path)


def test_predict_writes_a_colored_mask_of_each_images_size(saved_model, tmp_path, capsys):
    inputs = tmp_path / "images"
    inputs.mkdir()
    image = (np.random.default_rng(0).uniform(0, 255, (37, 23, 3))).astype(np.uint8)
    cv.imwrite(str(inputs / "odd.jpg"), image)
    (inputs / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert predict.main([saved_model, str(inputs), "--out", str(out), "--device", "cpu"]) == 0
    mask = cv.imread(str(out / "odd.png"))
    assert mask.shape == (37, 23, 3)
    assert {tuple(c) for c in mask.reshape(-1, 3)} <= {tuple(c) for c in PALETTE}
    assert "segmented 1 of 1" in capsys.readouterr().out


@pytest.mark.parametrize("height, width, num_views", [(37, 23, 4), (30, 30, 8)])
def test_predict_tta_averages_the_flipped_views(saved_model, tmp_path, monkeypatch, height, width, num_views):
    image_path = tmp_path / "in.png"
    cv.imwrite(str(image_path), np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8))
    seen = []
    real_predict_views = predict.predict_views
    monkeypatch.setattr(predict, "predict_views", lambda f, x, n: seen.append(n) or real_predict_views(f, x, n))
    assert predict.main([saved_model, str(image_path), "--out", str(tmp_path / "out"), "--tta"]) == 0
    assert seen == [num_views]                              # square images are turned too
    assert cv.imread(str(tmp_path / "out" / "in.png")).shape == (height, width, 3)


def test_predict_errors(saved_model, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert predict.main([str(tmp_path / "missing.npz"), str(tmp_path), "--out", out]) == 2
    assert "missing.npz: no such file" in capsys.readouterr().err
    assert predict.main([saved_model, str(tmp_path / "nothing"), "--out", out]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    broken, deep = tmp_path / "broken.png", tmp_path / "deep.png"
    broken.write_bytes(b"\x89PNG but not really")
    cv.imwrite(str(deep), np.zeros((20, 20, 3), np.uint16))
    assert predict.main([saved_model, str(broken), "--out", out]) == 1
    assert "broken.png: not an image" in capsys.readouterr().err
    assert predict.main([saved_model, str(deep), "--out", out]) == 1
    assert "deep.png: uint16 pixels; the model was trained on 8-bit images" in capsys.readouterr().err


def test_predict_out_that_is_a_file_is_refused(saved_model, tmp_path):
    image, out = tmp_path / "a.png", tmp_path / "out.png"
    cv.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    out.write_bytes(b"the user's file")
    result = subprocess.run([sys.executable, "predict.py", saved_model, str(image), "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    code, err = result.returncode, result.stderr
    assert code == 2 and "Traceback" not in err and f"--out {out}: is a file, not a folder" in err
    assert out.read_bytes() == b"the user's file"


@pytest.mark.parametrize("flags,message", [(["--batch-size", "0"], "--batch-size must be at least 1"),
                                           (["--overlap", "-3"], "--overlap must be 0 or more")])
def test_predict_refuses_impossible_settings(flags, message, capsys):
    with pytest.raises(SystemExit) as caught:
        predict.parse_args(["m.npz", "in", "--out", "o", *flags])
    assert caught.value.code == 2 and message in capsys.readouterr().err


def test_predict_reads_gray_and_rgba_images_as_training_does(saved_model, tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (20, 24), dtype=np.uint8)
    bgr = cv.cvtColor(gray, cv.COLOR_GRAY2BGR)
    bgra = np.dstack([bgr, np.full(gray.shape, 77, np.uint8)])
    for name, image in (("gray", gray), ("bgra", bgra), ("bgr", bgr)):
        cv.imwrite(str(tmp_path / f"{name}.png"), image)
        assert predict.main([saved_model, str(tmp_path / f"{name}.png"), "--out", str(tmp_path / "out")]) == 0
    masks = [cv.imread(str(tmp_path / "out" / f"{name}.png")) for name in ("gray", "bgra", "bgr")]
    np.testing.assert_array_equal(masks[0], masks[2])
    np.testing.assert_array_equal(masks[1], masks[2])


def test_predict_shows_progress_over_the_tiles_of_a_large_image(saved_model, tmp_path, capsys):
    cv.imwrite(str(tmp_path / "big.png"), np.zeros((100, 130, 3), np.uint8))
    assert predict.main([saved_model, str(tmp_path / "big.png"), "--out", str(tmp_path / "o"), "--batch-size", "2"]) == 0
    err = capsys.readouterr().err
    assert "big.png" in err and "tile" in err                         # 7 x 9 tiles, 16 px kept of each


def test_extended_palette_is_distinct_and_keeps_the_seeds_colors():
    palette = predict.extended_palette(21)
    assert palette[:4] == PALETTE and len({tuple(c) for c in palette}) == 21
    assert predict.extended_palette(21) == palette
