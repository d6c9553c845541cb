"""bench/gpu_check.sh, dry-run on the CPU stand-in for CuPy: every step of the GPU verification works
before a GPU ever runs it. About two minutes on 2 cores, so it is ``slow``: ``python -m pytest -m slow``."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_step(tmp_path):
    result = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OUT": str(tmp_path), "GPU_CHECK_DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    steps = {line.split(":")[0]: line for line in summary if ": exit " in line}
    assert list(steps) == ["machine", "install", "gpu_tests", "bench", "train"]
    assert all(": exit 0," in line for line in steps.values()), summary
    assert "passed" in (tmp_path / "gpu_tests.log").read_text()
    assert (tmp_path / "bench.json").exists() and (tmp_path / "UNet_test_result" / "metrics.json").exists()
    assert "test mean IoU (3 shapes):" in (tmp_path / "train.log").read_text()
