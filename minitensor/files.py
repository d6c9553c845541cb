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


# Every temporary file of an atomic write is named ``.tmp-<pid>-<random><suffix>`` beside its
# target: unique, so two processes never write the same temporary, and owned, so a clean-up can
# tell a dead process's leftover from a live process's save in progress.
TEMPORARY_PREFIX = ".tmp-"


def _umask():
    """The process's umask (read by setting it and putting it back; os has no plain getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write, suffix="", sync=True):
    """Write ``path`` through ``write(binary_file)`` under a temporary name, fsync, then rename.

    ``path`` is never half-written: a reader sees the old file or the new one. ``sync=False`` skips
    the fsync, for many small files that can be made again (a data set's images): the rename still
    keeps a killed process from leaving half a file, but a power cut may. The file gets the
    mode ``open`` would give it (0666 less the umask), not mkstemp's 0600. An OSError names ``path``
    (np.savez's own errors name no file: "[Errno 28] No space left on device" alone).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f"{TEMPORARY_PREFIX}{os.getpid()}-", suffix=suffix, dir=folder)
    try:
        os.fchmod(handle, 0o666 & ~_umask())
        with os.fdopen(handle, "wb") as f:
            write(f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if os.path.exists(temporary):
            os.remove(temporary)
        if isinstance(error, OSError) and not isinstance(error, BrokenPipeError) and error.filename is None:
            raise OSError(error.errno, error.strerror or str(error), path) from error
        raise


def atomic_savez(path, arrays):
    """np.savez into ``path`` by ``atomic_write``: ``path`` is never half-written."""
    atomic_write(path, lambda f: np.savez(f, **arrays), suffix=".npz")


def atomic_write_bytes(path, data, sync=True):
    """``data`` (bytes) into ``path`` by ``atomic_write``."""
    atomic_write(path, lambda f: f.write(data), suffix=os.path.splitext(os.fspath(path))[1], sync=sync)


def _is_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # alive, another user's
        return True
    return True


def remove_stale_temporaries(folder, log=None):
    """Delete the temporaries in ``folder`` whose writing process is gone (a save killed before its
    rename); a live process's save in progress is left alone. Returns the paths removed."""
    removed = []
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        if not name.startswith(TEMPORARY_PREFIX):
            continue
        owner = name[len(TEMPORARY_PREFIX):].split("-", 1)[0]
        if owner.isdigit() and _is_running(int(owner)):
            continue
        path = os.path.join(folder, name)
        try:
            os.remove(path)
        except FileNotFoundError:      # its owner renamed or removed it meanwhile
            continue
        removed.append(path)
        if log is not None:
            log(f"removed {path}, a partial file left by an interrupted save")
    return removed


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
