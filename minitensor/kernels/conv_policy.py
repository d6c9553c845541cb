"""Which algorithm runs each product of a convolution: the policy, kept out of the layer.

A Conv2D has three products, the forward Z, the input gradient dx and the kernel gradient dW.
Each can run as

- ``gemm``: im2col + one BLAS / cuBLAS product (kernels/conv_gemm.py), any kernel and stride;
- ``winograd``: Winograd F(2x2, 3x3) on the CPU (kernels/cpu_winograd.py), 3x3 stride 1 only;
- ``direct``: the register-blocked direct convolution on the CPU (kernels/cpu_conv.py), stride 1;
- ``reference``: im2col -> GEMM -> col2im in plain array code (kernels/reference.py), learning mode.

``choose`` decides, from the switches (kernels/switches.py) and the product's shape:

- learning mode (``MINITENSOR_KERNELS=reference``): ``reference`` everywhere;
- CuPy arrays, strided and 1x1 layers, or the setting 'gemm': ``gemm`` (the 1x1 stride-1 layer
  is already a matrix product; the GPU is fastest with one large cuBLAS product per layer);
- the setting 'direct': ``direct`` for every other stride-1 layer;
- kernels other than 3x3: ``gemm``;
- the setting 'winograd': ``winograd``; 'auto' (the default): ``winograd`` where
  ``prefers_winograd`` says it measured faster, ``gemm`` elsewhere.

The input gradient of a stride-1 convolution is itself a convolution (of dZ, with the flipped
kernel, whose output is x's N x H x W pixels), so it is judged as a forward of that size.
"""
from __future__ import annotations

import numpy as np

from minitensor.kernels import switches

#: Where 'auto' uses Winograd (see prefers_winograd).
WINOGRAD_MIN_PIXELS = 8192
WINOGRAD_MAX_CHANNEL_PRODUCT = {"forward": 512 * 512, "kernel_grad": 512 * 256}

#: The three products of a convolution, as ``choose`` names them.
PRODUCTS = ("forward", "input_grad", "kernel_grad")


def prefers_winograd(pixels, in_channels, out_channels, product="forward"):
    """Whether 'auto' gives one product of a 3x3 stride-1 layer to Winograd F(2x2, 3x3).

    ``pixels`` is the product's output pixels over the whole batch; ``product`` is "forward"
    (also used for dx, the same convolution with the channels swapped) or "kernel_grad" (dW).
    Read off ``python -m bench.conv_shapes`` (docs/benchmarks.md, "Choosing the algorithm"):
    Winograd's 2.25x fewer multiplications win on the wide layers; with fewer output pixels in
    the batch than WINOGRAD_MIN_PIXELS its transforms and fixed costs are barely repaid; and dW
    sweeps a 16 x C x OC partial sum every 4 tiles, which stops paying once that no longer fits
    the cache (the forward holds only the transformed kernel, so it keeps paying longer).
    """
    return pixels >= WINOGRAD_MIN_PIXELS and in_channels * out_channels <= WINOGRAD_MAX_CHANNEL_PRODUCT[product]


def choose(product, geometry, x_shape, out_channels, xp=np):
    """The algorithm for one product: 'reference', 'gemm', 'winograd' or 'direct' (see the module docstring).

    ``geometry`` is the layer's ConvGeometry, ``x_shape`` the layer input's (N, H, W, C),
    ``out_channels`` its OC, ``xp`` the arrays' module (NumPy or CuPy).
    """
    if product not in PRODUCTS:
        raise ValueError(f"product must be one of {', '.join(PRODUCTS)}, got {product!r}")
    if switches.using_reference():
        return "reference"
    setting = switches.get_conv_algorithm()
    if setting == "gemm" or not geometry.unit_stride or geometry.pointwise or xp is not np:
        return "gemm"
    if setting == "direct":
        return "direct"
    if geometry.kernel_size != (3, 3):
        return "gemm"
    n_images, height, width, in_channels = x_shape
    if product == "input_grad":
        pixels, measured_as = n_images * height * width, "forward"
    else:
        pixels, measured_as = n_images * geometry.out_h * geometry.out_w, product
    if setting == "winograd" or prefers_winograd(pixels, in_channels, out_channels, measured_as):
        return "winograd"
    return "gemm"
