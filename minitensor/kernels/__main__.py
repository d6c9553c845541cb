"""``python -m minitensor.kernels``: the op table, and which implementation serves each op on this machine and why."""
from __future__ import annotations

import os
import sys

from minitensor import backend, cpu_runtime
from minitensor.kernels import conv_plan, conv_policy, switches, table


def describe() -> str:
    """The op table, then what NumPy and CuPy arrays get here, with the reason for each."""
    learning = switches.using_reference()
    gpu_usable, gpu_reason = backend.gpu_status()
    conv_setting = switches.get_conv_algorithm()
    lines = ["minitensor.kernels: the op table (minitensor/kernels/table.py)", "", table.format_table(), "",
             "On this machine:"]
    if learning:
        lines.append(f"  learning mode is on (MINITENSOR_KERNELS={os.environ.get('MINITENSOR_KERNELS', '')!r} "
                     "or kernels.use_reference): every op runs the reference column, on either device")
    else:
        lines.append("  learning mode is off (MINITENSOR_KERNELS=reference or kernels.use_reference(True) turns it on)")
    devices = [("NumPy arrays", "numpy", "the CPU")]
    devices.append(("CuPy arrays", "cupy", "the GPU" if gpu_usable else f"no usable GPU here: {gpu_reason}"))
    for label, module_name, where in devices:
        lines.append(f"  {label} ({where}):")
        for op in table.TABLE:
            column, cell = table.column_for(op, module_name, learning)
            why = "learning mode" if learning else "its own code"
            first = table.TABLE[op][table.DEVICE_COLUMNS[module_name]]
            if not learning and isinstance(first, table.Uses):
                why = f"fallback: {first.why}"
            if isinstance(cell, table.Chosen):
                why = (f"one of {', '.join(cell.algorithms)} per layer shape, conv algorithm {conv_setting!r} "
                       f"(MINITENSOR_CONV; kernels/conv_policy.py)" if len(cell.algorithms) > 1
                       else "the only algorithm with code for this device")
            lines.append(f"    {op:<20} {column:<10} {why}")
    limits = conv_policy.WINOGRAD_MAX_CHANNEL_PRODUCT
    lines += ["", f"'rules' gives a 3x3 stride-1 product on the CPU to Winograd F(4x4, 3x3) (forward, dx) from "
              f"{conv_policy.WINOGRAD4_MIN_PIXELS} output pixels and {conv_policy.WINOGRAD4_MIN_CHANNELS} input "
              f"channels, to F(2x2, 3x3) from {conv_policy.WINOGRAD_MIN_PIXELS} output pixels per batch up, while "
              f"C*OC <= {limits['forward']} (forward, dx) or <= {limits['kernel_grad']} (dW); every other product "
              f"to gemm.",
              f"'auto' starts from that and keeps what this machine measures faster (kernels/conv_plan.py); "
              f"its plan file here: {conv_plan.cache_path()}",
              f"NumPy's BLAS runs OpenBLAS's {cpu_runtime.blas_core() or '(not OpenBLAS)'} kernels here"
              + (f" (OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']})" if os.environ.get("OPENBLAS_CORETYPE")
                 else "")]
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
    sys.exit(0)
