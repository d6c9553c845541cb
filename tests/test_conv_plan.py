"""The measured plan behind 'auto' (minitensor/kernels/conv_plan.py): its trials, its decisions, its cache
file and its place in a training checkpoint."""
import json
import os
import stat

import numpy as np
import pytest

from minitensor import kernels
from minitensor.kernels import ConvGeometry, conv_plan

SAME_3X3 = ConvGeometry(3, 3, 1, 1, 1, 1, 16, 16)


@pytest.fixture(autouse=True)
def fresh_plan(tmp_path, monkeypatch, fast_kernels):
    """'auto' with an empty plan and a cache folder of this test's own."""
    monkeypatch.setenv("MINITENSOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MPI_LOCALNRANKS", raising=False)
    monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_SIZE", raising=False)
    conv_plan.reset()
    with kernels.conv_algorithm("auto"):
        yield tmp_path / "cache"
    conv_plan.reset()


def forward_key(n=2, size=16, channels=8, out_channels=8, dtype="float32", geometry=SAME_3X3):
    return conv_plan.key("forward", geometry, (n, size, size, channels), out_channels, dtype)


def test_keys_name_the_product_its_shapes_and_dtype():
    assert forward_key() == "forward float32 2x16x16x8 oc8 k3x3 s1x1 pad1,1 out16x16"
    assert conv_plan.key("kernel_grad", ConvGeometry(5, 5, 1, 1, 0, 0, 12, 12), (1, 16, 16, 3), 4, np.float64) == \
        "kernel_grad float64 1x16x16x3 oc4 k5x5 s1x1 pad0,0 out12x12"


def test_the_candidates_are_what_can_run_the_product():
    assert conv_plan.candidates(forward_key(), "winograd4") == ["winograd4", "gemm", "direct", "winograd"]
    dw = conv_plan.key("kernel_grad", SAME_3X3, (2, 16, 16, 8), 8, "float32")
    assert conv_plan.candidates(dw, "gemm") == ["gemm", "direct", "winograd", "winograd4"]
    wide = conv_plan.key("kernel_grad", SAME_3X3, (2, 16, 16, 1024), 1024, "float32")     # dU sums of 151 MiB
    assert conv_plan.candidates(wide, "gemm") == ["gemm", "direct", "winograd"]
    five = conv_plan.key("forward", ConvGeometry(5, 5, 1, 1, 2, 2, 16, 16), (2, 16, 16, 8), 8, "float32")
    assert conv_plan.candidates(five, "gemm") == ["gemm", "direct"]
    assert not conv_plan.valid(five, "winograd") and not conv_plan.valid(wide, "winograd4")
    assert not conv_plan.valid("nonsense", "gemm") and not conv_plan.valid(forward_key(), "fastest")
    with pytest.raises(ValueError, match="cannot run"):
        conv_plan.candidates(five, "winograd")


def test_the_trials_run_a_fixed_sequence_then_decide_by_the_times():
    """First call untimed (the rules' choice), then every candidate once, the rules' choice first; then the
    rules' choice and its fastest rival to three times each; then the verdict."""
    plan, entry = conv_plan.current(), forward_key()
    speed = {"winograd4": 1.0, "gemm": 3.0, "direct": 2.0, "winograd": 0.5}
    sequence = []
    while entry not in plan.decided:
        algorithm, trial = plan.choose(entry, "winograd4")
        assert plan.choose(entry, "winograd4")[0] == algorithm          # asking again changes nothing
        sequence.append(algorithm if trial else f"({algorithm})")
        if trial:
            trial.record(speed[algorithm])
    assert sequence == ["(winograd4)", "winograd4", "gemm", "direct", "winograd",
                        "winograd4", "winograd4", "winograd", "winograd"]
    assert plan.decided[entry] == "winograd" and plan.choose(entry, "winograd4") == ("winograd", None)
    assert conv_plan.settled() and conv_plan.summary()["tried"] == 1
    # each trial's time beyond the fastest the key had shown before it: gemm 2, direct 1, winograd4 0.5 twice
    assert conv_plan.summary()["extra_seconds"] == pytest.approx(4.0)


@pytest.mark.parametrize("rival, expected", [(0.95, "winograd4"), (0.9, "winograd")])
def test_the_rules_choice_stays_unless_another_is_clearly_faster(rival, expected):
    times = {"winograd4": [1.0, 1.1], "winograd": [rival, 1.2], "gemm": [3.0]}
    assert conv_plan.decide(times, "winograd4") == expected          # MARGIN is 8%


def test_a_trial_of_code_not_yet_run_here_runs_it_once_untimed_first(monkeypatch):
    from minitensor.kernels import conv

    plan, entry = conv_plan.current(), forward_key()
    plan.choose(entry, "gemm")                                        # the first, untimed call
    algorithm, trial = plan.choose(entry, "gemm")
    assert (algorithm, trial.cold) == ("gemm", False)                 # gemm just ran for this product
    calls = []
    monkeypatch.setattr(trial, "record", lambda seconds: calls.append(("recorded", seconds)))
    assert conv._run(trial, lambda: calls.append("ran") or 7) == 7 and calls[0] == "ran" and len(calls) == 2
    plan.record(entry, "gemm", "gemm", 1.0)
    algorithm, trial = plan.choose(entry, "gemm")
    assert (algorithm, trial.cold) == ("direct", True)
    calls.clear()
    monkeypatch.setattr(trial, "record", lambda seconds: calls.append("recorded"))
    conv._run(trial, lambda: calls.append("ran"))
    assert calls == ["ran", "ran", "recorded"]


def test_auto_on_real_calls_runs_each_candidate_and_gives_its_exact_result(fresh_plan):
    """Through kernels.conv2d_forward: every call (trial or not) gives exactly the bits of the algorithm the
    plan named for it, the trials visit every candidate, and the decision lands in the cache file."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 16)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)
    entry = conv_plan.key("forward", SAME_3X3, x.shape, 16, "float32")
    seen = set()
    for _ in range(20):
        algorithm = kernels.conv_algorithm_of("conv2d_forward", x, kernel, None, SAME_3X3)
        y = kernels.conv2d_forward(x, kernel, None, SAME_3X3)
        np.testing.assert_array_equal(y, kernels.conv2d_forward(x, kernel, None, SAME_3X3, algorithm=algorithm))
        seen.add(algorithm)
    assert seen == set(conv_plan.candidates(entry, "gemm")) and conv_plan.settled()
    with open(conv_plan.cache_path()) as file:
        written = json.load(file)
    assert written["entries"] == {entry: conv_plan.current().decided[entry]}
    assert written["machine"]["numba_threads"] == conv_plan.machine()["numba_threads"]
    assert os.path.dirname(conv_plan.cache_path()) == str(fresh_plan)


def test_a_later_process_reads_the_plan_and_tries_nothing(fresh_plan):
    entry = forward_key()
    plan = conv_plan.current()
    plan.choose(entry, "winograd4")
    for algorithm in ("winograd4", "gemm", "direct", "winograd", "winograd4", "winograd4", "gemm", "gemm"):
        chosen, trial = plan.choose(entry, "winograd4")
        assert chosen == algorithm
        trial.record({"gemm": 0.5}.get(algorithm, 1.0))
    assert plan.decided[entry] == "gemm"
    mode = stat.S_IMODE(os.stat(conv_plan.cache_path()).st_mode)
    umask = os.umask(0o022)
    os.umask(umask)
    assert mode == 0o666 & ~umask                                     # not mkstemp's private 0600
    conv_plan.reset()                                                 # as a new process
    assert conv_plan.current().choose(entry, "winograd4") == ("gemm", None)
    assert conv_plan.summary()["tried"] == 0


def test_another_machine_kind_has_another_file(monkeypatch):
    mine = conv_plan.cache_path()
    monkeypatch.setattr(conv_plan.cpu_runtime, "cpu_identity",
                        lambda: {"cpu_model": "Intel Xeon", "cpu_family_model": "6/167", "vector_isa": "AVX-512"})
    assert conv_plan.cache_path() != mine


def test_other_blas_kernels_have_another_file(monkeypatch):
    """OPENBLAS_CORETYPE=Haswell on an AVX-512 CPU halves GEMM's speed: its timings are not the default's. The
    core OpenBLAS reports follows the variable (read in a new process: OpenBLAS reads it when it loads)."""
    import subprocess
    import sys

    from minitensor import cpu_runtime

    core = cpu_runtime.blas_core()
    if core is None:
        pytest.skip("NumPy's BLAS here is not OpenBLAS")
    mine = conv_plan.cache_path()
    monkeypatch.setattr(conv_plan.cpu_runtime, "blas_core", lambda: "Sandybridge" if core != "Sandybridge" else "Haswell")
    assert conv_plan.cache_path() != mine
    import platform
    if platform.machine() != "x86_64":
        return                                   # OPENBLAS_CORETYPE's names here are x86's
    probe = "import minitensor.cpu_runtime as c; print(c.blas_core())"
    forced = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "OPENBLAS_CORETYPE": "Sandybridge"})
    assert forced.stdout.strip() == "Sandybridge", forced.stderr


def test_an_unreadable_cache_is_warned_about_and_rewritten(fresh_plan):
    os.makedirs(fresh_plan)
    with open(conv_plan.cache_path(), "w") as file:
        file.write("{ half a file")
    with pytest.warns(conv_plan.PlanWarning, match="unreadable"):
        assert conv_plan.current().choose(forward_key(), "gemm") == ("gemm", None)
    _decide(forward_key(), "gemm")
    assert json.load(open(conv_plan.cache_path()))["entries"] == {forward_key(): "gemm"}


def test_an_unwritable_cache_folder_is_one_warning_and_training_goes_on(fresh_plan):
    fresh_plan.parent.joinpath("cache").write_text("a file where the folder should be")
    with pytest.warns(conv_plan.PlanWarning) as caught:          # it cannot be read either
        _decide(forward_key(), "gemm")
    assert [w for w in caught if "cannot write the convolution plan cache" in str(w.message)]
    with _no_warning():
        _decide(forward_key(n=4), "gemm")
    assert set(conv_plan.current().decided) == {forward_key(), forward_key(n=4)}


def test_state_and_restore_carry_decisions_and_trials_in_progress():
    plan = conv_plan.current()
    done, halfway = forward_key(), forward_key(n=4)
    _decide(done, "winograd4")
    plan.choose(halfway, "winograd4")
    _, trial = plan.choose(halfway, "winograd4")
    trial.record(1.0)
    saved = json.loads(json.dumps(conv_plan.state()))                 # through the checkpoint's JSON
    next_trial = plan.choose(halfway, "winograd4")[0]
    conv_plan.reset()
    assert conv_plan.restore(saved) == []
    assert conv_plan.current().choose(done, "winograd4") == (plan.decided[done], None)
    assert conv_plan.current().choose(halfway, "winograd4")[0] == next_trial == "gemm"
    assert conv_plan.state() == saved


def test_restore_refuses_what_cannot_run_and_the_checkpoint_wins_over_the_cache():
    wide = conv_plan.key("kernel_grad", SAME_3X3, (2, 16, 16, 1024), 1024, "float32")   # too wide for winograd4
    _decide(forward_key(), "winograd4")                                # the cache now has this key
    refused = conv_plan.restore({"decided": {wide: "winograd4", forward_key(): "direct"}, "trials": {}})
    assert refused == [wide]
    assert conv_plan.current().choose(forward_key(), "winograd4") == ("direct", None)


def test_the_trials_budget_bounds_what_a_process_spends(monkeypatch, fresh_plan):
    """Past TRIAL_BUDGET_S of time beyond the fastest, a key in trial is decided on its times so far and a new
    one takes the rules' choice, for the rest of the process; the trials so far go to the cache, and the next
    process goes on with them."""
    monkeypatch.setattr(conv_plan, "TRIAL_BUDGET_S", 5.0)
    plan, first, second, third = conv_plan.current(), forward_key(), forward_key(n=4), forward_key(n=8)
    plan.choose(first, "winograd4")
    for algorithm, seconds in (("winograd4", 1.0), ("gemm", 0.5)):
        chosen, trial = plan.choose(first, "winograd4")
        assert chosen == algorithm
        trial.record(seconds)
    plan.choose(second, "winograd4")
    plan.choose(second, "winograd4")[1].record(1.0)
    plan.choose(second, "winograd4")[1].record(7.0)                    # gemm, 6 s over: the budget is gone
    assert plan.choose(first, "winograd4") == ("gemm", None)          # 0.5 against 1.0: decided on that
    assert plan.choose(second, "winograd4") == ("winograd4", None)
    assert plan.choose(third, "winograd4") == ("winograd4", None)      # never tried
    assert conv_plan.settled()
    with open(conv_plan.cache_path()) as file:
        assert json.load(file)["entries"] == {first: {"trials": {"winograd4": [1.0], "gemm": [0.5]}},
                                             second: {"trials": {"winograd4": [1.0], "gemm": [7.0]}}}
    saved = conv_plan.state()
    conv_plan.restore(saved)                                           # a resumed run: the same choices
    assert conv_plan.current().choose(first, "winograd4") == ("gemm", None)
    assert conv_plan.current().choose(third, "winograd4") == ("winograd4", None)
    conv_plan.reset()                                                  # a new run goes on with the trials
    next_plan = conv_plan.current()
    assert next_plan.choose(first, "winograd4") == ("winograd4", None)          # its first call: untimed
    assert next_plan.choose(first, "winograd4")[0] == "direct"                  # then what was not tried
    next_plan.choose(third, "winograd4")
    assert next_plan.choose(third, "winograd4")[0] == "winograd4"


def test_more_than_one_rank_on_a_machine_tries_nothing(monkeypatch):
    monkeypatch.setenv("MPI_LOCALNRANKS", "2")
    for _ in range(12):
        assert conv_plan.current().choose(forward_key(), "winograd4") == ("winograd4", None)
    assert conv_plan.settled() and conv_plan.state()["decided"] == {}


def test_rules_and_forced_settings_leave_the_plan_alone():
    x = np.zeros((2, 16, 16, 8), np.float32)
    kernel = np.zeros((3, 3, 8, 8), np.float32)
    for setting in ("rules", "gemm", "winograd"):
        with kernels.conv_algorithm(setting):
            kernels.conv2d_forward(x, kernel, None, SAME_3X3)
    assert conv_plan.state() == {"decided": {}, "trials": {}, "extra_seconds": 0.0}


def test_the_bench_warm_up_waits_for_the_plan_to_settle():
    from bench.worker import MAX_PLAN_WARMUP, time_steps

    pending = [3]

    def step():
        pending[0] -= 1
        return 0.5

    times, losses, warmup = time_steps(step, lambda: None, 1, 2, lambda message: None,
                                       settled=lambda: pending[0] <= 0)
    assert (len(times), warmup) == (2, 3)
    times, losses, warmup = time_steps(step, lambda: None, 0, 1, lambda message: None, settled=lambda: False)
    assert warmup == 0                                                # --warmup 0: a smoke run, no waiting
    times, losses, warmup = time_steps(step, lambda: None, 1, 1, lambda message: None, settled=lambda: False)
    assert warmup == 1 + MAX_PLAN_WARMUP


def _decide(entry, preferred):
    """Run ``entry``'s trials with made-up times (the rules' choice fastest) until it is decided."""
    plan = conv_plan.current()
    while entry not in plan.decided:
        algorithm, trial = plan.choose(entry, preferred)
        if trial:
            trial.record(0.5 if algorithm == preferred else 1.0)


class _no_warning:
    def __enter__(self):
        import warnings
        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        warnings.simplefilter("error", conv_plan.PlanWarning)

    def __exit__(self, *exc):
        self._catcher.__exit__(*exc)


TINY = ["--num-images", "24", "--num-val", "4", "--num-test", "4", "--image-size", "32", "--batch-size", "4",
        "--quiet", "--epochs", "2"]


def test_a_resumed_run_takes_its_checkpoints_choices_whatever_the_cache_says(tmp_path, fresh_plan):
    """train.py under 'auto': a run whose cache says 'direct' for every product, interrupted in epoch 2 and
    resumed as a new process would be (the plan forgotten, the cache gone), ends with exactly the weights
    of the same run uninterrupted. The same resume under the rules' choices does not, so the algorithms
    do show in the bits and the test can fail."""
    import shutil

    import train
    from minitensor.files import read_npz

    def run(name, *extra, on_batch_end=None):
        argv = TINY + ["--data", str(tmp_path / "shape"), "--weights-dir", str(tmp_path / name / "w"),
                       "--results-dir", str(tmp_path / name / "r"), *extra]
        return train.main(argv, on_batch_end=on_batch_end)

    def weights(name):
        return {k: v for k, v in read_npz(tmp_path / name / "w" / "last.npz").items() if k.startswith("weights/")}

    assert run("probe", "--epochs", "1") == 0                         # which products a run serves
    served = conv_plan.state()
    everything_direct = {entry: "direct" for entry in [*served["decided"], *served["trials"]]}
    assert len(everything_direct) >= 20
    with open(conv_plan.cache_path(), "w") as file:
        json.dump({"machine": conv_plan.machine(), "entries": everything_direct}, file)

    conv_plan.reset()
    assert run("straight") == 0
    assert conv_plan.summary()["tried"] == 0 and set(conv_plan.state()["decided"].values()) == {"direct"}

    conv_plan.reset()
    batches = [0]

    def interrupt(trainer):
        batches[0] += 1
        if batches[0] == 7:                                           # 5 batches an epoch: inside epoch 2
            trainer.stop.requested = True

    assert run("split", on_batch_end=interrupt) == 130
    shutil.copytree(tmp_path / "split", tmp_path / "control")
    os.remove(conv_plan.cache_path())
    conv_plan.reset()                                                 # a new process, on a machine without it
    assert run("split", "--resume") == 0
    straight, split = weights("straight"), weights("split")
    for name in straight:
        np.testing.assert_array_equal(straight[name], split[name], err_msg=name)

    conv_plan.reset()
    with kernels.conv_algorithm("rules"):
        assert run("control", "--resume") == 0
    control = weights("control")
    assert any(not np.array_equal(straight[name], control[name]) for name in straight)
