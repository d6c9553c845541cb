"""Training checkpoints: a model file that also carries the state a training loop resumes from.

A checkpoint is an ordinary model file (``Model.save``'s layout, so ``load_model`` and
``predict.py`` read it as a model) whose ``extra`` record holds the loop's own JSON-able state:

    config                  the architecture (Model.get_config, as JSON)
    weights/<layer>/<name>  every weight
    optimizer/<name>        the optimizer's state (Adam: iterations, learning rate, moments)
    extra                   JSON: whatever the training loop needs besides (epoch, batch, RNG states...)

``write_checkpoint`` writes one atomically (minitensor/files.py); ``read_checkpoint`` reads it back
into its three parts or raises a ModelFileError naming the file; ``remove_stale_temporaries``
deletes what a save killed before its rename left behind. A training loop needs no other
knowledge of the format (unet/trainer.py uses only these).
"""
from __future__ import annotations

import json
from typing import NamedTuple

from .files import ModelFileError, atomic_savez, read_npz, remove_stale_temporaries, with_prefix

__all__ = ["Checkpoint", "read_checkpoint", "remove_stale_temporaries", "write_checkpoint"]


class Checkpoint(NamedTuple):
    weights: dict       # "layer/name" -> host array (the keys Model.assign_weights takes)
    optimizer: dict     # the optimizer's get_state() arrays
    extra: dict         # the training loop's JSON state


def write_checkpoint(path, model, extra, weights=None, optimizer_state=None):
    """Write ``model``'s architecture with ``weights`` and ``optimizer_state`` (captured from it
    earlier: keyed as :class:`Checkpoint` keys them) and ``extra`` to ``path``, atomically.

    Without ``weights`` / ``optimizer_state``: the model's as they are now (``optimizer_state={}``
    leaves the optimizer out: a file of weights only).
    """
    if weights is None:
        weights = with_prefix(model.weights_dict(), "weights/")
    if optimizer_state is None and model.optimizer is not None:
        optimizer_state = model.optimizer.get_state()
    arrays = {f"weights/{key}": value for key, value in weights.items()}
    atomic_savez(path, model.file_arrays(arrays, optimizer_state, extra))


def read_checkpoint(path):
    """The :class:`Checkpoint` in ``path``; a ModelFileError says why a file is none."""
    data = read_npz(path)
    try:
        extra = json.loads(str(data["extra"])) if "extra" in data else {}
    except ValueError as error:
        raise ModelFileError(f"{path}: its training state is damaged ({error})") from None
    if not isinstance(extra, dict):
        raise ModelFileError(f"{path}: its training state is not a record")
    return Checkpoint(with_prefix(data, "weights/"), with_prefix(data, "optimizer/"), extra)
