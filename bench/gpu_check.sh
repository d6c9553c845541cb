#!/usr/bin/env bash
# The whole GPU verification in one script, for the few minutes a GPU machine is lent (H100/H200:
# CuPy, numba and PyTorch installed, no TensorFlow, no network). From the repository root:
#
#   OUT=/some/folder bash bench/gpu_check.sh          # on the GPU machine; everything lands in $OUT
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh        # here, on the CPU: the strict CuPy stand-in,
#                                                      # tiny sizes, to know the script works
#
# Steps, each logged to $OUT/<step>.log and summed up in $OUT/summary.txt (a failed step does not
# stop the others): the machine (nvidia-smi, versions); the install (pip install --no-deps -e .);
# every gpu-marked test (pytest -m gpu); python -m bench --device gpu (minitensor against PyTorch,
# both workloads, JSON in $OUT/bench.json); the seed's training, python train.py --device gpu with
# its defaults (50 epochs, BCE, batch 16, callbacks), timed, with the test mean IoU and the peak GPU
# memory (nvidia-smi, polled every half second). Budget: under 8 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
PYTHON=${PYTHON:-python}

TRAIN_ARGS=()
BENCH_ARGS=(--device gpu --json "$OUT/bench.json")
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
    export PYTHONPATH="$PWD/tests/standin_site:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
    TRAIN_ARGS=(--num-images 24 --num-val 4 --num-test 4 --image-size 32 --epochs 2 --batch-size 4)
    BENCH_ARGS+=(--workload small --steps 1 --warmup 1 --engines minitensor)
    echo "dry run: CuPy is the CPU stand-in (tests/cupy_standin.py), sizes are tiny" | tee -a "$SUMMARY"
fi

step() {   # step NAME COMMAND...: run it, log it, time it, keep going
    local name=$1; shift
    local start=$SECONDS
    echo "== $name: $*"
    "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    tail -n 25 "$OUT/$name.log"
    echo "$name: exit $status, $((SECONDS - start)) s" | tee -a "$SUMMARY"
    return 0
}

machine() {
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    else
        echo "no nvidia-smi on this machine"
    fi
    "$PYTHON" - <<'PY'
import importlib, platform
print("python", platform.python_version())
for name in ("numpy", "numba", "cupy", "torch", "cv2", "h5py", "tqdm", "matplotlib", "pytest", "hypothesis",
             "tensorflow"):
    try:
        print(f"{name:11s}", getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as error:
        print(f"{name:11s} missing ({type(error).__name__}: {error})")
from minitensor import backend
print("GPU usable:", backend.gpu_status())
PY
}

peak_gpu_memory() {   # peak_gpu_memory COMMAND...: run it while polling nvidia-smi; print the peak MiB in use
    local log="$OUT/gpu_memory.csv"
    : > "$log"
    if command -v nvidia-smi > /dev/null; then
        ( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >> "$log"; sleep 0.5; done ) &
        local poller=$!
    fi
    local start=$SECONDS
    "$@"
    local status=$?
    echo "wall time: $((SECONDS - start)) s"
    [ -n "${poller:-}" ] && kill "$poller" 2> /dev/null
    if [ -s "$log" ]; then echo "peak GPU memory in use: $(sort -n "$log" | tail -n 1) MiB (whole GPU, nvidia-smi)"; fi
    return $status
}

train_seed() {
    peak_gpu_memory "$PYTHON" train.py --device gpu --quiet --data "$OUT/shape" --weights-dir "$OUT/UNet_weight" \
        --results-dir "$OUT/UNet_test_result" "${TRAIN_ARGS[@]}"
    local status=$?
    "$PYTHON" -c "import json, sys; m = json.load(open(sys.argv[1])); print('test mean IoU (3 shapes):', m['mean_iou'])" \
        "$OUT/UNet_test_result/metrics.json"
    return $status
}

step machine machine
step install "$PYTHON" -m pip install --no-deps -q -e .
step gpu_tests "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests
step bench "$PYTHON" -m bench "${BENCH_ARGS[@]}"
step train train_seed
echo "== summary ($OUT/summary.txt)"
cat "$SUMMARY"
