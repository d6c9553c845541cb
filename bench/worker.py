"""Time one engine on one workload, in a process of its own, and print one JSON line.

    python -m bench.worker --engine minitensor --workload small --device cpu --steps 10 --warmup 3

``python -m bench`` starts one of these per (engine, workload), so that the engines' memory,
thread pools and GPU allocators never meet, and each process's peak memory is its own.
The result is the last stdout line that starts with ``BENCH_RESULT ``.

Timing: ``warmup`` untimed steps (they compile numba / CUDA / XLA kernels, pick cuDNN
algorithms and allocate the optimizer state; minitensor's go on until its measured convolution
plan has settled), then ``steps`` timed steps, each between two
device synchronisations; the data is on the device before the first step, so no host->device
copy is timed. We report the median step.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback

from bench.workloads import WORKLOADS, make_batch

RESULT_PREFIX = "BENCH_RESULT "


class Unavailable(Exception):
    """The engine cannot run here (not installed, or no GPU for it); not a failure of the benchmark,
    except on ``--device gpu`` with ``MINITENSOR_REQUIRE_GPU=1`` (bench/gpu_check.sh), where it is an error."""


def gpu_required():
    """MINITENSOR_REQUIRE_GPU=1 in the environment, as ``minitensor.backend.gpu_required`` reads it; read here
    without importing minitensor, whose import sets CPU thread defaults that the other engines must not get."""
    return os.environ.get("MINITENSOR_REQUIRE_GPU", "").strip() == "1"


def rss_bytes():
    """The current resident set size of this process, from /proc (0 where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_bytes():
    """The process's peak resident set size (ru_maxrss is in KiB on Linux, in bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


#: At most this many warm-up steps beyond ``warmup`` wait for minitensor's measured plan to settle.
MAX_PLAN_WARMUP = 30


def time_steps(step, sync, warmup, steps, log, settled=lambda: True):
    """Run ``warmup`` + ``steps`` calls of ``step``; return (per-step seconds, loss values, warm-up steps run).

    A warm-up of one step or more goes on, up to MAX_PLAN_WARMUP steps more, until ``settled()``:
    minitensor's 'auto' tries each new convolution shape's algorithms in its first steps
    (kernels/conv_plan.py), as cuDNN's benchmark mode and TF's autotuning do in theirs, and those
    trials are warm-up, not the step."""
    losses = []
    i = 0
    while i < warmup or (warmup and not settled() and i < warmup + MAX_PLAN_WARMUP):
        start = time.perf_counter()
        losses.append(step())
        sync()
        i += 1
        log(f"warm-up {i}: {time.perf_counter() - start:.3f} s")
    times = []
    for i in range(steps):
        sync()
        start = time.perf_counter()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - start)
        log(f"step {i + 1}/{steps}: {times[-1]:.3f} s")
    return times, losses, len(losses) - steps


# ----- the three engines -------------------------------------------------------------------
# Each returns a dict: step (callable returning the loss as a float), sync, info (dict),
# and optionally memory (callable run after timing, returning a dict of byte counts) and model.

def setup_minitensor(workload, args, x, y, info):
    import numpy as np

    import minitensor
    import unet
    from minitensor import backend

    info["engine_version"] = minitensor.__version__
    info["rss_after_import_bytes"] = rss_bytes()
    try:
        import numba
        info["numba_threads"] = numba.get_num_threads()
    except Exception:
        pass
    try:
        info["numpy_blas"] = np.show_config(mode="dicts")["Build Dependencies"]["blas"].get("name")
    except Exception:
        pass
    device = "gpu" if args.device == "gpu" else "cpu"
    if device == "gpu" and not backend.is_gpu_available():
        raise Unavailable(f"no usable GPU: {backend.gpu_status()[1]}")
    if device == "gpu":
        backend.set_tf32(bool(args.tf32))
        info["notes"].append(f"tf32 {'on' if args.tf32 else 'off'} (minitensor.backend.set_tf32)")
    elif args.tf32:
        info["notes"].append("--tf32 applies to the GPU only")
    if device == "cpu":
        settings = ", ".join(f"{name}={entry['value']}{'' if entry['in_effect'] else ' (not in effect)'}"
                             for name, entry in minitensor.cpu_runtime.status().items())
        info["notes"].append(f"conv algorithm {minitensor.kernels.get_conv_algorithm()}; {settings}; OpenBLAS "
                             f"kernels {minitensor.cpu_runtime.blas_core() or '-'} (OPENBLAS_CORETYPE "
                             f"{os.environ.get('OPENBLAS_CORETYPE') or 'unset'})")
    minitensor.set_seed(0)
    build = unet.small_unet if workload.model == "small_unet" else unet.unet
    model = build(input_shape=workload.input_shape, num_classes=workload.num_classes)
    model.compile(minitensor.optimizers.Adam(1e-3), minitensor.losses.BinaryCrossentropy(from_logits=True))
    model.to(device)
    info["params"] = model.count_params()
    xd, yd = minitensor.to_device(x, device), minitensor.to_device(y, device)

    sync = lambda: None  # noqa: E731
    if device == "gpu":
        cupy = backend.cupy_module()
        sync = cupy.cuda.Device().synchronize
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"]
        info["device_name"] = name.decode() if isinstance(name, bytes) else str(name)
        info["cupy_version"] = cupy.__version__

        def memory():
            return cupy_memory(cupy, lambda: (model.train_on_batch(xd, yd), sync()))
    else:
        memory = None
    from minitensor.kernels import conv_plan

    def plan_note():
        plan = conv_plan.summary()
        if minitensor.kernels.get_conv_algorithm() == "auto" and device == "cpu":
            info["conv_plan"] = plan
            info["notes"].append(f"conv plan: {plan['tried']} products tried in this run's warm-up (their slower "
                                 f"candidates took {plan['extra_seconds']:.1f} s more), the others from "
                                 f"{plan['cache']}")

    return {"step": lambda: model.train_on_batch(xd, yd), "sync": sync, "memory": memory,
            "model": model, "x": xd, "y": yd, "settled": conv_plan.settled, "after_timing": plan_note}


def cupy_memory(cupy, one_step):
    """Peak bytes in use in CuPy's memory pool during one more (untimed) step, and what the pool holds.

    The pool never gives memory back by itself, so total_bytes() is a high-water mark of what
    it took from the GPU; the peak *in use* needs a hook that looks at every allocation.
    """
    pool = cupy.get_default_memory_pool()
    result = {}
    try:
        class PeakHook(cupy.cuda.MemoryHook):
            name = "bench_peak_memory"

            def __init__(self):
                self.peak = pool.used_bytes()

            def malloc_postprocess(self, **kwargs):
                self.peak = max(self.peak, pool.used_bytes())

        hook = PeakHook()
        with hook:
            one_step()
        result["gpu_peak_used_bytes"] = hook.peak
    except Exception as exc:   # an older/newer CuPy without this hook API: fall back to the pool's size
        result["gpu_peak_note"] = f"memory hook failed ({type(exc).__name__}: {exc}); peak = pool high-water"
        one_step()
        result["gpu_peak_used_bytes"] = pool.total_bytes()
    result["gpu_pool_held_bytes"] = pool.total_bytes()
    return result


def setup_torch(workload, args, x, y, info):
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as exc:
        raise Unavailable(f"not installed ({exc})") from exc
    from bench.torch_seed import count_params, torch_small_unet, torch_unet

    info["engine_version"] = torch.__version__
    info["rss_after_import_bytes"] = rss_bytes()
    torch.set_num_threads(os.cpu_count())
    info["torch_threads"] = torch.get_num_threads()
    if args.device == "gpu":
        if not torch.cuda.is_available():
            raise Unavailable("this PyTorch build sees no CUDA GPU")
        device = torch.device("cuda")
        # Set both explicitly: PyTorch's defaults differ (matmul off, cuDNN convolutions on).
        torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
        torch.backends.cudnn.allow_tf32 = bool(args.tf32)
        torch.backends.cudnn.benchmark = True   # pick the fastest conv algorithms, as TF's autotune does
        info["device_name"] = torch.cuda.get_device_name(device)
        info["notes"].append(f"tf32 {'on' if args.tf32 else 'off'}, cudnn.benchmark on")
        sync = torch.cuda.synchronize
    else:
        device = torch.device("cpu")
        sync = lambda: None  # noqa: E731
    torch.manual_seed(0)
    model = torch_small_unet(workload.num_classes) if workload.model == "small_unet" else torch_unet(workload.num_classes)
    model = model.to(device=device, memory_format=torch.channels_last)
    info["params"] = count_params(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7)

    def to_nchw(a):   # NHWC numpy -> NCHW logical shape, NHWC (channels_last) in memory
        return torch.from_numpy(a).permute(0, 3, 1, 2).to(device).contiguous(memory_format=torch.channels_last)

    xt, yt = to_nchw(x), to_nchw(y)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(model(xt), yt)   # mean over N*C*H*W, as Keras's BCE
        loss.backward()
        optimizer.step()
        return loss.item()

    if args.device == "gpu":
        def memory():
            return {"gpu_peak_used_bytes": torch.cuda.max_memory_allocated(device),
                    "gpu_pool_held_bytes": torch.cuda.max_memory_reserved(device)}
    else:
        memory = None
    return {"step": step, "sync": sync, "memory": memory}


def setup_tensorflow(workload, args, x, y, info):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
        import keras
    except ImportError as exc:
        raise Unavailable(f"not installed ({exc})") from exc
    from bench.keras_seed import keras_small_unet, keras_unet

    info["engine_version"] = f"{tf.__version__} (keras {keras.__version__})"
    info["rss_after_import_bytes"] = rss_bytes()
    info["onednn"] = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default")
    if args.device == "gpu":
        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            raise Unavailable("TensorFlow sees no GPU (tensorflow-cpu, or no CUDA build)")
        tf.config.experimental.set_memory_growth(gpus[0], True)   # so the peak reflects what is used
        info["device_name"] = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
        device_name = "/GPU:0"
    else:
        tf.config.set_visible_devices([], "GPU")
        device_name = "/CPU:0"
    # TF turns TF32 on by default on Ampere and newer; make it follow --tf32 like the others.
    tf.config.experimental.enable_tensor_float_32_execution(bool(args.tf32))
    keras.utils.set_random_seed(0)
    with tf.device(device_name):
        build = keras_small_unet if workload.model == "small_unet" else keras_unet
        model = build(input_shape=workload.input_shape, num_classes=workload.num_classes)
        model.compile(keras.optimizers.Adam(1e-3), keras.losses.BinaryCrossentropy())
        xt, yt = tf.constant(x), tf.constant(y)   # on the device before timing starts
    info["params"] = model.count_params()

    def step():
        return float(model.train_on_batch(xt, yt))   # returns a NumPy value: waits for the device

    if args.device == "gpu":
        def memory():
            return {"gpu_peak_used_bytes": tf.config.experimental.get_memory_info("GPU:0")["peak"]}
    else:
        memory = None
    result = {"step": step, "sync": lambda: None, "memory": memory}
    result["after_timing"] = lambda: info["notes"].append(f"jit_compile={model.jit_compile}")
    return result


ENGINES = {"minitensor": setup_minitensor, "torch": setup_torch, "tensorflow": setup_tensorflow}


def run(args):
    workload = WORKLOADS[args.workload]
    info = {"engine": args.engine, "workload": workload.name, "device": args.device, "batch": workload.batch,
            "notes": [], "pid": os.getpid(), "python": platform.python_version()}

    def log(message):
        if args.verbose:
            print(f"[{args.engine}/{workload.name}] {message}", file=sys.stderr, flush=True)

    if args.engine == "minitensor":
        import minitensor  # noqa: F401  before NumPy, as train.py does (minitensor/cpu_runtime.py)
    x, y = make_batch(workload)
    try:
        engine = ENGINES[args.engine](workload, args, x, y, info)
    except Unavailable as exc:
        info.update(status="unavailable", error=str(exc))
        if args.device == "gpu" and gpu_required():
            # gpu_check.sh on a GPU machine: a GPU run that cannot use the GPU must not look like a pass
            info.update(status="error", error=f"{exc} (MINITENSOR_REQUIRE_GPU=1: on --device gpu, "
                                              f"unavailable counts as an error)")
        return info
    times, losses, warmup = time_steps(engine["step"], engine["sync"], args.warmup, args.steps, log,
                                       engine.get("settled", lambda: True))
    if "after_timing" in engine:
        engine["after_timing"]()
    median = statistics.median(times)
    info.update(
        status="ok", steps=len(times), warmup=warmup, step_times_s=times, median_step_s=median,
        min_step_s=min(times), max_step_s=max(times), images_per_s=workload.batch / median,
        first_loss=losses[0], last_loss=losses[-1],
    )
    if engine.get("memory") is not None:
        info.update(engine["memory"]())
    if args.profile and args.engine == "minitensor":
        from bench.layer_profile import profile_train_step
        log(f"profiling {args.profile_steps} steps")
        info["profile"] = profile_train_step(engine["model"], engine["x"], engine["y"], engine["sync"],
                                             steps=args.profile_steps)
    info["peak_rss_bytes"] = peak_rss_bytes()
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True, choices=sorted(ENGINES))
    p.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tf32", action="store_true")
    p.add_argument("--profile", action="store_true", help="minitensor only: per-layer profile after timing")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--verbose", action="store_true", help="log every step's time to stderr")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.profile_steps < 1:
        p.error("--steps and --profile-steps must be >= 1, --warmup >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        info = run(args)
    except Exception as exc:
        info = {"engine": args.engine, "workload": args.workload, "device": args.device, "status": "error",
                "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8),
                "peak_rss_bytes": peak_rss_bytes()}
    print(RESULT_PREFIX + json.dumps(info), flush=True)
    return 0 if info.get("status") in ("ok", "unavailable") else 1


if __name__ == "__main__":
    sys.exit(main())
