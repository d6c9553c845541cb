"""The convolution ops: the forward, the input gradient and the kernel gradient, each on a ConvGeometry.

    conv2d_forward(x, kernel, bias, geometry, relu=False)   -> y  = relu?(conv(x, W) + b)   (N, OH, OW, OC)
    conv2d_input_grad(dz, kernel, x_shape, geometry)        -> dx                          x_shape
    conv2d_kernel_grad(x, dz, geometry)                     -> dW                          (KH, KW, C, OC)

reference.py holds their definitions (im2col -> GEMM -> col2im) and layers/conv2d.py derives
them. Each call checks its arguments, asks kernels/conv_policy.py which algorithm serves this
product on these arrays (or takes the one named by ``algorithm=``: 'reference', 'gemm',
'winograd', 'winograd4', 'direct'), and runs that algorithm's code from the op table (kernels/table.py),
timing the call when the measured plan asks for it (kernels/conv_plan.py: a new shape's first calls).
"""
from __future__ import annotations

import time

import numpy as np

from minitensor.backend import get_array_module
from minitensor.kernels import conv_policy, table
from minitensor.kernels.checks import check_float_array, check_same, check_x_shape
from minitensor.kernels.geometry import ConvGeometry

#: The names ``algorithm=`` takes.
ALGORITHMS = ("reference", "gemm", "winograd", "winograd4", "direct")
_PRODUCT = {"conv2d_forward": "forward", "conv2d_input_grad": "input_grad", "conv2d_kernel_grad": "kernel_grad"}


def _check_geometry(geometry, kernel_h, kernel_w):
    if not isinstance(geometry, ConvGeometry):
        raise TypeError(f"geometry must be a kernels.ConvGeometry, got {type(geometry).__name__}")
    if geometry.kernel_size != (kernel_h, kernel_w):
        raise ValueError(f"geometry is for a {geometry.kernel_h}x{geometry.kernel_w} kernel, "
                         f"the kernel is {kernel_h}x{kernel_w}")


def _algorithm_code(op, algorithm, geometry, xp):
    """The module whose ``op`` runs ``algorithm`` on these arrays, or a clear error."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    if algorithm == "reference":
        return table.TABLE[op]["reference"].module
    column = table.DEVICE_COLUMNS["numpy" if xp is np else "cupy"]
    options = table.TABLE[op][column].algorithms
    if algorithm not in options:
        raise ValueError(f"algorithm {algorithm!r} has no {column} code: for these arrays use one of "
                         f"{', '.join(['reference', *options])}")
    if algorithm in ("winograd", "winograd4", "direct") and not geometry.unit_stride:
        raise ValueError(f"algorithm {algorithm!r} needs stride 1, got {geometry.stride_h}x{geometry.stride_w}: "
                         f"use algorithm='gemm'")
    if algorithm in ("winograd", "winograd4") and geometry.kernel_size != (3, 3):
        raise ValueError(f"Winograd F({'4x4' if algorithm == 'winograd4' else '2x2'}, 3x3) needs a 3x3 kernel, got "
                         f"{geometry.kernel_h}x{geometry.kernel_w}: use algorithm='direct'")
    return options[algorithm].module


def _serve(op, geometry, x_shape, out_channels, xp, algorithm, dtype):
    """(the code that runs ``op``, None or the plan's Trial to time it for: kernels/conv_plan.py)."""
    trial = None
    if algorithm is None:
        algorithm, trial = conv_policy.decide(_PRODUCT[op], geometry, x_shape, out_channels, xp, dtype)
    return _algorithm_code(op, algorithm, geometry, xp), trial


def _run(trial, function, *args, **kwargs):
    """function(*args, **kwargs), timed for the plan when it is one of its trials."""
    if trial is None:
        return function(*args, **kwargs)
    if trial.cold:
        function(*args, **kwargs)      # loads the compiled code; the timed call below gives the same result
    start = time.perf_counter()
    result = function(*args, **kwargs)
    trial.record(time.perf_counter() - start)
    return result


def conv2d_forward(x, kernel, bias, geometry, relu=False, algorithm=None):
    """y = relu?(conv(x, kernel) + bias): x (N, H, W, C), kernel (KH, KW, C, OC), bias (OC,) or None."""
    check_float_array("x", x, 4)
    check_float_array("kernel", kernel, 4)
    check_same("x", x, "kernel", kernel)
    _check_geometry(geometry, kernel.shape[0], kernel.shape[1])
    if kernel.shape[2] != x.shape[3]:
        raise ValueError(f"kernel {tuple(kernel.shape)} expects {kernel.shape[2]} input channels, x has {x.shape[3]}")
    if bias is not None:
        if tuple(getattr(bias, "shape", ())) != (kernel.shape[3],):
            raise ValueError(f"bias must have shape ({kernel.shape[3]},), got {tuple(getattr(bias, 'shape', ()))}")
        check_same("x", x, "bias", bias)
    code, trial = _serve("conv2d_forward", geometry, x.shape, kernel.shape[3], get_array_module(x, kernel),
                         algorithm, x.dtype)
    return _run(trial, code.conv2d_forward, x, kernel, bias, geometry, relu=bool(relu))


def conv2d_input_grad(dz, kernel, x_shape, geometry, algorithm=None):
    """dx (x_shape) from dZ (N, OH, OW, OC), the gradient at the convolution's output, and the kernel."""
    check_float_array("dz", dz, 4)
    check_float_array("kernel", kernel, 4)
    check_same("dz", dz, "kernel", kernel)
    x_shape = check_x_shape(x_shape)
    _check_geometry(geometry, kernel.shape[0], kernel.shape[1])
    expected = (x_shape[0], geometry.out_h, geometry.out_w, kernel.shape[3])
    if tuple(dz.shape) != expected or kernel.shape[2] != x_shape[3]:
        raise ValueError(f"dz {tuple(dz.shape)} and kernel {tuple(kernel.shape)} do not fit x_shape {x_shape}: "
                         f"dz must be {expected}, the kernel's input channels {x_shape[3]}")
    code, trial = _serve("conv2d_input_grad", geometry, x_shape, kernel.shape[3], get_array_module(dz, kernel),
                         algorithm, dz.dtype)
    return _run(trial, code.conv2d_input_grad, dz, kernel, x_shape, geometry)


def conv2d_kernel_grad(x, dz, geometry, algorithm=None):
    """dW (KH, KW, C, OC) from the input x (N, H, W, C) and dZ (N, OH, OW, OC)."""
    check_float_array("x", x, 4)
    check_float_array("dz", dz, 4)
    check_same("x", x, "dz", dz)
    if not isinstance(geometry, ConvGeometry):
        raise TypeError(f"geometry must be a kernels.ConvGeometry, got {type(geometry).__name__}")
    if dz.shape[0] != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} images but dz has {dz.shape[0]}")
    if tuple(dz.shape[1:3]) != (geometry.out_h, geometry.out_w):
        raise ValueError(f"dz is {dz.shape[1]}x{dz.shape[2]} but the geometry's output is "
                         f"{geometry.out_h}x{geometry.out_w}")
    code, trial = _serve("conv2d_kernel_grad", geometry, x.shape, dz.shape[3], get_array_module(x, dz),
                         algorithm, x.dtype)
    return _run(trial, code.conv2d_kernel_grad, x, dz, geometry)


def algorithm_of(op, *args, **kwargs):
    """The algorithm a call ``op(*args, **kwargs)`` of a convolution op runs: its ``algorithm=`` or the
    policy's choice (bench/layer_profile.py labels its rows with it)."""
    parameters = {
        "conv2d_forward": lambda x, kernel, bias, geometry, relu=False, algorithm=None:
            (geometry, x.shape, kernel.shape[3], (x, kernel), algorithm),
        "conv2d_input_grad": lambda dz, kernel, x_shape, geometry, algorithm=None:
            (geometry, tuple(x_shape), kernel.shape[3], (dz, kernel), algorithm),
        "conv2d_kernel_grad": lambda x, dz, geometry, algorithm=None:
            (geometry, x.shape, dz.shape[3], (x, dz), algorithm),
    }
    geometry, x_shape, out_channels, arrays, algorithm = parameters[op](*args, **kwargs)
    return algorithm or conv_policy.choose(_PRODUCT[op], geometry, x_shape, out_channels, get_array_module(*arrays),
                                           arrays[0].dtype)
