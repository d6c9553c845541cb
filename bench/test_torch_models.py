"""The benchmark's PyTorch models are the seed's networks, the same as minitensor's.

Run with the bench extra installed: ``python -m pytest bench``. (Not in the main test suite:
PyTorch is a multi-gigabyte install that the engine itself never needs.) Parameter counts at
full size (the PyTorch unet is built on the "meta" device, which allocates nothing), and the same
output and training loss as minitensor given the same weights, on a narrow copy at a small input.
"""
import numpy as np
import pytest

from unet import small_unet, unet

torch = pytest.importorskip("torch")

FULL_PARAMS = {"small": 1_993_188, "original": 31_380_245}
SMALL = dict(input_shape=(32, 32, 3), num_classes=4, base_filters=4)
ORIGINAL = dict(input_shape=(188, 188, 3), num_classes=3, base_filters=2)   # 188: the smallest valid size
CONFIGS = {"small": (small_unet, SMALL), "original": (unet, ORIGINAL)}
EXPECTED_OUTPUT = {"small": (32, 32, 4), "original": (4, 4, 3)}


def rel_error(actual, expected):
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def test_torch_full_size_param_counts():
    from bench.torch_seed import count_params, torch_small_unet, torch_unet

    with torch.device("meta"):
        assert count_params(torch_small_unet()) == FULL_PARAMS["small"]
        assert count_params(torch_unet()) == FULL_PARAMS["original"]


@pytest.mark.parametrize("kind", ["small", "original"])
def test_torch_matches_minitensor_with_the_same_weights(kind):
    from bench.torch_seed import set_keras_weights, torch_small_unet, torch_unet

    builder, config = CONFIGS[kind]
    ours = builder(**config)
    rng = np.random.default_rng(5)
    # Non-zero biases, so a misplaced bias cannot hide.
    ours.set_weights([w + (0.05 * rng.standard_normal(w.shape).astype(w.dtype) if w.ndim == 1 else 0)
                      for w in ours.get_weights()])
    torch_builder = torch_small_unet if kind == "small" else torch_unet
    theirs = set_keras_weights(torch_builder(config["num_classes"], config["base_filters"]), ours.get_weights())
    theirs = theirs.to(memory_format=torch.channels_last)
    assert sum(p.numel() for p in theirs.parameters()) == ours.count_params()

    x = rng.uniform(-1, 1, (2, *config["input_shape"])).astype(np.float32)
    expected = ours.predict(x)
    with torch.no_grad():
        nchw = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        got = theirs.probabilities(nchw).permute(0, 2, 3, 1).numpy()
    assert expected.shape == got.shape == (2, *EXPECTED_OUTPUT[kind])
    assert rel_error(got, expected) < 1e-5

    # The benchmark's losses agree: PyTorch's BCE with logits = minitensor's BinaryCrossentropy(from_logits=True).
    from minitensor.losses import BinaryCrossentropy
    from minitensor.optimizers import Adam

    y = np.eye(config["num_classes"], dtype=np.float32)[rng.integers(0, config["num_classes"], expected.shape[:3])]
    ours.compile(Adam(1e-3), BinaryCrossentropy(from_logits=True))
    with torch.no_grad():
        theirs_loss = torch.nn.functional.binary_cross_entropy_with_logits(
            theirs(nchw), torch.from_numpy(y).permute(0, 3, 1, 2)).item()
    assert abs(theirs_loss - ours.test_on_batch(x, y)) < 1e-6 * max(1.0, abs(theirs_loss))


