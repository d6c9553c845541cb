"""Write a saved minitensor model in a format other tools read: ONNX, or Keras 3 weights.

    python -m minitensor.export UNet_weight/best.npz unet.onnx           # ONNX (pip install 'minitensor[onnx]')
    python -m minitensor.export UNet_weight/best.npz unet.weights.h5     # for the post's Keras model's load_weights

The format follows the output's name: ``.onnx`` (minitensor/onnx_export.py) or ``.weights.h5``
(minitensor/keras_io.py). MODEL is any file ``Model.save`` wrote: train.py's last.npz, best.npz
or a ModelCheckpoint file. An existing output file is left alone unless ``--overwrite`` is
given, and is then replaced atomically (never half-written).

Exit status: 0 written; 2 a file that cannot be used (not a minitensor model, a layer that
cannot be exported, an output that exists or cannot be written, a missing package), the message
naming it and the fix.
"""
from __future__ import annotations

import argparse
import os
import sys

from .files import ModelFileError
from .keras_io import KERAS_SUFFIX, write_keras_weights
from .onnx_export import OnnxExportError, export_onnx
from .saving import load_model

FORMATS = {".onnx": ("ONNX", export_onnx), KERAS_SUFFIX: ("Keras 3 weights", write_keras_weights)}


class ExportUsageError(ValueError):
    """An output path the command cannot use; the message says what to give instead."""


def output_format(path):
    """(format's name, writer) for the output's name, or ExportUsageError listing the names it takes."""
    for suffix, entry in FORMATS.items():
        if os.fspath(path).endswith(suffix):
            return entry
    raise ExportUsageError(f"{path}: the output's name says its format: end it in .onnx (ONNX) or {KERAS_SUFFIX} "
                           f"(Keras 3 weights)")


def export(model_path, out_path, overwrite=False):
    """Load ``model_path`` and write it to ``out_path`` in the format its name says; returns the format's name."""
    if os.path.isdir(out_path):
        raise ExportUsageError(f"{out_path}: is a folder; give the output file's path, e.g. "
                               f"{os.path.join(out_path, 'model.onnx')}")
    name, write = output_format(out_path)
    folder = os.path.dirname(os.path.abspath(out_path))
    while not os.path.exists(folder):          # the first part of the path that exists must be a folder
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ExportUsageError(f"{out_path}: cannot write there: {folder} is a file, not a folder")
    if os.path.exists(out_path) and not overwrite:
        raise ExportUsageError(f"{out_path}: exists already; give another name, or pass --overwrite to replace it")
    model = load_model(model_path)
    write(model, out_path)
    return name


def _reason(error, out_path):
    """The OS's reason, and the path it concerns where that is not the output itself (its folder, a
    temporary beside it: ``atomic_write`` writes there first)."""
    reason = error.strerror or str(error)
    where = error.filename and os.path.abspath(os.fspath(error.filename))
    folder = os.path.dirname(os.path.abspath(out_path))
    if where and where != os.path.abspath(out_path) and os.path.dirname(where) != folder:
        reason += f": {error.filename}"
    return reason


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minitensor.export",
                                     description="Write a saved minitensor model (.npz) as ONNX (.onnx) or as "
                                                 f"Keras 3 weights ({KERAS_SUFFIX}).")
    parser.add_argument("model", help="a model file written by Model.save (train.py: UNet_weight/best.npz, last.npz)")
    parser.add_argument("out", help=f"the file to write: NAME.onnx or NAME{KERAS_SUFFIX}")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    try:
        name = export(args.model, args.out, args.overwrite)
    except (ModelFileError, OnnxExportError, ExportUsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: {args.out}: cannot write there ({_reason(error, args.out)}); give a path in a folder you "
              f"can write to", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({name}) from {args.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
