"""The two switches of minitensor.kernels: learning mode, and the CPU's convolution algorithm.

Learning mode. ``MINITENSOR_KERNELS=reference`` in the environment (read when minitensor is
imported), ``kernels.use_reference(True)``, or ``with kernels.reference_kernels(): ...`` sends
every op to its plainest vectorised twin, ``reference.py``, on both devices: the convolutions
become im2col -> GEMM -> col2im, whole, as layers/conv2d.py derives them; pooling, upsampling,
ReLU, softmax and Adam are a few array operations each. Slower, and the code a reader can
follow into with a debugger. ``MINITENSOR_KERNELS=auto`` (or unset) is the fast default.

The convolution algorithm. ``MINITENSOR_CONV`` or ``kernels.set_conv_algorithm`` decides which
of the CPU's convolutions Conv2D's three products take (kernels/conv_policy.py says what each
choice does); it changes no numbers beyond rounding, and nothing on the GPU or in learning mode.
"""
from __future__ import annotations

import contextlib
import os

#: The choices of ``set_conv_algorithm`` (kernels/conv_policy.py says what each does).
CONV_ALGORITHMS = ("auto", "rules", "winograd4", "winograd", "direct", "gemm")


def reference_requested_by_environment() -> bool:
    """Whether MINITENSOR_KERNELS asks for learning mode; a misspelt value is a clear error."""
    choice = os.environ.get("MINITENSOR_KERNELS", "").strip().lower()
    if choice not in ("", "auto", "reference"):
        raise ValueError(f"MINITENSOR_KERNELS={choice!r}: expected 'reference' (learning mode), 'auto' or unset")
    return choice == "reference"


def _check_conv_algorithm(name, source):
    choice = str(name).strip().lower()
    if choice not in CONV_ALGORITHMS:
        raise ValueError(f"{source}={name!r}: expected one of {', '.join(CONV_ALGORITHMS)}")
    return choice


_use_reference = reference_requested_by_environment()
_conv_algorithm = _check_conv_algorithm(os.environ.get("MINITENSOR_CONV", "auto") or "auto", "MINITENSOR_CONV")


def use_reference(flag: bool = True) -> None:
    """Learning mode on (True: every op runs ``reference.py``) or off (False: numba / CUDA)."""
    global _use_reference
    _use_reference = bool(flag)


def using_reference() -> bool:
    """True in learning mode, while every op runs ``reference.py``."""
    return _use_reference


@contextlib.contextmanager
def reference_kernels():
    """``with reference_kernels(): ...`` runs the block in learning mode."""
    previous = _use_reference
    use_reference(True)
    try:
        yield
    finally:
        use_reference(previous)


def set_conv_algorithm(name: str) -> None:
    """How the CPU runs Conv2D's stride-1 products: 'auto' (measured on this machine), 'rules' (the fixed
    thresholds), 'winograd4', 'winograd', 'direct' or 'gemm' (kernels/conv_policy.py, ``choose``, says what
    each does)."""
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
