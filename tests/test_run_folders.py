"""A run's folders: nothing of an earlier run, of the data set or of another live run is written over,
and the files a run writes are the ones a user expects (mode, names, which weights predicted)."""
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

import train
from minitensor.checkpoint import read_checkpoint
from minitensor.files import atomic_savez, atomic_write, remove_stale_temporaries
from unet import shapes
from unet.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num-images", "20", "--num-val", "4", "--num-test", "4", "--image-size", "32", "--batch-size", "4",
        "--quiet"]


@pytest.fixture(scope="module")
def shape_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "shape"
    shapes.generate_shapes(root, 20, 32, 4, seed=22)
    return root


def run(tmp_path, data, *extra, on_batch_end=None):
    return train.main(TINY + ["--data", str(data), "--weights-dir", str(tmp_path / "w"), "--results-dir",
                              str(tmp_path / "r"), *extra], on_batch_end=on_batch_end)


def snapshot(folder):
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


# ----- an earlier run in the folders ------------------------------------------------------------------

def test_running_again_without_resume_is_refused_and_changes_nothing(tmp_path, shape_data, capsys):
    """The issue's up-arrow and Enter after Ctrl-C: the old run must survive it."""
    assert run(tmp_path, shape_data, "--epochs", "2") == 0
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert run(tmp_path, shape_data, "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert f"--weights-dir {tmp_path / 'w'} / --results-dir {tmp_path / 'r'} hold an earlier run" in err
    assert "last.npz after 2 finished epochs" in err
    assert "--resume" in err and "--start-over" in err
    assert snapshot(tmp_path) == before


def test_start_over_deletes_the_earlier_run_and_trains_afresh(tmp_path, shape_data, capsys):
    assert run(tmp_path, shape_data, "--epochs", "3") == 0
    assert list((tmp_path / "w").glob("ep003-*.npz"))
    assert run(tmp_path, shape_data, "--epochs", "1", "--start-over") == 0
    assert "--start-over: deleted the earlier run's" in capsys.readouterr().out
    assert not list((tmp_path / "w").glob("ep*.npz"))          # the old run's epNNN files are gone
    assert read_checkpoint(tmp_path / "w" / "last.npz").extra["epoch"] == 1
    history = (tmp_path / "r" / "history.csv").read_text().splitlines()
    assert len(history) == 2


# ----- output folders and the data set ---------------------------------------------------------------------

@pytest.mark.parametrize("flag,where", [
    ("--results-dir", "shape/test_mask"),       # the issue's: predictions would replace the true masks
    ("--results-dir", "shape/../shape"),        # the data set itself, however spelled
    ("--weights-dir", "shape/train_imgs/w"),
    ("--results-dir", "."),                     # a folder that holds the data set
])
def test_no_output_folder_inside_the_data_set_or_holding_it(tmp_path, flag, where, capsys):
    data = tmp_path / "shape"
    shapes.generate_shapes(data, 20, 32, 4, seed=22)
    before = snapshot(data)
    argv = TINY + ["--data", str(data), "--weights-dir", str(tmp_path / "w"), "--results-dir", str(tmp_path / "r")]
    argv += [flag, str(tmp_path / where)]
    assert train.main(argv + ["--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{flag} {tmp_path / where}:" in err and "data set" in err
    assert snapshot(data) == before


def test_two_runs_generating_one_new_data_set_get_one_complete_set(tmp_path):
    """The second waits for the first to finish drawing (a lock), then uses what it drew."""
    code = ("import sys; from unet.shapes import ensure_dataset; "
            "ensure_dataset(sys.argv[1], 60, 32, 6, seed=22)")
    processes = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "new")], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    shapes.generate_shapes(tmp_path / "alone", 60, 32, 6, seed=22)
    drawn, alone = snapshot(tmp_path / "new"), snapshot(tmp_path / "alone")
    assert drawn.keys() == alone.keys() and all(drawn[name] == alone[name] for name in alone)


# ----- the files themselves ---------------------------------------------------------------------------------

def test_saved_files_follow_the_umask_and_an_error_names_the_file(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_savez(tmp_path / "a.npz", {"x": np.arange(3)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.npz").st_mode) == 0o640    # mkstemp alone gives 0600

    def full_disk(f):
        raise OSError(28, "No space left on device")                   # as np.savez raises it: no file name
    with pytest.raises(OSError) as caught:
        atomic_write(tmp_path / "b.npz", full_disk)
    assert caught.value.filename == str(tmp_path / "b.npz") and caught.value.errno == 28
    assert os.listdir(tmp_path) == ["a.npz"]


def test_stale_temporaries_only_of_dead_processes_are_removed(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".tmp-{sleeper.pid}-abc.npz"
        dead = tmp_path / ".tmp-999999999-abc.npz"
        for path in (live, dead, tmp_path / "last.npz"):
            path.write_bytes(b"x")
        assert remove_stale_temporaries(tmp_path) == [str(dead)]
        assert live.exists() and (tmp_path / "last.npz").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# ----- which weights predict the test set ----------------------------------------------------------------

def test_the_test_set_is_predicted_with_the_best_epochs_weights(tmp_path, shape_data, monkeypatch, capsys):
    """val_loss 0.5, 0.3, 0.4: epoch 2's weights (best.npz) predict, as restore_best_weights would;
    the last epoch's stay in last.npz, and metrics.json says which were used."""
    val_losses = iter([0.5, 0.3, 0.4] * 2)
    monkeypatch.setattr(Trainer, "_validate", lambda self: next(val_losses))
    predicted_with = []
    real_write_results = train.write_results
    monkeypatch.setattr(train, "write_results", lambda model, *a, **k: predicted_with.append(
        {key: np.array(value) for key, value in model.weights_dict().items()}) or real_write_results(model, *a, **k))
    assert run(tmp_path, shape_data, "--epochs", "3") == 0
    out = capsys.readouterr().out
    assert "the weights of epoch 2, whose val_loss 0.3000 is the lowest" in out
    best, last = read_checkpoint(tmp_path / "w" / "best.npz"), read_checkpoint(tmp_path / "w" / "last.npz")
    assert best.extra == {"epoch": 2, "val_loss": 0.3} and not best.optimizer
    for key, value in best.weights.items():
        np.testing.assert_array_equal(predicted_with[0][f"weights/{key}"], value)
    assert any(not np.array_equal(best.weights[key], last.weights[key]) for key in best.weights)
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["weights"]["epoch"] == 2

    # the same run stopped after epoch 2: its last.npz holds what best.npz holds
    assert train.main(TINY + ["--data", str(shape_data), "--weights-dir", str(tmp_path / "w2"), "--results-dir",
                              str(tmp_path / "r2"), "--epochs", "2"]) == 0
    for key, value in read_checkpoint(tmp_path / "w2" / "last.npz").weights.items():
        np.testing.assert_array_equal(best.weights[key], value)


def test_predict_with_last_and_the_epoch_line_counts_checkpoint_time(tmp_path, shape_data, capsys):
    assert run(tmp_path, shape_data, "--epochs", "1", "--predict-with", "last", "--checkpoint-minutes", "0") == 0
    out = capsys.readouterr().out
    assert "predicting the test set with the last epoch's weights (epoch 1, --predict-with last)" in out
    assert " - checkpoints " in out
    header, row = (tmp_path / "r" / "history.csv").read_text().splitlines()
    assert header.endswith(",save_seconds") and float(row.split(",")[-1]) > 0
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["weights"]["file"].endswith("last.npz")


def test_resuming_an_early_stopped_run_says_so_and_how_to_go_on(tmp_path, shape_data, monkeypatch, capsys):
    monkeypatch.setattr(Trainer, "_validate", lambda self: 1.0)       # never improves after epoch 1
    assert run(tmp_path, shape_data, "--epochs", "30") == 0
    assert read_checkpoint(tmp_path / "w" / "last.npz").extra["epoch"] == 11
    capsys.readouterr()
    assert run(tmp_path, shape_data, "--epochs", "100", "--resume") == 0
    out = capsys.readouterr().out
    assert "EarlyStopping ended this run after epoch 11 (val_loss had not improved for 10 epochs" in out
    assert "its best val_loss, 1.0000, came at epoch 1" in out and "--start-over" in out
