"""``python -m minitensor.kernels``: the op table, and which implementation serves each op on this machine and why."""
from __future__ import annotations

import os
import sys

from minitensor import backend
from minitensor.kernels import conv_policy, switches, table


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
    lines += ["", f"'auto' gives a 3x3 stride-1 product on the CPU to Winograd from {conv_policy.WINOGRAD_MIN_PIXELS} "
              f"output pixels per batch up, while C*OC <= {limits['forward']} (forward, dx) or "
              f"<= {limits['kernel_grad']} (dW); every other product to gemm."]
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
    sys.exit(0)
