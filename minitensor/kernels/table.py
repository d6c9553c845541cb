"""The op table: every kernel op, the implementations it has, and which one serves an array.

One row per op, one column per implementation:

- ``naive``: plain loops, one output element at a time (naive.py), the definition; never dispatched to;
- ``reference``: plain vectorised array code (reference.py) for NumPy and CuPy alike, the truth the
  others are tested against, and what learning mode runs (kernels/switches.py);
- ``numba``: the CPU kernels (cpu.py; the convolutions in conv_gemm.py, cpu_winograd.py, cpu_winograd4.py
  with its cpu_winograd4_tiles.py, cpu_conv.py);
- ``cuda``: the GPU kernels (gpu.py, CUDA C compiled by CuPy; the convolution in conv_gemm.py).

A cell is ``Own`` (the implementation's own code), ``Uses`` (a fallback: it runs another
column's code, and says why), ``Chosen`` (several algorithms, one picked per call by
kernels/conv_policy.py) or None (none exists). NumPy arrays are served by the ``numba`` column
and CuPy arrays by ``cuda``, both by ``reference`` in learning mode. ``python -m
minitensor.kernels`` prints the table and what serves each op on this machine;
docs/CONTRACTS.md quotes ``format_table(markdown=True)`` (tests/test_kernels.py checks it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

from minitensor.kernels import conv_gemm, cpu, cpu_conv, cpu_winograd, cpu_winograd4, gpu, naive, reference

IMPLEMENTATIONS = ("naive", "reference", "numba", "cuda")
#: The column that serves each array module's arrays outside learning mode.
DEVICE_COLUMNS = {"numpy": "numba", "cupy": "cuda"}


@dataclass(frozen=True)
class Own:
    """The implementation's own code for the op: ``module.<function>``, the op's name unless given."""

    module: ModuleType
    function: str = ""

    def resolve(self, op):
        return getattr(self.module, self.function or op)

    def label(self, op):
        name = self.module.__name__.rsplit(".", 1)[-1] + ".py"
        return name if not self.function or self.function == op else f"{name} ({self.function})"


@dataclass(frozen=True)
class Uses:
    """No code of its own: the op runs the ``implementation`` column's code instead, because ``why``."""

    implementation: str
    why: str

    def label(self, op):
        return f"uses {self.implementation}"


@dataclass(frozen=True)
class Chosen:
    """Several algorithms, each its own code; kernels/conv_policy.py picks one per call."""

    algorithms: dict = field(default_factory=dict)

    def label(self, op):
        return "/".join(self.algorithms) + (" (conv_policy.py)" if len(self.algorithms) > 1 else "")


_NUMBA_CONV = Chosen({"winograd4": Own(cpu_winograd4), "winograd": Own(cpu_winograd), "direct": Own(cpu_conv),
                      "gemm": Own(conv_gemm)})
_CUDA_CONV = Chosen({"gemm": Own(conv_gemm)})


def _everywhere():
    return {"naive": Own(naive), "reference": Own(reference), "numba": Own(cpu), "cuda": Own(gpu)}


TABLE = {
    "im2col": _everywhere(),
    "col2im": {**_everywhere(), "naive": None},
    "conv2d_forward": {"naive": Own(naive), "reference": Own(reference), "numba": _NUMBA_CONV, "cuda": _CUDA_CONV},
    "conv2d_input_grad": {"naive": Own(naive, "conv2d_backward"), "reference": Own(reference),
                          "numba": _NUMBA_CONV, "cuda": _CUDA_CONV},
    "conv2d_kernel_grad": {"naive": Own(naive, "conv2d_backward"), "reference": Own(reference),
                           "numba": _NUMBA_CONV, "cuda": _CUDA_CONV},
    "maxpool_forward": _everywhere(),
    "maxpool_backward": _everywhere(),
    "upsample_forward": _everywhere(),
    "upsample_backward": _everywhere(),
    "relu_backward": {"naive": None, "reference": Own(reference), "numba": Own(cpu),
                      "cuda": Uses("reference", "dy * (y > 0) is two CuPy elementwise kernels, already fast")},
    "softmax_forward": {"naive": None, "reference": Own(reference), "numba": Own(cpu),
                        "cuda": Uses("reference", "CuPy's reductions over the channels are already fast")},
    "concatenate": {"naive": None, "reference": Own(reference), "numba": Own(cpu),
                    "cuda": Uses("reference", "CuPy's concatenate is one copy kernel per input, already fast")},
    "add": {"naive": None, "reference": Own(reference), "numba": Own(cpu),
            "cuda": Uses("reference", "a + b is one CuPy elementwise kernel, already fast")},
    "adam_update": {"naive": None, "reference": Own(reference), "numba": Own(cpu), "cuda": Own(gpu)},
}

#: The elementwise ops: the reference kernels marked ``@elementwise`` (reference.py; every array
#: argument has one shape and one dtype, scalars may follow). Their public functions ``kernels.<op>`` are
#: written from this list (kernels/__init__.py).
ELEMENTWISE = tuple(name for name, function in vars(reference).items() if getattr(function, "elementwise", False))


def _declared_row(op):
    """The row of an elementwise op that TABLE does not write by hand: every file that defines the op serves
    it. A device column without the op would have nothing to run, so that is an error naming the fix."""
    row = {"naive": Own(naive) if hasattr(naive, op) else None, "reference": Own(reference)}
    for column, module in (("numba", cpu), ("cuda", gpu)):
        if not callable(getattr(module, op, None)):
            raise ImportError(f"the elementwise op {op} (reference.py) has no {column} kernel: define {op} in "
                              f"{module.__name__.rsplit('.', 1)[-1]}.py, or give {op} a row in kernels/table.py "
                              f"whose {column} cell says which column it uses, and why")
        row[column] = Own(module)
    return row


for _op in ELEMENTWISE:
    if _op not in TABLE:
        TABLE[_op] = _declared_row(_op)
del _op


def column_for(op, module_name, learning=False):
    """(column, cell) serving ``op`` for arrays of ``module_name`` ("numpy" or "cupy"), fallbacks followed."""
    column = "reference" if learning else DEVICE_COLUMNS[module_name]
    cell = TABLE[op][column]
    while isinstance(cell, Uses):
        column, cell = cell.implementation, TABLE[op][cell.implementation]
    return column, cell


def own_entries():
    """(op, column, algorithm or None, Own) for every piece of code the table names."""
    for op, row in TABLE.items():
        for column in IMPLEMENTATIONS:
            cell = row[column]
            if isinstance(cell, Own):
                yield op, column, None, cell
            elif isinstance(cell, Chosen):
                for algorithm, own in cell.algorithms.items():
                    yield op, column, algorithm, own


def _algorithm_lines():
    """One line per convolution algorithm: its file, and where it runs."""
    columns = {}
    for column in IMPLEMENTATIONS:
        cell = TABLE["conv2d_forward"][column]
        for name, own in (cell.algorithms.items() if isinstance(cell, Chosen) else ()):
            columns.setdefault((name, own.label("conv2d_forward")), []).append(column)
    return [f"{name} is {label} ({' and '.join(where)})" for (name, label), where in columns.items()]


def format_table(markdown=False):
    """The table as text (or as a Markdown table), then each fallback with its reason. No machine state."""
    rows = [["op", *IMPLEMENTATIONS]]
    fallbacks = []
    for op, row in TABLE.items():
        rows.append([op] + ["-" if row[c] is None else row[c].label(op) for c in IMPLEMENTATIONS])
        fallbacks += [f"{op} on {c}: uses {row[c].implementation}, because {row[c].why}"
                      for c in IMPLEMENTATIONS if isinstance(row[c], Uses)]
    if markdown:
        lines = ["| " + " | ".join(f"`{cell}`" if index == 0 and cell != "op" else cell for index, cell in enumerate(r))
                 + " |" for r in rows]
        lines.insert(1, "|" + "---|" * len(IMPLEMENTATIONS + ("op",)))
        return "\n".join(lines + [""] + [f"- {line}." for line in fallbacks + _algorithm_lines()])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines + ["", "Fallbacks:"] + [f"  {line}" for line in fallbacks]
                     + ["", "Convolution algorithms:"] + [f"  {line}" for line in _algorithm_lines()])
