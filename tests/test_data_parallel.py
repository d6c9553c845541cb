"""Data-parallel training under mpiexec: the same run as one process, one writer, no hangs, nothing lost.

Every test that needs ranks starts ``mpiexec -n 2`` itself (2 ranks, one thread each: CI has 2
cores), in its own process group, with a timeout well below CI's; on a timeout the whole group is
killed, so nothing is left running.
"""
import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import train
from minitensor import distributed
from minitensor.checkpoint import read_checkpoint
from minitensor.cpu_runtime import threads_per_rank
from unet.augment import Augmenter
from unet.trainer import rank_slice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = os.path.join(ROOT, "tests", "mpi_programs")
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
try:
    import mpi4py  # noqa: F401  (only whether it is installed)
    MISSING = None if MPIEXEC else "no mpiexec next to this Python or on PATH (pip install -e '.[mpi]')"
except ImportError:
    MISSING = "mpi4py is not installed (pip install -e '.[mpi]')"
needs_mpi = pytest.mark.skipif(MISSING is not None, reason=f"data-parallel tests need MPI: {MISSING}")

# A tiny run: 34 training images in batches of 5 (the last one 4), 2 epochs in a few seconds.
RUN = ["--num-images", "46", "--num-val", "8", "--num-test", "4", "--image-size", "32", "--batch-size", "5",
       "--augment", "elastic", "--quiet", "--seed", "5"]


def launch(args, ranks=2, timeout=120, env=None, wait=True):
    """``mpiexec -n ranks python args...`` in its own process group; returns the Popen (finished if ``wait``)."""
    command = [MPIEXEC, "-n", str(ranks), sys.executable, *args]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})
    if wait:
        finish(process, timeout)
    return process


def finish(process, timeout):
    try:
        process.out, process.err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.out, process.err = process.communicate()
        pytest.fail(f"{process.args} did not end within {timeout} s:\n{process.out[-2000:]}\n{process.err[-3000:]}")
    return process


def folders(tmp_path, name):
    return ["--data", str(tmp_path / "shape"), "--weights-dir", str(tmp_path / name / "w"),
            "--results-dir", str(tmp_path / name / "r")]


def history(tmp_path, name):
    with open(tmp_path / name / "r" / "history.csv") as f:
        return [{key: float(row[key]) for key in ("epoch", "loss", "val_loss", "lr")} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, 3 epochs, uninterrupted: what every data-parallel run below must end like."""
    tmp_path = tmp_path_factory.mktemp("dp")
    assert train.main(RUN + ["--epochs", "3"] + folders(tmp_path, "one")) == 0
    return tmp_path, history(tmp_path, "one")


def assert_same_run(rows, expected, rtol=2e-4):
    assert [row["epoch"] for row in rows] == [row["epoch"] for row in expected]
    for row, want in zip(rows, expected):
        for key in ("loss", "val_loss", "lr"):
            assert row[key] == pytest.approx(want[key], rel=rtol), (key, row, want)


# ----- no MPI needed ---------------------------------------------------------------------------------

def test_rank_slices_partition_every_batch_in_order():
    for size in range(1, 6):
        for ranks in (1, 2, 3, 4):
            ids = np.arange(10, 10 + size)
            parts = [rank_slice(ids, rank, ranks) for rank in range(ranks)]
            assert np.array_equal(np.concatenate(parts), ids)
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_per_sample_streams_do_not_depend_on_how_the_batch_is_split():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(4, 32, 32, 3)).astype(np.float32)
    masks = rng.integers(0, 4, size=(4, 32, 32)).astype(np.uint8)
    keys = [(2, 11), (2, 12), (2, 13), (2, 14)]
    whole = Augmenter(seed=9)(images, masks, keys=keys)
    halves = [Augmenter(seed=9)(images[part], masks[part], keys=keys[part]) for part in (slice(0, 1), slice(1, 4))]
    for index in range(2):
        assert np.array_equal(whole[index], np.concatenate([half[index] for half in halves]))
    other_epoch = Augmenter(seed=9)(images, masks, keys=[(3, i) for _, i in keys])
    assert not np.array_equal(whole[0], other_epoch[0])       # a new epoch, new deformations
    with pytest.raises(ValueError, match="one key per sample"):
        Augmenter(seed=9)(images, masks, keys=keys[:2])


def test_the_launcher_is_read_from_the_environment():
    assert distributed.launched_ranks({}) == 1 and distributed.launched_rank({}) == 0
    assert distributed.launched_ranks({"PMI_SIZE": "4", "PMI_RANK": "3"}) == 4
    assert distributed.launched_rank({"OMPI_COMM_WORLD_RANK": "2"}) == 2
    assert threads_per_rank({}) is None
    assert threads_per_rank({"MPI_LOCALNRANKS": "2"}) == max(1, len(os.sched_getaffinity(0)) // 2)
    world = distributed.make_world(None)
    assert world.size == 1 and world.is_writer and world.allreduce_sum(np.ones(3)).tolist() == [1, 1, 1]


def test_distributed_outside_mpiexec_and_without_mpi4py_are_clear_errors(tmp_path, capsys, monkeypatch):
    for name in distributed.SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert train.main(RUN + ["--epochs", "1", "--distributed"] + folders(tmp_path, "x")) == 2
    assert "not started by an MPI launcher; run it as mpiexec -n N" in capsys.readouterr().err
    blocked = tmp_path / "blocked"
    (blocked / "mpi4py").mkdir(parents=True)
    (blocked / "mpi4py" / "__init__.py").write_text("raise ImportError('No module named mpi4py (blocked)')\n")
    result = subprocess.run([sys.executable, "train.py", "--epochs", "1", *folders(tmp_path, "y")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": f"{blocked}{os.pathsep}{ROOT}", "PMI_SIZE": "2",
                                 "PMI_RANK": "0"})
    assert result.returncode == 2, result.stderr
    assert "started by mpiexec with 2 ranks, but mpi4py cannot be imported" in result.stderr
    assert "pip install -e '.[mpi]'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "y").exists()                     # refused before anything was written


# ----- under mpiexec -------------------------------------------------------------------------------

@needs_mpi
def test_one_step_on_two_ranks_is_one_process_on_the_whole_batch(tmp_path):
    sys.path.insert(0, PROGRAMS)
    import one_step
    run = launch([os.path.join(PROGRAMS, "one_step.py"), str(tmp_path)], timeout=120)
    assert run.returncode == 0, run.err[-3000:]
    for dtype, batch in one_step.CASES:
        saved = np.load(tmp_path / f"{dtype}-{batch}.npz")
        model = one_step.build(dtype)
        images, masks, weights = one_step.case_batch(dtype, batch)
        loss = model.compute_gradients(images, masks, weights)
        grads = [np.array(g) for g in model.grads]
        model.optimizer.step(model.params, model.grads)
        tolerance = 1e-12 if dtype == "float64" else 2e-6
        assert float(saved["loss"]) == pytest.approx(float(loss), rel=tolerance)
        for index, grad in enumerate(grads):
            difference = np.max(np.abs(saved[f"grad{index}"] - grad)) / (np.max(np.abs(grad)) + 1e-30)
            assert difference <= tolerance, (dtype, batch, index, difference)
        for index, weight in enumerate(model.params):
            # Adam's first step moves each weight by about lr = 1e-3 in the gradient's sign: the
            # gradients' agreement carries over (within 0.1% of a step in float32, where a gradient near
            # Adam's epsilon turns its rounding into a larger change of the step).
            assert np.allclose(saved[f"weight{index}"], weight, rtol=0, atol=1e-14 if dtype == "float64" else 1e-6)
    sys.path.remove(PROGRAMS)


@needs_mpi
def test_two_ranks_train_as_one_process_and_the_run_moves_between_rank_counts(reference):
    tmp_path, expected = reference
    assert train.main(RUN + ["--epochs", "1"] + folders(tmp_path, "mixed")) == 0               # 1 process
    second = launch(["train.py", *RUN, "--epochs", "2", "--resume", *folders(tmp_path, "mixed")])   # 2 ranks
    assert second.returncode == 0, second.err[-3000:]
    assert second.out.count("Epoch 2/2 - loss") == 1                # one rank logs
    assert "data-parallel: 2 ranks" in second.out
    assert train.main(RUN + ["--epochs", "3", "--resume"] + folders(tmp_path, "mixed")) == 0   # 1 process
    assert_same_run(history(tmp_path, "mixed"), expected)


@needs_mpi
def test_killing_one_rank_ends_the_job_and_the_checkpoint_resumes(reference):
    tmp_path, expected = reference
    run = launch(["train.py", *RUN, "--epochs", "3", "--checkpoint-minutes", "0", *folders(tmp_path, "kill")],
                 wait=False)
    checkpoint = tmp_path / "kill" / "w" / "last.npz"
    deadline = time.monotonic() + 90
    while not checkpoint.exists() and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
    victim = next(pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                  if _is_rank(pid, 1, str(tmp_path / "kill")))
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    finish(run, timeout=60)
    assert run.returncode != 0 and time.monotonic() - killed_at < 30
    assert read_checkpoint(str(checkpoint)).extra["batch"] >= 0     # intact: it reads as a checkpoint
    again = launch(["train.py", *RUN, "--epochs", "3", "--resume", *folders(tmp_path, "kill")])
    assert again.returncode == 0, again.err[-3000:]
    assert_same_run(history(tmp_path, "kill"), expected)            # 3 epochs on 2 ranks: the 1-process run
    for folder in ("w", "r"):                                       # one writer: the files of one process
        assert sorted(os.listdir(tmp_path / "kill" / folder)) == sorted(os.listdir(tmp_path / "one" / folder))


def _is_rank(pid, rank, marker):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read().split(b"\0")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read()
    except OSError:
        return False
    return f"PMI_RANK={rank}".encode() in environ and marker.encode() in command and b"train.py" in command


@needs_mpi
def test_an_error_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    run = launch([os.path.join(PROGRAMS, "train_with_fault.py"), "unreadable", "1", "3", "--", *RUN,
                  "--epochs", "2", *folders(tmp_path, "error")], timeout=90)
    assert run.returncode == 2, run.err[-3000:]
    assert "rank 1: error:" in run.err and "cannot be decoded as an image" in run.err
    assert "Traceback" not in run.err


@needs_mpi
def test_a_signal_on_one_rank_stops_all_after_the_same_batch_and_saves_once(reference):
    tmp_path, expected = reference
    run = launch([os.path.join(PROGRAMS, "train_with_fault.py"), "sigint", "1", "4", "--", *RUN,
                  "--epochs", "3", *folders(tmp_path, "signal")], timeout=90)
    assert run.returncode == 130, run.err[-3000:]
    assert run.out.count("stopped: saved") == 1
    saved = read_checkpoint(str(tmp_path / "signal" / "w" / "last.npz")).extra
    assert (saved["epoch"], saved["batch"]) == (0, 4)
    again = launch(["train.py", *RUN, "--epochs", "3", "--resume", *folders(tmp_path, "signal")])
    assert again.returncode == 0, again.err[-3000:]
    assert_same_run(history(tmp_path, "signal"), expected)


@needs_mpi
@pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU stand-in for CuPy compiles the CUDA kernels with g++")
def test_two_gpu_ranks_sum_with_nccl_on_the_standin(reference):
    tmp_path, expected = reference
    env = {"PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "tests", "standin_site"), os.path.join(ROOT, "tests"),
                                          ROOT]), "CUPY_STANDIN_DEVICES": "2", "MINITENSOR_REQUIRE_GPU": "1"}
    run = launch(["train.py", *RUN, "--epochs", "1", "--device", "gpu", *folders(tmp_path, "nccl")], env=env, timeout=240)
    assert run.returncode == 0, run.err[-3000:]
    assert "device: gpu" in run.out
    assert_same_run(history(tmp_path, "nccl"), expected[:1])
    one_gpu = launch(["train.py", *RUN, "--epochs", "1", "--device", "gpu", *folders(tmp_path, "nccl1")],
                     env={**env, "CUPY_STANDIN_DEVICES": "1"}, timeout=60)
    assert one_gpu.returncode == 2 and "2 ranks on this machine but 1 GPU" in one_gpu.err


def test_a_checkpoint_with_the_old_sequential_augmentation_stream_goes_on_with_it(tmp_path, monkeypatch):
    """Checkpoints written before per-sample streams hold the augmenter's one generator: a resumed
    run keeps drawing from it (so it ends as it would have), in one process; sharing it out is refused."""
    argv = RUN + ["--epochs", "2"] + folders(tmp_path, "old")

    def stop_after_two(trainer):
        if trainer.state.batch == 2:
            trainer.stop.requested = True
    assert train.main(argv, on_batch_end=stop_after_two) == 130
    path = tmp_path / "old" / "w" / "last.npz"
    arrays = dict(np.load(path))
    extra = json.loads(str(arrays["extra"]))
    assert extra["augmenter"] == {"streams": "per-sample", "seed": 6}      # --seed 5, the augmenter's is 6
    extra["augmenter"] = Augmenter(seed=6).get_state()                      # the earlier format
    arrays["extra"] = np.array(json.dumps(extra))
    np.savez(path, **arrays)

    seen = []
    monkeypatch.setattr(Augmenter, "__call__", _recording(Augmenter.__call__, seen))
    assert train.main(argv + ["--resume"]) == 0
    assert seen and all(keys is None for keys in seen)                   # the sequential stream, as before

    class TwoRanks(distributed.SingleProcess):
        size = 2
    with contextlib.ExitStack() as stack, pytest.raises(train.CheckpointError,
                                                        match="cannot be shared out over 2 processes; resume it in one"):
        train.prepare(train.parse_args(argv + ["--resume"]), stack, world=TwoRanks())


def _recording(call, seen):
    def recorded(self, images, masks, weights=None, keys=None):
        seen.append(keys)
        return call(self, images, masks, weights, keys=keys)
    return recorded
