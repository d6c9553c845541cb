"""Model files on disk: written atomically, read back with errors that name the file and the problem.

The lowest layer of saving: ``model.py`` builds the arrays of a model file (architecture,
weights, optimizer state) and reads them back through these functions; ``keras_io.py`` reads
Keras's HDF5 files and reports problems with the same ``ModelFileError``.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np


class ModelFileError(ValueError):
    """A model or weights file that is missing, corrupt, or does not fit the model."""


def atomic_savez(path, arrays):
    """np.savez to a temporary file beside ``path``, then rename: ``path`` is never half-written."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(handle, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def with_prefix(data, prefix):
    """The entries of a saved file under ``prefix`` ("weights/", "optimizer/"), keys without it."""
    return {key[len(prefix):]: value for key, value in data.items() if key.startswith(prefix)}


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"   # the first bytes of every HDF5 file, Keras's .h5 among them


def read_npz(path):
    """Every array of a minitensor ``.npz``, or a ModelFileError that names the problem (a Keras
    ``.h5`` file is told by its first bytes and pointed to ``Model.load_keras_weights``)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelFileError(f"{path}: is a folder, not a model file; give the path of a .npz (e.g. {path}/last.npz)")
    try:
        with open(path, "rb") as f:
            head = f.read(len(HDF5_SIGNATURE))
    except OSError as error:
        raise ModelFileError(f"{path}: cannot read ({error.strerror or error})") from None
    if head == HDF5_SIGNATURE:
        raise ModelFileError(f"{path}: is an HDF5 file (Keras's .h5 or .weights.h5 format), not a minitensor .npz; "
                             f"build the model in code and call model.load_keras_weights({os.path.basename(path)!r})")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except Exception as exc:   # np.load's own message for random bytes advises allow_pickle: unsafe, so not shown
        raise ModelFileError(f"{path}: not a readable minitensor .npz file; it is truncated or corrupt "
                             f"({type(exc).__name__})") from exc
