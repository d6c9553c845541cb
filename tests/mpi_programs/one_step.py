"""Run under ``mpiexec -n N`` by tests/test_data_parallel.py: one data-parallel step of small_unet per case.

    mpiexec -n 2 python tests/mpi_programs/one_step.py OUT_DIR

For each case (dtype, global batch size) every rank builds the same model, takes its slice of the
same global batch and makes one DataParallel step; rank 0 writes OUT_DIR/<dtype>-<batch>.npz with
the summed gradients, the global loss and the weights after the step, for the test to compare with
one process on the whole batch.
"""
import os
import sys

import minitensor  # noqa: F401  (before NumPy)
import numpy as np
from minitensor import losses, set_seed
from minitensor.data_parallel import DataParallel
from minitensor.distributed import MPIWorld
from minitensor.optimizers import Adam
from unet import small_unet
from unet.trainer import rank_slice

CASES = [("float64", 5), ("float32", 5), ("float64", 1)]


def case_batch(dtype, batch):
    """The global batch of a case: images, class-index masks and per-pixel weights, the same on every rank."""
    rng = np.random.default_rng(7)
    images = rng.uniform(-1, 1, size=(batch, 16, 16, 3)).astype(dtype)
    masks = rng.integers(0, 4, size=(batch, 16, 16)).astype(np.uint8)
    weights = rng.uniform(0.5, 2.0, size=(batch, 16, 16)).astype(dtype)
    return images, masks, weights


def build(dtype):
    set_seed(3)
    model = small_unet((16, 16, 3), num_classes=4, base_filters=4, dtype=dtype)
    model.compile(Adam(learning_rate=1e-3), losses.SoftmaxCrossEntropy())
    return model


def main(out_dir):
    world = MPIWorld()
    for dtype, batch in CASES:
        model = build(dtype)
        images, masks, weights = case_batch(dtype, batch)
        mine = rank_slice(np.arange(batch), world.rank, world.size)
        step = DataParallel(model, world)
        loss = step.train_step(images[mine], masks[mine], weights[mine], share=len(mine) / batch)
        grads = [step._buffer[start:end].reshape(shape) for start, end, shape in step._slices]
        step.check_weights_agree("after the step")
        if world.is_writer:
            np.savez(os.path.join(out_dir, f"{dtype}-{batch}.npz"), loss=np.asarray(loss),
                     **{f"grad{i}": g for i, g in enumerate(grads)},
                     **{f"weight{i}": np.asarray(w) for i, w in enumerate(model.params)})


if __name__ == "__main__":
    main(sys.argv[1])
