"""Fault injection: stop train.py in every way it can stop, resume, and end bit for bit where an
uninterrupted run ends.

Tiny runs: 24 images of 32 px (16 train, 4 val, 4 test), batch 4, so an epoch is 4 batches and
3 epochs are 12. "The same end" means: every weight and every optimizer array of the final
last.npz, the epNNN checkpoint files, and history.csv's epoch, loss, val_loss and lr columns
(its two timing columns are wall-clock measurements). After every resumed run no temporary file
of an interrupted save may be left in the weights folder.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import train
from minitensor import Model
from minitensor.files import atomic_savez, read_npz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num-images", "24", "--num-val", "4", "--num-test", "4", "--image-size", "32", "--batch-size", "4",
        "--epochs", "3", "--quiet"]
BATCHES_PER_EPOCH = 4
VARIANTS = {"plain": [], "augmented": ["--augment", "elastic", "--loss", "weighted"]}


def argv_of(tmp_path, name, *extra):
    return TINY + ["--data", str(tmp_path.parent / "shape"), "--weights-dir", str(tmp_path / name / "UNet_weight"),
                   "--results-dir", str(tmp_path / name / "UNet_test_result"), *extra]


def run(tmp_path, name, *extra, on_batch_end=None):
    return train.main(argv_of(tmp_path, name, *extra), on_batch_end=on_batch_end)


def outcome(run_dir):
    """What must not depend on how the run was stopped: arrays, checkpoint names, history columns."""
    weights_dir = run_dir / "UNet_weight"
    arrays = {key: value for key, value in read_npz(weights_dir / "last.npz").items()
              if key.startswith(("weights/", "optimizer/"))}
    checkpoints = {path.name: {k: v for k, v in read_npz(path).items() if k.startswith("weights/")}
                   for path in sorted([*weights_dir.glob("ep*.npz"), *weights_dir.glob("best.npz")])}
    history = [row.split(",")[:4] for row in (run_dir / "UNet_test_result" / "history.csv").read_text().splitlines()]
    return arrays, checkpoints, history


def assert_same_end(reference_dir, run_dir, best=True):
    reference, resumed = outcome(reference_dir), outcome(run_dir)
    if not best:
        reference[1].pop("best.npz", None), resumed[1].pop("best.npz", None)
    assert resumed[2] == reference[2], "history.csv differs"
    assert resumed[1].keys() == reference[1].keys(), "other epNNN / best checkpoints"
    for name, weights in reference[1].items():
        for key, value in weights.items():
            np.testing.assert_array_equal(resumed[1][name][key], value, err_msg=f"{name} {key}")
    assert resumed[0].keys() == reference[0].keys()
    for key, value in reference[0].items():
        np.testing.assert_array_equal(resumed[0][key], value, err_msg=key)
    assert not list((run_dir / "UNet_weight").glob(".tmp-*")), "a temporary file was left behind"


def uninterrupted(tmp_path_factory, variant):
    """(variant flags, folder of the uninterrupted run)."""
    base = tmp_path_factory.mktemp("faults") / variant
    base.mkdir()
    flags = VARIANTS[variant]
    assert train.main(argv_of(base, "straight", *flags)) == 0
    return flags, base


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Every way of stopping, on the seed's plain training."""
    return uninterrupted(tmp_path_factory, "plain")


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def each_variant(request, tmp_path_factory):
    """Plain, and with the elastic augmenter and border weights (their generators and caches resume too)."""
    return uninterrupted(tmp_path_factory, request.param)


def stop_at(*global_batches):
    """An on_batch_end hook that asks to stop (as Ctrl-C does) after these batches (counted from 1
    over the whole run, also across resumes)."""
    def hook(trainer):
        done = trainer.state.epoch * BATCHES_PER_EPOCH + trainer.state.batch
        if done in global_batches:
            trainer.stop.requested = True
    return hook


# batch 2 and 11: mid-epoch; 4 and 8: the last batch of epochs 1 and 2 (validation, then the stop). The
# default run keeps one of each kind (2 and 8); 4 and 11, the same kinds in other epochs, run with -m slow.
@pytest.mark.parametrize("stop_after", [2, pytest.param(4, marks=pytest.mark.slow), 8,
                                        pytest.param(11, marks=pytest.mark.slow)])
def test_stop_after_any_batch_then_resume(each_variant, stop_after):
    flags, base = each_variant
    work = base / f"stop{stop_after}"
    assert run(base, work.name, *flags, on_batch_end=stop_at(stop_after)) == 130
    assert not (work / "UNet_test_result" / "metrics.json").exists()
    assert run(base, work.name, *flags, "--resume") == 0
    assert_same_end(base / "straight", work)


def test_stopped_three_times(reference, capsys):
    flags, base = reference
    hook = stop_at(1, 4, 7)
    for resume in ([], ["--resume"], ["--resume"]):
        assert run(base, "thrice", *flags, *resume, on_batch_end=hook) == 130
    assert run(base, "thrice", *flags, "--resume") == 0
    assert "resumed from" in capsys.readouterr().out
    assert_same_end(base / "straight", base / "thrice")


def test_max_minutes_then_resume(reference, capsys):
    """The issue's reproduction: --max-minutes ends after epoch 1 (and predicts); --resume goes on."""
    flags, base = reference
    assert run(base, "budget", *flags, "--max-minutes", "0.0001") == 0
    assert "--max-minutes 0.0001: stopping after epoch 1" in capsys.readouterr().out
    assert len((base / "budget" / "UNet_test_result" / "history.csv").read_text().splitlines()) == 2
    assert run(base, "budget", *flags, "--resume") == 0
    assert_same_end(base / "straight", base / "budget")


def test_sigint_during_validation(reference, monkeypatch):
    flags, base = reference
    real_test_step = Model.test_step
    sent = []

    def interrupted_validation(self, *args, **kwargs):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)         # the real signal, through train.py's handler
        return real_test_step(self, *args, **kwargs)

    monkeypatch.setattr(Model, "test_step", interrupted_validation)
    assert run(base, "val", *flags) == 130
    monkeypatch.setattr(Model, "test_step", real_test_step)
    assert (base / "val" / "UNet_weight" / "last.npz").exists()
    assert run(base, "val", *flags, "--resume") == 0
    assert_same_end(base / "straight", base / "val")


def test_sigint_mid_epoch(reference):
    flags, base = reference

    def hook(trainer):
        if trainer.state.epoch == 1 and trainer.state.batch == 1:
            os.kill(os.getpid(), signal.SIGINT)
    assert run(base, "sigint", *flags, on_batch_end=hook) == 130
    assert run(base, "sigint", *flags, "--resume") == 0
    assert_same_end(base / "straight", base / "sigint")


def test_a_failed_checkpoint_write_keeps_the_previous_one(reference, monkeypatch, capsys):
    """A failure between the temporary write and the rename (a full disk, say): exit 2, a message,
    no temporary file, and the previous checkpoint resumes exactly."""
    flags, base = reference
    real_replace = os.replace
    saves = []

    def failing_replace(source, destination):
        if str(destination).endswith("last.npz"):
            saves.append(destination)
            if len(saves) == 2:
                raise OSError(28, "No space left on device", str(destination))
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", failing_replace)
    assert run(base, "full", *flags) == 2
    monkeypatch.setattr(os, "replace", real_replace)
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--resume" in err and "Traceback" not in err
    assert not list((base / "full" / "UNet_weight").glob(".tmp-*"))
    assert run(base, "full", *flags, "--resume") == 0
    assert_same_end(base / "straight", base / "full")


def test_a_checkpoint_without_the_best_epoch_resumes_exactly(reference, capsys):
    """Checkpoints from before best.npz lack best_val_loss and best_epoch: the run resumes bit for
    bit, and the best so far is taken from its history."""
    flags, base = reference
    assert run(base, "old", *flags, on_batch_end=stop_at(4)) == 130          # saved at the end of epoch 1
    path = base / "old" / "UNet_weight" / "last.npz"
    arrays = read_npz(path)
    extra = json.loads(str(arrays["extra"]))
    del extra["best_val_loss"], extra["best_epoch"]
    arrays["extra"] = np.array(json.dumps(extra))
    atomic_savez(path, arrays)
    (base / "old" / "UNet_weight" / "best.npz").unlink()
    assert run(base, "old", *flags, "--resume") == 0
    assert_same_end(base / "straight", base / "old", best=False)


KILLER = textwrap.dedent("""
    import os, signal, sys
    import train
    argv, mode, when = sys.argv[3:], sys.argv[1], int(sys.argv[2])
    if mode == "batch":          # SIGKILL after the when-th batch, as kill -9 from outside would
        def hook(trainer):
            if trainer.state.epoch * 4 + trainer.state.batch == when:
                os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(train.main(argv, on_batch_end=hook))
    real_replace, saves = os.replace, []
    def replace(source, destination):   # SIGKILL in the when-th save of last.npz, before its rename
        if str(destination).endswith("last.npz"):
            saves.append(1)
            if len(saves) == when:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(source, destination)
    os.replace = replace
    sys.exit(train.main(argv))
""")


def killed(base, name, flags, mode, when, *extra):
    result = subprocess.run([sys.executable, "-c", KILLER, mode, str(when), *argv_of(base, name, *flags, *extra)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


# The augmented run takes every kind of kill; the plain one only the kill inside a save, its two kills
# between batches (the same code, fewer generators to resume) run with -m slow (the suite's time budget).
KILLS = [("batch", 6, []),                                   # falls back to the epoch-1 checkpoint
         ("batch", 6, ["--checkpoint-minutes", "0"]),        # a checkpoint after every batch: loses nothing
         ("save", 3, ["--checkpoint-minutes", "0"])]         # killed inside the third save, before its rename


@pytest.mark.parametrize("each_variant,mode,when,extra",
                         [("augmented", *kill) for kill in KILLS]
                         + [pytest.param("plain", *kill, marks=pytest.mark.slow) for kill in KILLS[:2]]
                         + [("plain", *KILLS[2])], indirect=["each_variant"])
def test_sigkill_then_resume(each_variant, mode, when, extra, capsys):
    flags, base = each_variant
    name = f"kill-{mode}-{when}-{len(extra)}"
    killed(base, name, flags, mode, when, *extra)
    weights_dir = base / name / "UNet_weight"
    left = list(weights_dir.glob(".tmp-*.npz"))
    assert bool(left) == (mode == "save")               # a kill mid-save leaves its temporary file
    assert run(base, name, *flags, "--resume", *extra) == 0
    out = capsys.readouterr().out
    if mode == "save":
        assert f"removed {left[0]}, a partial file left by an interrupted save" in out
        assert "resumed from" in out and "epoch 1, batch 2" in out
    elif extra:
        assert "epoch 2, batch 1" in out                 # the checkpoint of batch 5 (the kill came before 6's)
    else:
        assert "epoch 2, batch 0" in out
    assert_same_end(base / "straight", base / name)


# ----- stop signals from outside: real processes, real signals --------------------------------------

SLOW = textwrap.dedent("""
    import sys, time
    import train
    def hook(trainer):                      # slow enough for a signal to arrive mid-run; says where it is
        print(f"batch {trainer.state.epoch * 4 + trainer.state.batch}", file=sys.stderr, flush=True)
        time.sleep(0.3)
    sys.exit(train.main(sys.argv[1:], on_batch_end=hook))
""")


def slow_run(argv, **popen):
    return subprocess.Popen([sys.executable, "-u", "-c", SLOW, *argv], cwd=ROOT, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, **popen)


def wait_for_batch(process, batch):
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.strip() == f"batch {batch}":
            return lines
    pytest.fail(f"the run ended before batch {batch}: {''.join(lines)[-2000:]}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_save_and_resume_exactly(reference, signum, capsys):
    """What `timeout`, `docker stop`, a scheduler (SIGTERM) or a closed terminal (SIGHUP) send is
    treated as Ctrl-C: the batch ends, a checkpoint is saved, the status is 128 + the signal."""
    flags, base = reference
    name = f"signal{int(signum)}"
    process = slow_run(argv_of(base, name, *flags))
    try:
        wait_for_batch(process, 6)
        process.send_signal(signum)
        err = process.stderr.read()
        assert process.wait(timeout=120) == 128 + signum, err[-2000:]
    finally:
        process.kill()
    assert "Traceback" not in err
    if signum == signal.SIGTERM:
        assert "SIGTERM: stopping after this batch and saving a checkpoint" in err
    assert run(base, name, *flags, "--resume") == 0
    assert "epoch 2, batch 2" in capsys.readouterr().out
    assert_same_end(base / "straight", base / name)


def test_an_ignored_sighup_stays_ignored(reference):
    """Under nohup SIGHUP is ignored from the start; the run must not start handling it."""
    flags, base = reference
    process = slow_run(argv_of(base, "nohup", *flags, "--epochs", "1"),
                       preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        wait_for_batch(process, 2)
        process.send_signal(signal.SIGHUP)
        err = process.stderr.read()
        assert process.wait(timeout=120) == 0, err[-2000:]
    finally:
        process.kill()


def test_a_closed_output_pipe_stops_quietly_and_resumes_exactly(reference):
    """`train.py | head`: once the reader is gone, the run saves after the batch and exits 141
    without a message or a traceback; --resume ends as an uninterrupted run."""
    flags, base = reference
    process = subprocess.Popen([sys.executable, "-u", "train.py", *argv_of(base, "pipe", *flags)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:
            if line.startswith("Epoch 1/3"):
                break
        process.stdout.close()                  # as head does after its lines
        err = process.stderr.read()
        assert process.wait(timeout=120) == 141, err[-2000:]
    finally:
        process.kill()
    assert "Traceback" not in err and "error" not in err, err[-2000:]
    assert (base / "pipe" / "UNet_weight" / "last.npz").exists()
    assert not (base / "pipe" / "UNet_test_result" / "metrics.json").exists()
    assert run(base, "pipe", *flags, "--resume") == 0
    assert_same_end(base / "straight", base / "pipe")


def test_one_run_per_folder_and_a_live_runs_save_is_not_cleaned_up(reference, capsys):
    """A second train.py on a folder in use is refused with the holder's pid, and deletes nothing of
    it: a temporary file of the live run's is kept; one of a dead process is removed at the next start."""
    flags, base = reference
    process = slow_run(argv_of(base, "busy", *flags))
    weights_dir = base / "busy" / "UNet_weight"
    try:
        wait_for_batch(process, 1)
        live = weights_dir / f".tmp-{process.pid}-inprogress.npz"
        live.write_bytes(b"a save in progress")
        assert run(base, "busy", *flags, "--resume") == 2
        err = capsys.readouterr().err
        assert f"--weights-dir {weights_dir}: in use by a training run (pid {process.pid}," in err
        assert "one run per folder" in err
        assert run(base, "busy", *flags, "--start-over") == 2     # refused before deleting anything
        assert live.exists()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 143
    finally:
        process.kill()
    live.rename(weights_dir / ".tmp-999999999-dead.npz")          # no such process
    assert run(base, "busy", *flags, "--resume") == 0
    assert "removed " in capsys.readouterr().out
    assert_same_end(base / "straight", base / "busy")
