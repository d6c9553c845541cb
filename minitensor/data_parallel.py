"""One data-parallel training step: each rank's share of the gradient, summed by one Allreduce.

Why the sum of the ranks' gradients is the big batch's gradient. The losses reduce as Keras's
"sum_over_batch_size" does (minitensor/losses.py): over the P pixels of a batch,

    L = (1/P) sum_p w_p l_p.

Split the global batch of B images over N ranks, n_r images (P_r pixels) on rank r. Each rank's
model computes its own mean, L_r = (1/P_r) sum_{p in r} w_p l_p, so

    L = sum_r (P_r / P) L_r     and     dL/dtheta = sum_r (P_r / P) dL_r/dtheta,

because differentiation is linear. Every image of a U-Net batch has the same size, so the share is
s_r = P_r / P = n_r / B. Each rank scales its gradient by s_r, the Allreduce sums, and every rank
holds dL/dtheta of the whole batch: the gradient one process would compute, up to the order of
the float additions (about 1e-16 relative in float64, 1e-7 in float32). The same optimizer step
from the same weights then keeps every rank's weights identical, step after step;
``weights_checksum`` lets a run check that they are.

The buffer: all gradients side by side in one flat array of the parameters' dtype, and the
scaled loss s_r L_r as its last element, so one Allreduce also gives every rank the global loss
(the one a NaN check and the epoch's mean need). One call per step, not one per layer: a
collective's fixed cost (microseconds on one machine, tens over a network) is paid once.

This is the plain version, the one to read: the Allreduce starts after the whole backward pass.
Overlapping it with the backward pass of the layers still running (PyTorch DDP's buckets) hides
communication behind computation; docs/data_parallel.md has the measurements that say whether it
would pay here.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

from . import backend


class WeightsDifferError(RuntimeError):
    """The ranks' weights are no longer identical (a bug, or ranks that ran different code)."""


class DataParallel:
    """``model``'s training step across the ranks of ``world`` (minitensor/distributed.py).

    ``train_step(images, masks, sample_weight, share)``: ``images`` are this rank's part of the
    global batch (possibly none), ``share`` is its fraction n_r / B. Returns the global batch's
    loss as a 0-d array on the model's device, like Model.train_step; the update is applied on
    every rank, or, where the loss is NaN or infinite, on none.
    """

    def __init__(self, model, world):
        self.model, self.world = model, world
        self._buffer = None
        self._slices = None

    def _flat_buffer(self):
        """The step's buffer: every gradient, then the loss (kept between steps: no allocation per step)."""
        params = self.model.params
        if self._buffer is None or backend.device_of(self._buffer) != backend.device_of(params[0]):
            xp = backend.get_array_module(params[0])
            sizes = [p.size for p in params]
            ends = np.cumsum(sizes).tolist()
            self._slices = [(end - size, end, p.shape) for size, end, p in zip(sizes, ends, params)]
            self._buffer = xp.empty(ends[-1] + 1, dtype=params[0].dtype)
        return self._buffer

    def train_step(self, images, masks, sample_weight=None, share=1.0):
        model = self.model
        if model.optimizer is None:
            raise RuntimeError("call model.compile(optimizer, loss) before training")
        buffer = self._flat_buffer()
        if len(images):
            loss = model.compute_gradients(images, masks, sample_weight)
            scale = buffer.dtype.type(share)
            for (start, end, _), grad in zip(self._slices, model.grads):
                buffer[start:end] = grad.reshape(-1)
            buffer[:-1] *= scale
            buffer[-1] = loss * scale
        else:                     # a last global batch smaller than the ranks: this one adds nothing
            buffer[:] = 0
        self.world.allreduce_sum(buffer)
        loss = buffer[-1].copy()  # its own array: the buffer is the next step's
        grads = [buffer[start:end].reshape(shape) for start, end, shape in self._slices]
        on_host = backend.device_of(buffer) == backend.CPU
        if on_host and not math.isfinite(float(loss)):
            return loss           # the same value on every rank: every rank skips the update
        model.optimizer.step(model.params, grads, guard=None if on_host else loss)
        return loss

    def check_weights_agree(self, where):
        """Raise WeightsDifferError unless every rank's weights are the same bits (a hash of each rank's)."""
        digests = self.world.allgather(weights_checksum(self.model))
        if len(set(digests)) > 1:
            ranks = ", ".join(f"rank {rank} {digest[:12]}" for rank, digest in enumerate(digests))
            raise WeightsDifferError(f"{where}: the ranks' weights differ ({ranks}); they must stay identical "
                                     f"(the same summed gradient and the same update on every rank). Stopped "
                                     f"before saving; the last checkpoint is intact")


def weights_checksum(model) -> str:
    """A BLAKE2 hash of every weight's bytes, in layer order (one read of the weights from the device)."""
    digest = hashlib.blake2b(digest_size=16)
    for param in model.params:
        digest.update(np.ascontiguousarray(backend.to_numpy(param)).tobytes())
    return digest.hexdigest()
