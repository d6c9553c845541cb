"""The hot kernels of minitensor: convolution (im2col/col2im, Winograd, direct), max pooling, upsampling,
ReLU's backward, softmax, Adam's step.

Each kernel exists three times with one signature (docs/CONTRACTS.md):

- ``reference.py``: plain array code, the one to read first, and the truth the others are tested against;
- ``cpu.py``: numba, parallel over output rows, for NumPy arrays (``cpu_winograd.py`` and
  ``cpu_conv.py``: the Winograd and direct convolutions, numba too);
- ``gpu.py``: CUDA C compiled by CuPy, for CuPy arrays.

The functions here check their arguments and pick the implementation from the arrays'
device: CuPy -> gpu, NumPy -> cpu. ``use_reference(True)``, the ``reference_kernels()``
context manager, or the environment variable ``MINITENSOR_KERNELS=reference`` (read at
import) switch both devices to the reference code, to debug or to compare.
"""
from __future__ import annotations

import contextlib
import numbers
import os

import numpy as np

from minitensor.backend import get_array_module
from minitensor.kernels import cpu, cpu_conv, cpu_winograd, gpu, reference

__all__ = ["CONV_ALGORITHMS", "adam_update", "col2im", "conv2d_forward", "conv2d_kernel_grad", "conv_algorithm",
           "get_conv_algorithm", "im2col", "set_conv_algorithm", "maxpool_backward", "maxpool_forward", "reference_kernels", "relu_backward", "softmax_forward",
           "upsample_backward", "upsample_forward", "use_reference", "using_reference"]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _reference_requested_by_environment() -> bool:
    choice = os.environ.get("MINITENSOR_KERNELS", "").strip().lower()
    if choice not in ("", "auto", "reference"):
        raise ValueError(f"MINITENSOR_KERNELS={choice!r}: expected 'reference', 'auto' or unset")
    return choice == "reference"


_use_reference = _reference_requested_by_environment()

#: The choices of ``set_conv_algorithm``.
CONV_ALGORITHMS = ("auto", "winograd", "direct", "gemm")
#: The CPU implementations of ``conv2d_forward`` and ``conv2d_kernel_grad``.
_CPU_CONV = {"direct": cpu_conv, "winograd": cpu_winograd}


def _check_conv_algorithm(name, source):
    choice = str(name).strip().lower()
    if choice not in CONV_ALGORITHMS:
        raise ValueError(f"{source}={name!r}: expected one of {', '.join(CONV_ALGORITHMS)}")
    return choice


_conv_algorithm = _check_conv_algorithm(os.environ.get("MINITENSOR_CONV", "auto") or "auto", "MINITENSOR_CONV")


def set_conv_algorithm(name: str) -> None:
    """How Conv2D runs stride-1 convolutions on the CPU: 'auto', 'winograd', 'direct' or 'gemm'
    (this module's docstring says what each does)."""
    global _conv_algorithm
    _conv_algorithm = _check_conv_algorithm(name, "conv algorithm")


def get_conv_algorithm() -> str:
    """The current choice of set_conv_algorithm."""
    return _conv_algorithm


@contextlib.contextmanager
def conv_algorithm(name: str):
    """``with conv_algorithm("gemm"): ...`` runs the block with that choice."""
    previous = _conv_algorithm
    set_conv_algorithm(name)
    try:
        yield
    finally:
        set_conv_algorithm(previous)


def use_reference(flag: bool = True) -> None:
    """Route every kernel call to ``reference.py`` (True) or to numba / CUDA (False)."""
    global _use_reference
    _use_reference = bool(flag)


def using_reference() -> bool:
    """True while kernel calls go to ``reference.py``."""
    return _use_reference


@contextlib.contextmanager
def reference_kernels():
    """``with reference_kernels(): ...`` runs the block on the reference kernels."""
    previous = _use_reference
    use_reference(True)
    try:
        yield
    finally:
        use_reference(previous)


def _implementation(*arrays):
    """The kernel module for these arrays; get_array_module raises TypeError if devices are mixed."""
    xp = get_array_module(*arrays)
    if _use_reference:
        return reference
    return cpu if xp is np else gpu


def _check_float_array(name, array, ndim):
    if getattr(array, "ndim", None) != ndim:
        layout = "(N, H, W, C)" if ndim == 4 else "(rows, columns)"
        raise ValueError(f"{name} must be a {ndim}-D array {layout}, got {type(array).__name__} "
                         f"of shape {getattr(array, 'shape', None)}")
    if array.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {array.dtype}")


def _check_ints(minimum, **values):
    for name, value in values.items():
        if not isinstance(value, numbers.Integral) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_window(kh, kw, sh, sw, pad_top, pad_left, out_h, out_w):
    _check_ints(1, kh=kh, kw=kw, sh=sh, sw=sw, out_h=out_h, out_w=out_w)
    _check_ints(0, pad_top=pad_top, pad_left=pad_left)


def _check_x_shape(x_shape):
    if len(x_shape) != 4:
        raise ValueError(f"x_shape must be (N, H, W, C), got {x_shape!r}")
    _check_ints(1, N=x_shape[0], H=x_shape[1], W=x_shape[2], C=x_shape[3])
    return tuple(int(size) for size in x_shape)


def im2col(x, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w, out=None):
    """Windows of x (N, H, W, C) as rows: cols (N*out_h*out_w, kh*kw*C). See reference.im2col.

    ``out``, if given, is a C-contiguous array of that shape and x's dtype and device that
    receives the result (Conv2D passes reused scratch memory, see backend.scratch_array);
    every element is overwritten, so it may hold anything.
    """
    _check_float_array("x", x, 4)
    _check_window(kh, kw, sh, sw, pad_top, pad_left, out_h, out_w)
    if out is not None:
        expected = (x.shape[0] * out_h * out_w, kh * kw * x.shape[3])
        if tuple(out.shape) != expected or out.dtype != x.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {x.dtype} array of shape {expected}, got "
                             f"{out.dtype} {tuple(out.shape)}")
        get_array_module(x, out)   # same device, or a clear error
    return _implementation(x).im2col(x, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w, out=out)


def col2im(cols, x_shape, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w):
    """The adjoint of im2col: dx with shape x_shape. See reference.col2im."""
    _check_float_array("cols", cols, 2)
    x_shape = _check_x_shape(x_shape)
    _check_window(kh, kw, sh, sw, pad_top, pad_left, out_h, out_w)
    n_batch, _, _, channels = x_shape
    expected = (n_batch * out_h * out_w, kh * kw * channels)
    if tuple(cols.shape) != expected:
        raise ValueError(f"cols has shape {tuple(cols.shape)}, but x_shape {x_shape} with a {kh}x{kw} kernel "
                         f"and a {out_h}x{out_w} output needs {expected}")
    return _implementation(cols).col2im(cols, x_shape, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w)


def _check_conv_operands(x, second_name, second, kernel_h, kernel_w, pad_top, pad_left, out_h, out_w):
    _check_float_array("x", x, 4)
    _check_float_array(second_name, second, 4)
    _check_window(kernel_h, kernel_w, 1, 1, pad_top, pad_left, out_h, out_w)
    get_array_module(x, second)   # same device, or a clear error
    if second.dtype != x.dtype:
        raise TypeError(f"x is {x.dtype} but {second_name} is {second.dtype}: use one dtype")


def _conv_module(x, second, algorithm, kernel_h, kernel_w):
    if algorithm not in _CPU_CONV:
        raise ValueError(f"algorithm must be one of {', '.join(_CPU_CONV)}, got {algorithm!r}")
    if algorithm == "winograd" and (kernel_h, kernel_w) != (3, 3):
        raise ValueError(f"Winograd F(2x2, 3x3) needs a 3x3 kernel, got {kernel_h}x{kernel_w}: use algorithm='direct'")
    module = _implementation(x, second)
    return _CPU_CONV[algorithm] if module is cpu else reference


def conv2d_forward(x, kernel, bias, pad_top, pad_left, out_h, out_w, relu=False, algorithm="direct"):
    """Stride-1 convolution, bias and (optionally) ReLU in one call: y (N, out_h, out_w, OC).

    See reference.conv2d_forward (im2col + GEMM) for the definition. NumPy arrays take
    cpu_conv.py (``algorithm="direct"``) or cpu_winograd.py (``"winograd"``, 3x3 kernels only);
    CuPy arrays take the reference (Conv2D uses im2col + cuBLAS on the GPU instead).
    """
    _check_float_array("kernel", kernel, 4)
    _check_conv_operands(x, "kernel", kernel, kernel.shape[0], kernel.shape[1], pad_top, pad_left, out_h, out_w)
    if kernel.shape[2] != x.shape[3]:
        raise ValueError(f"kernel {tuple(kernel.shape)} expects {kernel.shape[2]} input channels, x has {x.shape[3]}")
    if bias is not None:
        if tuple(getattr(bias, "shape", ())) != (kernel.shape[3],):
            raise ValueError(f"bias must have shape ({kernel.shape[3]},), got {tuple(getattr(bias, 'shape', ()))}")
        get_array_module(x, bias)   # same device, or a clear error
        if bias.dtype != x.dtype:
            raise TypeError(f"x is {x.dtype} but bias is {bias.dtype}: use one dtype")
    module = _conv_module(x, kernel, algorithm, kernel.shape[0], kernel.shape[1])
    return module.conv2d_forward(x, kernel, bias, pad_top, pad_left, out_h, out_w, relu=bool(relu))


def conv2d_kernel_grad(x, dz, kernel_h, kernel_w, pad_top, pad_left, algorithm="direct"):
    """dW (KH, KW, C, OC) of a stride-1 convolution from its input x and dZ (N, OH, OW, OC).

    See reference.conv2d_kernel_grad (im2col^T @ dZ); NumPy arrays take cpu_conv.py or
    cpu_winograd.py as in conv2d_forward.
    """
    _check_float_array("dz", dz, 4)
    _check_conv_operands(x, "dz", dz, kernel_h, kernel_w, pad_top, pad_left, dz.shape[1], dz.shape[2])
    if dz.shape[0] != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} images but dz has {dz.shape[0]}")
    module = _conv_module(x, dz, algorithm, kernel_h, kernel_w)
    return module.conv2d_kernel_grad(x, dz, kernel_h, kernel_w, pad_top, pad_left)


def maxpool_forward(x, ph, pw, sh, sw, pad_top, pad_left, out_h, out_w):
    """Max over each ph x pw window: (y, argmax int32), both (N, out_h, out_w, C). See reference."""
    _check_float_array("x", x, 4)
    _check_window(ph, pw, sh, sw, pad_top, pad_left, out_h, out_w)
    return _implementation(x).maxpool_forward(x, ph, pw, sh, sw, pad_top, pad_left, out_h, out_w)


def maxpool_backward(dy, argmax, x_shape, ph, pw, sh, sw, pad_top, pad_left):
    """dy routed to each window's argmax cell: dx with shape x_shape. See reference."""
    _check_float_array("dy", dy, 4)
    x_shape = _check_x_shape(x_shape)
    n_batch, out_h, out_w, channels = dy.shape
    _check_window(ph, pw, sh, sw, pad_top, pad_left, out_h, out_w)
    if getattr(argmax, "dtype", None) != np.int32 or argmax.shape != dy.shape:
        raise ValueError(f"argmax must be the int32 array of dy's shape {tuple(dy.shape)} that maxpool_forward "
                         f"returned, got {getattr(argmax, 'dtype', type(argmax).__name__)} "
                         f"of shape {getattr(argmax, 'shape', None)}")
    if (x_shape[0], x_shape[3]) != (n_batch, channels):
        raise ValueError(f"dy {tuple(dy.shape)} and x_shape {x_shape} differ in batch size or channels")
    return _implementation(dy, argmax).maxpool_backward(dy, argmax, x_shape, ph, pw, sh, sw, pad_top, pad_left)


def upsample_forward(x, sh, sw):
    """Nearest-neighbour upsampling: y (N, H*sh, W*sw, C). See reference."""
    _check_float_array("x", x, 4)
    _check_ints(1, sh=sh, sw=sw)
    return _implementation(x).upsample_forward(x, sh, sw)


def upsample_backward(dy, sh, sw):
    """Sum of dy over each sh x sw block: dx (N, H, W, C). See reference."""
    _check_float_array("dy", dy, 4)
    _check_ints(1, sh=sh, sw=sw)
    if dy.shape[1] % sh or dy.shape[2] % sw:
        raise ValueError(f"dy of shape {tuple(dy.shape)} is not made of whole {sh}x{sw} blocks")
    return _implementation(dy).upsample_backward(dy, sh, sw)


def softmax_forward(x):
    """Softmax over the last axis (the channels). See reference.softmax_forward.

    NumPy arrays take the numba kernel (one pass per pixel); CuPy arrays the reference.
    """
    if getattr(x, "dtype", None) not in _FLOAT_DTYPES or x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be a float32 or float64 array with a non-empty last axis, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} of shape {getattr(x, 'shape', None)}")
    module = _implementation(x)
    return (cpu if module is cpu else reference).softmax_forward(x)


def relu_backward(dy, y):
    """dx = dy * (y > 0), the ReLU's backward from its output y. See reference.relu_backward.

    NumPy arrays take the numba kernel (one pass); CuPy arrays the reference, two elementwise
    kernels, as before.
    """
    if dy.shape != y.shape:
        raise ValueError(f"dy and y must have one shape, got {tuple(dy.shape)} and {tuple(y.shape)}")
    if dy.dtype != y.dtype:
        raise TypeError(f"dy is {dy.dtype} but y is {y.dtype}: use one dtype")
    module = _implementation(dy, y)
    return (cpu if module is cpu else reference).relu_backward(dy, y)


def adam_update(param, grad, m, v, step_size, one_minus_beta_1, one_minus_beta_2, epsilon, guard=None):
    """Adam's step for one parameter, in place, skipped where ``guard`` is not finite. See reference.adam_update.

    NumPy arrays take the reference (already one vectorised pass per operation, with no
    launch cost to save); CuPy arrays the fused CUDA kernel.
    """
    module = _implementation(param, grad, m, v)
    if module is cpu:
        module = reference
    module.adam_update(param, grad, m, v, step_size, one_minus_beta_1, one_minus_beta_2, epsilon, guard)
