"""The shape data set generator, the batch loader and the data set checks (unet/data.py)."""
import json
import os
import subprocess
import sys

import cv2 as cv
import numpy as np
import pytest

from unet import batches, data, shapes
from unet.data import DatasetError

NUM_IMAGES, NUM_TEST, SIZE = 12, 2, 32


def all_files(root):
    """{relative path: bytes} of every file under root."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shape")
    shapes.generate_shapes(root, NUM_IMAGES, SIZE, NUM_TEST, seed=0)
    return root


def test_split_ids_is_the_seeds_800_100_100():
    assert data.split_ids() == (range(0, 800), range(800, 900), range(900, 1000))
    assert data.split_ids(12, num_test=2, num_val=3) == (range(0, 7), range(7, 10), range(10, 12))
    with pytest.raises(ValueError):
        data.split_ids(10, num_test=5, num_val=5)


def test_layout_and_counts(dataset):
    dirs = data.dataset_dirs(dataset)
    first_test = NUM_IMAGES - NUM_TEST
    assert sorted(os.listdir(dirs.train_images)) == sorted(f"{i}.jpg" for i in range(first_test))
    assert sorted(os.listdir(dirs.train_masks)) == sorted(f"{i}.png" for i in range(first_test))
    assert sorted(os.listdir(dirs.test_images)) == sorted(f"{i}.jpg" for i in range(first_test, NUM_IMAGES))
    assert sorted(os.listdir(dirs.test_masks)) == sorted(f"{i}.png" for i in range(first_test, NUM_IMAGES))
    marker = json.loads((dataset / shapes.MARKER_FILE).read_text())
    assert marker == {"num_images": NUM_IMAGES, "num_test": NUM_TEST, "image_size": [SIZE, SIZE], "seed": 0,
                      "complete": True}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(dataset, tmp_path):
    shapes.generate_shapes(tmp_path / "same", NUM_IMAGES, SIZE, NUM_TEST, seed=0)
    assert all_files(tmp_path / "same") == all_files(dataset)
    shapes.generate_shapes(tmp_path / "other", NUM_IMAGES, SIZE, NUM_TEST, seed=1)
    other = all_files(tmp_path / "other")
    assert all(other[name] != content for name, content in all_files(dataset).items() if name.endswith(".jpg"))


def test_a_sample_does_not_depend_on_the_others(dataset):
    """Sample i is seeded by (seed, i): drawn alone it equals the file written in the full run."""
    _, mask_path = data.sample_paths(dataset, 5, NUM_IMAGES, NUM_TEST)
    _, mask = shapes.make_sample(0, 5, SIZE)
    np.testing.assert_array_equal(cv.imread(str(mask_path), cv.IMREAD_UNCHANGED), mask)


def test_mask_png_reads_back_as_the_seed_reads_it(dataset):
    """The seed reads a mask with cv.imread(path)[:, :, 0]; 3-channel PNGs read back the same."""
    image, mask = shapes.make_sample(0, 11, SIZE)
    _, path = data.sample_paths(dataset, 11, NUM_IMAGES, NUM_TEST)
    seed_read = cv.imread(str(path))
    assert seed_read.shape == (SIZE, SIZE, 3) and seed_read.dtype == np.uint8
    np.testing.assert_array_equal(seed_read[:, :, 0], mask)
    three_channel = str(dataset / "three_channel.png")
    cv.imwrite(three_channel, np.repeat(mask[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(cv.imread(three_channel)[:, :, 0], mask)
    os.remove(three_channel)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8


def test_masks_hold_only_class_indices_and_every_class_appears(dataset):
    counts = np.zeros(256, np.int64)
    for i in range(NUM_IMAGES):
        _, mask_path = data.sample_paths(dataset, i, NUM_IMAGES, NUM_TEST)
        mask = cv.imread(str(mask_path))[:, :, 0]
        counts += np.bincount(mask.ravel(), minlength=256)
        assert (mask > 0).any(), f"image {i} has no visible shape"
    assert set(np.flatnonzero(counts)) == {0, 1, 2, 3}


def test_colour_does_not_give_away_the_class():
    """Shapes of one class come in every colour: the per-shape mean colours spread widely."""
    mean_colors = {1: [], 2: [], 3: []}
    for i in range(40):
        image, mask = shapes.make_sample(3, i, 64)
        for c in mean_colors:
            if (mask == c).sum() > 20:
                mean_colors[c].append(image[mask == c].mean(axis=0))
    for c, colors in mean_colors.items():
        assert len(colors) >= 5 and np.std(colors, axis=0).min() > 40, c


def test_shapes_are_large_enough_to_learn():
    """At 128 px, shapes are 12..40 px; occlusion cuts a few into slivers, and touching shapes of
    one class merge, so only the bulk of the visible pieces is checked."""
    extents = []
    for i in range(30):
        _, mask = shapes.make_sample(0, i, 128)
        for c in (1, 2, 3):
            count, _, stats, _ = cv.connectedComponentsWithStats((mask == c).astype(np.uint8))
            extents += [max(w, h) for _, _, w, h, _ in stats[1:count]]
    assert np.percentile(extents, 10) >= 12 and 25 <= np.median(extents) <= 40


def test_ensure_dataset_uses_a_complete_set_and_regenerates_a_missing_file(dataset, tmp_path):
    messages = []
    summary = shapes.ensure_dataset(dataset, NUM_IMAGES, SIZE, NUM_TEST, seed=0, log=messages.append)
    assert summary["generated"] is False and "using" in messages[0]

    root = tmp_path / "copy"
    shapes.generate_shapes(root, NUM_IMAGES, SIZE, NUM_TEST, seed=0)
    before = all_files(root)
    os.remove(data.sample_paths(root, 3, NUM_IMAGES, NUM_TEST)[0])
    messages.clear()
    summary = shapes.ensure_dataset(root, NUM_IMAGES, SIZE, NUM_TEST, seed=0, log=messages.append)
    assert summary["generated"] is True and summary["written"] == 1 and summary["kept"] == NUM_IMAGES - 1
    assert "1 of 24 files missing" in messages[0]
    assert all_files(root) == before


def test_other_parameters_are_refused_unless_overwriting(dataset, tmp_path):
    with pytest.raises(ValueError, match="overwrite"):
        shapes.generate_shapes(dataset, NUM_IMAGES, SIZE, NUM_TEST, seed=1)
    root = tmp_path / "redo"
    shapes.generate_shapes(root, NUM_IMAGES, SIZE, NUM_TEST, seed=0)
    summary = shapes.generate_shapes(root, NUM_IMAGES, SIZE, NUM_TEST, seed=1, overwrite=True)
    assert summary["written"] == NUM_IMAGES
    assert json.loads((root / shapes.MARKER_FILE).read_text())["seed"] == 1


def test_a_generated_folder_is_used_and_completed_with_its_own_seed(tmp_path):
    """The training seed does not decide which data set a folder may hold: its shapes.json does."""
    root = tmp_path / "seed0"
    shapes.generate_shapes(root, NUM_IMAGES, SIZE, NUM_TEST, seed=0)
    before = all_files(root)
    os.remove(data.sample_paths(root, 2, NUM_IMAGES, NUM_TEST)[1])
    messages = []
    summary = shapes.ensure_dataset(root, NUM_IMAGES, SIZE, NUM_TEST, seed=22, log=messages.append)
    assert summary["written"] == 1 and "seed 0" in messages[0]
    assert all_files(root) == before                    # the mask redrawn with seed 0, byte for byte
    with pytest.raises(ValueError, match=f"pass --num-images {NUM_IMAGES} --num-test {NUM_TEST} --image-size {SIZE}"):
        shapes.ensure_dataset(root, NUM_IMAGES + 4, SIZE, NUM_TEST, seed=0, log=messages.append)


def test_the_users_own_data_is_never_drawn_into(dataset, tmp_path):
    """Without shapes.json the folder is the user's: a missing image is an error, its mask stays untouched."""
    root = tmp_path / "mine"
    shapes.generate_shapes(root, NUM_IMAGES, SIZE, NUM_TEST, seed=0)
    os.remove(root / shapes.MARKER_FILE)
    image_path, mask_path = data.sample_paths(root, 3, NUM_IMAGES, NUM_TEST)
    os.remove(image_path)
    cv.imwrite(mask_path, np.full((SIZE, SIZE), 2, np.uint8))      # the user's own mask
    before = all_files(root)
    with pytest.raises(DatasetError) as caught:
        shapes.ensure_dataset(root, NUM_IMAGES, SIZE, NUM_TEST, seed=0, log=lambda message: None)
    assert caught.value.problems == [(image_path, "missing")]
    assert "read as your own data set and nothing is drawn into it" in str(caught.value)
    assert all_files(root) == before
    with pytest.raises(ValueError, match="did not write"):
        shapes.generate_shapes(root, NUM_IMAGES, SIZE, NUM_TEST, seed=0)
    assert all_files(root) == before
    assert shapes.main(["--out", str(root), "--num-images", str(NUM_IMAGES), "--num-test", str(NUM_TEST)]) == 2


def test_an_interrupted_generation_is_completed_not_taken_for_user_data(tmp_path, monkeypatch):
    root = tmp_path / "interrupted"
    written = []
    real_write = shapes.write_image_atomic

    def write_then_die(path, array):
        if len(written) == 5:
            raise KeyboardInterrupt
        written.append(path)
        real_write(path, array)

    monkeypatch.setattr(shapes, "write_image_atomic", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        shapes.generate_shapes(root, NUM_IMAGES, SIZE, NUM_TEST, seed=0)
    monkeypatch.setattr(shapes, "write_image_atomic", real_write)
    assert json.loads((root / shapes.MARKER_FILE).read_text())["complete"] is False
    summary = shapes.ensure_dataset(root, NUM_IMAGES, SIZE, NUM_TEST, seed=0, log=lambda message: None)
    assert summary["kept"] == 2 and summary["written"] == NUM_IMAGES - 2
    assert json.loads((root / shapes.MARKER_FILE).read_text())["complete"] is True


def test_an_empty_or_new_folder_is_generated(tmp_path):
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "empty", tmp_path / "new"):
        summary = shapes.ensure_dataset(root, NUM_IMAGES, SIZE, NUM_TEST, seed=0, log=lambda message: None)
        assert summary["generated"] and summary["written"] == NUM_IMAGES


def test_a_long_list_of_problems_is_cut_with_a_count():
    error = DatasetError([(f"f{i}.jpg", "missing") for i in range(25)])
    assert len(error.problems) == 25 and "... and 5 more" in str(error) and "f19.jpg" in str(error)
    assert "f20.jpg" not in str(error)


def test_cli_help_and_generation(tmp_path, capsys):
    result = subprocess.run([sys.executable, "-m", "unet.shapes", "--help"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0
    for option in ("--out", "--num-images", "--num-test", "--image-size", "--seed", "--overwrite"):
        assert option in result.stdout
    shapes.main(["--out", str(tmp_path / "cli"), "--num-images", "4", "--num-test", "1", "--image-size", "16"])
    assert "wrote 4 images" in capsys.readouterr().out
    assert len(os.listdir(tmp_path / "cli" / "test_imgs")) == 1


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------

def make_loader(root, **kwargs):
    dirs = data.dataset_dirs(root)
    options = dict(batch_size=4, num_classes=4, seed=7, image_size=SIZE)
    options.update(kwargs)
    return batches.BatchLoader(range(NUM_IMAGES - NUM_TEST), dirs.train_images, dirs.train_masks, **options)


def epoch_ids(batches):
    """The ids of an epoch's batches, recovered from the images (each image is unique)."""
    return [tuple(np.round(x.sum(axis=(1, 2, 3)), 2)) for x, _ in batches]


def test_batches_have_the_seeds_shapes_dtypes_and_range(dataset):
    loader = make_loader(dataset, shuffle=False)
    batches = list(loader.epoch_batches())
    assert len(loader) == len(batches) == 3                      # 10 ids, batch 4: 4 + 4 + 2
    x, y = batches[0]
    assert x.shape == (4, SIZE, SIZE, 3) and x.dtype == np.float32
    assert y.shape == (4, SIZE, SIZE, 4) and y.dtype == np.float32
    assert batches[-1][0].shape[0] == 2
    assert x.min() >= -1.0 and x.max() <= 1.0
    np.testing.assert_array_equal(y.sum(axis=-1), 1.0)
    image_path, mask_path = data.sample_paths(dataset, 1, NUM_IMAGES, NUM_TEST)
    np.testing.assert_allclose(x[1], cv.imread(str(image_path)) / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(y[1].argmax(axis=-1), cv.imread(str(mask_path))[:, :, 0])
    assert len(make_loader(dataset, drop_last=True)) == 2


def test_reshuffles_every_epoch_reproducibly(dataset):
    first, second = make_loader(dataset), make_loader(dataset)
    orders = [first.epoch_order() for _ in range(3)]
    assert [list(o) for o in orders] == [list(second.epoch_order()) for _ in range(3)]
    assert list(orders[0]) != list(orders[1]) and sorted(orders[0]) == list(range(NUM_IMAGES - NUM_TEST))
    assert list(make_loader(dataset, seed=8).epoch_order()) != list(orders[0])


def test_resume_from_saved_state_gives_the_same_batches(dataset):
    uninterrupted = make_loader(dataset)
    list(uninterrupted.epoch_batches())
    saved = json.loads(json.dumps(uninterrupted.get_state()))     # as train.py would store it
    expected = epoch_ids(uninterrupted.epoch_batches())
    resumed = make_loader(dataset, seed=12345)
    resumed.set_state(saved)
    assert epoch_ids(resumed.epoch_batches()) == expected


def test_batch_generator_loops_like_the_seed(dataset):
    dirs = data.dataset_dirs(dataset)
    one_epoch = list(batches.batch_generator(range(10), dirs.train_images, dirs.train_masks, 5, 4, seed=3, loop=False))
    assert len(one_epoch) == 2
    endless = batches.batch_generator(range(10), dirs.train_images, dirs.train_masks, 5, 4, seed=3)
    first_five = [next(endless) for _ in range(5)]
    assert epoch_ids(first_five[:2]) == epoch_ids(one_epoch)
    assert epoch_ids(first_five[2:4]) != epoch_ids(one_epoch)   # the second epoch is reshuffled


def test_one_hot_and_colour_round_trip():
    mask = np.array([[0, 1], [2, 3]], np.uint8)
    np.testing.assert_array_equal(data.one_hot(mask, 4)[1, 0], [0, 0, 1, 0])
    with pytest.raises(ValueError):
        data.one_hot(mask, 3)
    colored = data.colorize_mask(mask)
    np.testing.assert_array_equal(colored[0, 1], [0, 0, 128])      # circle: BGR (0, 0, 128), i.e. dark red
    np.testing.assert_array_equal(data.decolorize_mask(colored), mask)
    colored[0, 0] = [1, 2, 3]
    with pytest.raises(ValueError, match="1 pixels"):
        data.decolorize_mask(colored)


# ------------------------------------------------------------------------------------------------
# Bad files
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def broken(dataset, tmp_path):
    """A copy of the data set with four bad files; returns (root, {path: expected reason})."""
    root = tmp_path / "broken"
    shapes.generate_shapes(root, NUM_IMAGES, SIZE, NUM_TEST, seed=0)
    paths = {i: data.sample_paths(root, i, NUM_IMAGES, NUM_TEST) for i in range(NUM_IMAGES)}
    with open(paths[1][0], "wb") as f:
        f.write(b"this is not a JPEG")
    cv.imwrite(paths[2][0], np.zeros((SIZE + 4, SIZE, 3), np.uint8))
    bad_mask = np.zeros((SIZE, SIZE), np.uint8)
    bad_mask[3, 4] = 7
    cv.imwrite(paths[4][1], bad_mask)
    os.remove(paths[NUM_IMAGES - 1][1])                          # a test mask
    with open(paths[5][0], "rb") as f:
        truncated = f.read()[:-200]
    with open(paths[5][0], "wb") as f:
        f.write(truncated)
    return root, {paths[1][0]: "corrupt", paths[2][0]: "wrong size 36x32", paths[4][1]: "[7] outside 0..3",
                  paths[NUM_IMAGES - 1][1]: "missing", paths[5][0]: "truncated"}


def test_check_dataset_lists_every_bad_file(broken):
    root, expected = broken
    with pytest.raises(DatasetError) as caught:
        data.check_dataset(root, NUM_IMAGES, NUM_TEST, num_classes=4, image_size=SIZE)
    assert len(caught.value.problems) == len(expected)
    message = str(caught.value)
    for path, reason in expected.items():
        line = next(line for line in message.splitlines() if path in line)
        assert reason in line, line
    assert data.check_dataset(root, NUM_IMAGES, NUM_TEST, 4, SIZE, ids=[0, 3]) == 2


def test_the_loader_names_a_bad_file(broken):
    root, expected = broken
    dirs = data.dataset_dirs(root)
    for index, path in ((1, data.sample_paths(root, 1, NUM_IMAGES, NUM_TEST)[0]),
                        (4, data.sample_paths(root, 4, NUM_IMAGES, NUM_TEST)[1])):
        loader = batches.BatchLoader([0, index], dirs.train_images, dirs.train_masks, 2, 4, shuffle=False)
        with pytest.raises(DatasetError, match=expected[path].replace("[", r"\[")) as caught:
            next(loader.epoch_batches())
        assert caught.value.problems[0][0] == path
