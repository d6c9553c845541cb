"""``python -m bench.data_parallel``: one process against N MPI ranks on the same cores, and the Allreduce's share.

    python -m bench.data_parallel                              # both workloads, 1 process vs 2 ranks
    python -m bench.data_parallel --workload small --steps 8 --warmup 2 --ranks 2

For each workload, in one run, each configuration in its own processes:

* ``1 process x C threads``: Model.train_step on the whole batch (the fastest single process);
* ``1 process x C/N threads``: the same with the threads one rank gets (what each rank runs on);
* ``N ranks x C/N threads``: ``mpiexec -n N``, each rank a DataParallel step (minitensor/data_parallel.py)
  on its slice of the same global batch.

Reported per configuration: the median step time and images/s; for the ranks also the median time
inside the step's Allreduce (which includes waiting for the slowest rank) and the time of the
Allreduce alone on the same buffer after a barrier (pure communication), each as a share of the
step. The original U-Net runs at batch 2 here (batch 1 cannot be split over 2 ranks). The step
is the workloads' (bench/workloads.py): BCE on the logits, Adam, float32, data already in memory.
Target (issue 21): N ranks at >= 0.9x the best single process, the Allreduce < 5% of a small_unet step.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from bench.workloads import WORKLOADS, Workload

BATCHES = {"small": 16, "original": 2}


def measure(args):
    """In a worker process (one process, or one rank under mpiexec): time the steps, print one JSON line."""
    import minitensor
    import numpy as np
    from minitensor.data_parallel import DataParallel
    from minitensor.distributed import make_world
    from minitensor.optimizers import Adam
    from bench.workloads import make_batch
    from unet import small_unet, unet
    from unet.trainer import rank_slice

    world = make_world(None)
    base = WORKLOADS[args.workload]
    workload = Workload(base.name, base.model, base.input_shape, base.num_classes, BATCHES[base.name],
                        base.output_size)
    minitensor.set_seed(0)
    build = small_unet if workload.model == "small_unet" else unet
    model = build(input_shape=workload.input_shape, num_classes=workload.num_classes)
    model.compile(Adam(1e-3), minitensor.losses.BinaryCrossentropy(from_logits=True))
    x, y = make_batch(workload)
    reduce_seconds = []
    if world.size == 1:
        step = lambda: model.train_step(x, y)           # noqa: E731
    else:
        mine = rank_slice(np.arange(workload.batch), world.rank, world.size)
        parallel = DataParallel(model, world)
        reduce = world.allreduce_sum

        def timed_reduce(buffer):
            started = time.perf_counter()
            reduce(buffer)
            reduce_seconds.append(time.perf_counter() - started)
            return buffer
        world.allreduce_sum = timed_reduce
        step = lambda: parallel.train_step(x[mine], y[mine], share=len(mine) / workload.batch)   # noqa: E731
    seconds = []
    for index in range(args.warmup + args.steps):
        world.barrier()
        started = time.perf_counter()
        float(step())
        seconds.append(time.perf_counter() - started)
    seconds, reduce_seconds = seconds[args.warmup:], reduce_seconds[args.warmup:]
    alone = []
    if world.size > 1:
        buffer = parallel._flat_buffer()
        for _ in range(args.steps):
            world.comm.Barrier()
            started = time.perf_counter()
            reduce(buffer)
            alone.append(time.perf_counter() - started)
    record = {"rank": world.rank, "ranks": world.size, "step_s": statistics.median(seconds),
              "steps_s": seconds, "reduce_s": statistics.median(reduce_seconds) if reduce_seconds else 0.0,
              "reduce_alone_s": statistics.median(alone) if alone else 0.0, "batch": workload.batch,
              "params": model.count_params(), "buffer_bytes": (model.count_params() + 1) * 4,
              "threads": os.environ.get("OMP_NUM_THREADS"), "numba_threads": _numba_threads()}
    records = world.allgather(record)
    if world.is_writer:
        print("RESULT " + json.dumps(records))


def _numba_threads():
    try:
        import numba
        return numba.get_num_threads()
    except ImportError:
        return None


def run_config(workload, ranks, threads, args):
    env = {**os.environ, **{name: str(threads) for name in
                            ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    command = [sys.executable, "-m", "bench.data_parallel", "--worker", "--workload", workload,
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if ranks > 1:
        mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
        if mpiexec is None:
            raise SystemExit("no mpiexec: python -m pip install -e '.[mpi]'")
        command = [mpiexec, "-n", str(ranks), *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(BATCHES) + ["all"], default="all")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        measure(args)
        return 0
    from bench.run import machine_info

    machine = machine_info()
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // args.ranks)
    print(f"# {machine.get('cpu_model')} ({machine.get('vector_isa')}), {cores} cores; load before: "
          f"{os.getloadavg()[0]:.2f}")
    results = {"machine": machine, "workloads": {}}
    for workload in (sorted(BATCHES) if args.workload == "all" else [args.workload]):
        configs = [(f"1 process x {cores} threads", 1, cores), (f"1 process x {threads} threads", 1, threads),
                   (f"{args.ranks} ranks x {threads} threads", args.ranks, threads)]
        rows = {}
        for label, ranks, thread_count in configs:
            records = run_config(workload, ranks, thread_count, args)
            step = max(record["step_s"] for record in records)
            rows[label] = {"step_ms": 1000 * step, "images_per_s": records[0]["batch"] / step,
                           "allreduce_ms": 1000 * max(r["reduce_s"] for r in records),
                           "allreduce_alone_ms": 1000 * max(r["reduce_alone_s"] for r in records),
                           "buffer_MB": records[0]["buffer_bytes"] / 1e6, "records": records}
        best_single = max(rows[label]["images_per_s"] for label, ranks, _ in configs if ranks == 1)
        parallel = rows[configs[-1][0]]
        parallel["vs_best_single"] = parallel["images_per_s"] / best_single
        print(f"\n## {workload}, global batch {BATCHES[workload]}, buffer {parallel['buffer_MB']:.1f} MB")
        print("| configuration | step | images/s | Allreduce in the step | Allreduce alone |")
        print("|---|---|---|---|---|")
        for label, row in rows.items():
            share = (f"{row['allreduce_ms']:.1f} ms ({100 * row['allreduce_ms'] / row['step_ms']:.1f}%)"
                     if row["allreduce_ms"] else "-")
            alone = (f"{row['allreduce_alone_ms']:.1f} ms ({100 * row['allreduce_alone_ms'] / row['step_ms']:.1f}%)"
                     if row["allreduce_alone_ms"] else "-")
            print(f"| {label} | {row['step_ms']:.1f} ms | {row['images_per_s']:.2f} | {share} | {alone} |")
        print(f"{configs[-1][0]}: {parallel['vs_best_single']:.2f}x the best single process")
        results["workloads"][workload] = rows
    print(f"\nload after: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
