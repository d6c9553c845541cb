"""Prepare the next training batch in a background thread while the model trains on this one.

Reading a batch (JPEG/PNG decoding, the border-weight maps, the augmenter's deformations) is host
work that does not depend on the model, so it can overlap the step: on a GPU a step takes
milliseconds and would otherwise wait for the disk and OpenCV every time; on the CPU the decoding
runs while BLAS and OpenCV release the GIL.

One worker thread, one batch ahead, in order: the batches come out exactly as a plain loop would
make them, and the worker is the only user of the augmenter while the epoch runs, so its random
draws happen in the same order. The augmenter's state after each batch travels with that batch,
which is what a checkpoint after it must save (the live generator may already be one batch on).
"""
from __future__ import annotations

import concurrent.futures


class Prefetcher:
    """``for item in Prefetcher(prepare, keys): ...`` yields ``prepare(key)`` for each key, in order,
    with the next one prepared in a background thread while the loop body runs.

    An exception in ``prepare`` is raised in the loop, at the item it belongs to. Leaving the loop
    early (a stop, an error) waits for the batch in preparation, then drops it.
    ``enabled=False`` prepares each item in the loop's own thread (the plain twin, for tests).
    """

    def __init__(self, prepare, keys, enabled=True):
        self.prepare, self.keys, self.enabled = prepare, list(keys), enabled
        self._pool = None

    def __enter__(self):
        if self.enabled:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        return self

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        return False

    def __iter__(self):
        if not self.enabled:
            for key in self.keys:
                yield self.prepare(key)
            return
        if self._pool is None:
            raise RuntimeError("use the Prefetcher in a with statement, so its thread is always stopped")
        ahead = self._pool.submit(self.prepare, self.keys[0]) if self.keys else None
        for index in range(len(self.keys)):
            current = ahead
            ahead = self._pool.submit(self.prepare, self.keys[index + 1]) if index + 1 < len(self.keys) else None
            yield current.result()
