"""``TrainingState``: everything the rest of a training run depends on, in one record.

Saving a checkpoint and restoring one both go through it (unet/trainer.py), so the two cannot
drift apart; minitensor/checkpoint.py writes it into a model file as weights, optimizer state
and one JSON record.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from minitensor.files import ModelFileError


@dataclasses.dataclass
class TrainingState:
    """Everything the rest of a run depends on, as host arrays and JSON-able values.

    ``loader`` is the shuffling generator's state *before* epoch ``epoch``'s order was drawn: a
    resumed run draws that order again and skips the ``batch`` batches already trained. The
    augmenter's generator is saved where it stands, after the last trained batch.
    """

    weights: dict                   # "<layer>/<name>" -> host array, as minitensor.checkpoint keys them
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
    best_val_loss: float | None = None   # the lowest val_loss so far, whose weights are in best.npz
    best_epoch: int = 0
    conv_plan: dict | None = None   # minitensor.kernels.conv_plan.state(): the convolutions' measured choices

    ARRAYS = ("weights", "optimizer")
    # Older checkpoints lack these: their defaults mean "unknown" (a run without a conv_plan plans afresh).
    ADDED_LATER = ("best_val_loss", "best_epoch", "conv_plan")

    def to_dict(self) -> dict[str, Any]:
        """{"weights": {...}, "optimizer": {...}, "progress": {every other field, JSON-able}}."""
        progress = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.ARRAYS}
        return {"weights": self.weights, "optimizer": self.optimizer, "progress": progress}

    @classmethod
    def from_dict(cls, data, source="the checkpoint"):
        """The inverse of ``to_dict``; a ModelFileError names what a file that is no checkpoint lacks."""
        progress = data["progress"]
        names = [f.name for f in dataclasses.fields(cls) if f.name not in cls.ARRAYS]
        missing = [name for name in names if name not in progress and name not in cls.ADDED_LATER]
        if missing:
            raise ModelFileError(f"{source}: not a training checkpoint of train.py (it lacks {', '.join(missing)})")
        state = cls(weights=dict(data["weights"]), optimizer=dict(data["optimizer"]),
                    **{name: progress[name] for name in names if name in progress})
        if "best_val_loss" not in progress and state.history:
            # A checkpoint from before best.npz: the best so far is known from the history, its
            # weights are not; a later epoch that beats it writes best.npz as usual.
            best = min(state.history, key=lambda row: row["val_loss"])
            state.best_val_loss, state.best_epoch = best["val_loss"], best["epoch"]
        return state
