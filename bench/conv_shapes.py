"""Each CPU convolution algorithm on the U-Nets' layer shapes: the measurements behind the rules ('rules', and
where 'auto' starts).

    python -m bench.conv_shapes                 # small_unet's shapes (batch 16)
    python -m bench.conv_shapes --original      # unet's deep shapes (batch 1)

For every shape it times the forward product and the kernel gradient dW under im2col + GEMM
(kernels/conv_gemm.py, in cache-sized pieces), the direct kernel and Winograd (F(2x2, 3x3) and
F(4x4, 3x3)), interleaved,
through the public ops ``kernels.conv2d_forward`` / ``conv2d_kernel_grad`` with ``algorithm=``,
and prints the best of ``--repeats`` runs in ms. kernels/conv_policy.py's prefers_winograd and prefers_winograd4 are read off
this table (docs/benchmarks.md, "Choosing the algorithm"); rerun it on a new machine kind
before changing the rule. float32, stride 1, 3x3, 'same' padding, on a quiet machine.
"""
from __future__ import annotations

import argparse
import time

import minitensor  # noqa: F401  before NumPy: its CPU settings (minitensor/cpu_runtime.py) apply
import numpy as np
from minitensor import kernels

SMALL = [(16, 128, 3, 32), (16, 128, 32, 32), (16, 128, 64, 32), (16, 64, 32, 64), (16, 64, 96, 32),
         (16, 32, 128, 128), (16, 32, 192, 64), (16, 16, 128, 128), (16, 16, 384, 128), (16, 8, 256, 256)]
ORIGINAL = [(1, 138, 256, 256), (1, 102, 512, 256), (1, 66, 512, 512), (1, 54, 1024, 512), (1, 30, 1024, 1024)]
ALGORITHMS = ("gemm", "direct", "winograd", "winograd4")


def products(x, kernel, dz):
    """name -> a call computing that product, for every algorithm."""
    size = x.shape[1]
    geometry = kernels.ConvGeometry(3, 3, 1, 1, 1, 1, size, size)          # 3x3, stride 1, 'same'
    calls = {}
    for algorithm in ALGORITHMS:
        calls[f"forward {algorithm}"] = lambda a=algorithm: kernels.conv2d_forward(x, kernel, None, geometry,
                                                                                   algorithm=a)
        calls[f"dW {algorithm}"] = lambda a=algorithm: kernels.conv2d_kernel_grad(x, dz, geometry, algorithm=a)
    return calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", action="store_true", help="unet's deep shapes (batch 1) instead")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    columns = [f"{product} {algorithm}" for product in ("forward", "dW") for algorithm in ALGORITHMS]
    print(f"{'N x S x S, C -> OC':<24}" + "".join(f"{name:>18}" for name in columns) + "   (ms, best of "
          f"{args.repeats})")
    for images, size, channels, out_channels in (ORIGINAL if args.original else SMALL):
        x = rng.standard_normal((images, size, size, channels)).astype(np.float32)
        kernel = (rng.standard_normal((3, 3, channels, out_channels)) * 0.1).astype(np.float32)
        dz = rng.standard_normal((images, size, size, out_channels)).astype(np.float32)
        calls = products(x, kernel, dz)
        for call in calls.values():      # compile and allocate once, untimed
            call()
        best = dict.fromkeys(calls, float("inf"))
        for _ in range(args.repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                best[name] = min(best[name], time.perf_counter() - start)
        label = f"{images}x{size}x{size}, {channels} -> {out_channels}"
        print(f"{label:<24}" + "".join(f"{1e3 * best[name]:18.1f}" for name in columns), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
