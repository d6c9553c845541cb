"""The two benchmark workloads: one training step of each of the seed's U-Nets.

A step is forward + loss + backward + Adam update, in float32, on a batch already on the device:

* ``small``:    small_unet, 128x128x3 images, 4 classes, batch 16 (the seed's Shape training run);
* ``small-b4``: the same at batch 4, the README's best recipe, where the small convolutions fall below
  the Winograd threshold and each call's fixed costs show;
* ``original``: unet (Ronneberger et al.), 572x572x3 images, 21 classes, batch 1 -> 388x388 output.

The loss is the seed's ``BinaryCrossentropy()`` on the softmax output, in the form Keras 3 actually
computes it: sigmoid binary cross-entropy of the pre-softmax logits, averaged over channels and
pixels (minitensor: ``BinaryCrossentropy(from_logits=True)``; PyTorch:
``F.binary_cross_entropy_with_logits(logits, y)``, whose mean over N*C*H*W is the same number).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    name: str
    model: str                 # "small_unet" or "unet"
    input_shape: tuple         # (H, W, C)
    num_classes: int
    batch: int
    output_size: int           # H = W of the output

    @property
    def description(self):
        h, w, c = self.input_shape
        return f"{self.model} {h}x{w}x{c} -> {self.output_size}x{self.output_size}x{self.num_classes}, batch {self.batch}"


WORKLOADS = {
    "small": Workload("small", "small_unet", (128, 128, 3), 4, 16, 128),
    "small-b4": Workload("small-b4", "small_unet", (128, 128, 3), 4, 4, 128),
    "original": Workload("original", "unet", (572, 572, 3), 21, 1, 388),
}


def make_batch(workload: Workload, seed: int = 0):
    """x uniform in [-1, 1] (the seed's img / 127.5 - 1) and one-hot y, both float32 NHWC."""
    import numpy as np   # here, not at the top: the minitensor worker imports minitensor before NumPy

    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, (workload.batch, *workload.input_shape)).astype(np.float32)
    labels = rng.integers(0, workload.num_classes, (workload.batch, workload.output_size, workload.output_size))
    y = np.eye(workload.num_classes, dtype=np.float32)[labels]
    return x, y
