"""The post's ``model.fit_generator`` written out, and checkpoints a run resumes from exactly.

``Trainer.fit`` runs epochs of batches, validates after each epoch and calls the callbacks
(checkpoint, learning-rate schedule, early stopping) as Keras does. Whatever stops it (Ctrl-C,
SIGTERM, SIGHUP, a closed output pipe, ``--max-minutes``, ``kill -9``, a crash, a full disk),
the run can be continued from the newest checkpoint and ends with the very bytes an
uninterrupted run would have written, because the checkpoint holds everything the rest of the
run depends on: one ``TrainingState`` (unet/training_state.py), which saving and restoring both
go through, so the two cannot drift apart.

When checkpoints are written (``WEIGHTS_DIR/last.npz``, atomically by minitensor/checkpoint.py):

* after every epoch (after validation and the callbacks);
* during an epoch, after the first batch that ends ``checkpoint_minutes`` after the last save
  (so ``kill -9`` loses at most that much work; 0 saves after every batch);
* when a stop is requested (unet/stopping.py: after the current batch, or after validation if it
  came then).

``WEIGHTS_DIR/best.npz`` holds the weights of the epoch with the lowest val_loss so far (written
when an epoch beats it), for predicting as Keras's ``restore_best_weights`` would. What is not
saved is what cannot change the result: wall-clock times go into the history as they were
measured, and a resumed epoch reports the time of both of its parts.
"""
from __future__ import annotations

import math
import os
import signal
import time

from minitensor import backend
from minitensor.checkpoint import remove_stale_temporaries
from minitensor.data_parallel import DataParallel
from minitensor.distributed import SingleProcess
from minitensor.kernels import conv_plan

from .callbacks import EarlyStopping, ModelCheckpoint, ReduceLROnPlateau
from .data import CLASS_NAMES, NUM_CLASSES
from .prefetch import Prefetcher
from .stopping import StopRequest
from .tiling import fit_to_model
from .trainer_checkpoints import BEST_FILE, RESUME_FILE, CheckpointError, TrainerCheckpoints, TrainingError
from .training_state import TrainingState
from .weights import batch_weights

__all__ = ["Trainer", "TrainingError", "CheckpointError", "RESUME_FILE", "BEST_FILE", "WEIGHT_CACHE"]
WEIGHT_CACHE = "border_weights"   # the border-weight maps' cache, in the weights folder (not the user's data)


def rank_slice(ids, rank, size):
    """Rank ``rank``'s contiguous part of one global batch ``ids``: sizes differ by at most one."""
    return ids[len(ids) * rank // size:len(ids) * (rank + 1) // size]


class Trainer(TrainerCheckpoints):
    """Epochs of batches, validation and callbacks, with checkpoints to resume from (see the module doc).

    ``fingerprint`` holds the settings a resumed run must share with the one it continues;
    ``border_weighted`` reads each batch's border-weight maps (with ``class_weights``, None for per
    mask); ``augmenter`` (or None) moves every training batch. ``on_batch_end(trainer)`` is called
    after every trained batch, ``on_epoch_end(trainer)`` after each epoch's checkpoint (hooks for tests and
    tools: train.py --tensorboard).

    The host reads the device only where it must: the batch losses stay on the device and are
    read ``loss_read_every`` batches at a time in one transfer (and before a checkpoint, a stop
    and the epoch's end), the validation losses once per epoch. A NaN loss stops training at
    that read, within the epoch; the update of the batch that gave it was never applied (see
    Model.train_step). The sums are made on the host in batch order, so they are the same bits
    whatever the device and the read interval. With ``prefetch`` the next batch is read and
    augmented in a background thread during each step (unet/prefetch.py); the batches, and so
    the run, are the same as without.

    Data-parallel (``world``, minitensor/distributed.py, of more than one rank): every rank goes
    through the same global batches in the same order and trains on its slice of each
    (``rank_slice``); minitensor/data_parallel.py sums the gradients and the loss, so the
    history is the global batch's. Validation batches are dealt out to the ranks and their
    losses gathered and summed in batch order (the same bits as one process). Rank 0 alone
    writes checkpoints and logs; a stop seen by any rank stops all after the same batch.
    """

    def __init__(self, model, train_loader, val_loader, *, epochs, weights_dir, fingerprint=None, augmenter=None,
                 border_weighted=False, class_weights=None, checkpoint_minutes=5.0, max_minutes=None, quiet=False,
                 loss_read_every=8, prefetch=True, log=print, world=None):
        self.world = world or SingleProcess()
        if not self.world.is_writer:                 # one writer: rank 0 logs, the others stay silent
            log, quiet = (lambda message: None), True
        self.parallel = DataParallel(model, self.world) if self.world.is_distributed else None
        self.per_sample_streams = True               # False for a run begun before them (see apply)
        self.model, self.train_loader, self.val_loader = model, train_loader, val_loader
        self.epochs = epochs
        self.weights_dir = os.fspath(weights_dir)
        self.augmenter = augmenter
        self.border_weighted, self.class_weights = border_weighted, class_weights
        self.checkpoint_minutes, self.max_minutes = checkpoint_minutes, max_minutes
        self.stop = StopRequest()
        self.quiet, self.log = quiet, self._guarded(log)
        self.on_batch_end = self.on_epoch_end = None
        self.loss_read_every, self.prefetch = loss_read_every, prefetch
        self._unread = []            # (batch index, images, loss on the device) of batches whose loss is unread
        self.state = TrainingState(weights={}, optimizer={}, fingerprint=dict(fingerprint or {}),
                                   loader=train_loader.get_state(),
                                   augmenter={"streams": "per-sample", "seed": augmenter.seed} if augmenter else None)
        self._last_save = time.monotonic()
        self._save_seconds = 0.0     # time spent writing checkpoints in this epoch
        self._plan_tried_logged, self._plan_extra_logged = 0, 0.0   # conv_plan.summary() when last logged
        if border_weighted and class_weights is not None:
            log("border-weighted loss, class weights: "
                + ", ".join(f"{name} {w:.3g}" for name, w in zip(CLASS_NAMES, class_weights)))
        self.early_stopping = EarlyStopping(monitor="val_loss", min_delta=0, patience=10, verbose=1,
                                            log=self._log_above_progress)
        self.callbacks = [
            ModelCheckpoint(weights_dir, period=3, verbose=1, log=self._log_above_progress,
                            writes=self.world.is_writer),
            ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=3, verbose=1, log=self._log_above_progress),
            self.early_stopping,
        ]
        for callback in self.callbacks:
            callback.set_model(model)
            callback.on_train_begin()

    def _guarded(self, write):
        """``write`` that never stops training: a closed pipe (``train.py | head``) is a stop request,
        as Ctrl-C is, and a terminal gone after SIGHUP is written to no more."""
        def say(message):
            try:
                write(message)
            except BrokenPipeError:
                self.stop.request(signal.SIGPIPE)
            except OSError:
                pass
        return say

    def _log_above_progress(self, message):
        from tqdm import tqdm

        if self.world.is_writer:
            self._guarded(tqdm.write)(message)

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
            for images, masks, weights, augmenter_state, batch_images in ahead:
                if self.parallel is None:
                    loss = self.model.train_step(images, masks, sample_weight=weights)
                else:
                    loss = self.parallel.train_step(images, masks, weights, share=len(images) / batch_images)
                self._unread.append((state.batch, batch_images, loss))
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
                if self._stop_agreed():
                    return False
                if (self.checkpoint_minutes is not None
                        and time.monotonic() - self._last_save >= 60 * self.checkpoint_minutes):
                    self.save_checkpoint()
                clock = time.perf_counter()
        return True

    def _stop_agreed(self):
        """Whether to stop now. Across ranks, the largest signal number any rank has seen, so a
        signal that reached one rank (or reached them at different batches) stops all of them here."""
        if self.world.size > 1:
            signum = self.world.max_over_ranks(self.stop.signum or 0)
            if signum:
                self.stop.request(signal.Signals(signum))
        return self.stop.requested

    def _prepare_training_batch(self, ids):
        """(images, masks, weights, the augmenter's state after them, the global batch's size) of
        this rank's slice of one training batch; runs in the prefetch thread, the augmenter's only
        user during an epoch. A rank whose slice is empty gets ``((), None, None, ...)``."""
        mine = rank_slice(ids, self.world.rank, self.world.size)
        images, masks, weights = self._read_batch(self.train_loader, mine, augment=True) if len(mine) else ((),) * 3
        if self.augmenter is None or self.per_sample_streams:
            return images, masks, weights, self.state.augmenter, len(ids)
        return images, masks, weights, self.augmenter.get_state(), len(ids)

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

        Border weights come from their cache in the weights folder and, when the batch is deformed,
        are deformed with it, so they stay on the gaps between the objects.
        """
        images, masks = loader.read_labels(ids)     # class indices: the model one-hots them on its device
        weights = (batch_weights(ids, loader.masks_dir, os.path.join(self.weights_dir, WEIGHT_CACHE), NUM_CLASSES,
                                 class_weights=self.class_weights, write_cache=self.world.is_writer)
                   if self.border_weighted else None)
        if augment and self.augmenter is not None:
            keys = [(self.state.epoch, index) for index in ids] if self.per_sample_streams else None
            images, masks, *rest = self.augmenter(images, masks, weights, keys=keys)
            weights = rest[0] if rest else None
        return fit_to_model(self.model, images, masks, weights)

    def _validate(self):
        """Mean loss over every validation image (weighted like the training loss, never augmented).

        Batch b is validated by rank b mod N; the ranks' losses are gathered and summed in batch
        order, so the mean is the same bits for any number of ranks."""
        loader, world = self.val_loader, self.world
        starts = range(0, len(loader.ids), loader.batch_size)
        mine, losses = [], []
        for batch, start in list(enumerate(starts))[world.rank::world.size]:
            images, masks, weights = self._read_batch(loader, loader.ids[start:start + loader.batch_size], augment=False)
            mine.append((batch, len(images)))
            losses.append(self.model.test_step(images, masks, sample_weight=weights))
        values = backend.read_scalars(losses) if losses else []   # one read
        results = sorted((batch, size, value) for part in world.allgather(
            [(batch, size, value) for (batch, size), value in zip(mine, values)]) for batch, size, value in part)
        total = 0.0
        for _, size, value in results:
            total += value * size
        return total / sum(size for _, size, _ in results)

    def _end_epoch(self):
        """Validate, run the callbacks, keep the best weights and move the state to the next epoch's start."""
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
        state.train_seconds += seconds
        for callback in self.callbacks:
            callback.on_epoch_end(state.epoch, logs)
        if self.parallel is not None:
            self.parallel.check_weights_agree(f"after epoch {state.epoch + 1}")
        self._save_if_best(val_loss)
        state.epoch, state.batch = state.epoch + 1, 0
        state.epoch_loss_sum, state.epoch_images, state.epoch_seconds = 0.0, 0, 0.0
        state.loader = self.train_loader.get_state()   # past this epoch's draw: the next epoch's start

    def _log_epoch(self):
        """The finished epoch's line, with the time its checkpoints took (not in its training time).

        The history row gets it too (``save_seconds``); the row inside the epoch's own checkpoint,
        written before that time was known, lacks the last save, so a run resumed from that very
        checkpoint reports a little less (timings are the one thing a resume does not reproduce)."""
        row = self.state.history[-1]
        row["save_seconds"] = round(self._save_seconds, 3)
        self._save_seconds = 0.0
        self.log(f"Epoch {row['epoch']}/{self.epochs} - loss {row['loss']:.4f} - val_loss {row['val_loss']:.4f} "
                 f"- lr {row['lr']:.2e} - {row['seconds']:.1f} s - {row['images_per_second']:.1f} images/s"
                 f" - checkpoints {row['save_seconds']:.1f} s")
        plan = conv_plan.summary()
        if plan["tried"] > self._plan_tried_logged:
            self.log(f"  (the convolutions' algorithms: {plan['tried'] - self._plan_tried_logged} new shapes timed "
                     f"on this machine, in steps that took {plan['extra_seconds'] - self._plan_extra_logged:.1f} s "
                     f"more than the fastest choices would have; kept in {plan['cache']})")
            self._plan_tried_logged, self._plan_extra_logged = plan["tried"], plan["extra_seconds"]

    def _stopped(self):
        self.log(f"stopped: saved {self.resume_path}; continue with the same command and --resume")
        return False

    def fit(self):
        """Train until the epochs are done, EarlyStopping stops, time is up, or a stop signal. True if
        finished; False if stopped (``stop.exit_status`` says how).

        ``max_minutes`` counts the training time of this call only, so a resumed run gets its own budget.
        """
        if self.world.is_writer:
            remove_stale_temporaries(self.weights_dir, self.log)
        session_start = self.state.train_seconds
        with self.stop:
            while not self.finished:
                if not self._train_epoch():
                    self.save_checkpoint()
                    return self._stopped()
                self._end_epoch()
                self.save_checkpoint()
                self._log_epoch()
                if self.on_epoch_end is not None:
                    self.on_epoch_end(self)
                if self._stop_agreed():
                    return self._stopped()
                if (self.max_minutes is not None and not self.finished   # rank 0's clock decides for all
                        and self.world.broadcast(self.state.train_seconds - session_start > 60 * self.max_minutes)):
                    self.log(f"--max-minutes {self.max_minutes:g}: stopping after epoch {self.state.epoch}; "
                             f"continue with the same command and --resume")
                    break
        for callback in self.callbacks:
            callback.on_train_end()
        self.world.barrier()          # rank 0's last files are complete before any rank reads best.npz
        return True
