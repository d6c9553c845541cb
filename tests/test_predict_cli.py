"""predict.py as a user runs it: it never writes over its inputs or a file it did not write, says what it
skipped, and Ctrl-C is a one-line message with exit status 130 (real processes, a real SIGINT)."""
import os
import signal
import subprocess
import sys
import time

import cv2 as cv
import numpy as np
import pytest

import predict
from minitensor import set_seed
from unet import small_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "predict.py")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    set_seed(3)
    path = tmp_path_factory.mktemp("model") / "last.npz"
    small_unet((32, 32, 3), base_filters=2).save(path)
    return str(path)


def write_photo(path, height=20, width=24, seed=0):
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    assert cv.imwrite(str(path), image)
    return path.read_bytes()


def cli(*args, cwd=ROOT):
    result = subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    return result.returncode, result.stdout, result.stderr


def test_out_in_the_folder_of_a_png_input_is_refused_and_the_photo_kept(model_path, tmp_path):
    """The issue's own command: cd imgs; python predict.py last.npz photo.png --out ."""
    photo = write_photo(tmp_path / "photo.png")
    code, out, err = cli(model_path, "photo.png", "--out", ".", cwd=tmp_path)
    assert code == 2, err
    assert "Traceback" not in err
    assert "--out .: photo.png would be written over its own input photo.png" in err
    assert "give --out a folder" in err
    assert (tmp_path / "photo.png").read_bytes() == photo and os.listdir(tmp_path) == ["photo.png"]


@pytest.mark.parametrize("spelling", ["same folder", "dot-dot", "symlink", "hard link"])
def test_out_over_the_input_folder_is_refused_however_it_is_spelled(model_path, tmp_path, capsys, spelling):
    images = tmp_path / "imgs"
    images.mkdir()
    before = {name: write_photo(images / name, seed=i) for i, name in enumerate(["a.png", "b.png", "c.jpg"])}
    out = {"same folder": images, "dot-dot": images / ".." / "imgs", "symlink": tmp_path / "link"}.get(spelling)
    if spelling == "symlink":
        os.symlink(images, out)
    if spelling == "hard link":                          # another name for the same file: samefile sees it
        out = tmp_path / "out"
        out.mkdir()
        os.link(images / "b.png", out / "b.png")
    assert predict.main([model_path, str(images), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "b.png would be written over its own input" in err
    assert {name: (images / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(images)) == sorted(before)          # nothing written, not even c.png


def test_a_file_in_out_that_predict_did_not_write_is_kept(model_path, tmp_path, capsys):
    images, out = tmp_path / "imgs", tmp_path / "out"
    images.mkdir()
    out.mkdir()
    write_photo(images / "a.jpg")
    write_photo(images / "b.jpg", seed=1)
    (out / "a.png").write_bytes(b"the user's own a.png")
    assert predict.main([model_path, str(images), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'a.png'}: exists and is not a mask predict.py wrote" in err
    assert (out / "a.png").read_bytes() == b"the user's own a.png" and not (out / "b.png").exists()
    os.remove(out / "a.png")
    assert predict.main([model_path, str(images), "--out", str(out)]) == 0
    first = (out / "a.png").read_bytes()
    assert predict.main([model_path, str(images), "--out", str(out)]) == 0   # its own masks: replaced
    assert (out / "a.png").read_bytes() == first
    assert sorted(os.listdir(out)) == ["a.png", "b.png"]


def test_what_was_skipped_is_said(model_path, tmp_path, capsys):
    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    write_photo(images / "a.png")
    (images / "notes.txt").write_text("not an image")
    (images / "anim.gif").write_bytes(b"GIF89a")
    webp = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    (images / "c.webp").write_bytes(cv.imencode(".webp", webp)[1].tobytes())
    assert predict.main([model_path, str(images), "--out", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert "skipped 3 entries: anim.gif (not a supported image type), notes.txt (not a supported image type), " \
           "sub/ (a folder)" in err
    assert "segmented 2 of 2 images" in out and (tmp_path / "out" / "c.png").exists()


def test_ctrl_c_is_one_line_exit_130_and_the_masks_written_stay(model_path, tmp_path):
    images, out = tmp_path / "imgs", tmp_path / "out"
    images.mkdir()
    write_photo(images / "a_small.png")
    write_photo(images / "b_large.png", 1200, 1200, seed=1)      # some 1400 tiles: seconds of work
    process = subprocess.Popen([sys.executable, SCRIPT, model_path, str(images), "--out", str(out), "--quiet"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        first_line = process.stdout.readline()                   # a_small.png -> ...: b_large.png is under way
        assert "a_small.png ->" in first_line
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        rest, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "interrupted" in err and "1 of 2 masks written" in err
    assert sorted(os.listdir(out)) == ["a_small.png"]             # whole, and no temporary left
    assert cv.imread(str(out / "a_small.png")).shape == (20, 24, 3)
