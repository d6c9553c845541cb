"""unet/prefetch.py: the next batch prepared in a background thread, in order, and training unchanged by it."""
import contextlib
import threading

import numpy as np
import pytest

import train
from unet.prefetch import Prefetcher


def test_items_come_in_order_with_the_next_one_prepared_during_the_loop_body():
    started = {key: threading.Event() for key in range(4)}

    def prepare(key):
        started[key].set()
        return key * 10

    seen = []
    with Prefetcher(prepare, range(4)) as ahead:
        for item in ahead:
            key = item // 10
            if key + 1 < 4:                            # the worker starts on the next key meanwhile
                assert started[key + 1].wait(timeout=10)
            seen.append(item)
    assert seen == [0, 10, 20, 30]


@pytest.mark.parametrize("enabled", [True, False])
def test_an_error_is_raised_at_its_own_item_and_leaving_early_stops_the_thread(enabled):
    def prepare(key):
        if key == 2:
            raise ValueError("bad file for key 2")
        return key

    seen = []
    with pytest.raises(ValueError, match="key 2"):
        with Prefetcher(prepare, range(5), enabled=enabled) as ahead:
            for item in ahead:
                seen.append(item)
    assert seen == [0, 1]
    assert not [t for t in threading.enumerate() if t.name.startswith("prefetch")]


def test_training_with_and_without_prefetch_is_the_same(tmp_path):
    """Elastic augmentation and border weights, prepared in the background or in line: the same run."""
    results = []
    for prefetch in (True, False):
        args = train.parse_args(["--num-images", "20", "--num-val", "4", "--num-test", "4", "--image-size", "32",
                                 "--batch-size", "4", "--epochs", "2", "--quiet", "--augment", "elastic",
                                 "--loss", "weighted", "--data", str(tmp_path / "shape"),
                                 "--weights-dir", str(tmp_path / f"w{prefetch}"),
                                 "--results-dir", str(tmp_path / f"r{prefetch}")])
        with contextlib.ExitStack() as folder_locks:
            trainer, _, _ = train.prepare(args, folder_locks, log=lambda message: None)
            trainer.prefetch = prefetch
            assert trainer.fit()
        results.append((trainer.model.get_weights(), [(row["loss"], row["val_loss"]) for row in trainer.state.history],
                        trainer.state.augmenter))
    (weights_a, history_a, augmenter_a), (weights_b, history_b, augmenter_b) = results
    assert history_a == history_b and augmenter_a == augmenter_b
    for a, b in zip(weights_a, weights_b):
        np.testing.assert_array_equal(a, b)
