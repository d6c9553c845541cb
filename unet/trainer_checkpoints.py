"""The part of the Trainer that writes and reads its checkpoints (unet/trainer.py says when).

``capture`` and ``apply`` turn the run into one ``TrainingState`` and back; ``save_checkpoint``
writes it to ``WEIGHTS_DIR/last.npz`` and ``restore`` continues from there, refusing (with a
CheckpointError that says what to do) a file of another run or of other settings. In a
data-parallel run only rank 0 writes; every rank restores from the same file.
"""
from __future__ import annotations

import dataclasses
import os
import time

from minitensor.checkpoint import read_checkpoint, write_checkpoint
from minitensor.kernels import conv_plan
from minitensor.files import with_prefix

from .training_state import TrainingState

RESUME_FILE = "last.npz"
BEST_FILE = "best.npz"            # the weights of the epoch with the lowest val_loss so far


class TrainingError(RuntimeError):
    """Training cannot go on (it diverged); the message says why."""


class CheckpointError(TrainingError):
    """--resume cannot continue from this checkpoint (missing, corrupt, other settings); the message says what to do."""


class TrainerCheckpoints:
    """Checkpoints of a Trainer (mixed into it): everything here reads or writes ``self.state``."""

    # -- the one state, captured and applied --
    def capture(self) -> TrainingState:
        """The run as it stands now, with copies of every array (later steps do not change it)."""
        self._read_losses()
        return dataclasses.replace(
            self.state, weights=with_prefix(self.model.weights_dict(), "weights/"),
            optimizer=self.model.optimizer.get_state(),
            history=list(self.state.history), callbacks=[c.get_state() for c in self.callbacks],
            stop_training=bool(self.model.stop_training), conv_plan=conv_plan.state())

    def apply(self, state: TrainingState, source="the checkpoint"):
        """Put ``state`` into the model, the optimizer, the callbacks and the augmenter."""
        self.model.assign_weights(state.weights, source)
        self.model.optimizer.set_state(state.optimizer)
        for callback, saved in zip(self.callbacks, state.callbacks, strict=True):
            callback.set_state(saved)
        self.model.stop_training = state.stop_training
        # The same convolution algorithms as the run it continues, so the same rounding (kernels/conv_plan.py).
        refused = conv_plan.restore(state.conv_plan)
        if refused:
            self.log(f"{source}: {len(refused)} convolution choices there cannot run in this version "
                     f"(first: {refused[0]!r}); those are measured again")
        if self.augmenter and "rng" in (state.augmenter or {}):
            # A run begun before per-sample streams: it goes on drawing from the one sequential
            # stream it was drawing from, so that it still ends as it would have uninterrupted.
            self.augmenter.set_state(state.augmenter)
            self.per_sample_streams = False
        self.state = dataclasses.replace(state, weights={}, optimizer={})

    # -- checkpoints --
    @property
    def resume_path(self):
        return os.path.join(self.weights_dir, RESUME_FILE)

    @property
    def best_path(self):
        return os.path.join(self.weights_dir, BEST_FILE)

    def save_checkpoint(self):
        """Write the TrainingState to WEIGHTS_DIR/last.npz, atomically (predict.py reads the file as a model)."""
        if not self.world.is_writer:
            return                                   # one writer: rank 0
        started = time.perf_counter()
        data = self.capture().to_dict()
        write_checkpoint(self.resume_path, self.model, data["progress"], data["weights"], data["optimizer"])
        self._last_save = time.monotonic()
        self._save_seconds += time.perf_counter() - started

    def _save_if_best(self, val_loss):
        """Keep the weights of the epoch with the lowest val_loss in WEIGHTS_DIR/best.npz (what the test
        set is predicted with, as Keras's ``restore_best_weights`` would have it)."""
        state = self.state
        if state.best_val_loss is not None and not val_loss < state.best_val_loss:
            return
        started = time.perf_counter()
        state.best_val_loss, state.best_epoch = val_loss, state.epoch + 1
        if not self.world.is_writer:
            return
        write_checkpoint(self.best_path, self.model, {"epoch": state.best_epoch, "val_loss": val_loss},
                         optimizer_state={})
        self._save_seconds += time.perf_counter() - started

    def load_best_weights(self):
        """Put best.npz's weights into the model (to predict with them); returns its record,
        ``{"epoch", "val_loss"}``, or None where this run has no best.npz (a checkpoint from before
        best.npz was kept)."""
        found = None
        if self.world.is_writer and self.state.best_val_loss is not None and os.path.exists(self.best_path):
            checkpoint = read_checkpoint(self.best_path)
            if checkpoint.extra.get("epoch") == self.state.best_epoch:  # this run's best (not an older one)
                found = checkpoint.weights, checkpoint.extra
        # Data-parallel, rank 0 reads the file and sends the weights: the other ranks, maybe on other
        # machines, need not see rank 0's folder.
        found = self.world.broadcast(found) if self.world.is_distributed else found
        if found is None:
            return None
        self.model.assign_weights(found[0], self.best_path)
        return found[1]

    def restore(self):
        """Continue from WEIGHTS_DIR/last.npz; a CheckpointError says why a checkpoint does not fit this run."""
        path = self.resume_path
        if not self.world.is_distributed:
            state = self._read_resume_file()
        else:              # rank 0 reads it and sends it: the other ranks need not see its folder
            try:
                outcome = self._read_resume_file() if self.world.rank == 0 else None
            except CheckpointError as error:
                outcome = error.args[0]
            outcome = self.world.broadcast(outcome)
            if isinstance(outcome, str):
                raise CheckpointError(outcome)
            state = outcome
        differences = [f"--{key.replace('_', '-')} {state.fingerprint.get(key)!r} there, {value!r} here"
                       for key, value in self.state.fingerprint.items() if state.fingerprint.get(key) != value]
        if differences:
            raise CheckpointError(f"--resume: {path} was written by a run with other settings: "
                                  f"{'; '.join(differences)}. Use that run's settings, or another --weights-dir "
                                  f"to start afresh")
        if state.epoch > self.epochs:
            raise CheckpointError(f"--resume: {path} has trained {state.epoch} epochs, more than "
                                  f"--epochs {self.epochs}; pass --epochs {state.epoch} or more")
        if (self.world.size > 1 and self.augmenter
                and "rng" in (state.augmenter or {})):
            raise CheckpointError(f"--resume: {path} was begun by a version whose augmentation draws one "
                                  f"sequential stream, which cannot be shared out over {self.world.size} "
                                  f"processes; resume it in one process (python train.py ... --resume)")
        self.apply(state, source=path)
        if self.model.stop_training:
            best = (f"; its best val_loss, {state.best_val_loss:.4f}, came at epoch {state.best_epoch}"
                    if state.best_val_loss is not None else "")
            self.log(f"resumed from {path}: EarlyStopping ended this run after epoch {state.epoch} (val_loss had "
                     f"not improved for {self.early_stopping.patience} epochs{best}), and a resumed run does not "
                     f"train past it, whatever --epochs says; predicting. To train longer, start a new run "
                     f"(another --weights-dir, or --start-over)")
        elif self.finished:
            self.log(f"resumed from {path}: training finished after epoch {state.epoch}; predicting")
        else:
            self.log(f"resumed from {path}: epoch {state.epoch + 1}, batch {state.batch}")

    def _read_resume_file(self):
        """The TrainingState in WEIGHTS_DIR/last.npz; a CheckpointError if it is missing or damaged."""
        path = self.resume_path
        if not os.path.exists(path):
            raise CheckpointError(f"--resume: no checkpoint at {path}; run without --resume to start, "
                                  f"or point --weights-dir at the folder of the run to continue")
        try:
            checkpoint = read_checkpoint(path)
            return TrainingState.from_dict({"weights": checkpoint.weights, "optimizer": checkpoint.optimizer,
                                            "progress": checkpoint.extra}, source=path)
        except (ValueError, KeyError, TypeError) as error:     # ModelFileError, or a damaged "extra" record
            raise CheckpointError(f"--resume: {error}. Start afresh with another --weights-dir (or "
                                  f"--start-over), or continue from an older checkpoint copied to {path}") from None
