"""The post's three Keras callbacks, with Keras's exact decision rules, for our training loop.

    ModelCheckpoint(weight_dir, period=3)                 save the best model, looking every 3rd epoch
    ReduceLROnPlateau(factor=0.5, patience=3, verbose=1)  halve the learning rate on a plateau
    EarlyStopping(min_delta=0, patience=10, verbose=1)    stop when val_loss stops improving

The training loop drives them like Keras's ``fit`` does::

    for callback in callbacks: callback.set_model(model); callback.on_train_begin()
    for epoch in range(epochs):                       # 0-based, as in Keras; messages say epoch + 1
        ... train, validate ...
        logs = {"loss": loss, "val_loss": val_loss, "lr": model.optimizer.learning_rate}
        for callback in callbacks: callback.on_epoch_end(epoch, logs)
        if model.stop_training: break
    for callback in callbacks: callback.on_train_end()

A callback touches the model only through ``model.optimizer.learning_rate`` (a float, read and
set), ``model.stop_training`` (a bool) and ``model.save(path)``. To resume, save every callback's
``get_state()`` (a JSON-serialisable dict) with the weights and the optimizer (which holds the
learning rate), and after ``on_train_begin()`` of the new run call ``set_state(saved)``: the
decisions then continue as if training had never stopped.

Messages go through ``log`` (default ``print``; pass ``tqdm.write`` under a progress bar) in
Keras 2's words, e.g. "Epoch 00007: ReduceLROnPlateau reducing learning rate to 0.0005.".

Comparisons are done in Python floats (float64). Keras 3 compares in float32 (its ``ops.less``), so
the two can disagree only on values equal up to float32 rounding (~1e-7 relative).
"""
from __future__ import annotations

import os
import warnings

import numpy as np


class Callback:
    """Base class: hooks that do nothing, and state made of the attributes named in STATE."""

    STATE = ()

    def __init__(self, verbose=0, log=print):
        self.verbose = verbose
        self.log = log
        self.model = None

    def set_model(self, model):
        self.model = model

    def on_train_begin(self):
        pass

    def on_epoch_end(self, epoch, logs):
        pass

    def on_train_end(self):
        pass

    def get_state(self):
        return {name: getattr(self, name) for name in self.STATE}

    def set_state(self, state):
        for name in self.STATE:
            setattr(self, name, state[name])


class MonitorCallback(Callback):
    """A callback that watches one logged quantity and keeps the best value seen (``None`` before
    the first, so the first value always counts as an improvement, as in Keras 3).

    ``mode`` "min" or "max" says which way is better; "auto" means "min" for a loss and refuses to
    guess for anything else. An improvement must beat the best by more than ``min_delta``.
    """

    def __init__(self, monitor, mode="auto", min_delta=0.0, verbose=0, log=print):
        super().__init__(verbose, log)
        if mode == "auto":
            if monitor.removeprefix("val_") != "loss":
                raise ValueError(f"cannot tell whether {monitor!r} should go up or down: pass mode='min' or 'max'")
            mode = "min"
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        self.monitor = monitor
        self.mode = mode
        self.min_delta = abs(min_delta)
        self.best = None

    def _is_improvement(self, current, best):
        if best is None:
            return True
        if self.mode == "min":
            return current + self.min_delta < best
        return current - self.min_delta > best

    def _current(self, logs):
        """The monitored value as a float, or None (with Keras's warning) when it is not logged."""
        value = (logs or {}).get(self.monitor)
        if value is None:
            warnings.warn(f"{type(self).__name__} is conditioned on {self.monitor!r}, which is not logged; "
                          f"logged: {', '.join(logs or {})}", stacklevel=3)
            return None
        return float(value)


class ReduceLROnPlateau(MonitorCallback):
    """Multiply the learning rate by ``factor`` when ``monitor`` has not improved (by more than
    ``min_delta``) for ``patience`` epochs; then wait ``cooldown`` epochs before counting again.
    Never goes below ``min_lr``. Keras's defaults, including ``min_delta=1e-4``.

    Per epoch (Keras's order): a cooldown epoch clears the wait counter; an improvement records the
    new best and clears it; otherwise, outside cooldown, the wait counter grows, and reaching
    ``patience`` reduces the rate, starts the cooldown and clears the counter.
    """

    STATE = ("best", "wait", "cooldown_counter")

    def __init__(self, monitor="val_loss", factor=0.1, patience=10, verbose=0, mode="auto",
                 min_delta=1e-4, cooldown=0, min_lr=0.0, log=print):
        super().__init__(monitor, mode, min_delta, verbose, log)
        if factor >= 1.0:
            raise ValueError(f"ReduceLROnPlateau needs factor < 1.0, got {factor}")
        self.factor = factor
        self.patience = patience
        self.cooldown = cooldown
        self.min_lr = min_lr
        self.wait = 0
        self.cooldown_counter = 0

    def on_train_begin(self):
        self.best = None
        self.wait = 0
        self.cooldown_counter = 0

    def on_epoch_end(self, epoch, logs):
        current = self._current(logs)
        if current is None:
            return
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self._is_improvement(current, self.best):
            self.best = current
            self.wait = 0
        elif self.cooldown_counter == 0:
            self.wait += 1
            if self.wait >= self.patience and self._reduce_lr(epoch):
                self.cooldown_counter = self.cooldown
                self.wait = 0

    def _reduce_lr(self, epoch):
        """Lower the learning rate; False if it is already at ``min_lr``."""
        optimizer = self.model.optimizer
        old_lr = float(optimizer.learning_rate)
        # Compared in float32 as Keras does (it stores the rate in float32), so a rate that equals
        # min_lr up to float32 rounding counts as already there.
        if not old_lr > np.float32(self.min_lr):
            return False
        new_lr = max(old_lr * self.factor, self.min_lr)
        optimizer.learning_rate = new_lr
        if self.verbose > 0:
            self.log(f"Epoch {epoch + 1:05d}: ReduceLROnPlateau reducing learning rate to {new_lr}.")
        return True


class EarlyStopping(MonitorCallback):
    """Set ``model.stop_training`` once ``monitor`` has not improved (by more than ``min_delta``)
    for ``patience`` epochs. Never stops after the first epoch (epoch 0).

    Keras counts every epoch (``wait += 1``) and resets the count to 0 on an improvement, so the
    stop comes at the ``patience``-th epoch in a row without one. As with Keras's default
    ``restore_best_weights=False`` (the post's setting), the model keeps its last weights; the best
    ones are in the checkpoint folder.
    """

    STATE = ("best", "wait", "stopped_epoch", "best_epoch")

    def __init__(self, monitor="val_loss", min_delta=0.0, patience=0, verbose=0, mode="auto", log=print):
        super().__init__(monitor, mode, min_delta, verbose, log)
        self.patience = patience
        self.wait = 0
        self.stopped_epoch = 0
        self.best_epoch = 0

    def on_train_begin(self):
        self.best = None
        self.wait = 0
        self.stopped_epoch = 0
        self.best_epoch = 0

    def on_epoch_end(self, epoch, logs):
        current = self._current(logs)
        if current is None:
            return
        self.wait += 1
        if self._is_improvement(current, self.best):
            self.best = current
            self.best_epoch = epoch
            self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self):
        if self.stopped_epoch > 0 and self.verbose > 0:
            self.log(f"Epoch {self.stopped_epoch + 1:05d}: early stopping")


class ModelCheckpoint(MonitorCallback):
    """Save the model into ``directory`` every ``period`` epochs, or with ``save_best_only`` only
    when ``monitor`` beat its best so far.

    ``period`` is Keras 2's (the post's ``period=3``; Keras 3 dropped it): a counter of epochs since
    the last look; when it reaches ``period`` it restarts and this epoch is considered, the others
    are not looked at at all. So with period 3 only epochs 3, 6, 9, ... (1-based) can be saved,
    and "best" means best among those epochs. Files are named like the post's,
    ``ep{epoch:03d}-loss{loss:.3f}-val_loss{val_loss:.3f}`` + ``extension``, with the epoch
    numbered from 1; ``filename`` may use any key of ``logs``. ``last_saved_path`` is the newest
    file written (with ``save_best_only``, the best model).
    """

    STATE = ("best", "epochs_since_last_save", "last_saved_path")

    def __init__(self, directory, filename="ep{epoch:03d}-loss{loss:.3f}-val_loss{val_loss:.3f}", extension=".npz",
                 monitor="val_loss", save_best_only=True, period=3, mode="auto", verbose=0, log=print, writes=True):
        super().__init__(monitor, mode, 0.0, verbose, log)
        if period < 1:
            raise ValueError(f"period must be at least 1, got {period}")
        self.directory = os.fspath(directory)
        self.filename = filename + extension
        self.save_best_only = save_best_only
        self.period = period
        self.epochs_since_last_save = 0
        self.last_saved_path = None
        self.writes = writes        # False on the ranks of a data-parallel run that do not write (all but 0)

    def on_epoch_end(self, epoch, logs):
        self.epochs_since_last_save += 1
        if self.epochs_since_last_save < self.period:
            return
        self.epochs_since_last_save = 0
        path = os.path.join(self.directory, self.filename.format(epoch=epoch + 1, **logs))
        if not self.save_best_only:
            self._save(path, f"Epoch {epoch + 1:05d}: saving model to {path}")
            return
        current = self._current(logs)
        if current is None:
            return
        best_text = self._best_text()
        if self._is_improvement(current, self.best):
            self.best = current
            self._save(path, f"Epoch {epoch + 1:05d}: {self.monitor} improved from {best_text} to {current:.5f}, "
                             f"saving model to {path}")
        elif self.verbose > 0:
            self.log(f"Epoch {epoch + 1:05d}: {self.monitor} did not improve from {best_text}")

    def _best_text(self):
        """The best value as Keras 2 prints it; it starts from +inf (-inf in "max" mode)."""
        if self.best is None:
            return "inf" if self.mode == "min" else "-inf"
        return f"{self.best:.5f}"

    def _save(self, path, message):
        if self.verbose > 0:
            self.log(message)
        if self.writes:
            os.makedirs(self.directory, exist_ok=True)
            self.model.save(path)
        self.last_saved_path = path
