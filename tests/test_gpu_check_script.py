"""bench/gpu_check.sh on the CPU stand-in for CuPy (GPU_CHECK_DRY_RUN=1): every step of the GPU verification
works before a GPU ever runs it, and it cannot be fooled: with the GPU broken on purpose every step fails,
naming why, and a step past its time limit is reported as cut short. With MINITENSOR_REQUIRE_GPU=1 the
benchmark counts an unavailable GPU as an error."""
import os
import subprocess

import pytest

from bench import run as bench_run
from bench import worker
from minitensor import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gpu_check(tmp_path, **env):
    """Run the dry run with ``env`` added; return (process, summary lines, {step: its summary line})."""
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith(("GPU_CHECK_", "CUPY_STANDIN_", "MINITENSOR_REQUIRE_GPU"))}
    result = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**environment, "OUT": str(tmp_path), "GPU_CHECK_DRY_RUN": "1", **env})
    summary = (tmp_path / "summary.txt").read_text().splitlines() if (tmp_path / "summary.txt").exists() else []
    steps = {line.split(":")[0]: line for line in summary if line.split(":")[0] in
             ("setup", "gpu_tests", "bench_small", "bench_original", "train", "data_parallel")}
    return result, summary, steps


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_step(tmp_path):
    """About five minutes on 2 shared cores, so it is ``slow``: ``python -m pytest -m slow``."""
    result, summary, steps = gpu_check(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert list(steps) == ["setup", "gpu_tests", "bench_small", "bench_original", "train", "data_parallel"]
    assert steps["bench_original"].startswith("bench_original: skipped (dry run")
    assert all(": ok, " in line for name, line in steps.items() if name != "bench_original"), summary
    assert summary[-1].startswith("result: PASS")
    assert "GPU usable: CPU stand-in for CuPy" in (tmp_path / "setup.log").read_text()
    tests_log = (tmp_path / "gpu_tests.log").read_text()
    assert "passed" in tests_log and "failed" not in tests_log
    assert (tmp_path / "bench_small.json").exists() and (tmp_path / "UNet_test_result" / "metrics.json").exists()
    assert "test mean IoU (3 shapes):" in (tmp_path / "train.log").read_text()
    assert "every batch of 4 shared out as 2 + 2 images" in (tmp_path / "data_parallel.log").read_text()


@pytest.mark.parametrize("part,why", [("nvrtc", "CUDA kernels cannot be compiled or run"),
                                      pytest.param("device", "no CUDA driver or device can be used",
                                                   marks=pytest.mark.slow)])   # the same path: keep one fast
def test_gpu_check_with_the_gpu_broken_fails_every_step_naming_why(tmp_path, part, why):
    """The stand-in broken as a GPU machine can be: nothing may pass on the CPU instead (about 20 s)."""
    result, summary, steps = gpu_check(tmp_path, CUPY_STANDIN_BREAK=part)
    assert result.returncode == 1, summary
    for name in ("setup", "gpu_tests", "bench_small", "train", "data_parallel"):
        assert steps[name].startswith(f"{name}: FAILED"), summary
        assert why in steps[name] and f"CUPY_STANDIN_BREAK={part}" in steps[name], steps[name]
    assert "MINITENSOR_REQUIRE_GPU=1 but the GPU is not usable" in steps["gpu_tests"]
    assert "unavailable counts as an error" in steps["bench_small"]
    assert summary[-1].startswith("result: FAIL (failed: setup gpu_tests bench_small train data_parallel; timed out: none)")


def test_gpu_check_reports_a_step_cut_short_by_its_time_limit(tmp_path):
    result, summary, steps = gpu_check(tmp_path, GPU_CHECK_STEPS="train", GPU_CHECK_TIMEOUT_TRAIN="3")
    assert result.returncode == 1
    assert steps["setup"] == "setup: skipped (not in GPU_CHECK_STEPS)"
    assert steps["train"].startswith("train: TIMED OUT after 3 s (cut short; GPU_CHECK_TIMEOUT_TRAIN=N allows more)")
    assert summary[-1].startswith("result: FAIL (failed: none; timed out: train)")
    left = [pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline_has(pid, str(tmp_path))]
    assert not left, "the time limit must end the step's whole process group"


def test_gpu_check_refuses_an_unknown_step(tmp_path):
    result, summary, steps = gpu_check(tmp_path, GPU_CHECK_STEPS="setup,bench")
    assert result.returncode == 2 and "unknown step bench" in result.stderr and not steps


def _cmdline_has(pid, text):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return text.encode() in f.read()
    except OSError:
        return False


# ----- the benchmark: "unavailable" on --device gpu is an error when a GPU is required ------------------------

@pytest.mark.parametrize("required", [False, True])
def test_bench_worker_counts_a_missing_gpu_as_an_error_when_required(monkeypatch, capsys, required):
    monkeypatch.setattr(backend, "_gpu_status", (False, "no CUDA device here (test)"))
    monkeypatch.setenv("MINITENSOR_REQUIRE_GPU", "1" if required else "0")
    status = worker.main(["--engine", "minitensor", "--workload", "small", "--device", "gpu", "--steps", "1"])
    line = [line for line in capsys.readouterr().out.splitlines() if line.startswith(worker.RESULT_PREFIX)][-1]
    assert ('"status": "error"' in line) is required and ('"status": "unavailable"' in line) is not required
    assert "no CUDA device here (test)" in line
    assert status == (1 if required else 0)


@pytest.mark.parametrize("required", [False, True])
def test_bench_exits_non_zero_on_an_unavailable_gpu_when_required(monkeypatch, capsys, required):
    monkeypatch.setattr(bench_run, "run_worker", lambda engine, workload, args: {
        "engine": engine, "workload": workload, "status": "unavailable", "error": "no usable GPU: (test)"})
    monkeypatch.setenv("MINITENSOR_REQUIRE_GPU", "1" if required else "0")
    status = bench_run.main(["--device", "gpu", "--workload", "small", "--engines", "minitensor"])
    assert status == (1 if required else 0)
    assert ("FAILED: minitensor on small: no usable GPU: (test)" in capsys.readouterr().err) is required
