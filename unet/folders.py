"""The folders a run writes: checked before any work, one run at a time, and never over anything kept.

``train.py`` writes two folders, ``--weights-dir`` (checkpoints) and ``--results-dir`` (test masks,
metrics, plots); ``predict.py`` one, ``--out``. Before any work:

* ``check_writable_folder``: the folder can be made and written (a bad path fails in a second, not
  after hours of training);
* ``check_apart``: no output folder lies inside the data set, is it, or holds it (predictions
  written into ``test_mask`` would replace the truth and then score 1.0 against themselves);
* ``FolderLock``: one run per folder (an advisory ``fcntl`` lock, released by the kernel when the
  process ends however it ends; the message names the process that holds it; generating a data
  set takes one too, and a second run waits for the first to finish drawing);
* ``run_files``: what an earlier run left there, which a new run refuses to write over unless told
  to start over (``--resume`` continues it instead).
"""
from __future__ import annotations

import glob
import os
import tempfile
import time

try:
    import fcntl
except ImportError:          # not on Windows: runs there are not locked against each other
    fcntl = None

LOCK_FILE = ".run.lock"
# What a training run writes into its two folders (unet/trainer.py, unet/callbacks.py, unet/report.py).
CHECKPOINT_PATTERNS = ("last.npz", "best.npz", "ep[0-9][0-9][0-9]-loss*-val_loss*.npz")
RESULT_FILES = ("history.csv", "metrics.json", "training.png", "predictions.png")


class OutputFolderError(ValueError):
    """An output folder that cannot be used (a file, not writable, inside the data, another run's);
    the message names the flag and the fix."""


def check_writable_folder(folder, flag):
    """Make ``folder`` if needed and write a file there now, so that a bad output folder fails
    before hours of work instead of after them."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OutputFolderError(f"{flag} {folder}: is a file, not a folder; give a folder path")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OutputFolderError(f"{flag} {folder}: cannot write there ({error.strerror or error}); "
                                f"give a folder you can write to") from None


def is_within(path, folder):
    """True if ``path`` is ``folder`` or lies inside it, after resolving '..', symlinks and
    relative parts (paths that do not exist yet are resolved as far as they exist)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_apart(outputs, data_root, data_flag="--data"):
    """Refuse an output folder (``outputs``: {flag: folder}) inside the data set, equal to it, or
    holding it."""
    for flag, folder in outputs.items():
        if is_within(folder, data_root):
            raise OutputFolderError(f"{flag} {folder}: lies inside the data set {data_flag} {data_root}; what is "
                                    f"written there could replace its files (and predictions in test_mask would "
                                    f"be scored against themselves); give a folder outside it")
        if is_within(data_root, folder):
            raise OutputFolderError(f"{flag} {folder}: holds the data set {data_flag} {data_root}; give an output "
                                    f"folder of its own, outside the data set")


def run_files(weights_dir, results_dir):
    """The files an earlier training run left in these folders: checkpoints, then results."""
    checkpoints = set()
    for pattern in CHECKPOINT_PATTERNS:
        checkpoints.update(glob.glob(os.path.join(glob.escape(os.fspath(weights_dir)), pattern)))
    results = [path for name in RESULT_FILES if os.path.exists(path := os.path.join(results_dir, name))]
    return sorted(checkpoints) + [path for path in results if path not in checkpoints]


def predicted_mask_files(results_dir, ids):
    """The colored test masks a run wrote into ``results_dir`` for these test ids."""
    return [path for index in ids if os.path.exists(path := os.path.join(results_dir, f"{index}.png"))]


class FolderBusyError(OutputFolderError):
    """Another live process holds the folder's lock."""


class FolderLock:
    """An exclusive advisory lock on ``folder`` (its file ``.run.lock``) for as long as it is held.

    ``acquire(wait=False)`` raises FolderBusyError naming the holder (its pid and purpose, which the
    holder writes into the lock file); ``wait=True`` blocks until the holder is done, saying once
    through ``log`` whom it waits for. The kernel drops the lock when the process ends, even by
    ``kill -9``, so a lock file left behind never blocks anyone. ``release`` deletes the file
    (while still holding the lock); a waiter that then wakes up on the deleted file sees that the
    path no longer names it and tries again on a fresh one.
    """

    def __init__(self, folder, flag, purpose="a training run"):
        self.folder, self.flag, self.purpose = os.fspath(folder), flag, purpose
        self.path = os.path.join(self.folder, LOCK_FILE)
        self._file = None

    def _holder(self):
        try:
            with open(self.path) as f:
                return f.read().strip() or "a process that has not said which"
        except OSError:
            return "another process"

    def _still_named(self, handle):
        try:
            return os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            return False

    def acquire(self, wait=False, log=print):
        if fcntl is None:
            return self
        os.makedirs(self.folder, exist_ok=True)
        said = False
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    holder = self._holder()
                    handle.close()
                    raise FolderBusyError(f"{self.flag} {self.folder}: in use by {holder}; one run per folder: "
                                          f"wait for it to end, or give this run another {self.flag}") from None
                if not said:
                    log(f"{self.flag} {self.folder}: waiting for {self._holder()} ...")
                    said = True
                fcntl.flock(handle, fcntl.LOCK_EX)
            if self._still_named(handle):
                break
            handle.close()              # the holder deleted it on release: lock the new one
        handle.seek(0)
        handle.truncate()
        handle.write(f"{self.purpose} (pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        handle.flush()
        self._file = handle
        return self

    def release(self):
        if self._file is not None:
            try:
                os.remove(self.path)
            except OSError:
                pass
            self._file.close()          # closing the descriptor releases the lock
            self._file = None

    def __enter__(self):               # ``with lock.acquire(wait=True):`` holds it already
        return self if self._file is not None else self.acquire()

    def __exit__(self, *exc):
        self.release()
