"""train.py --tensorboard DIR (unet/tensorboard_log.py), read back with TensorBoard's own reader.

The events must hold the epochs' loss, val_loss, learning rate and images/s at steps 1, 2, ...,
the values of the run's history, and at the end the first test images beside their true and
predicted masks, pixel for pixel the files the run wrote. A stopped and resumed run shows every
epoch once, also the epoch that was logged and then trained again (a resume from an older
checkpoint), with the values an uninterrupted run logs. A --tensorboard folder that cannot be
used is refused before any training, with exit status 2.
"""
import csv
import os
import shutil

import cv2
import numpy as np
import pytest

import train
from unet import shapes
from unet.data import PALETTE, colorize_mask, load_mask, read_bgr
from unet.tensorboard_log import event_files

pytest.importorskip("tensorboardX", reason="tensorboardX is not installed (pip install 'minitensor[tensorboard]')")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                        reason="tensorboard is not installed (pip install tensorboard)")

TINY = ["--num-images", "20", "--num-val", "4", "--num-test", "4", "--image-size", "32", "--batch-size", "4",
        "--quiet"]                                   # 12 training images: 3 batches an epoch
TEST_IDS = [16, 17, 18]                              # the first three of the four test images (ids 16..19)
SCALAR_COLUMNS = {"loss": "loss", "val_loss": "val_loss", "learning_rate": "lr",
                  "images_per_second": "images_per_second"}


@pytest.fixture(scope="module")
def shape_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "shape"
    shapes.generate_shapes(root, 20, 32, 4, seed=22)
    return root


def run(folder, data, *extra, on_batch_end=None):
    return train.main(TINY + ["--data", str(data), "--weights-dir", str(folder / "w"), "--results-dir",
                              str(folder / "r"), "--tensorboard", str(folder / "tb"), *extra],
                      on_batch_end=on_batch_end)


def read_events(folder):
    events = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.IMAGES: 0})
    events.Reload()
    return events


def scalars(events):
    """{tag: [(step, value), ...]} in the order TensorBoard shows them."""
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def history(folder):
    with open(folder / "r" / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def stop_at(batch, before=None):
    """An on_batch_end hook that asks for a stop (as Ctrl-C does) after training batch ``batch``."""
    seen = {"batches": 0}

    def hook(trainer):
        seen["batches"] += 1
        if before is not None:
            before(seen["batches"], trainer)
        if seen["batches"] == batch:
            trainer.stop.requested = True
    return hook


def check_a_whole_run(folder, data):
    """Every epoch's four scalars at steps 1..3 with the history's values; the test images beside their
    masks at step 3, pixel for pixel the files the run read and wrote; one run as TensorBoard loads it."""
    from tensorboard.backend.event_processing import plugin_event_multiplexer

    events = read_events(folder / "tb")
    logged, rows = scalars(events), history(folder)
    assert sorted(logged) == sorted(SCALAR_COLUMNS)
    for tag, column in SCALAR_COLUMNS.items():
        assert [step for step, _ in logged[tag]] == [1, 2, 3], tag
        np.testing.assert_allclose([value for _, value in logged[tag]], [float(row[column]) for row in rows],
                                   rtol=1e-6, err_msg=tag)
    assert logged["learning_rate"][0][1] == pytest.approx(1e-3)
    assert sorted(events.Tags()["images"]) == [f"test_images/{i}" for i in TEST_IDS]
    for index in TEST_IDS:
        (image,) = events.Images(f"test_images/{index}")
        assert image.step == 3
        shown = cv2.imdecode(np.frombuffer(image.encoded_image_string, np.uint8), cv2.IMREAD_COLOR)   # BGR
        expected = np.concatenate([read_bgr(data / "test_imgs" / f"{index}.jpg"),
                                   colorize_mask(load_mask(data / "test_mask" / f"{index}.png"), PALETTE),
                                   read_bgr(folder / "r" / f"{index}.png")], axis=1)
        np.testing.assert_array_equal(shown, expected)
    multiplexer = plugin_event_multiplexer.EventMultiplexer()      # what `tensorboard --logdir` loads
    multiplexer.AddRunsFromDirectory(str(folder / "tb"))
    multiplexer.Reload()
    assert list(multiplexer.Runs()) == ["."]
    assert sorted(multiplexer.PluginRunToTagToContent("scalars")["."]) == sorted(SCALAR_COLUMNS)


def test_every_epoch_and_the_test_images_and_a_resumed_run_shows_each_epoch_once(tmp_path, shape_data):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(straight, shape_data, "--epochs", "3") == 0
    check_a_whole_run(straight, shape_data)
    kept = tmp_path / "after_epoch_1.npz"

    def keep_epoch_1(batch, trainer):
        if batch == 4:                        # the first batch of epoch 2: last.npz is epoch 1's checkpoint
            shutil.copy(split / "w" / "last.npz", kept)

    assert run(split, shape_data, "--epochs", "3", on_batch_end=stop_at(7, keep_epoch_1)) == 130   # in epoch 3
    assert [step for step, _ in scalars(read_events(split / "tb"))["loss"]] == [1, 2]
    assert run(split, shape_data, "--epochs", "3", "--resume", on_batch_end=stop_at(1)) == 130      # in epoch 3
    assert [step for step, _ in scalars(read_events(split / "tb"))["loss"]] == [1, 2]
    # Back to epoch 1's checkpoint, as a user copies an older checkpoint to last.npz: epoch 2, logged
    # already, is trained again and must not be shown twice.
    shutil.copy(kept, split / "w" / "last.npz")
    assert run(split, shape_data, "--epochs", "3", "--resume") == 0

    assert len(event_files(split / "tb")) == 3                # one event file per session, none written over
    resumed, uninterrupted = read_events(split / "tb"), read_events(straight / "tb")
    for tag in ("loss", "val_loss", "learning_rate"):
        assert [step for step, _ in scalars(resumed)[tag]] == [1, 2, 3], tag
        assert scalars(resumed)[tag] == scalars(uninterrupted)[tag], tag
    assert [step for step, _ in scalars(resumed)["images_per_second"]] == [1, 2, 3]
    for index in TEST_IDS:
        assert [image.step for image in resumed.Images(f"test_images/{index}")] == [3]
    check_a_whole_run(split, shape_data)


def test_a_finished_run_resumed_to_predict_again_shows_its_test_images_once(tmp_path, shape_data):
    assert run(tmp_path, shape_data, "--epochs", "1") == 0
    assert run(tmp_path, shape_data, "--epochs", "1", "--resume") == 0
    events = read_events(tmp_path / "tb")
    assert [step for step, _ in scalars(events)["loss"]] == [1]
    assert [image.step for image in events.Images(f"test_images/{TEST_IDS[0]}")] == [1]


def not_trained(folder):
    return not (folder / "w" / "last.npz").exists()


def test_a_folder_that_holds_another_runs_events_is_refused_unless_starting_over(tmp_path, shape_data, capsys):
    board = tmp_path / "board"

    def run_into_board(name, *extra):
        return train.main(TINY + ["--data", str(shape_data), "--weights-dir", str(tmp_path / name / "w"),
                                  "--results-dir", str(tmp_path / name / "r"), "--tensorboard", str(board),
                                  "--epochs", "1", *extra])

    assert run_into_board("first") == 0
    before = {path: os.path.getsize(path) for path in event_files(board)}
    capsys.readouterr()
    assert run_into_board("second") == 2
    err = capsys.readouterr().err
    assert f"--tensorboard {board}: holds an earlier run's events" in err
    assert "--resume" in err and "--start-over" in err
    assert {path: os.path.getsize(path) for path in event_files(board)} == before
    assert not_trained(tmp_path / "second")
    assert run_into_board("second", "--start-over") == 0
    # the first run's file is gone (the new one may take its name when both open within one second)
    assert len(before) == 1 and len(event_files(board)) == 1
    assert [step for step, _ in scalars(read_events(board))["loss"]] == [1]


@pytest.mark.parametrize("where", ["a file", "inside the data", "unwritable"])
def test_a_tensorboard_folder_that_cannot_be_used_is_refused_before_training(tmp_path, shape_data, capsys, where):
    folder = {"a file": tmp_path / "file", "inside the data": shape_data / "tb",
              "unwritable": "/proc/minitensor-tensorboard"}[where]
    (tmp_path / "file").write_text("not a folder")
    argv = TINY + ["--data", str(shape_data), "--weights-dir", str(tmp_path / "w"), "--results-dir",
                   str(tmp_path / "r"), "--tensorboard", str(folder), "--epochs", "1"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --tensorboard {folder}: ") and "Traceback" not in err
    assert {"a file": "is a file", "inside the data": "inside the data set",
            "unwritable": "cannot write there"}[where] in err
    assert not_trained(tmp_path) and not (shape_data / "tb").exists()


def test_without_tensorboardx_the_message_says_what_to_install(tmp_path, shape_data, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tensorboardX", None)     # import tensorboardX fails
    assert run(tmp_path, shape_data, "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert "pip install 'minitensor[tensorboard]'" in err and "Traceback" not in err
    assert not_trained(tmp_path) and not (tmp_path / "tb").exists()


def test_a_session_opened_within_the_second_of_the_last_keeps_both_files(tmp_path):
    """tensorboardX names a file by the second and truncates one of the same name: a resume that
    comes quickly (a run stopped at once) must not destroy the last session's events."""
    from unet.tensorboard_log import TensorBoardLog

    rows = [{"epoch": 1, "loss": 0.5, "val_loss": 0.4, "lr": 1e-3, "images_per_second": 10.0}]
    for session in range(2):
        board = TensorBoardLog(tmp_path, rows[:session])
        board.close()
    assert len(event_files(tmp_path)) == 2
    assert [step for step, _ in scalars(read_events(tmp_path))["loss"]] == [1]
