"""The user-facing gradient checker: its command line, and that it can fail."""
import subprocess
import sys

import numpy as np
import pytest

from minitensor import gradcheck, layers


def test_every_named_example_passes(capsys):
    assert gradcheck.main(["--all"]) == 0
    out = capsys.readouterr().out
    for name in gradcheck.EXAMPLES:
        assert f"{name}: passed" in out
    assert "max relative error" in out


def test_list_and_unknown_names(capsys):
    assert gradcheck.main(["--list"]) == 0
    assert "conv2d" in capsys.readouterr().out.split()
    with pytest.raises(SystemExit):
        gradcheck.main(["no_such_layer"])


class Scale(layers.Layer):
    """A user's layer, y = factor * x (not registered: this module is not minitensor's)."""

    def __init__(self, factor=2.0, wrong_by=1.0, name=None, dtype="float32"):
        super().__init__(name=name, dtype=dtype)
        self.factor, self.wrong_by = factor, wrong_by

    def forward(self, x):
        return self.factor * x

    def backward(self, dy):
        return self.factor * self.wrong_by * dy


def test_a_layer_declares_its_own_examples():
    """A layer's gradcheck_examples become examples, built in float64, and a wrong backward fails in them."""
    class Declared(Scale):
        gradcheck_examples = {"scale": ({"factor": 3.0}, [(3, 2, 2)]),
                              "scale_wrong": ({"factor": 3.0, "wrong_by": 1.01}, [(3, 2, 2)])}

    examples = gradcheck.declared_layer_examples([Declared])
    assert list(examples) == ["scale", "scale_wrong"]
    assert examples["scale"](np.random.default_rng(0), 2).passed
    assert not examples["scale_wrong"](np.random.default_rng(0), 2).passed
    with pytest.raises(ValueError, match="two layers declare the gradient-check example 'scale'"):
        gradcheck.declared_layer_examples([Declared, Declared])
    assert set(gradcheck.EXAMPLES) >= {name for cls in (layers.Conv2D, layers.MaxPool2D, layers.Softmax)
                                       for name in cls.gradcheck_examples}


def test_a_wrong_gradient_fails_and_shows_the_worst_entries():
    layer = layers.Conv2D(2, 3, dtype="float64", seed=0)
    x = np.random.default_rng(0).standard_normal((1, 5, 5, 1))
    original = layer.backward

    def off_by_a_bit(dy):
        dx = original(dy)
        layer.grads[1] = layer.grads[1] * 1.01        # a 1% error in the bias gradient
        return dx

    layer.backward = off_by_a_bit
    result = gradcheck.check_layer(layer, x)
    assert not result.passed and result.errors["bias"] > 1e-3 and result.errors["kernel"] < 1e-6
    assert "bias" in result.report() and "numeric" in result.report()


def test_float32_layers_are_refused():
    with pytest.raises(TypeError, match="float64"):
        gradcheck.check_layer(layers.ReLU(), np.zeros((1, 2, 2, 1), np.float32))


def test_runs_as_a_module_from_the_command_line():
    done = subprocess.run([sys.executable, "-m", "minitensor.gradcheck", "conv2d"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "conv2d: passed" in done.stdout and "kernel" in done.stdout


def test_skip_model_crops_so_a_misplaced_crop_gradient_fails():
    """skip_model's crop takes at least one pixel off every side, so a crop backward that puts dy
    in the wrong place (here: at the top-left corner, as if nothing had been cropped there) fails."""
    model = gradcheck.skip_model()
    crop = model.get_layer("crop")
    assert min(c for pair in crop.cropping for c in pair) >= 1
    x = np.random.default_rng(0).standard_normal((1, 10, 10, 2))
    assert gradcheck.check_model(model, x).passed

    def misplaced(dy):
        x_shape = crop._pop_cache()
        dx = np.zeros(x_shape)
        dx[:, :dy.shape[1], :dy.shape[2], :] = dy
        return dx

    crop.backward = misplaced
    result = gradcheck.check_model(model, x)
    assert not result.passed and result.errors["x"] > 1e-2


def test_the_failure_report_prints_plain_indices_and_one_column():
    long_name = "decoder_conv1_2/kernel"
    result = gradcheck.GradcheckResult(1e-6)
    result.errors = {"x": 0.5, long_name: 1e-9}
    result.details = {"x": (np.array([[0.0, 1.0]]), np.array([[0.0, 0.5]])), long_name: (np.zeros(1), np.zeros(1))}
    lines = result.report().split("\n")
    assert "at (0, 1): backward" in result.report() and "np.int64" not in result.report()
    rows = [line for line in lines if "max relative error" in line]
    assert len({row.index("max relative error") for row in rows}) == 1    # the errors line up in one column


def test_a_users_layer_from_the_command_line(tmp_path):
    """python -m minitensor.gradcheck FILE.py:CLASS checks a layer of your own; a wrong name is a message, exit 2."""
    (tmp_path / "halving.py").write_text(
        "from minitensor.layers import Layer\n\n"
        "class Halving(Layer):\n"
        "    def forward(self, x):\n        return x / 2\n\n"
        "    def backward(self, dy):\n        return dy / 3    # wrong on purpose\n")

    def check(*args):
        return subprocess.run([sys.executable, "-m", "minitensor.gradcheck", *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)

    wrong = check("halving.py:Halving", "--shape", "3,3,2")
    assert wrong.returncode == 1 and "halving.py:Halving: FAILED" in wrong.stdout
    for args, message in [(["nothere.py:Halving"], "there is no file 'nothere.py'"),
                          (["halving.py:Nope"], "no Layer subclass named 'Nope'"),
                          (["halving.py:Halving", "--shape", "3,3"], "HEIGHT,WIDTH,CHANNELS")]:
        done = check(*args)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
