"""``python -m bench``: minitensor against PyTorch and TensorFlow on the seed's two U-Net training steps.

    python -m bench --device cpu                         # all three workloads, all installed engines
    python -m bench --device gpu --workload small --json results.json
    python -m bench --device cpu --workload small --steps 1 --warmup 0 --engines minitensor   # smoke
    python -m bench --device cpu --workload small --engines minitensor --profile              # where the time goes

Every (engine, workload) pair runs in its own process (``python -m bench.worker``), so memory,
thread pools and GPU allocators of one engine never influence another. An engine that cannot be
imported is reported as "not installed". See docs/benchmarks.md for what is measured and how to
read the output, and bench/RESULTS.md for recorded numbers.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.worker import gpu_required
from bench.workloads import WORKLOADS

REPO = Path(__file__).resolve().parent.parent
ENGINE_ORDER = ("minitensor", "torch", "tensorflow")
ENGINE_ALIASES = {"minitensor": "minitensor", "mt": "minitensor", "torch": "torch", "pytorch": "torch",
                  "tensorflow": "tensorflow", "tf": "tensorflow", "keras": "tensorflow"}
ENGINE_LABELS = {"minitensor": "minitensor", "torch": "PyTorch", "tensorflow": "TensorFlow"}
ENGINE_MODULES = {"minitensor": ("numpy", "numba"), "torch": ("torch",), "tensorflow": ("tensorflow", "keras")}
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT",
                    "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER", "TF_ENABLE_ONEDNN_OPTS",
                    "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "CUPY_TF32", "MINITENSOR_KERNELS",
                    "MINITENSOR_CONV", "CUDA_VISIBLE_DEVICES", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
PACKAGES = {   # what to report, and the distribution names each may be installed under
    "numpy": ("numpy",), "numba": ("numba",), "cupy": ("cupy-cuda12x", "cupy-cuda11x", "cupy-cuda13x", "cupy"),
    "torch": ("torch",), "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-gpu"), "keras": ("keras",),
}


# ----- the machine and the software ----------------------------------------------------------

def _cpu_runtime():
    """minitensor/cpu_runtime.py loaded on its own: its ``cpu_identity`` names the CPU as minitensor's
    convolution plan cache does. ``import minitensor`` here would set its thread variables in this
    process, which every engine's worker (TensorFlow's and PyTorch's too) would inherit."""
    spec = importlib.util.spec_from_file_location("_minitensor_cpu_runtime", REPO / "minitensor" / "cpu_runtime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(path):
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine_info():
    meminfo = re.search(r"^MemTotal:\s*(\d+) kB", _read("/proc/meminfo"), flags=re.M)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        **_cpu_runtime().cpu_identity(),
        "logical_cores": os.cpu_count(), "usable_cores": usable,
        "memory_gib": round(int(meminfo.group(1)) / 2**20, 1) if meminfo else None,
        "os": platform.platform(), "python": platform.python_version(),
        "gpus": [],
    }
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
            info["gpus"] = [line.strip() for line in out.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def package_versions():
    versions = {}
    for name, distributions in PACKAGES.items():
        for dist in distributions:
            try:
                versions[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        else:
            versions[name] = None
    init = _read(REPO / "minitensor" / "__init__.py")
    match = re.search(r'__version__\s*=\s*"([^"]+)"', init)
    versions["minitensor"] = match.group(1) if match else None
    return versions


def git_revision():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{commit}{' (with uncommitted changes)' if dirty else ''}" if commit else None
    except (OSError, subprocess.SubprocessError):
        return None


def engine_installed(engine):
    return all(importlib.util.find_spec(module) is not None for module in ENGINE_MODULES[engine])


# ----- running the workers -------------------------------------------------------------------

def run_worker(engine, workload, args):
    """One ``python -m bench.worker`` process; its JSON result (or an error record)."""
    from bench.worker import RESULT_PREFIX

    command = [sys.executable, "-m", "bench.worker", "--engine", engine, "--workload", workload,
               "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.tf32:
        command.append("--tf32")
    if args.profile and engine == "minitensor":
        command += ["--profile", "--profile-steps", str(args.profile_steps)]
    if args.verbose:
        command.append("--verbose")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=None if args.verbose else subprocess.PIPE, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"engine": engine, "workload": workload, "status": "error",
                "error": f"timed out after {args.timeout} s (--timeout)"}
    elapsed = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if lines:
        result = json.loads(lines[-1][len(RESULT_PREFIX):])
    else:
        reason = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        if proc.returncode == -9:
            reason += " (out of memory?)"
        tail = (proc.stderr or "").strip().splitlines()[-15:]
        result = {"engine": engine, "workload": workload, "status": "error",
                  "error": f"worker printed no result, {reason}", "stderr_tail": tail}
    result["wall_s"] = elapsed
    return result


# ----- printing --------------------------------------------------------------------------------

def _bytes(n):
    if not n:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _ms(seconds):
    return f"{1e3 * seconds:.1f}" if seconds is not None else "-"


def format_results(report):
    device = report["device"]
    lines = []
    m = report["machine"]
    lines.append(f"machine:  {m['cpu_model']} ({m.get('vector_isa', '?')}, family/model {m.get('cpu_family_model') or '?'}), "
                 f"{m['usable_cores']} usable of {m['logical_cores']} logical cores, "
                 f"{m['memory_gib']} GiB RAM" + (f"; GPU: {'; '.join(m['gpus'])}" if m["gpus"] else ""))
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v))
    lines.append(f"command:  {report['command']}")
    lines.append(f"date:     {report['date']}   git: {report['git'] or '-'}")
    if report.get("environment"):
        lines.append("env:      " + " ".join(f"{k}={v}" for k, v in sorted(report["environment"].items())))
    lines.append(f"step = forward + BCE(logits) + backward + Adam, float32; median of {report['steps']} timed steps "
                 f"after {report['warmup']} warm-up steps (minitensor's, on the CPU, go on until its measured "
                 f"convolution plan has settled)" + (", TF32 allowed" if report["tf32"] else ""))
    if report["steps"] < 10:
        lines.append("NOTE: fewer than 10 timed steps: a smoke run, not a measurement.")
    lines.append("")
    memory_header = "peak RSS" if device == "cpu" else "GPU peak"
    header = (f"{'workload':<10}{'engine':<12}{'median ms':>11}{'min ms':>10}{'max ms':>10}{'img/s':>9}"
              f"{memory_header:>12}" + (f"{'GPU held':>12}" if device == "gpu" else f"{'imports':>10}")
              + "   loss first -> last")
    lines += [header, "-" * len(header)]
    for r in report["results"]:
        name = ENGINE_LABELS.get(r["engine"], r["engine"])
        if r.get("status") != "ok":
            what = r.get("status", "error")
            message = r.get("error", "")
            lines.append(f"{r['workload']:<10}{name:<12}  {what}: {message}")
            continue
        memory = r.get("peak_rss_bytes") if device == "cpu" else r.get("gpu_peak_used_bytes")
        row = (f"{r['workload']:<10}{name:<12}{_ms(r['median_step_s']):>11}{_ms(r['min_step_s']):>10}"
               f"{_ms(r['max_step_s']):>10}{r['images_per_s']:>9.2f}{_bytes(memory):>12}")
        if device == "gpu":
            row += f"{_bytes(r.get('gpu_pool_held_bytes')):>12}"
        else:
            row += f"{_bytes(r.get('rss_after_import_bytes')):>10}"
        row += f"   {r['first_loss']:.4f} -> {r['last_loss']:.4f}"
        lines.append(row)
    notes = [f"  {ENGINE_LABELS.get(r['engine'], r['engine'])}/{r['workload']}: {note}"
             for r in report["results"] for note in r.get("notes", [])]
    notes += [f"  {ENGINE_LABELS.get(r['engine'], r['engine'])}: runs on {r['device_name']}"
              for r in report["results"] if r.get("device_name")]
    if notes:
        lines += ["", "notes:"] + sorted(set(notes))
    if report["ratios"]:
        lines += ["", "minitensor / other (images per second; below 1 means minitensor is slower):"]
        for ratio in report["ratios"]:
            lines.append(f"  {ratio['workload']:<10} minitensor / {ENGINE_LABELS[ratio['other']]:<11}"
                         f"{ratio['throughput_ratio']:7.3f}   (minitensor's step takes {1 / ratio['throughput_ratio']:.2f}x "
                         f"as long)")
    return "\n".join(lines)


def compute_ratios(results):
    by_key = {(r["workload"], r["engine"]): r for r in results if r.get("status") == "ok"}
    ratios = []
    for workload in dict.fromkeys(r["workload"] for r in results):
        ours = by_key.get((workload, "minitensor"))
        if not ours:
            continue
        for other in ("tensorflow", "torch"):
            theirs = by_key.get((workload, other))
            if theirs:
                ratios.append({"workload": workload, "other": other,
                               "throughput_ratio": ours["images_per_s"] / theirs["images_per_s"]})
    return ratios


# ----- the command line ------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all",
                   help="small: small_unet 128x128x3, 4 classes, batch 16; small-b4: the same at batch 4; original: "
                        "unet 572x572x3, 21 classes, batch 1; all: the three (default)")
    p.add_argument("--steps", type=int, default=10, help="timed steps, median reported (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--engines", default=",".join(ENGINE_ORDER),
                   help="comma-separated: minitensor, torch, tensorflow (default: all three)")
    p.add_argument("--profile", action="store_true", help="also print a per-layer profile of minitensor")
    p.add_argument("--profile-steps", type=int, default=3, help="profiled steps, median per row (default 3)")
    p.add_argument("--profile-top", type=int, default=0, help="print only the N slowest rows (default: all)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matrix products on the GPU (default: strict float32)")
    p.add_argument("--json", metavar="OUT", help="write everything (machine, versions, command, results) to OUT")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per worker process")
    p.add_argument("--verbose", action="store_true", help="show each worker's step times and stderr")
    args = p.parse_args(argv)
    engines = []
    for name in args.engines.split(","):
        name = name.strip().lower()
        if not name:
            continue
        if name not in ENGINE_ALIASES:
            p.error(f"unknown engine {name!r}: choose from {', '.join(ENGINE_ORDER)}")
        if ENGINE_ALIASES[name] not in engines:
            engines.append(ENGINE_ALIASES[name])
    if not engines:
        p.error("--engines names no engine")
    args.engines = engines
    if args.steps < 1 or args.warmup < 0 or args.profile_steps < 1:
        p.error("--steps and --profile-steps must be >= 1, --warmup >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    workloads = list(WORKLOADS) if args.workload == "all" else [args.workload]
    report = {
        "command": command, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": args.device, "workloads": {w: WORKLOADS[w].description for w in workloads},
        "steps": args.steps, "warmup": args.warmup, "tf32": args.tf32, "engines": args.engines,
        "machine": machine_info(), "versions": package_versions(), "git": git_revision(),
        "environment": {k: v for k, v in os.environ.items() if k in THREAD_VARIABLES},
        "results": [], "ratios": [],
    }
    if args.profile and "minitensor" not in args.engines:
        print("--profile profiles minitensor: add it to --engines", file=sys.stderr)
    for workload in workloads:
        for engine in args.engines:
            if not engine_installed(engine):
                result = {"engine": engine, "workload": workload, "status": "not installed",
                          "error": f"cannot import {' / '.join(ENGINE_MODULES[engine])}"}
            else:
                print(f"running {ENGINE_LABELS[engine]} on {workload} ({WORKLOADS[workload].description}), "
                      f"{args.device}, {args.warmup} + {args.steps} steps ...", flush=True)
                result = run_worker(engine, workload, args)
                if result.get("status") == "ok":
                    print(f"  median {1e3 * result['median_step_s']:.1f} ms/step, "
                          f"{result['images_per_s']:.2f} img/s", flush=True)
                else:
                    print(f"  {result.get('status')}: {result.get('error')}", flush=True)
                    for line in result.get("stderr_tail", []) + result.get("traceback", "").splitlines()[-6:]:
                        print(f"    {line}", flush=True)
            report["results"].append(result)
    report["ratios"] = compute_ratios(report["results"])
    print()
    print(format_results(report))
    if args.profile:
        from bench.layer_profile import format_profile
        for r in report["results"]:
            if r.get("profile"):
                print()
                print(format_profile(r["profile"], top=args.profile_top or None,
                                     title=f"minitensor per-layer profile: {r['workload']} "
                                           f"({WORKLOADS[r['workload']].description}) on {args.device}"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    # With MINITENSOR_REQUIRE_GPU=1 (bench/gpu_check.sh) a GPU run whose engine could not use the GPU fails;
    # the worker already reports it as an error, this also covers a result that says "unavailable".
    required = args.device == "gpu" and gpu_required()
    failed = [r for r in report["results"]
              if r.get("status") == "error" or (required and r.get("status") == "unavailable")]
    for r in failed:
        print(f"FAILED: {r['engine']} on {r['workload']}: {r.get('error')}", file=sys.stderr)
    return 1 if failed else 0
