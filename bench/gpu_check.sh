#!/usr/bin/env bash
# The whole GPU verification in one script, for the few minutes a GPU machine is lent (H100/H200:
# CuPy, numba and PyTorch installed, no TensorFlow, no network). From the repository root:
#
#   OUT=/some/folder bash bench/gpu_check.sh          # on the GPU machine; everything lands in $OUT
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh        # here, on the CPU: the strict CuPy stand-in,
#                                                      # tiny sizes, to know the script works
#
# Steps, in this order, each with its own time limit (seconds; GPU_CHECK_TIMEOUT_<STEP>=N overrides
# one), logged to $OUT/<step>.log and summed up in $OUT/summary.txt; a failed step does not stop the
# others, and the most telling ones come first, so that a lease cut short still leaves them:
#   setup           30  the machine (nvidia-smi, versions) and the GPU probe: a GPU that is not usable
#                       fails here, naming why
#   gpu_tests      120  every gpu-marked test (pytest -m gpu), on the GPU: never on the CPU stand-in
#   bench_small     75  python -m bench --device gpu --workload small (minitensor against PyTorch),
#                       JSON in $OUT/bench_small.json
#   bench_original  75  the same for the original U-Net at 572x572, batch 1 ($OUT/bench_original.json)
#   train          105  the seed's training, python train.py --device gpu with its defaults (50 epochs,
#                       BCE, batch 16, callbacks), timed, with the test mean IoU and the peak GPU
#                       memory (nvidia-smi, polled every half second)
#   data_parallel   40  mpiexec -n <GPUs> python train.py --device gpu --distributed, 2 short epochs: the
#                       gradients summed by the real NCCL (one rank per GPU; on a one-GPU machine a
#                       communicator of one rank, which still runs NCCL's Allreduce)
# That is about 7 minutes at most, so that with the machine's start a second call fits the 15-minute lease
# (numba's and CuPy's kernel caches are cold on every fresh machine: the first steps pay the compiles).
# GPU_CHECK_STEPS=setup,bench_small runs only those steps (a second call, say).
#
# Nothing is installed: the checkout runs as it is (PYTHONPATH), as pip would need the network to build
# it. MINITENSOR_REQUIRE_GPU=1 is exported, so that no step passes without the GPU: the tests refuse
# to fall back to the stand-in and the bench counts an unavailable GPU as an error. The exit status is
# 0 only when every step that ran passed; summary.txt says which failed and which were cut short.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
PYTHON=${PYTHON:-python}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
export MINITENSOR_REQUIRE_GPU=1
if [ -z "${GPU_CHECK_PATHS_SET:-}" ]; then      # once: the steps' own processes inherit them
    export GPU_CHECK_PATHS_SET=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    [ "$DRY_RUN" = 1 ] && export PYTHONPATH="$PWD/tests/standin_site:$PWD/tests:$PYTHONPATH"
fi
STEPS=(setup gpu_tests bench_small bench_original train data_parallel)
declare -A LIMIT=([setup]=30 [gpu_tests]=120 [bench_small]=75 [bench_original]=60 [train]=105 [data_parallel]=40)
SCALE=1
TRAIN_ARGS=()
BENCH_ARGS=()
BENCH_ENGINES=2                   # minitensor and PyTorch (TensorFlow is not installed there: no worker)
if [ "$DRY_RUN" = 1 ]; then
    # tests/standin_site answers `import cupy` with the stand-in, which MINITENSOR_REQUIRE_GPU takes for the
    # GPU; broken on purpose (CUPY_STANDIN_BREAK=device or nvrtc) it fails as a broken GPU machine would.
    TRAIN_ARGS=(--num-images 24 --num-val 4 --num-test 4 --image-size 32 --epochs 2 --batch-size 4)
    BENCH_ARGS=(--steps 1 --warmup 0 --engines minitensor)    # a step of small takes a minute on the stand-in
    BENCH_ENGINES=1
    SCALE=5                       # the stand-in on a shared CPU is that much slower than a GPU
fi

# ----- the steps (each runs in a process of its own: bash bench/gpu_check.sh --run-step NAME) --------

setup() {
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    else
        echo "no nvidia-smi on this machine"
    fi
    "$PYTHON" - <<'PY'
import importlib, platform, sys
print("python", platform.python_version())
for name in ("numpy", "numba", "cupy", "torch", "cv2", "h5py", "tqdm", "matplotlib", "pytest", "hypothesis",
             "tensorflow"):
    try:
        print(f"{name:11s}", getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as error:
        print(f"{name:11s} missing ({type(error).__name__}: {error})")
import minitensor
from minitensor import backend
print("minitensor from", minitensor.__file__)
usable, reason = backend.gpu_status()
if not usable:
    print(f"GPU not usable: {reason}")
    sys.exit(1)
cupy = backend.cupy_module()
name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())["name"]
print("GPU usable:", name.decode() if isinstance(name, bytes) else name, "| CuPy", cupy.__version__)
PY
}

gpu_tests() {
    "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider --durations=15 --basetemp="$OUT/pytest_tmp" tests
}

bench() {   # bench WORKLOAD: each engine's worker allowed its share of the step's time
    local workload=$1
    "$PYTHON" -m bench --device gpu --workload "$workload" --timeout $(( (LIMIT_S - 4) / BENCH_ENGINES )) \
        --json "$OUT/bench_$workload.json" "${BENCH_ARGS[@]}"
}

bench_small() {
    bench small
}

bench_original() {
    bench original
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

train() {
    peak_gpu_memory "$PYTHON" train.py --device gpu --quiet --data "$OUT/shape" --weights-dir "$OUT/UNet_weight" \
        --results-dir "$OUT/UNet_test_result" "${TRAIN_ARGS[@]}" 2>&1 | tee "$OUT/train_py.log"
    local status=${PIPESTATUS[0]}
    if [ "$status" != 0 ]; then     # the summary quotes the last line: make it train.py's own message
        echo "train.py failed (exit $status): $(grep -v -e '^[[:space:]]*$' -e '^wall time' "$OUT/train_py.log" \
            | tail -n 1)"
        return "$status"
    fi
    "$PYTHON" -c "import json, sys; print('test mean IoU (3 shapes):', json.load(open(sys.argv[1]))['mean_iou'])" \
        "$OUT/UNet_test_result/metrics.json"
}

data_parallel() {   # the real NCCL: one rank per GPU (the dry run: 2 ranks on 2 stand-in devices over MPI)
    local mpiexec ranks
    mpiexec=$(command -v mpiexec || true)
    [ -n "$mpiexec" ] || { echo "no mpiexec on PATH (pip install mpi4py mpich, or a system MPI)"; return 1; }
    local sizes=(--num-images 120 --num-val 16 --num-test 8 --image-size 64 --epochs 2 --batch-size 8)
    if [ "$DRY_RUN" = 1 ]; then
        ranks=2
        export CUPY_STANDIN_DEVICES=2
        sizes=(--num-images 20 --num-val 4 --num-test 4 --image-size 32 --epochs 2 --batch-size 4)
    else
        ranks=$(nvidia-smi --list-gpus 2> /dev/null | wc -l)
        [ "$ranks" -ge 1 ] || ranks=1
    fi
    "$mpiexec" -n "$ranks" "$PYTHON" train.py --device gpu --distributed --quiet --data "$OUT/shape_dp" \
        --weights-dir "$OUT/dp_weights" --results-dir "$OUT/dp_results" "${sizes[@]}" 2>&1 \
        | tee "$OUT/data_parallel_py.log"
    local status=${PIPESTATUS[0]}
    if [ "$status" != 0 ]; then     # the summary quotes the last line: make it train.py's own message
        echo "mpiexec -n $ranks train.py failed (exit $status): $(grep -v -e '^[[:space:]]*$' -e '^\[mpiexec' \
            "$OUT/data_parallel_py.log" | tail -n 1)"
        return "$status"
    fi
    grep -h "data-parallel:\|^Epoch 2/2" "$OUT/data_parallel_py.log" || true
}

limit_of() {   # limit_of STEP: its time limit in seconds (GPU_CHECK_TIMEOUT_<STEP> overrides)
    local variable="GPU_CHECK_TIMEOUT_${1^^}"
    echo "${!variable:-$(( ${LIMIT[$1]} * SCALE ))}"
}

if [ "${1:-}" = --run-step ]; then      # one step, in the process that `timeout` watches
    LIMIT_S=$(limit_of "$2")
    "$2"
    exit $?
fi

# ----- the run ---------------------------------------------------------------------------------------

command -v timeout > /dev/null || { echo "bench/gpu_check.sh needs timeout (GNU coreutils)" >&2; exit 2; }
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
if [ "$DRY_RUN" = 1 ]; then
    echo "dry run: CuPy is the CPU stand-in (tests/cupy_standin.py), sizes are tiny" | tee -a "$SUMMARY"
fi
SELECTED=",${GPU_CHECK_STEPS:-$(IFS=,; echo "${STEPS[*]}")},"
for name in ${GPU_CHECK_STEPS:+${GPU_CHECK_STEPS//,/ }}; do
    [ -n "${LIMIT[$name]:-}" ] || { echo "GPU_CHECK_STEPS: unknown step $name (steps: ${STEPS[*]})" >&2; exit 2; }
done
FAILED=()
TIMED_OUT=()
START=$SECONDS

for name in "${STEPS[@]}"; do
    if [[ $SELECTED != *",$name,"* ]]; then
        echo "$name: skipped (not in GPU_CHECK_STEPS)" | tee -a "$SUMMARY"
        continue
    fi
    if [ "$DRY_RUN" = 1 ] && [ "$name" = bench_original ]; then
        echo "$name: skipped (dry run: 572x572 on the stand-in takes many minutes; bench_small runs the same code)" \
            | tee -a "$SUMMARY"
        continue
    fi
    limit=$(limit_of "$name")
    echo "== $name (at most $limit s)"
    start=$SECONDS
    # KILL, not TERM, for the step's whole process group: train.py answers SIGTERM by finishing its
    # batch and saving a checkpoint, which a step out of time must not wait for (nor outlive the script).
    timeout --signal=KILL "$limit" bash "$0" --run-step "$name" > "$OUT/$name.log" 2>&1
    status=$?
    tail -n 25 "$OUT/$name.log"
    last=$(grep -v '^[[:space:]]*$' "$OUT/$name.log" | tail -n 1)
    if [ "$status" = 124 ] || [ "$status" = 137 ]; then
        TIMED_OUT+=("$name")
        echo "$name: TIMED OUT after $limit s (cut short; GPU_CHECK_TIMEOUT_${name^^}=N allows more);" \
            "last line: $last" | tee -a "$SUMMARY"
    elif [ "$status" != 0 ]; then
        FAILED+=("$name")
        echo "$name: FAILED (exit $status), $((SECONDS - start)) s; last line: $last" | tee -a "$SUMMARY"
    else
        echo "$name: ok, $((SECONDS - start)) s" | tee -a "$SUMMARY"
    fi
done

if [ ${#FAILED[@]} = 0 ] && [ ${#TIMED_OUT[@]} = 0 ]; then
    echo "result: PASS, $((SECONDS - START)) s" | tee -a "$SUMMARY"
    exit 0
fi
echo "result: FAIL (failed: ${FAILED[*]:-none}; timed out: ${TIMED_OUT[*]:-none}), $((SECONDS - START)) s" \
    | tee -a "$SUMMARY"
exit 1
