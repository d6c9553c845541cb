"""The hot kernels of minitensor, one function per op: checks its arguments, then runs the implementation
the op table names for the arrays' device.

The op table (kernels/table.py, printed with ``python -m minitensor.kernels``, quoted below) has
one row per op and one column per implementation: ``naive.py`` (loops, the definition),
``reference.py`` (plain array code, the one to read, the truth the others are tested against),
numba (``cpu.py``; the convolutions in ``conv_gemm.py``, ``cpu_winograd.py``, ``cpu_conv.py``) and
CUDA (``gpu.py``). NumPy arrays take the numba column, CuPy arrays the CUDA column; where a
column has no code of its own the table says which it uses and why. Learning mode
(``MINITENSOR_KERNELS=reference``, ``use_reference(True)`` or ``with reference_kernels():``,
kernels/switches.py) runs the reference column everywhere. The convolutions pick one of
several algorithms per product (kernels/conv_policy.py; ``set_conv_algorithm``, ``MINITENSOR_CONV``), under
'auto' by what this machine measured (kernels/conv_plan.py).
The elementwise ops' functions (``table.ELEMENTWISE``: one shape for all their arrays) are written
from the table by ``_elementwise``; the others check their windows and shapes below.
docs/CONTRACTS.md states each op's contract.

"""
from __future__ import annotations

import functools

import numpy as np

from minitensor.backend import get_array_module
from minitensor.kernels import table
from minitensor.kernels.checks import FLOAT_DTYPES, check_float_array, check_ints, check_window, check_x_shape
from minitensor.kernels import conv_plan
from minitensor.kernels.conv import algorithm_of as conv_algorithm_of
from minitensor.kernels.conv import conv2d_forward, conv2d_input_grad, conv2d_kernel_grad
from minitensor.kernels.geometry import ConvGeometry
from minitensor.kernels.switches import (CONV_ALGORITHMS, conv_algorithm, get_conv_algorithm, reference_kernels,
                                         set_conv_algorithm, use_reference, using_reference)

if __doc__:                       # None under python -OO
    __doc__ += table.format_table()

__all__ = ["CONV_ALGORITHMS", "ConvGeometry", "adam_update", "col2im", "concatenate", "conv2d_forward",
           "conv2d_input_grad", "conv2d_kernel_grad", "conv_algorithm", "conv_algorithm_of", "conv_plan",
           "get_conv_algorithm", "im2col", "implementation_of", "maxpool_backward", "maxpool_forward",
           "reference_kernels", "set_conv_algorithm", "softmax_forward", "upsample_backward", "upsample_forward",
           "use_reference", "using_reference", *table.ELEMENTWISE]


def implementation_of(op, *arrays):
    """The column of the op table ("reference", "numba" or "cuda") that serves ``op`` for these arrays now;
    get_array_module raises TypeError if their devices are mixed."""
    xp = get_array_module(*arrays)
    return table.column_for(op, "numpy" if xp is np else "cupy", using_reference())[0]


def _serve(op, *arrays):
    """The function that runs ``op`` for these arrays (the op table's cell, fallbacks followed)."""
    xp = get_array_module(*arrays)
    return table.column_for(op, "numpy" if xp is np else "cupy", using_reference())[1].resolve(op)


def im2col(x, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w, out=None):
    """Windows of x (N, H, W, C) as rows: cols (N*out_h*out_w, kh*kw*C). See reference.im2col.

    ``out``, if given, is a C-contiguous array of that shape and x's dtype and device that
    receives the result (Conv2D passes reused scratch memory, see backend.scratch_array);
    every element is overwritten, so it may hold anything.
    """
    check_float_array("x", x, 4)
    check_window(kh, kw, sh, sw, pad_top, pad_left, out_h, out_w)
    if out is not None:
        expected = (x.shape[0] * out_h * out_w, kh * kw * x.shape[3])
        if tuple(out.shape) != expected or out.dtype != x.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {x.dtype} array of shape {expected}, got "
                             f"{out.dtype} {tuple(out.shape)}")
        get_array_module(x, out)   # same device, or a clear error
    return _serve("im2col", x)(x, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w, out=out)


def col2im(cols, x_shape, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w):
    """The adjoint of im2col: dx with shape x_shape. See reference.col2im."""
    check_float_array("cols", cols, 2)
    x_shape = check_x_shape(x_shape)
    check_window(kh, kw, sh, sw, pad_top, pad_left, out_h, out_w)
    n_batch, _, _, channels = x_shape
    expected = (n_batch * out_h * out_w, kh * kw * channels)
    if tuple(cols.shape) != expected:
        raise ValueError(f"cols has shape {tuple(cols.shape)}, but x_shape {x_shape} with a {kh}x{kw} kernel "
                         f"and a {out_h}x{out_w} output needs {expected}")
    return _serve("col2im", cols)(cols, x_shape, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w)


def maxpool_forward(x, ph, pw, sh, sw, pad_top, pad_left, out_h, out_w):
    """Max over each ph x pw window: (y, argmax int32), both (N, out_h, out_w, C). See reference."""
    check_float_array("x", x, 4)
    check_window(ph, pw, sh, sw, pad_top, pad_left, out_h, out_w)
    return _serve("maxpool_forward", x)(x, ph, pw, sh, sw, pad_top, pad_left, out_h, out_w)


def maxpool_backward(dy, argmax, x_shape, ph, pw, sh, sw, pad_top, pad_left):
    """dy routed to each window's argmax cell: dx with shape x_shape. See reference."""
    check_float_array("dy", dy, 4)
    x_shape = check_x_shape(x_shape)
    n_batch, out_h, out_w, channels = dy.shape
    check_window(ph, pw, sh, sw, pad_top, pad_left, out_h, out_w)
    if getattr(argmax, "dtype", None) != np.int32 or argmax.shape != dy.shape:
        raise ValueError(f"argmax must be the int32 array of dy's shape {tuple(dy.shape)} that maxpool_forward "
                         f"returned, got {getattr(argmax, 'dtype', type(argmax).__name__)} "
                         f"of shape {getattr(argmax, 'shape', None)}")
    if (x_shape[0], x_shape[3]) != (n_batch, channels):
        raise ValueError(f"dy {tuple(dy.shape)} and x_shape {x_shape} differ in batch size or channels")
    return _serve("maxpool_backward", dy, argmax)(dy, argmax, x_shape, ph, pw, sh, sw, pad_top, pad_left)


def upsample_forward(x, sh, sw):
    """Nearest-neighbour upsampling: y (N, H*sh, W*sw, C). See reference."""
    check_float_array("x", x, 4)
    check_ints(1, sh=sh, sw=sw)
    return _serve("upsample_forward", x)(x, sh, sw)


def upsample_backward(dy, sh, sw):
    """Sum of dy over each sh x sw block: dx (N, H, W, C). See reference."""
    check_float_array("dy", dy, 4)
    check_ints(1, sh=sh, sw=sw)
    if dy.shape[1] % sh or dy.shape[2] % sw:
        raise ValueError(f"dy of shape {tuple(dy.shape)} is not made of whole {sh}x{sw} blocks")
    return _serve("upsample_backward", dy)(dy, sh, sw)


def softmax_forward(x):
    """Softmax over the last axis (the channels). See reference.softmax_forward."""
    if getattr(x, "dtype", None) not in FLOAT_DTYPES or x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be a float32 or float64 array with a non-empty last axis, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} of shape {getattr(x, 'shape', None)}")
    return _serve("softmax_forward", x)(x)


def concatenate(arrays, axis):
    """The arrays side by side along ``axis``: (..., sum C_i, ...). See reference.concatenate."""
    if not isinstance(arrays, (list, tuple)) or not arrays:
        raise TypeError(f"concatenate takes a non-empty list of arrays, got {type(arrays).__name__}")
    first = arrays[0]
    if not hasattr(first, "ndim"):
        raise TypeError(f"concatenate takes NumPy or CuPy arrays, got {type(first).__name__}")
    for array in arrays:
        check_float_array("each array", array, first.ndim)
        if array.dtype != first.dtype:
            raise TypeError(f"concatenate: the arrays are {' and '.join(str(a.dtype) for a in arrays)}: use one dtype")
    if not -first.ndim <= axis < first.ndim:
        raise ValueError(f"axis {axis} is out of range for {first.ndim}-dimensional arrays")
    others = [tuple(a.shape[:axis % first.ndim]) + tuple(a.shape[axis % first.ndim + 1:]) for a in arrays]
    if len(set(others)) != 1:
        raise ValueError(f"concatenate along axis {axis}: the arrays must agree on every other axis, got "
                         f"{' and '.join(str(tuple(a.shape)) for a in arrays)}")
    return _serve("concatenate", *arrays)(list(arrays), axis)


def _elementwise(op):
    """``kernels.<op>`` for an elementwise op (table.ELEMENTWISE), with the reference's name, signature and
    docstring: its array arguments must share one shape and one float dtype (and one device, which
    ``_serve`` checks), then the table's implementation runs; its other arguments are scalars."""
    @functools.wraps(table.TABLE[op]["reference"].resolve(op))
    def public(*args):
        arrays = [a for a in args if getattr(a, "ndim", 0) > 0]
        if not arrays:
            raise TypeError(f"{op} takes NumPy or CuPy arrays, got {', '.join(type(a).__name__ for a in args)}")
        first = arrays[0]
        for array in arrays[1:]:
            if array.shape != first.shape:
                raise ValueError(f"{op}: the arrays must have one shape, got "
                                 f"{' and '.join(str(tuple(a.shape)) for a in arrays)}")
            if array.dtype != first.dtype:
                raise TypeError(f"{op}: the arrays are {' and '.join(str(a.dtype) for a in arrays)}: use one dtype")
        if first.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: the arrays must be float32 or float64, got {first.dtype}")
        return _serve(op, *arrays)(*args)
    public.__module__ = __name__
    return public


for _op in table.ELEMENTWISE:
    globals()[_op] = _elementwise(_op)
del _op


def adam_update(param, grad, m, v, step_size, one_minus_beta_1, one_minus_beta_2, epsilon, guard=None):
    """Adam's step for one parameter, in place, skipped where ``guard`` is not finite. See reference.adam_update."""
    _serve("adam_update", param, grad, m, v)(param, grad, m, v, step_size, one_minus_beta_1, one_minus_beta_2, epsilon, guard)
