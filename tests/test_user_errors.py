"""Every user mistake is a message that names the flag or file and the fix, with exit status 2 and no
traceback; and the user's own data, and the last good checkpoint, are never lost."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import train
from minitensor import Model, set_seed
from minitensor.files import read_npz
from unet import folders, report, shapes, small_unet
from unet.tiling import fit_to_model, mirror

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = ["--num-images", "20", "--num-val", "4", "--num-test", "4", "--image-size", "32"]
TINY = SIZES + ["--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def shape_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "shape"
    shapes.generate_shapes(root, 20, 32, 4, seed=22)
    return root


def argv(tmp_path, data_root, *extra):
    return TINY + ["--data", str(data_root), "--weights-dir", str(tmp_path / "w"), "--results-dir",
                   str(tmp_path / "r"), *extra]


def run(tmp_path, data_root, *extra):
    return train.main(argv(tmp_path, data_root, *extra))


def cli(script, *args):
    result = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    return result.returncode, result.stdout, result.stderr


# ----- checkpoints ------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_a_damaged_checkpoint_is_a_message_without_unsafe_advice(tmp_path, shape_data, damage):
    assert run(tmp_path, shape_data, "--epochs", "1") == 0
    checkpoint = tmp_path / "w" / "last.npz"
    content = checkpoint.read_bytes()
    checkpoint.write_bytes(content[:len(content) // 2] if damage == "truncated"
                           else np.random.default_rng(0).bytes(5000))
    code, out, err = cli("train.py", *argv(tmp_path, shape_data, "--epochs", "2", "--resume"))
    assert code == 2, err
    assert "Traceback" not in err and "pickle" not in err
    assert f"{checkpoint}: not a readable minitensor .npz file; it is truncated or corrupt" in err
    assert "another --weights-dir" in err


def test_a_model_file_that_is_no_training_checkpoint_is_named(tmp_path, shape_data, capsys):
    set_seed(0)
    (tmp_path / "w").mkdir()
    small_unet((32, 32, 3)).save(tmp_path / "w" / "last.npz")
    assert run(tmp_path, shape_data, "--epochs", "1", "--resume") == 2
    assert "not a training checkpoint of train.py (it lacks fingerprint" in capsys.readouterr().err


def test_resume_with_another_learning_rate_applies_it_and_says_so(tmp_path, shape_data, capsys):
    assert run(tmp_path, shape_data, "--epochs", "1") == 0
    assert run(tmp_path, shape_data, "--epochs", "2", "--resume", "--lr", "0.01") == 0
    assert "--lr 0.01: the learning rate is now 0.01 (the checkpoint had 0.001)" in capsys.readouterr().out
    assert float(read_npz(tmp_path / "w" / "last.npz")["optimizer/learning_rate"]) == 0.01


# ----- output folders -----------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--weights-dir", "--results-dir"])
@pytest.mark.parametrize("kind", ["a file", "under a file", "unwritable"])
def test_output_folders_are_checked_before_any_training(tmp_path, shape_data, capsys, monkeypatch, flag, kind):
    blocker = tmp_path / "blocker"
    blocker.write_text("the user's file")
    folder = {"a file": blocker, "under a file": blocker / "sub", "unwritable": tmp_path / "locked"}[kind]
    if kind == "unwritable":           # root ignores permission bits, so the refusal is simulated
        real = folders.tempfile.TemporaryFile

        def refuse(dir=None, **kwargs):
            if os.path.abspath(dir) == str(folder):
                raise PermissionError(13, "Permission denied")
            return real(dir=dir, **kwargs)
        monkeypatch.setattr(folders.tempfile, "TemporaryFile", refuse)
    monkeypatch.setattr(Model, "train_step", lambda *a, **k: pytest.fail("training started"))
    assert run(tmp_path, shape_data, "--epochs", "1", flag, str(folder)) == 2
    err = capsys.readouterr().err
    expected = {"a file": "is a file, not a folder", "under a file": "cannot write there",
                "unwritable": "cannot write there (Permission denied)"}[kind]
    assert f"{flag} {folder}: {expected}" in err
    assert blocker.read_text() == "the user's file"


# ----- settings -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--num-val", "0"], "--num-val must be at least 1 (the callbacks watch val_loss)"),
    (["--num-images", "10", "--num-val", "5", "--num-test", "5"], "leaves no training image"),
    (["--num-test", "-1"], "--num-test must be 0 or more"),
    (["--checkpoint-minutes", "-1"], "--checkpoint-minutes -1: must be 0 or more"),
    (["--checkpoint-minutes", "nan"], "--checkpoint-minutes nan: must be 0 or more"),
    (["--max-minutes", "nan"], "--max-minutes nan: must be 0 or more"),
    (["--lr", "0"], "--lr 0: must be a positive number"),
    (["--lr", "-1"], "--lr -1: must be a positive number"),
    (["--lr", "nan"], "--lr nan: must be a positive number"),
    (["--lr", "inf"], "--lr inf: must be a positive number"),
    (["--image-size", "50"], "--image-size 50: small_unet's four 2x max-pools need a multiple of 16, e.g. 48"),
    (["--image-size", "1"], "--image-size 1: small_unet's four 2x max-pools need a multiple of 16, e.g. 16"),
    (["--model", "original", "--image-size", "8"], "--image-size 8: must be at least 16 px"),
    (["--resume", "--start-over"], "pass one of them"),
])
def test_impossible_settings_are_refused_with_status_2(flags, message, capsys):
    with pytest.raises(SystemExit) as caught:
        train.parse_args(flags)
    assert caught.value.code == 2 and message in capsys.readouterr().err


def test_no_test_images_skips_predictions_and_says_so(tmp_path, capsys):
    args = ["--num-images", "12", "--num-val", "4", "--num-test", "0", "--image-size", "32", "--batch-size", "4",
            "--quiet", "--epochs", "1", "--data", str(tmp_path / "d"), "--weights-dir", str(tmp_path / "w"),
            "--results-dir", str(tmp_path / "r")]
    assert train.main(args) == 0
    assert "no test images (--num-test 0)" in capsys.readouterr().out
    assert (tmp_path / "r" / "history.csv").exists() and not (tmp_path / "r" / "metrics.json").exists()


def test_metrics_json_is_valid_json_when_a_score_is_undefined():
    text = report.json_text({"iou": [0.5, float("nan")], "mean_iou": float("nan"), "n": 3})
    assert json.loads(text) == {"iou": [0.5, None], "mean_iou": None, "n": 3}


# ----- data sets --------------------------------------------------------------------------------------------

def test_data_made_by_unet_data_with_its_own_seed_is_used(tmp_path, capsys):
    root = tmp_path / "made"
    assert shapes.main(["--out", str(root), "--num-images", "20", "--num-test", "4", "--image-size", "32"]) == 0
    before = {p: p.read_bytes() for p in root.rglob("*.png")}
    assert run(tmp_path, root, "--epochs", "1") == 0
    assert "using the 20 images found" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in root.rglob("*.png")} == before


def test_a_generated_folder_of_other_sizes_names_the_flags_to_pass(tmp_path, shape_data, capsys):
    assert train.main(["--num-images", "24", "--num-val", "4", "--num-test", "4", "--image-size", "32",
                       "--data", str(shape_data), "--weights-dir", str(tmp_path / "w"),
                       "--results-dir", str(tmp_path / "r"), "--quiet"]) == 2
    assert "pass --num-images 20 --num-test 4 --image-size 32 to use it" in capsys.readouterr().err


def test_the_users_data_set_with_a_missing_image_is_an_error_and_untouched(tmp_path, shape_data, capsys):
    import shutil

    root = tmp_path / "mine"
    shutil.copytree(shape_data, root)
    os.remove(root / shapes.MARKER_FILE)
    os.remove(root / "train_imgs" / "3.jpg")
    mask_before = (root / "train_mask" / "3.png").read_bytes()
    assert run(tmp_path, root, "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert "train_imgs/3.jpg: missing" in err and "read as your own data set" in err
    assert not (root / "train_imgs" / "3.jpg").exists()
    assert (root / "train_mask" / "3.png").read_bytes() == mask_before


# ----- divergence ---------------------------------------------------------------------------------------------

def test_divergence_before_any_checkpoint_says_there_is_none(tmp_path, shape_data, monkeypatch, capsys):
    monkeypatch.setattr(Model, "train_step", lambda self, x, y, sample_weight=None: float("nan"))
    assert run(tmp_path, shape_data, "--epochs", "1") == 1
    err = capsys.readouterr().err
    assert "the loss became nan at epoch 1, batch 1" in err and "no checkpoint had been written yet" in err
    assert not (tmp_path / "w" / "last.npz").exists()


def test_a_nan_loss_read_late_names_its_own_batch(tmp_path, shape_data, monkeypatch, capsys):
    """Losses are read a few batches at a time: the message still names the batch that diverged."""
    real_step, calls = Model.train_step, []

    def third_diverges(self, *args, **kwargs):
        calls.append(1)
        loss = real_step(self, *args, **kwargs)
        return np.float32("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(Model, "train_step", third_diverges)
    assert run(tmp_path, shape_data, "--epochs", "1") == 1
    assert "the loss became nan at epoch 1, batch 3" in capsys.readouterr().err
    assert not (tmp_path / "w" / "last.npz").exists()


def test_a_nan_validation_loss_stops_without_saving(tmp_path, shape_data, monkeypatch, capsys):
    monkeypatch.setattr(Model, "test_step", lambda self, x, y, sample_weight=None: float("nan"))
    assert run(tmp_path, shape_data, "--epochs", "3") == 1
    assert "the validation loss became nan after epoch 1" in capsys.readouterr().err
    assert not list((tmp_path / "w").glob("*.npz"))


# ----- one mirror for training and prediction -------------------------------------------------------------------

def test_training_mirrors_the_border_as_tiled_prediction_does():
    set_seed(0)
    from unet import unet
    model = unet((188, 188, 3), num_classes=4, base_filters=2)       # 188 -> 4 px out: a 92 px margin
    images = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)
    masks = np.random.default_rng(1).standard_normal((2, 4, 4, 4)).astype(np.float32)
    padded_images, padded_masks = fit_to_model(model, images, masks)
    assert padded_images.shape == (2, 188, 188, 3) and padded_masks.shape == (2, 4, 4, 4)
    for padded, image in zip(padded_images, images):
        np.testing.assert_array_equal(padded, mirror(image, (92, 92), (92, 92)))
        np.testing.assert_array_equal(padded, np.pad(image, ((92, 92), (92, 92), (0, 0)), mode="reflect"))


# ----- the Python API's messages (issue 25) -----------------------------------------------------------------

def test_load_model_on_a_keras_h5_file_points_to_load_keras_weights(tmp_path):
    import h5py

    from minitensor import ModelFileError, load_model
    path = tmp_path / "seed_weights.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("model_weights/conv1/kernel", data=np.zeros((3, 3, 3, 4), np.float32))
    with pytest.raises(ModelFileError) as caught:
        load_model(path)
    message = str(caught.value)
    assert "HDF5" in message and "load_keras_weights" in message and "truncated" not in message


def test_predict_on_an_empty_list_is_a_message():
    set_seed(0)
    model = small_unet((32, 32, 3), base_filters=2)
    with pytest.raises(ValueError, match=r"predict got an empty batch \(shape \(0,\)\)"):
        model.predict([])


def test_compile_names_the_optimizers_there_are():
    from minitensor.optimizers import Adam
    set_seed(0)
    model = small_unet((32, 32, 3), base_filters=2)
    with pytest.raises(ValueError, match="unknown optimizer 'sgd': minitensor has Adam only"):
        model.compile("sgd", "softmax_cross_entropy")
    with pytest.raises(TypeError, match="optimizer must be"):
        model.compile(3, "softmax_cross_entropy")
    assert isinstance(model.compile("Adam", "softmax_cross_entropy").optimizer, Adam)


def test_save_to_a_folder_names_the_path_and_the_fix(tmp_path):
    from minitensor import ModelFileError
    set_seed(0)
    model = small_unet((32, 32, 3), base_filters=2)
    with pytest.raises(ModelFileError, match=f"{tmp_path}: is a folder; give a file path such as "):
        model.save(tmp_path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("script", ["train.py", "predict.py"])
@pytest.mark.parametrize("variable, value, message", [
    ("MINITENSOR_CONV", "fastest", "MINITENSOR_CONV='fastest': expected one of auto, rules, winograd4"),
    ("MINITENSOR_KERNELS", "refrence", "MINITENSOR_KERNELS='refrence': expected 'reference'"),
])
def test_a_misspelt_setting_in_the_environment_is_a_message_with_status_2(script, variable, value, message):
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, variable: value}, timeout=120)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
