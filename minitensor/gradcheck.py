"""Check a hand-written backward pass against central differences, in float64.

For a layer y = f(x, W) and an upstream gradient dout (random, so that every output entry
matters), the quantity backward computes is dL/dx for L = sum(f(x) * dout). Each entry of it
can be estimated without any calculus:

    dL/dx[i] ~= (sum(f(x + h e_i) * dout) - sum(f(x - h e_i) * dout)) / (2h)

The estimate has two errors. Truncation: the Taylor terms the difference leaves out, O(h^2)
(the h^1 terms cancel in a central difference), and none at all where the layer is linear in
the perturbed entry (a convolution in x or in W). Rounding: each sum is computed to about 1e-16
relative and then divided by 2h, so O(1e-16 / h). At the default h = 1e-6 rounding dominates:
a correct backward agrees to about 1e-9 (worse for a larger h on a curved layer, and for a
smaller h on any layer), and a wrong one is off by O(1). docs/your_first_layer.md ('Choosing h')
measures both errors on conv2d and softmax at h = 1e-3, 1e-6 and 1e-8, in code the test suite
runs. We report, per input and per parameter,

    relative error = max_i |analytic_i - numeric_i| / max(max_i |analytic_i|, max_i |numeric_i|)

(normalised by the largest entry, so entries that are legitimately zero, e.g. behind a ReLU,
do not divide by zero), and print the worst entries when a check fails.

From the command line, on any layer or loss::

    python -m minitensor.gradcheck conv2d
    python -m minitensor.gradcheck skip_model    # a whole model: a gradient summed over two paths
    python -m minitensor.gradcheck --all
    python -m minitensor.gradcheck --list
    python -m minitensor.gradcheck my_layer.py:MyLayer --shape 6,6,3   # your own layer (docs/your_first_layer.md)
"""
from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from . import layers, losses
from .layers import Concatenate, Conv2D, Cropping2D, Input, MaxPool2D, UpSampling2D, set_seed
from .model import Model

DEFAULT_EPS = 1e-6
DEFAULT_TOLERANCE = 1e-6


def numerical_gradient(forward, array, dout, eps=DEFAULT_EPS):
    """Central-difference estimate of d sum(forward() * dout) / d array.

    ``forward`` is a zero-argument function that reads ``array``; we perturb ``array`` in place
    one entry at a time and restore it afterwards.
    """
    grad = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        original = array[index]
        array[index] = original + eps
        plus = np.sum(forward() * dout)
        array[index] = original - eps
        minus = np.sum(forward() * dout)
        array[index] = original
        grad[index] = (plus - minus) / (2 * eps)
    return grad


def relative_error(analytic, numeric):
    scale = max(np.max(np.abs(analytic), initial=0.0), np.max(np.abs(numeric), initial=0.0))
    if scale == 0.0:
        return 0.0
    return float(np.max(np.abs(analytic - numeric)) / scale)


@dataclass
class GradcheckResult:
    """Per-name relative errors, plus what is needed to show the worst entries."""

    tolerance: float
    errors: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)   # name -> (analytic, numeric)

    @property
    def passed(self) -> bool:
        return all(err < self.tolerance for err in self.errors.values())

    def report(self, worst=5) -> str:
        lines = []
        width = max(map(len, self.errors), default=0)    # one column, however long a layer's name
        for name, err in self.errors.items():
            status = "ok" if err < self.tolerance else "FAIL"
            lines.append(f"  {name:<{width}}  max relative error {err:.3e}  {status}")
            if err >= self.tolerance:
                analytic, numeric = self.details[name]
                diff = np.abs(analytic - numeric)
                for flat in np.argsort(diff, axis=None)[::-1][:worst]:
                    index = tuple(int(i) for i in np.unravel_index(flat, diff.shape))   # (0, 1), not np.int64(1)
                    lines.append(f"      at {index}: backward {analytic[index]: .9e}  numeric {numeric[index]: .9e}")
        return "\n".join(lines)


def check_gradients(forward, backward, arrays, names, dout, eps=DEFAULT_EPS, tolerance=DEFAULT_TOLERANCE):
    """Compare backward(dout) (a list of gradients, one per array) with central differences.

    ``forward()`` must read the arrays in ``arrays`` (which are perturbed in place).
    """
    forward()
    analytic = [np.asarray(g, dtype=np.float64) for g in backward(dout)]
    result = GradcheckResult(tolerance)
    for name, array, grad in zip(names, arrays, analytic):
        numeric = numerical_gradient(forward, array, dout, eps)
        result.errors[name] = relative_error(grad, numeric)
        result.details[name] = (grad, numeric)
    return result


def check_layer(layer, inputs, dout=None, seed=0, eps=DEFAULT_EPS, tolerance=DEFAULT_TOLERANCE):
    """Gradient-check a float64 layer on ``inputs`` (an array, or a list for Concatenate).

    Checks dL/d(input) for every input and dL/d(weight) for every parameter, with a random
    upstream gradient ``dout`` unless one is given.
    """
    if layer.dtype != np.float64:
        raise TypeError(f"gradient checks need a float64 layer (dtype='float64'), {layer.name!r} is {layer.dtype}")
    is_list = isinstance(inputs, (list, tuple))
    input_list = [np.array(x, dtype=np.float64) for x in (inputs if is_list else [inputs])]
    call_inputs = input_list if is_list else input_list[0]
    y = layer.forward(call_inputs)
    if dout is None:
        dout = np.random.default_rng(seed).standard_normal(y.shape)

    def forward():
        return layer.forward(call_inputs)

    def backward(upstream):
        dx = layer.backward(upstream)
        return list(dx if is_list else [dx]) + [g.copy() for g in layer.grads]

    names = [f"x{i}" if is_list else "x" for i in range(len(input_list))] + list(layer.weight_names[:len(layer.params)])
    return check_gradients(forward, backward, input_list + layer.params, names, dout, eps, tolerance)


def check_model(model, x, dout=None, seed=0, eps=DEFAULT_EPS, tolerance=DEFAULT_TOLERANCE):
    """Gradient-check a whole float64 model: dL/d(input) and every weight, through Model.backward."""
    x = np.array(x, dtype=np.float64)
    if dout is None:
        dout = np.random.default_rng(seed).standard_normal(model.forward(x).shape)

    def backward(upstream):
        return [model.backward(upstream)] + [g.copy() for g in model.grads]

    names = ["x"] + [f"{layer.name}/{w}" for layer in model.layers for w in layer.weight_names[:len(layer.params)]]
    return check_gradients(lambda: model.forward(x), backward, [x] + model.params, names, dout, eps, tolerance)


def skip_model(dtype="float64", seed=0):
    """A miniature U-Net: the tensor x1 feeds both the encoder (a max-pool) and a cropped skip
    connection, so its gradient is the sum of two paths; check_model checks that sum.

    The crop takes one pixel off every side, as the original U-Net's crops do, so x1's border
    gets a zero gradient from the skip and only the pooled one: that is checked too."""
    set_seed(seed)
    inputs = Input((10, 10, 2), name="input", dtype=dtype)
    x1 = Conv2D(3, 3, padding="same", activation="relu", name="enc1", dtype=dtype)(inputs)   # 10x10
    x2 = MaxPool2D(2, name="pool", dtype=dtype)(x1)                                           # 5x5
    x2 = Conv2D(4, 2, activation="relu", name="enc2", dtype=dtype)(x2)                        # 4x4
    up = UpSampling2D(2, name="up", dtype=dtype)(x2)                                         # 8x8
    crop = Cropping2D(1, name="crop", dtype=dtype)(x1)                                       # 8x8
    merged = Concatenate(name="concat", dtype=dtype)([crop, up])
    out = Conv2D(3, 1, activation="softmax", name="out", dtype=dtype)(merged)
    return Model(inputs, out, name="skip")


def check_loss(loss, y_pred, y_true, sample_weight=None, eps=DEFAULT_EPS, tolerance=DEFAULT_TOLERANCE):
    """Gradient-check a loss: the analytic dL/dy_pred against central differences of L."""
    y_pred = np.array(y_pred, dtype=np.float64)

    def forward():
        return np.float64(loss.forward(y_pred, y_true, sample_weight))

    return check_gradients(forward, lambda dout: [loss.backward() * dout], [y_pred], ["y_pred"], np.float64(1.0),
                           eps, tolerance)


# ----- the command line: a few named examples for each layer and loss ------------------------

def _random(rng, *shape):
    return rng.standard_normal(shape)


def _probabilities(rng, shape):
    logits = rng.standard_normal(shape)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _one_hot(rng, shape):
    labels = rng.integers(0, shape[-1], size=shape[:-1])
    return np.eye(shape[-1])[labels]


def _layer_example(make_layer, input_shapes):
    def run(rng, batch):
        shapes = [(batch, *s) for s in input_shapes]
        inputs = [_random(rng, *s) for s in shapes]
        return check_layer(make_layer(), inputs if len(inputs) > 1 else inputs[0], seed=int(rng.integers(1 << 30)))
    return run


def _loss_example(make_loss, targets_from, predictions_from):
    def run(rng, batch):
        shape = (batch, 5, 4, 3)
        return check_loss(make_loss(), predictions_from(rng, shape), targets_from(rng, shape),
                          sample_weight=rng.uniform(0.5, 2.0, size=shape[:-1]))
    return run


F64 = "float64"


def declared_layer_examples(layer_classes):
    """The examples the layer classes declare (``Layer.gradcheck_examples``: name -> (constructor
    arguments, input shapes)), each building its layer in float64. One name, one example."""
    found = {}
    for cls in layer_classes:
        for name, (arguments, input_shapes) in cls.gradcheck_examples.items():
            if name in found:
                raise ValueError(f"two layers declare the gradient-check example {name!r}")
            found[name] = _layer_example(functools.partial(cls, dtype=F64, **arguments), input_shapes)
    return found


# minitensor's own layers declare theirs (a new layer adds its example in its own file), then the losses
# and a whole model.
_OWN_LAYERS = [cls for cls in layers.LAYER_CLASSES.values() if cls.__module__.startswith("minitensor.")]
EXAMPLES = {
    **declared_layer_examples(_OWN_LAYERS),
    "binary_crossentropy": _loss_example(lambda: losses.BinaryCrossentropy(), _one_hot, _probabilities),
    "binary_crossentropy_logits": _loss_example(lambda: losses.BinaryCrossentropy(from_logits=True), _one_hot,
                                                lambda rng, shape: _random(rng, *shape)),
    "categorical_crossentropy": _loss_example(lambda: losses.CategoricalCrossentropy(), _one_hot, _probabilities),
    "softmax_cross_entropy": _loss_example(lambda: losses.SoftmaxCrossEntropy(), _one_hot,
                                           lambda rng, shape: _random(rng, *shape)),
    "skip_model": lambda rng, batch: check_model(skip_model(), _random(rng, batch, 10, 10, 2),
                                                 seed=int(rng.integers(1 << 30))),
}


def user_layer_example(spec, input_shape):
    """``'my_layer.py:MyLayer'`` or ``'package.module:MyLayer'`` -> an example that checks
    ``MyLayer(dtype='float64')`` on random inputs of ``input_shape`` (without the batch axis)."""
    source, _, class_name = spec.rpartition(":")
    if not source or not class_name:
        raise ValueError(f"{spec!r}: name your layer as FILE.py:CLASS or MODULE:CLASS")
    if source.endswith(".py"):
        if not os.path.isfile(source):
            raise ValueError(f"{spec!r}: there is no file {source!r}")
        module_spec = importlib.util.spec_from_file_location(os.path.basename(source)[:-3], source)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(source)
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, layers.Layer)):
        raise ValueError(f"{spec!r}: {source} has no Layer subclass named {class_name!r}")
    try:
        cls(dtype=F64)
    except TypeError as exc:
        raise ValueError(f"{spec!r}: the command line builds {class_name}(dtype='float64'), which fails ({exc}); "
                         f"give its other arguments defaults, or call check_layer from Python") from exc
    return _layer_example(lambda: cls(dtype=F64), [tuple(input_shape)])


def _shape(text):
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"expected HEIGHT,WIDTH,CHANNELS such as 6,6,3, got {text!r}")
    return shape


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minitensor.gradcheck",
                                     description="Check a layer's, loss's or model's backward pass against central "
                                                 "differences in float64.")
    parser.add_argument("names", nargs="*", help="layers, losses or skip_model (a miniature U-Net) to check "
                                                 "(see --list), or your own layer as FILE.py:CLASS or MODULE:CLASS")
    parser.add_argument("--all", action="store_true", help="check every example")
    parser.add_argument("--list", action="store_true", help="list the examples and exit")
    parser.add_argument("--batch", type=int, default=2, help="batch size of the random inputs (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--shape", type=_shape, default=(6, 6, 3),
                        help="HEIGHT,WIDTH,CHANNELS of the random input to your own layer (default 6,6,3)")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(EXAMPLES))
        return 0
    names = list(EXAMPLES) if args.all else args.names
    if not names:
        parser.error("name a layer or loss (see --list), or pass --all")
    examples = {name: EXAMPLES[name] for name in names if name in EXAMPLES}
    for name in names:
        if name not in EXAMPLES and ":" in name:
            try:
                examples[name] = user_layer_example(name, args.shape)
            except (ValueError, ImportError) as exc:
                parser.error(str(exc))
    unknown = [n for n in names if n not in examples]
    if unknown:
        parser.error(f"unknown example(s) {', '.join(unknown)}; choose from: {', '.join(EXAMPLES)}, "
                     f"or name your own layer as FILE.py:CLASS")
    rng = np.random.default_rng(args.seed)
    failed = 0
    for name in names:
        result = examples[name](rng, args.batch)
        print(f"{name}: {'passed' if result.passed else 'FAILED'} (tolerance {result.tolerance:g})")
        print(result.report())
        failed += not result.passed
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
