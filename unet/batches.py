"""Training batches read from disk: a generator that reshuffles every epoch and can resume exactly."""
from __future__ import annotations

import copy
import os

import numpy as np

from .data import NUM_CLASSES, load_image, load_mask, one_hot


class BatchLoader:
    """Batches ``(images, masks)`` read from disk: float32 NHWC images in [-1, 1] and float32
    one-hot masks (N, H, W, num_classes).

    Every epoch is one pass over ``ids`` in a fresh order (a permutation of a copy of the ids, drawn
    from the loader's own seeded ``numpy.random.Generator``); the last batch is smaller unless
    ``drop_last``. The post's generator instead streams across epoch boundaries, so with 100
    validation images and batch 16 its "epoch" saw a different 96 of them each time; aligning
    batches with epochs makes every epoch see every image once, and makes resuming exact.

    Resuming: ``epoch_batches()`` draws the epoch's order from the generator as soon as it is
    called. So ``get_state()`` taken between two epochs, saved (it is JSON-serialisable), and given
    to ``set_state()`` of a new loader makes that loader produce exactly the batches the old one
    would have produced from then on. A mid-epoch state is not supported.
    """

    def __init__(self, ids, images_dir, masks_dir, batch_size, num_classes=NUM_CLASSES,
                 shuffle=True, seed=0, image_size=None, drop_last=False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.ids = np.array(list(ids), dtype=np.int64)
        if len(self.ids) == 0 or (drop_last and len(self.ids) < batch_size):
            raise ValueError(f"{len(self.ids)} ids cannot make a batch of {batch_size}")
        self.images_dir = os.fspath(images_dir)
        self.masks_dir = os.fspath(masks_dir)
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.shuffle = shuffle
        self.image_size = image_size
        self.drop_last = drop_last
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        """Batches per epoch."""
        full, rest = divmod(len(self.ids), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def epoch_order(self):
        """The ids in this epoch's order; draws from the generator when shuffling."""
        return self.rng.permutation(self.ids) if self.shuffle else self.ids.copy()

    def epoch_batches(self):
        """An iterator over one epoch's batches. The order is drawn now, not at the first batch."""
        order = self.epoch_order()
        starts = range(0, len(self) * self.batch_size, self.batch_size)
        return (self.read_batch(order[start:start + self.batch_size]) for start in starts)

    def __iter__(self):
        """Epoch after epoch, for ever (the post's ``while 1`` generator)."""
        while True:
            yield from self.epoch_batches()

    def read_batch(self, batch_ids):
        """Read the given ids into ``(images, one-hot masks)``; a bad file raises DatasetError naming it."""
        images, labels = self.read_labels(batch_ids)
        return images, one_hot(labels, self.num_classes)

    def read_labels(self, batch_ids):
        """``(images, labels)``: labels as uint8 class indices (N, H, W), 1 byte a pixel to move to a GPU."""
        images, masks = [], []
        size = self.image_size
        for index in batch_ids:
            image = load_image(os.path.join(self.images_dir, f"{index}.jpg"), size)
            size = image.shape[:2]  # with no image_size given, the first image sets it for the batch
            images.append(image)
            masks.append(load_mask(os.path.join(self.masks_dir, f"{index}.png"), self.num_classes, size))
        return np.stack(images), np.stack(masks)

    def get_state(self):
        """The shuffling generator's state, a JSON-serialisable dict."""
        return {"rng": copy.deepcopy(self.rng.bit_generator.state)}

    def set_state(self, state):
        self.rng.bit_generator.state = copy.deepcopy(state["rng"])


def batch_generator(ids, images_dir, masks_dir, batch_size, num_classes=NUM_CLASSES,
                    shuffle=True, seed=0, loop=True, image_size=None):
    """The post's ``generate_arrays_from_file`` as a generator of ``(images, masks)`` batches:
    for ever with ``loop`` (reshuffling each epoch), else one epoch. See BatchLoader, whose
    ``get_state``/``set_state`` are the way to resume; this function is the short form."""
    loader = BatchLoader(ids, images_dir, masks_dir, batch_size, num_classes, shuffle, seed, image_size)
    if loop:
        yield from loader
    else:
        yield from loader.epoch_batches()
