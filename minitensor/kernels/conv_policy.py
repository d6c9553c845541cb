"""Which algorithm runs each product of a convolution: the policy, kept out of the layer.

A Conv2D has three products, the forward Z, the input gradient dx and the kernel gradient dW.
Each can run as

- ``gemm``: im2col + one BLAS / cuBLAS product (kernels/conv_gemm.py), any kernel and stride;
- ``winograd``: Winograd F(2x2, 3x3) on the CPU (kernels/cpu_winograd.py), 3x3 stride 1 only;
- ``winograd4``: Winograd F(4x4, 3x3) on the CPU (kernels/cpu_winograd4.py), its products by BLAS,
  3x3 stride 1;
- ``direct``: the register-blocked direct convolution on the CPU (kernels/cpu_conv.py), stride 1;
- ``reference``: im2col -> GEMM -> col2im in plain array code (kernels/reference.py), learning mode.

``choose`` decides, from the switches (kernels/switches.py), the product's shape and, under 'auto', this
machine's timings:

- learning mode (``MINITENSOR_KERNELS=reference``): ``reference`` everywhere;
- CuPy arrays, strided and 1x1 layers, or the setting 'gemm': ``gemm`` (the 1x1 stride-1 layer
  is already a matrix product; the GPU is fastest with one large cuBLAS product per layer);
- the setting 'direct': ``direct`` for every other stride-1 layer;
- kernels other than 3x3: ``gemm``;
- the settings 'winograd' and 'winograd4': that one;
- 'rules' (``rules``): for the forward and dx, ``winograd4`` where ``prefers_winograd4`` says it
  measured faster (dW never: its F(4x4, 3x3) came after the rules were read, and only the plan below
  gives it dW); then ``winograd`` where ``prefers_winograd`` does; ``gemm`` elsewhere. Fixed
  thresholds, read off one machine kind (a 2-core AMD EPYC), the same answer everywhere;
- 'auto' (the default): what this machine measured. A product of a new shape runs every algorithm
  that can run it in turn in its first calls, each timed, and then keeps the fastest
  (kernels/conv_plan.py: once per shape and machine kind, cached on disk, kept in a training
  checkpoint); the rules' answer stands unless another algorithm is clearly faster, and wherever
  nothing is measured (more than one MPI rank per machine).

The input gradient of a stride-1 convolution is itself a convolution (of dZ, with the flipped
kernel, whose output is x's N x H x W pixels), so it is judged as a forward of that size.
"""
from __future__ import annotations

import numba
import numpy as np

from minitensor.kernels import conv_plan, cpu_winograd4, switches

#: Where the rules use Winograd (see prefers_winograd).
WINOGRAD_MIN_PIXELS = 8192
WINOGRAD_MAX_CHANNEL_PRODUCT = {"forward": 512 * 512, "kernel_grad": 512 * 256}

#: Where the rules use Winograd F(4x4, 3x3) for the forward and dx (see prefers_winograd4).
WINOGRAD4_MIN_PIXELS = 2048
WINOGRAD4_MIN_CHANNELS = 16

#: The three products of a convolution, as ``choose`` names them.
PRODUCTS = ("forward", "input_grad", "kernel_grad")


def prefers_winograd(pixels, in_channels, out_channels, product="forward"):
    """Whether the rules give one product of a 3x3 stride-1 layer to Winograd F(2x2, 3x3).

    ``pixels`` is the product's output pixels over the whole batch; ``product`` is "forward"
    (also used for dx, the same convolution with the channels swapped) or "kernel_grad" (dW).
    Read off ``python -m bench.conv_shapes`` (docs/benchmarks.md, "Choosing the algorithm"):
    Winograd's 2.25x fewer multiplications win on the wide layers; with fewer output pixels in
    the batch than WINOGRAD_MIN_PIXELS its transforms and fixed costs are barely repaid; and dW
    sweeps a 16 x C x OC partial sum every 4 tiles, which stops paying once that no longer fits
    the cache (the forward holds only the transformed kernel, so it keeps paying longer).
    """
    return pixels >= WINOGRAD_MIN_PIXELS and in_channels * out_channels <= WINOGRAD_MAX_CHANNEL_PRODUCT[product]


def prefers_winograd4(pixels, in_channels, out_channels):
    """Whether the rules give the forward (or dx, judged as the forward with the channels swapped) of a 3x3
    stride-1 layer to Winograd F(4x4, 3x3).

    Read off ``python -m bench.conv_shapes`` (docs/benchmarks.md, "Choosing the algorithm"): its BLAS
    products need enough input channels to be real matrix products (the 3-channel first layer is
    faster with F(2x2, 3x3), and 32 channels only tie), and enough pixels for chunks of 64 tiles to
    keep every core busy (small_unet's 8 px layer, 64 tiles in all, is faster with F(2x2, 3x3));
    then it beats both F(2x2, 3x3) and GEMM up to unet's 1024-channel layers.
    """
    if not (cpu_winograd4.runs_in_parallel() or numba.get_num_threads() == 1):
        return False        # its chunks would take turns on BLAS's threads: slower than F(2x2, 3x3)
    return pixels >= WINOGRAD4_MIN_PIXELS and in_channels >= WINOGRAD4_MIN_CHANNELS


def rules(product, geometry, x_shape, out_channels, setting="rules"):
    """The rules' algorithm for one product of a stride-1, non-1x1 layer on the CPU: 'winograd4',
    'winograd', 'direct' or 'gemm' from the setting and the thresholds above (see the module docstring)."""
    if setting == "direct":
        return "direct"
    if geometry.kernel_size != (3, 3):
        return "gemm"
    n_images, height, width, in_channels = x_shape
    if product == "input_grad":     # the forward of dZ (OC channels) with the flipped kernel, onto x's pixels
        pixels, measured_as = n_images * height * width, "forward"
        in_channels, out_channels = out_channels, in_channels
    else:
        pixels, measured_as = n_images * geometry.out_h * geometry.out_w, product
    if setting == "winograd4":
        return "winograd4"
    if setting == "winograd":
        return "winograd"
    if product != "kernel_grad" and prefers_winograd4(pixels, in_channels, out_channels):
        return "winograd4"
    if prefers_winograd(pixels, in_channels, out_channels, measured_as):
        return "winograd"
    return "gemm"


def choose(product, geometry, x_shape, out_channels, xp=np, dtype=np.float32):
    """The algorithm for one product: 'reference', 'gemm', 'winograd', 'winograd4' or 'direct' (see the module
    docstring).

    ``geometry`` is the layer's ConvGeometry, ``x_shape`` the layer input's (N, H, W, C),
    ``out_channels`` its OC, ``xp`` the arrays' module (NumPy or CuPy), ``dtype`` theirs (the plan
    measures float32 and float64 apart).
    """
    return decide(product, geometry, x_shape, out_channels, xp, dtype)[0]


def decide(product, geometry, x_shape, out_channels, xp=np, dtype=np.float32):
    """(algorithm, trial): ``choose``'s answer, and None or the conv_plan.Trial that must be given the call's
    time (kernels/conv.py runs the call)."""
    if product not in PRODUCTS:
        raise ValueError(f"product must be one of {', '.join(PRODUCTS)}, got {product!r}")
    if switches.using_reference():
        return "reference", None
    setting = switches.get_conv_algorithm()
    if setting == "gemm" or not geometry.unit_stride or geometry.pointwise or xp is not np:
        return "gemm", None
    preferred = rules(product, geometry, x_shape, out_channels, setting)
    if setting == "auto":
        entry = conv_plan.key(product, geometry, tuple(x_shape), out_channels, dtype)
        return conv_plan.current().choose(entry, preferred)
    return preferred, None
