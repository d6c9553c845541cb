"""train.py end to end at a tiny size: files appear, metrics are computed, interrupt + resume is exact."""
import json

import numpy as np
import pytest

import train
from minitensor import Model
from unet import report, trainer
from minitensor.files import read_npz

TINY = ["--num-images", "24", "--num-val", "4", "--num-test", "4", "--image-size", "32", "--batch-size", "4",
        "--quiet"]


def run(tmp_path, name, *extra, on_batch_end=None, data="shape"):
    argv = TINY + ["--data", str(tmp_path / data), "--weights-dir", str(tmp_path / name / "UNet_weight"),
                   "--results-dir", str(tmp_path / name / "UNet_test_result"), *extra]
    return train.main(argv, on_batch_end=on_batch_end)


def weights_of(path):
    return {k: v for k, v in read_npz(path).items() if k.startswith(("weights/", "optimizer/"))}


def test_whole_workflow_writes_dataset_checkpoints_masks_metrics_and_plots(tmp_path, capsys):
    assert run(tmp_path, "run", "--epochs", "3") == 0
    out = capsys.readouterr().out
    assert (tmp_path / "shape" / "train_imgs" / "0.jpg").exists()
    assert (tmp_path / "shape" / "test_mask" / "23.png").exists()
    results = tmp_path / "run" / "UNet_test_result"
    assert sorted(p.name for p in results.glob("2?.png")) == ["20.png", "21.png", "22.png", "23.png"]
    for name in ("metrics.json", "history.csv", "training.png", "predictions.png"):
        assert (results / name).stat().st_size > 0
    metrics = json.loads((results / "metrics.json").read_text())
    assert 0.0 <= metrics["pixel_accuracy"] <= 1.0 and len(metrics["iou"]) == 4
    history = (results / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,loss,val_loss,lr") and len(history) == 4
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "UNet_weight").glob("ep*.npz"))
    assert len(checkpoints) == 1 and checkpoints[0].startswith("ep003-loss")   # period 3: only epoch 3 is looked at
    assert "Epoch 3/3 - loss" in out and "images/s" in out and "mean IoU" in out


@pytest.mark.parametrize("stop_at_batch,flags", [
    (2, []),                                                    # mid-epoch 1 (5 batches per epoch)
    (7, []),                                                    # mid-epoch 2
    (7, ["--augment", "elastic", "--loss", "weighted"]),       # the augmenter's generator resumes too
    (7, ["--augment", "flip"]),
])
def test_interrupt_and_resume_gives_the_same_weights(tmp_path, stop_at_batch, flags):
    assert run(tmp_path, "straight", "--epochs", "2", *flags) == 0

    seen = {"batches": 0}

    def interrupt(trainer):
        seen["batches"] += 1
        if seen["batches"] == stop_at_batch:
            trainer.stop.requested = True          # what the Ctrl-C handler does

    assert run(tmp_path, "split", "--epochs", "2", *flags, on_batch_end=interrupt) == 130
    assert not (tmp_path / "split" / "UNet_test_result" / "metrics.json").exists()
    assert run(tmp_path, "split", "--epochs", "2", "--resume", *flags) == 0

    straight = weights_of(tmp_path / "straight" / "UNet_weight" / "last.npz")
    split = weights_of(tmp_path / "split" / "UNet_weight" / "last.npz")
    assert straight.keys() == split.keys()
    for key in straight:
        np.testing.assert_array_equal(straight[key], split[key], err_msg=key)
    for name in ("history.csv",):
        a = (tmp_path / "straight" / "UNet_test_result" / name).read_text().splitlines()
        b = (tmp_path / "split" / "UNet_test_result" / name).read_text().splitlines()
        assert [row.split(",")[:4] for row in a] == [row.split(",")[:4] for row in b]   # times differ, losses not


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert run(tmp_path, "none", "--epochs", "1", "--resume") == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    assert run(tmp_path, "a", "--epochs", "1") == 0
    assert run(tmp_path, "a", "--epochs", "2", "--resume", "--loss", "softmax-ce", "--batch-size", "2") == 2
    err = capsys.readouterr().err
    assert "was written by a run with other settings" in err
    assert "--loss 'bce-logits' there, 'softmax-ce' here" in err and "--batch-size 4 there, 2 here" in err


def test_finished_run_resumed_with_tta_predicts_again_without_training(tmp_path, monkeypatch, capsys):
    assert run(tmp_path, "done", "--epochs", "1") == 0
    checkpoint = tmp_path / "done" / "UNet_weight" / "last.npz"
    before = checkpoint.read_bytes()
    views = []
    real_predict = report.predict_views
    monkeypatch.setattr(report, "predict_views", lambda f, x, n: views.append(n) or real_predict(f, x, n))
    monkeypatch.setattr(Model, "train_step", lambda *args, **kwargs: pytest.fail("a finished run trained again"))
    assert run(tmp_path, "done", "--epochs", "1", "--resume", "--tta") == 0
    assert "training finished after epoch 1; predicting" in capsys.readouterr().out
    assert views == [8]                                    # 4 test images, one batch of 4
    assert checkpoint.read_bytes() == before
    metrics = json.loads((tmp_path / "done" / "UNet_test_result" / "metrics.json").read_text())
    assert 0.0 <= metrics["mean_iou"] <= 1.0


def test_resume_with_fewer_epochs_than_trained_is_refused(tmp_path, capsys):
    assert run(tmp_path, "two", "--epochs", "2") == 0
    assert run(tmp_path, "two", "--epochs", "1", "--resume") == 2
    assert "has trained 2 epochs, more than --epochs 1; pass --epochs 2 or more" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    assert run(tmp_path, "nan", "--epochs", "1") == 0
    checkpoint = tmp_path / "nan" / "UNet_weight" / "last.npz"
    before = checkpoint.read_bytes()
    monkeypatch.setattr(Model, "train_step", lambda self, x, y, sample_weight=None: float("nan"))
    assert run(tmp_path, "nan", "--epochs", "2", "--resume") == 1
    assert "the loss became nan at epoch 2, batch 1" in capsys.readouterr().err
    assert checkpoint.read_bytes() == before


def test_corrupt_dataset_file_is_reported_by_name(tmp_path, capsys):
    assert run(tmp_path, "gen", "--epochs", "1") == 0
    (tmp_path / "shape" / "train_imgs" / "5.jpg").write_bytes(b"not a jpeg")
    assert run(tmp_path, "bad", "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert "5.jpg" in err and "cannot be used" in err


def test_gpu_without_cupy_says_how_to_install(tmp_path, capsys):
    from minitensor import backend

    if backend.is_gpu_available():
        pytest.skip("this machine has a GPU")
    assert run(tmp_path, "gpu", "--epochs", "1", "--device", "gpu") == 2
    err = capsys.readouterr().err
    assert "CuPy" in err and "--device cpu" in err


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        train.parse_args(["--epochs", "0"])
    with pytest.raises(SystemExit):
        train.parse_args(["--device", "tpu"])


def test_weighted_loss_caches_border_maps_in_the_weights_folder_not_the_data(tmp_path):
    assert run(tmp_path, "weighted", "--epochs", "1", "--loss", "weighted", "--augment", "elastic") == 0
    cached = sorted(p.name for p in (tmp_path / "weighted" / "UNet_weight" / "border_weights").glob("*/*.npz"))
    assert len(cached) == 20          # 16 training + 4 validation masks, each computed once
    assert sorted(p.name for p in (tmp_path / "shape").iterdir()) == ["shapes.json", "test_imgs", "test_mask",
                                                                       "train_imgs", "train_mask"]


@pytest.mark.parametrize("choice", ["dataset", "none"])
def test_class_weights_choice_reaches_the_weight_maps(tmp_path, choice, monkeypatch):
    seen = []
    original = trainer.batch_weights
    monkeypatch.setattr(trainer, "batch_weights", lambda *a, **k: seen.append(k["class_weights"]) or original(*a, **k))
    assert run(tmp_path, choice, "--epochs", "1", "--loss", "weighted", "--class-weights", choice) == 0
    assert seen and all(w is not None for w in seen)
    if choice == "none":
        assert all(np.array_equal(w, np.ones(4)) for w in seen)
    else:
        assert len({tuple(np.round(w, 12)) for w in seen}) == 1 and seen[0][0] < 1 < seen[0][1]


def test_original_unet_trains_on_mirror_padded_images(tmp_path):
    """--model original: 32 px images are mirror-padded to 220 px, the smallest input whose output covers them."""
    argv = ["--num-images", "12", "--num-val", "2", "--num-test", "2", "--image-size", "32", "--batch-size", "4",
            "--quiet", "--model", "original", "--epochs", "1", "--data", str(tmp_path / "shape"),
            "--weights-dir", str(tmp_path / "w"), "--results-dir", str(tmp_path / "r")]
    assert train.main(argv) == 0
    model = train.build_model(train.parse_args(argv), 32)
    assert model.input_shape == (None, 220, 220, 3) and model.output_shape == (None, 36, 36, 4)
    assert sorted(p.name for p in (tmp_path / "r").glob("1?.png")) == ["10.png", "11.png"]
    import cv2
    assert cv2.imread(str(tmp_path / "r" / "10.png")).shape == (32, 32, 3)


def test_epoch_losses_are_means_over_images_not_over_batches(tmp_path, monkeypatch):
    """17 training images in batches of 4 (the last holds 1) and 5 validation images (4 + 1): the
    logged loss is the mean over images, which a mean over batches would miss by far. Pinned by
    hand from the per-batch losses, and val_loss against the whole validation set in one batch."""
    from minitensor import load_model
    from unet.batches import BatchLoader
    from unet.data import dataset_dirs

    steps = []
    real_train_step = Model.train_step
    monkeypatch.setattr(Model, "train_step", lambda self, x, y, sample_weight=None: steps.append(
        (len(x), float(value := real_train_step(self, x, y, sample_weight)))) or value)
    flags = ["--num-images", "26", "--num-val", "5", "--num-test", "4", "--image-size", "32", "--batch-size", "4",
             "--quiet", "--epochs", "1", "--data", str(tmp_path / "shape"), "--weights-dir", str(tmp_path / "w"),
             "--results-dir", str(tmp_path / "r"), "--predict-with", "last"]
    assert train.main(flags) == 0
    row = (tmp_path / "r" / "history.csv").read_text().splitlines()[1].split(",")
    loss, val_loss = float(row[1]), float(row[2])
    assert [size for size, _ in steps] == [4, 4, 4, 4, 1]
    by_hand = sum(size * value for size, value in steps) / 17
    assert loss == pytest.approx(by_hand, rel=1e-12)
    assert abs(loss - sum(value for _, value in steps) / 5) > 1e-6       # what a mean over batches gives

    dirs = dataset_dirs(tmp_path / "shape")
    images, labels = BatchLoader(range(17, 22), dirs.train_images, dirs.train_masks, 5, shuffle=False).read_labels(
        list(range(17, 22)))
    model = load_model(tmp_path / "w" / "last.npz")
    model.compile(model.optimizer, train.LOSSES["bce-logits"]())
    assert val_loss == pytest.approx(model.test_on_batch(images, labels), rel=1e-5)
