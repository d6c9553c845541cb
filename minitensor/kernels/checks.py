"""Argument checks shared by the ops of minitensor.kernels: a clear error before any kernel runs."""
from __future__ import annotations

import numbers

import numpy as np

from minitensor.backend import get_array_module

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_float_array(name, array, ndim):
    if getattr(array, "ndim", None) != ndim:
        layout = "(N, H, W, C)" if ndim == 4 else "(rows, columns)"
        raise ValueError(f"{name} must be a {ndim}-D array {layout}, got {type(array).__name__} "
                         f"of shape {getattr(array, 'shape', None)}")
    if array.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {array.dtype}")


def check_ints(minimum, **values):
    for name, value in values.items():
        if not isinstance(value, numbers.Integral) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_window(kh, kw, sh, sw, pad_top, pad_left, out_h, out_w):
    check_ints(1, kh=kh, kw=kw, sh=sh, sw=sw, out_h=out_h, out_w=out_w)
    check_ints(0, pad_top=pad_top, pad_left=pad_left)


def check_x_shape(x_shape):
    if len(x_shape) != 4:
        raise ValueError(f"x_shape must be (N, H, W, C), got {x_shape!r}")
    check_ints(1, N=x_shape[0], H=x_shape[1], W=x_shape[2], C=x_shape[3])
    return tuple(int(size) for size in x_shape)


def check_same(first_name, first, second_name, second):
    """Same device (or get_array_module's clear error) and same dtype."""
    get_array_module(first, second)
    if second.dtype != first.dtype:
        raise TypeError(f"{first_name} is {first.dtype} but {second_name} is {second.dtype}: use one dtype")
