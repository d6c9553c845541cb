"""The seed's ``model.fit_generator`` written out, and checkpoints a run resumes from exactly.

``Trainer.fit`` runs epochs of batches, validates after each epoch and calls the callbacks
(checkpoint, learning-rate schedule, early stopping) as Keras does. Whatever stops it (Ctrl-C,
``--max-minutes``, ``kill -9``, a crash, a full disk), the run can be continued from the newest
checkpoint and ends with the very bytes an uninterrupted run would have written, because the
checkpoint holds everything the rest of the run depends on: one ``TrainingState``, which saving
and restoring both go through, so the two cannot drift apart.

When checkpoints are written (``WEIGHTS_DIR/last.npz``, atomically: a temporary file, then a rename):

* after every epoch (after validation and the callbacks);
* during an epoch, after the first batch that ends ``checkpoint_minutes`` after the last save
  (so ``kill -9`` loses at most that much work; 0 saves after every batch);
* when a stop is requested (Ctrl-C: after the current batch, or after validation if it came then).

What is not saved is what cannot change the result: wall-clock times go into the history as they
were measured, and a resumed epoch reports the time of both of its parts.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import signal
import sys
import time
from typing import Any

from minitensor import backend
from minitensor.files import ModelFileError, atomic_savez, read_npz, with_prefix

from .callbacks import EarlyStopping, ModelCheckpoint, ReduceLROnPlateau
from .data import CLASS_NAMES, NUM_CLASSES
from .prefetch import Prefetcher
from .tiling import fit_to_model
from .weights import batch_weights

RESUME_FILE = "last.npz"
# atomic_savez's temporary files: one left behind means a save was killed before its rename.
TEMPORARY_PATTERN = ".tmp-*.npz"


class TrainingError(RuntimeError):
    """Training cannot go on (it diverged); the message says why."""


class CheckpointError(TrainingError):
    """--resume cannot continue from this checkpoint (missing, corrupt, other settings); the message says what to do."""


class StopRequest:
    """First Ctrl-C (SIGINT): finish the current batch, then save and stop. Second: stop at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this batch and saving a checkpoint (Ctrl-C again to quit now)",
              file=sys.stderr, flush=True)


@dataclasses.dataclass
class TrainingState:
    """Everything the rest of a run depends on, as host arrays and JSON-able values.

    ``loader`` is the shuffling generator's state *before* epoch ``epoch``'s order was drawn: a
    resumed run draws that order again and skips the ``batch`` batches already trained. The
    augmenter's generator is saved where it stands, after the last trained batch.
    """

    weights: dict                   # Model.weights_dict(): "weights/<layer>/<name>" -> host array
    optimizer: dict                 # Adam.get_state(): iterations, learning rate, moments
    fingerprint: dict               # the settings a resumed run must share (see train.run_fingerprint)
    epoch: int = 0                  # epochs finished
    batch: int = 0                  # batches of epoch ``epoch`` finished
    epoch_loss_sum: float = 0.0     # sum of batch loss x batch size so far in this epoch
    epoch_images: int = 0
    epoch_seconds: float = 0.0
    train_seconds: float = 0.0      # all epochs so far, every run of this training together
    history: list = dataclasses.field(default_factory=list)
    callbacks: list = dataclasses.field(default_factory=list)
    stop_training: bool = False     # EarlyStopping's verdict
    loader: dict | None = None
    augmenter: dict | None = None

    ARRAYS = ("weights", "optimizer")

    def to_dict(self) -> dict[str, Any]:
        """{"weights": {...}, "optimizer": {...}, "progress": {every other field, JSON-able}}."""
        progress = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.ARRAYS}
        return {"weights": self.weights, "optimizer": self.optimizer, "progress": progress}

    @classmethod
    def from_dict(cls, data, source="the checkpoint"):
        """The inverse of ``to_dict``; a ModelFileError names what a file that is no checkpoint lacks."""
        progress = data["progress"]
        names = [f.name for f in dataclasses.fields(cls) if f.name not in cls.ARRAYS]
        missing = [name for name in names if name not in progress]
        if missing:
            raise ModelFileError(f"{source}: not a training checkpoint of train.py (it lacks {', '.join(missing)})")
        return cls(weights=dict(data["weights"]), optimizer=dict(data["optimizer"]),
                   **{name: progress[name] for name in names})


class Trainer:
    """Epochs of batches, validation and callbacks, with checkpoints to resume from (see the module doc).

    ``fingerprint`` holds the settings a resumed run must share with the one it continues;
    ``border_weighted`` reads each batch's border-weight maps (with ``class_weights``, None for per
    mask); ``augmenter`` (or None) moves every training batch. ``on_batch_end(trainer)`` is called
    after every trained batch (a hook for tests and tools).

    The host reads the device only where it must: the batch losses stay on the device and are
    read ``loss_read_every`` batches at a time in one transfer (and before a checkpoint, a stop
    and the epoch's end), the validation losses once per epoch. A NaN loss stops training at
    that read, within the epoch; the update of the batch that gave it was never applied (see
    Model.train_step). The sums are made on the host in batch order, so they are the same bits
    whatever the device and the read interval. With ``prefetch`` the next batch is read and
    augmented in a background thread during each step (unet/prefetch.py); the batches, and so
    the run, are the same as without.
    """

    def __init__(self, model, train_loader, val_loader, *, epochs, weights_dir, fingerprint=None, augmenter=None,
                 border_weighted=False, class_weights=None, checkpoint_minutes=5.0, max_minutes=None, quiet=False,
                 loss_read_every=8, prefetch=True, log=print):
        self.model, self.train_loader, self.val_loader = model, train_loader, val_loader
        self.epochs = epochs
        self.weights_dir = os.fspath(weights_dir)
        self.augmenter = augmenter
        self.border_weighted, self.class_weights = border_weighted, class_weights
        self.checkpoint_minutes, self.max_minutes = checkpoint_minutes, max_minutes
        self.quiet, self.log = quiet, log
        self.stop = StopRequest()
        self.on_batch_end = None
        self.loss_read_every, self.prefetch = loss_read_every, prefetch
        self._unread = []            # (batch index, images, loss on the device) of batches whose loss is unread
        self.state = TrainingState(weights={}, optimizer={}, fingerprint=dict(fingerprint or {}),
                                   loader=train_loader.get_state(),
                                   augmenter=augmenter.get_state() if augmenter else None)
        self._last_save = time.monotonic()
        if border_weighted and class_weights is not None:
            log("border-weighted loss, class weights: "
                + ", ".join(f"{name} {w:.3g}" for name, w in zip(CLASS_NAMES, class_weights)))
        self.callbacks = [
            ModelCheckpoint(weights_dir, period=3, verbose=1, log=self._log_above_progress),
            ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=3, verbose=1, log=self._log_above_progress),
            EarlyStopping(monitor="val_loss", min_delta=0, patience=10, verbose=1, log=self._log_above_progress),
        ]
        for callback in self.callbacks:
            callback.set_model(model)
            callback.on_train_begin()

    def _log_above_progress(self, message):
        from tqdm import tqdm

        tqdm.write(message)

    # -- the one state, captured and applied --
    def capture(self) -> TrainingState:
        """The run as it stands now, with copies of every array (later steps do not change it)."""
        self._read_losses()
        return dataclasses.replace(
            self.state, weights=self.model.weights_dict(), optimizer=self.model.optimizer.get_state(),
            history=list(self.state.history), callbacks=[c.get_state() for c in self.callbacks],
            stop_training=bool(self.model.stop_training))

    def apply(self, state: TrainingState, source="the checkpoint"):
        """Put ``state`` into the model, the optimizer, the callbacks and the augmenter."""
        self.model.assign_weights(with_prefix(state.weights, "weights/"), source)
        self.model.optimizer.set_state(state.optimizer)
        for callback, saved in zip(self.callbacks, state.callbacks, strict=True):
            callback.set_state(saved)
        self.model.stop_training = state.stop_training
        if self.augmenter:
            self.augmenter.set_state(state.augmenter)
        self.state = dataclasses.replace(state, weights={}, optimizer={})

    # -- checkpoints --
    @property
    def resume_path(self):
        return os.path.join(self.weights_dir, RESUME_FILE)

    def remove_stale_temporaries(self):
        """Delete the temporary files of saves that were killed before their rename (never a finished file)."""
        for path in glob.glob(os.path.join(glob.escape(self.weights_dir), TEMPORARY_PATTERN)):
            os.remove(path)
            self.log(f"removed {path}, a partial checkpoint left by an interrupted save")

    def save_checkpoint(self):
        """Write the TrainingState to WEIGHTS_DIR/last.npz, atomically (predict.py reads the file as a model)."""
        data = self.capture().to_dict()
        atomic_savez(self.resume_path, self.model.file_arrays(data["weights"], data["optimizer"], data["progress"]))
        self._last_save = time.monotonic()

    def restore(self):
        """Continue from WEIGHTS_DIR/last.npz; a CheckpointError says why a checkpoint does not fit this run."""
        path = self.resume_path
        if not os.path.exists(path):
            raise CheckpointError(f"--resume: no checkpoint at {path}; run without --resume to start, "
                                  f"or point --weights-dir at the folder of the run to continue")
        try:
            data = read_npz(path)
            progress = json.loads(str(data["extra"])) if "extra" in data else {}
            if "loader" not in progress and "epoch_start_state" in progress:
                progress["loader"] = self._loader_state_of_old_checkpoint(progress)
            state = TrainingState.from_dict({"weights": {k: v for k, v in data.items() if k.startswith("weights/")},
                                             "optimizer": with_prefix(data, "optimizer/"), "progress": progress},
                                            source=path)
        except (ValueError, KeyError, TypeError) as error:     # ModelFileError, or a damaged "extra" record
            raise CheckpointError(f"--resume: {error}. Start afresh with another --weights-dir (or without "
                                  f"--resume), or continue from an older checkpoint copied to {path}") from None
        differences = [f"--{key.replace('_', '-')} {state.fingerprint.get(key)!r} there, {value!r} here"
                       for key, value in self.state.fingerprint.items() if state.fingerprint.get(key) != value]
        if differences:
            raise CheckpointError(f"--resume: {path} was written by a run with other settings: "
                                  f"{'; '.join(differences)}. Use that run's settings, or another --weights-dir "
                                  f"to start afresh")
        if state.epoch > self.epochs:
            raise CheckpointError(f"--resume: {path} has trained {state.epoch} epochs, more than "
                                  f"--epochs {self.epochs}; pass --epochs {state.epoch} or more")
        self.apply(state, source=path)
        if self.finished:
            self.log(f"resumed from {path}: training finished after epoch {state.epoch}; predicting")
        else:
            self.log(f"resumed from {path}: epoch {state.epoch + 1}, batch {state.batch}")

    def _loader_state_of_old_checkpoint(self, progress):
        """Files from before TrainingState kept the loader's state at the start of the epoch they were in;
        after a finished epoch (batch 0) that epoch's draw of the order takes it to the next one's."""
        saved = progress.pop("epoch_start_state")
        if progress.get("batch") != 0 or saved is None:
            return saved
        self.train_loader.set_state(saved)
        self.train_loader.epoch_order()
        return self.train_loader.get_state()

    @property
    def finished(self):
        return self.state.epoch >= self.epochs or bool(self.model.stop_training)

    # -- one epoch --
    def _train_epoch(self):
        """Train the rest of epoch ``state.epoch``; False if a stop was requested before its end."""
        from tqdm import tqdm

        state, loader = self.state, self.train_loader
        loader.set_state(state.loader)               # the order drawn is this epoch's, also after a resume
        order = loader.epoch_order()
        batches = [order[i:i + loader.batch_size] for i in range(0, len(order), loader.batch_size)]
        progress = tqdm(total=len(batches), initial=state.batch, desc=f"Epoch {state.epoch + 1}/{self.epochs}",
                        unit="batch", disable=self.quiet, leave=False, dynamic_ncols=True)
        ahead = Prefetcher(self._prepare_training_batch, batches[state.batch:], enabled=self.prefetch)
        with progress, ahead:
            clock = time.perf_counter()              # the epoch's time: waiting for data, training, reading losses
            for images, masks, weights, augmenter_state in ahead:
                self._unread.append((state.batch, len(images),
                                     self.model.train_step(images, masks, sample_weight=weights)))
                state.augmenter = augmenter_state    # what a checkpoint after this batch must hold
                state.batch += 1
                progress.update(1)
                if len(self._unread) >= self.loss_read_every or state.batch == len(batches):
                    self._read_losses(progress)
                state.epoch_seconds += time.perf_counter() - clock
                if self.on_batch_end is not None:
                    self.on_batch_end(self)
                if state.batch == len(batches):
                    break                            # the epoch's end saves (after validation) anyway
                if self.stop.requested:
                    return False
                if (self.checkpoint_minutes is not None
                        and time.monotonic() - self._last_save >= 60 * self.checkpoint_minutes):
                    self.save_checkpoint()
                clock = time.perf_counter()
        return True

    def _prepare_training_batch(self, ids):
        """(images, masks, weights, the augmenter's state after them) of one training batch; runs in
        the prefetch thread, the augmenter's only user during an epoch."""
        images, masks, weights = self._read_batch(self.train_loader, ids, augment=True)
        return images, masks, weights, self.augmenter.get_state() if self.augmenter else None

    def _read_losses(self, progress=None):
        """Read the unread batch losses in one transfer and add them to the epoch's sums.

        A non-finite loss raises TrainingError naming its batch.
        """
        unread, self._unread = self._unread, []
        if not unread:
            return
        values = backend.read_scalars([loss for _, _, loss in unread])
        state = self.state
        for (batch, images, _), value in zip(unread, values):
            if not math.isfinite(value):
                raise TrainingError(f"the loss became {value} at epoch {state.epoch + 1}, batch {batch + 1}: "
                                    f"training diverged and was stopped without saving; {self._last_good()}; "
                                    f"try a smaller --lr")
            state.epoch_loss_sum += value * images
            state.epoch_images += images
        if progress is not None:
            progress.set_postfix(loss=f"{state.epoch_loss_sum / state.epoch_images:.4f}")

    def _last_good(self):
        if os.path.exists(self.resume_path):
            return f"the last checkpoint, {self.resume_path}, is kept (epoch {self.state.epoch + 1} or before)"
        return "no checkpoint had been written yet"

    def _read_batch(self, loader, ids, augment):
        """(images, masks, weights or None) for these ids, augmented if asked, fitted to the model.

        Border weights come from the cache beside the masks and, when the batch is deformed,
        are deformed with it, so they stay on the gaps between the objects.
        """
        images, masks = loader.read_labels(ids)     # class indices: the model one-hots them on its device
        weights = (batch_weights(ids, loader.masks_dir, NUM_CLASSES, class_weights=self.class_weights)
                   if self.border_weighted else None)
        if augment and self.augmenter is not None:
            images, masks, *rest = self.augmenter(images, masks, weights)
            weights = rest[0] if rest else None
        return fit_to_model(self.model, images, masks, weights)

    def _validate(self):
        """Mean loss over every validation image (weighted like the training loss, never augmented)."""
        loader = self.val_loader
        losses, sizes = [], []
        for start in range(0, len(loader.ids), loader.batch_size):
            ids = loader.ids[start:start + loader.batch_size]
            images, masks, weights = self._read_batch(loader, ids, augment=False)
            losses.append(self.model.test_step(images, masks, sample_weight=weights))
            sizes.append(len(images))
        values = backend.read_scalars(losses)   # one read
        total = 0.0
        for value, size in zip(values, sizes):
            total += value * size
        return total / sum(sizes)

    def _end_epoch(self):
        """Validate, log, run the callbacks and move the state to the next epoch's start."""
        state = self.state
        val_loss = self._validate()
        if not math.isfinite(val_loss):
            raise TrainingError(f"the validation loss became {val_loss} after epoch {state.epoch + 1}: training "
                                f"diverged and was stopped without saving; {self._last_good()}; try a smaller --lr")
        seconds = state.epoch_seconds
        logs = {"loss": state.epoch_loss_sum / state.epoch_images, "val_loss": val_loss,
                "lr": self.model.optimizer.learning_rate}
        state.history.append({"epoch": state.epoch + 1, **logs, "seconds": round(seconds, 3),
                              "images_per_second": round(state.epoch_images / seconds, 3)})
        self.log(f"Epoch {state.epoch + 1}/{self.epochs} - loss {logs['loss']:.4f} - val_loss {val_loss:.4f} "
                 f"- lr {logs['lr']:.2e} - {seconds:.1f} s - {state.epoch_images / seconds:.1f} images/s")
        state.train_seconds += seconds
        for callback in self.callbacks:
            callback.on_epoch_end(state.epoch, logs)
        state.epoch, state.batch = state.epoch + 1, 0
        state.epoch_loss_sum, state.epoch_images, state.epoch_seconds = 0.0, 0, 0.0
        state.loader = self.train_loader.get_state()   # past this epoch's draw: the next epoch's start

    def fit(self):
        """Train until the epochs are done, EarlyStopping stops, time is up, or Ctrl-C. True if finished.

        ``max_minutes`` counts the training time of this call only, so a resumed run gets its own budget.
        """
        self.remove_stale_temporaries()
        session_start = self.state.train_seconds
        with self.stop:
            while not self.finished:
                if not self._train_epoch():
                    self.save_checkpoint()
                    self.log(f"interrupted: saved {self.resume_path}; continue with the same command and --resume")
                    return False
                self._end_epoch()
                self.save_checkpoint()
                if self.stop.requested:
                    self.log(f"interrupted: saved {self.resume_path}; continue with the same command and --resume")
                    return False
                if (self.max_minutes is not None and not self.finished
                        and self.state.train_seconds - session_start > 60 * self.max_minutes):
                    self.log(f"--max-minutes {self.max_minutes:g}: stopping after epoch {self.state.epoch}; "
                             f"continue with the same command and --resume")
                    break
        for callback in self.callbacks:
            callback.on_train_end()
        return True
