"""Where does a training step of a minitensor U-Net spend its time? A per-layer profile.

It runs the model's real ``train_on_batch`` and times every piece of it by wrapping, on the
objects of this one model (nothing in minitensor's files changes):

* each layer's ``forward`` and ``backward`` (rows named after the layers, as in ``summary()``);
* the loss's ``forward`` + ``backward`` (one row) and the optimizer's ``step`` (one row);
* inside the layers, the ops of ``minitensor.kernels`` (the three convolution products, max-pool,
  upsampling), attributed to the layer that called them, and for a Conv2D the algorithm each
  product ran (``kernels.conv_algorithm_of``): a Conv2D's time minus its kernel time is the
  bias gradient, the activation's backward and the layer's own bookkeeping;
* what is left of the step ("other": the model's bookkeeping and the ``+=`` of the two gradients
  that reach each skip connection's encoder map).

On the GPU every timer waits for the device first (``synchronize``), so each row is the time of
that layer's kernels alone; this removes the overlap of Python with the GPU that an unprofiled
step enjoys, and the profiled step is a little slower than the benchmark's.

For each row the profile keeps the median over the profiled steps; "share" is the row's part of
the profiled step. Conv rows also give GFLOP/s, counting two flops per multiply-add,
2*N*OH*OW*KH*KW*C*OC for the forward and twice that for the backward (dW and dX; once when the layer skipped dX,
as the first layer may: nobody needs the gradient of the input images), so a reader can compare a
layer with the machine's peak and see which convolutions use the hardware well.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict

KERNEL_NAMES = ("conv2d_forward", "conv2d_input_grad", "conv2d_kernel_grad", "maxpool_forward", "maxpool_backward",
                "upsample_forward", "upsample_backward")


def conv_flops(layer, output_shape, batch):
    """Forward flops of a Conv2D (2 per multiply-add), or 0 for any other layer."""
    if type(layer).__name__ != "Conv2D":
        return 0
    out_h, out_w, out_c = output_shape
    kernel_h, kernel_w = layer.kernel_size
    in_c = layer.input_shape[-1]
    return 2 * batch * out_h * out_w * kernel_h * kernel_w * in_c * out_c


class _Recorder:
    """Collects the durations of one step, keyed by (row, phase)."""

    def __init__(self, sync):
        self.sync = sync
        self.current = None                 # the row whose forward/backward is running now
        self.times = defaultdict(float)     # (row, phase) -> seconds in this step
        self.no_input_grad = set()          # rows whose backward returned None (skipped dL/dx)
        self.algorithms = defaultdict(set)  # row -> the fast conv algorithms its kernel calls named

    def now(self):
        self.sync()
        return time.perf_counter()

    def timed(self, row, phase, function, sets_current=False):
        def wrapper(*args, **kwargs):
            outer = self.current
            if sets_current:
                self.current = row
            start = self.now()
            try:
                result = function(*args, **kwargs)
                if result is None and phase == "backward":
                    self.no_input_grad.add(row)
                return result
            finally:
                self.times[(row, phase)] += self.now() - start
                self.current = outer
        return wrapper


@contextlib.contextmanager
def _instrumented(model, recorder):
    """Wrap the layers, the loss, the optimizer and the kernels; undo everything on exit."""
    import minitensor.kernels as kernels

    patched = []   # (object, attribute name) given an instance attribute that shadows the method

    def patch(obj, name, wrapper):
        setattr(obj, name, wrapper)
        patched.append((obj, name))

    originals = {name: getattr(kernels, name) for name in KERNEL_NAMES}
    try:
        for layer in model.layers:
            patch(layer, "forward", recorder.timed(layer.name, "forward", layer.forward, sets_current=True))
            patch(layer, "backward", recorder.timed(layer.name, "backward", layer.backward, sets_current=True))
        loss_row = f"loss ({type(model.loss).__name__})"
        patch(model.loss, "forward", recorder.timed(loss_row, "forward", model.loss.forward))
        patch(model.loss, "backward", recorder.timed(loss_row, "backward", model.loss.backward))
        optimizer_row = f"optimizer ({type(model.optimizer).__name__})"
        patch(model.optimizer, "step", recorder.timed(optimizer_row, "forward", model.optimizer.step))

        def kernel_wrapper(name, function):
            def wrapper(*args, **kwargs):
                if name.startswith("conv2d_"):
                    recorder.algorithms[recorder.current].add(kernels.conv_algorithm_of(name, *args, **kwargs))
                start = recorder.now()
                try:
                    return function(*args, **kwargs)
                finally:
                    recorder.times[(recorder.current, "kernel:" + name)] += recorder.now() - start
            return wrapper

        for name, function in originals.items():
            setattr(kernels, name, kernel_wrapper(name, function))
        yield loss_row, optimizer_row
    finally:
        for name, function in originals.items():
            setattr(kernels, name, function)
        for obj, name in patched:
            delattr(obj, name)   # the class's method shows through again


def profile_train_step(model, x, y, sync, steps=3):
    """Profile ``steps`` calls of ``model.train_on_batch(x, y)``; returns a JSON-able dict.

    Run it on a warm model (after a few untimed steps): the first step compiles numba kernels
    and CUDA kernels and allocates the optimizer's moments.
    """
    batch = x.shape[0]
    per_step = []
    walls = []
    no_input_grad = set()
    algorithms = defaultdict(set)
    for _ in range(steps):
        recorder = _Recorder(sync)
        with _instrumented(model, recorder) as (loss_row, optimizer_row):
            start = recorder.now()
            model.train_on_batch(x, y)
            walls.append(recorder.now() - start)
        per_step.append(recorder.times)
        no_input_grad |= recorder.no_input_grad
        for row, names in recorder.algorithms.items():
            algorithms[row] |= names

    def median(key):
        return statistics.median(times.get(key, 0.0) for times in per_step)

    rows = []
    for node in model.nodes:
        layer = node.layer
        forward, backward = median((layer.name, "forward")), median((layer.name, "backward"))
        kernel_ms = {name: 1e3 * median((layer.name, "kernel:" + name)) for name in KERNEL_NAMES}
        flops = conv_flops(layer, node.output.shape, batch)
        rows.append({
            "name": layer.name, "type": type(layer).__name__,
            "output_shape": [batch, *node.output.shape],
            "forward_ms": 1e3 * forward, "backward_ms": 1e3 * backward, "total_ms": 1e3 * (forward + backward),
            "kernel_ms": {k: v for k, v in kernel_ms.items() if v > 0},
            # backward = dW (one GEMM as large as the forward) + dX (another), unless dX was skipped
            "forward_gflop": flops / 1e9, "backward_gflop": (1 if layer.name in no_input_grad else 2) * flops / 1e9,
            "input_grad": layer.name not in no_input_grad,
            "algorithm": ("+".join(sorted(algorithms[layer.name])) or "gemm") if flops else None,
        })
    for row_name, row_type in ((loss_row, "loss"), (optimizer_row, "optimizer")):
        forward, backward = median((row_name, "forward")), median((row_name, "backward"))
        rows.append({"name": row_name, "type": row_type, "output_shape": None, "forward_ms": 1e3 * forward,
                     "backward_ms": 1e3 * backward, "total_ms": 1e3 * (forward + backward), "kernel_ms": {},
                     "forward_gflop": 0.0, "backward_gflop": 0.0})
    # "other": the step's wall time minus everything timed above, per step, then the median.
    timed_keys = [k for k in set().union(*per_step) if not k[1].startswith("kernel:")]
    others = [wall - sum(times.get(k, 0.0) for k in timed_keys) for wall, times in zip(walls, per_step)]
    rows.append({"name": "other (model bookkeeping, skip gradient adds)", "type": "other", "output_shape": None,
                 "forward_ms": 0.0, "backward_ms": 1e3 * max(statistics.median(others), 0.0),
                 "total_ms": 1e3 * max(statistics.median(others), 0.0), "kernel_ms": {},
                 "forward_gflop": 0.0, "backward_gflop": 0.0})
    total = sum(r["total_ms"] for r in rows)
    for r in rows:
        r["share"] = r["total_ms"] / total if total > 0 else 0.0
    rows.sort(key=lambda r: -r["total_ms"])
    return {"steps": steps, "profiled_step_ms": 1e3 * statistics.median(walls), "rows_total_ms": total, "rows": rows,
            "gemm_peak_gflops": gemm_peak_gflops(x, sync)}


def gemm_peak_gflops(like, sync, size=2048, repeats=3):
    """The machine's float32 matrix-product speed, 2*size^3 flops at the best of ``repeats``:
    the yardstick for the profile's "% peak" column (BLAS or cuBLAS on square matrices)."""
    import minitensor

    xp = minitensor.get_array_module(like)
    a = xp.ones((size, size), dtype=xp.float32)
    b = xp.ones((size, size), dtype=xp.float32)
    a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


# ----- printing ------------------------------------------------------------------------------

def _gflops(gflop, ms):
    return f"{gflop / (ms / 1e3):7.1f}" if gflop > 0 and ms > 0 else "      -"


def _peak_share(row, peak):
    """The row's convolution flops per second as a share of the machine's GEMM peak (Winograd's
    flops are counted as the direct convolution's, so a Winograd layer may pass 100%)."""
    gflop, ms = row["forward_gflop"] + row["backward_gflop"], row["total_ms"]
    return f"{100 * gflop / (ms / 1e3) / peak:.0f}%" if gflop > 0 and ms > 0 and peak else "-"


def format_profile(profile, title="", top=None):
    """The profile as text: per-layer rows sorted by time, then totals per layer type."""
    rows = profile["rows"][:top] if top else profile["rows"]
    lines = []
    if title:
        lines.append(title)
    peak = profile.get("gemm_peak_gflops")
    lines.append(f"median of {profile['steps']} profiled steps; profiled step {profile['profiled_step_ms']:.1f} ms "
                 f"(sum of rows {profile['rows_total_ms']:.1f} ms)"
                 + (f"; this machine's float32 GEMM peak (2048^3): {peak:.0f} GFLOP/s" if peak else ""))
    header = (f"{'layer':<46}{'type':<13}{'output':<20}{'fwd ms':>9}{'bwd ms':>9}{'total ms':>10}{'share':>7}"
              f"{'cum':>7}{'kernels ms':>11}{'fwd GF/s':>9}{'bwd GF/s':>9}{'% peak':>7}  algorithm")
    lines += [header, "-" * len(header)]
    cumulative = 0.0
    for r in rows:
        cumulative += r["share"]
        shape = "x".join(map(str, r["output_shape"])) if r["output_shape"] else ""
        kernels = sum(r["kernel_ms"].values())
        lines.append(
            f"{r['name'][:45]:<46}{r['type']:<13}{shape:<20}{r['forward_ms']:9.2f}{r['backward_ms']:9.2f}"
            f"{r['total_ms']:10.2f}{100 * r['share']:6.1f}%{100 * cumulative:6.1f}%"
            f"{(f'{kernels:.2f}' if kernels else '-'):>11}"
            f"{_gflops(r['forward_gflop'], r['forward_ms']):>9}{_gflops(r['backward_gflop'], r['backward_ms']):>9}"
            f"{_peak_share(r, peak):>7}  {r.get('algorithm') or ''}".rstrip())
    if top and len(profile["rows"]) > top:
        lines.append(f"... {len(profile['rows']) - top} more rows (see --json)")
    lines.append("")
    lines.append(format_by_type(profile))
    return "\n".join(lines)


def format_by_type(profile):
    """Totals per layer type, and how a Conv2D's time splits into its three convolution products and the rest."""
    by_type = defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    kernel_totals = defaultdict(float)
    conv_gflop, conv_ms = 0.0, 0.0
    for r in profile["rows"]:
        entry = by_type[r["type"]]
        entry[0] += 1
        entry[1] += r["forward_ms"]
        entry[2] += r["backward_ms"]
        entry[3] += r["share"]
        if r["type"] == "Conv2D":
            for name, ms in r["kernel_ms"].items():
                kernel_totals[name] += ms
            conv_gflop += r["forward_gflop"] + r["backward_gflop"]
            conv_ms += r["total_ms"]
    header = f"{'by type':<16}{'count':>6}{'fwd ms':>10}{'bwd ms':>10}{'total ms':>10}{'share':>8}"
    lines = [header, "-" * len(header)]
    for kind, (count, fwd, bwd, share) in sorted(by_type.items(), key=lambda kv: -(kv[1][1] + kv[1][2])):
        lines.append(f"{kind:<16}{count:>6}{fwd:10.2f}{bwd:10.2f}{fwd + bwd:10.2f}{100 * share:7.1f}%")
    if conv_ms > 0:
        products = sum(kernel_totals.values())
        rest = conv_ms - products
        parts = [f"{name} {ms:.1f} ms ({100 * ms / conv_ms:.0f}%)" for name, ms in sorted(kernel_totals.items())]
        lines.append("")
        lines.append(f"Conv2D time {conv_ms:.1f} ms = " + " + ".join(
            parts + [f"bias gradient, activation backward, bookkeeping {rest:.1f} ms ({100 * rest / conv_ms:.0f}%)"]))
        lines.append(f"Conv2D arithmetic: {conv_gflop:.1f} GFLOP per step at {conv_gflop / (conv_ms / 1e3):.1f} GFLOP/s "
                     f"overall ({conv_gflop / (products / 1e3):.1f} GFLOP/s counting only the three products)"
                     if products > 0 else f"Conv2D arithmetic: {conv_gflop:.1f} GFLOP per step")
    return "\n".join(lines)
