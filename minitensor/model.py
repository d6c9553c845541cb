"""Model: a graph of layers built in Keras's functional style, that runs its own backward pass.

Building (exactly as the post's Keras code)::

    inputs = Input((128, 128, 3), name="input")
    x1 = Conv2D(32, 3, padding="same", activation="relu", name="conv1")(inputs)
    x2 = MaxPool2D(2)(x1)
    ...
    y = Concatenate()([x1, UpSampling2D(2)(x2)])
    model = Model(inputs, outputs, name="UNet")

Each layer call records a node: (layer, its input tensors, its output tensor). The model keeps
the nodes in the order the layers were called, which is always a valid order to run them in.

Forward runs the nodes in that order. Backward runs them in reverse: each node takes the
gradient of its output, calls its layer's hand-written ``backward``, and hands the result to
the tensors it read. A tensor read by two layers (an encoder map that feeds both the next
encoder block and a skip connection) receives two gradients, and they **add**, because
L depends on x through both paths: dL/dx = dL/dx|path 1 + dL/dx|path 2. That one addition
(``kernels.add``, a + b, in ``Model.backward``, which says why not ``+=``) is all a skip connection
asks of backprop.
"""
from __future__ import annotations

import collections
import json
import math
import os

import numpy as np

from . import backend, kernels, keras_io, losses as loss_module, optimizers as optimizer_module
from .files import ModelFileError, atomic_savez, read_npz, with_prefix
from .layers.base import InputLayer, SymbolicTensor
from .summary import summary_text

FORMAT_VERSION = 1


class _Node:
    """One layer call in the graph: ``output = layer(inputs)``."""

    __slots__ = ("layer", "inputs", "output")

    def __init__(self, layer, inputs, output):
        self.layer, self.inputs, self.output = layer, inputs, output


def _collect_nodes(output):
    """Every node the output depends on, in the order the layers were called (a topological order)."""
    seen, tensors = set(), []

    def visit(tensor):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors.append(tensor)
            for parent in tensor.inputs:
                visit(parent)

    visit(output)
    tensors.sort(key=lambda t: t.call_index)
    return [_Node(t.producer, t.inputs, t) for t in tensors]


def _optimizer(optimizer):
    """``compile``'s optimizer: an object with a ``step`` method, or the name "adam"."""
    if isinstance(optimizer, str):
        if optimizer.lower() != "adam":
            raise ValueError(f"unknown optimizer {optimizer!r}: minitensor has Adam only; pass \"adam\" or "
                             f"minitensor.optimizers.Adam(learning_rate=...)")
        return optimizer_module.Adam()
    if not callable(getattr(optimizer, "step", None)):
        raise TypeError(f"optimizer must be \"adam\" or an optimizer object such as minitensor.optimizers.Adam(), "
                        f"got {optimizer!r}")
    return optimizer


class Model:
    """A functional model: ``Model(inputs, outputs, name)`` with Keras's method names."""

    def __init__(self, inputs, outputs, name="model"):
        if not isinstance(inputs, SymbolicTensor) or not isinstance(outputs, SymbolicTensor):
            raise TypeError("Model(inputs, outputs) takes the symbolic tensors returned by Input(...) and by "
                            "calling layers on them (one input and one output)")
        self.name = name
        self.input, self.output = inputs, outputs
        self.nodes = _collect_nodes(outputs)
        if self.nodes[0].output is not inputs or not isinstance(inputs.producer, InputLayer):
            raise ValueError("the model's output does not depend on its input")
        self.layers = [node.layer for node in self.nodes]
        if len(set(map(id, self.layers))) != len(self.layers):
            raise ValueError("a layer object is used twice; minitensor layers keep one forward cache each")
        names = [layer.name for layer in self.layers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"layer names must be unique in a model, repeated: {', '.join(duplicates)}")
        self.dtype = inputs.dtype
        self.device = backend.CPU
        self.optimizer = None
        self.loss = None
        self.stop_training = False

    # ----- shapes and parameters ---------------------------------------------------------
    @property
    def input_shape(self):
        return (None, *self.input.shape)

    @property
    def output_shape(self):
        return (None, *self.output.shape)

    @property
    def params(self):
        return [p for layer in self.layers for p in layer.params]

    @property
    def grads(self):
        return [g for layer in self.layers for g in layer.grads]

    def count_params(self) -> int:
        return sum(layer.count_params() for layer in self.layers)

    def get_layer(self, name):
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise ValueError(f"no layer named {name!r} in model {self.name!r}; layers: "
                         f"{', '.join(layer.name for layer in self.layers)}")

    def get_weights(self):
        return [w for layer in self.layers for w in layer.get_weights()]

    def set_weights(self, weights):
        weights = list(weights)
        expected = sum(len(layer.params) for layer in self.layers)
        if len(weights) != expected:
            raise ValueError(f"model {self.name!r} has {expected} weight arrays, got {len(weights)}")
        start = 0
        for layer in self.layers:
            count = len(layer.params)
            layer.set_weights(weights[start:start + count])
            start += count

    def to(self, device):
        """Move every parameter (and the optimizer's moments, at its next step) to "cpu" or "gpu"."""
        device = backend.check_device(device)
        if device == backend.GPU:
            backend.require_gpu()
        for layer in self.layers:
            layer.to(device)
        self.device = device   # the optimizer moves its moments to each parameter's device by itself
        return self

    # ----- the two passes ---------------------------------------------------------------
    def forward(self, x):
        """Run every layer in order; x (N, H, W, C) on the model's device -> output array."""
        self.nodes[0].layer.forward(x)       # checks shape, dtype and device of the input
        values = {id(self.input): x}
        readers_left = self._reader_counts()
        for node in self.nodes[1:]:
            args = [values[id(t)] for t in node.inputs]
            values[id(node.output)] = node.layer.forward(args if len(args) > 1 else args[0])
            for tensor in node.inputs:
                readers_left[id(tensor)] -= 1
                if readers_left[id(tensor)] == 0:
                    del values[id(tensor)]   # the layers keep what their backward needs
        return values[id(self.output)]

    def backward(self, dy, from_logits=False, input_grad=True):
        """Run the layers' backward passes in reverse order; returns dL/d(input).

        Why reverse creation order works: a node was created after every node that produced its
        inputs, so walking backwards, every reader of a tensor has run (and added its share of
        dL/dtensor) before the tensor's producer pops that gradient. A tensor read twice (an
        encoder map feeding the next block and a skip connection) gets its two shares added into a
        new array (``kernels.add``: a + b), never with ``+=``: a share may be a view into another
        array (Concatenate's backward returns slices of its dy), and adding in place would write into it.

        ``from_logits=True`` means dy is the gradient with respect to the output layer's logits
        (its pre-softmax values), so that layer skips its activation's backward.
        ``input_grad=False`` (training) lets the first layer skip dL/d(input); None is returned.
        """
        grads = {id(self.output): dy}
        for node in reversed(self.nodes[1:]):
            dout = grads.pop(id(node.output))
            options = {}
            if node.output is self.output and from_logits:
                options["from_logits"] = True
            if not input_grad and node.layer.can_skip_input_grad and node.inputs == [self.input]:
                options["input_grad"] = False
            dinputs = node.layer.backward(dout, **options)
            if dinputs is None:
                continue
            if len(node.inputs) == 1:
                dinputs = [dinputs]
            for tensor, grad in zip(node.inputs, dinputs):
                if id(tensor) in grads:
                    grads[id(tensor)] = kernels.add(grads[id(tensor)], grad)   # a tensor read twice: gradients add
                else:
                    grads[id(tensor)] = grad
        return grads.get(id(self.input))

    def _reader_counts(self):
        """How many layers read each tensor: the forward pass drops a value once its last reader ran."""
        return collections.Counter(id(tensor) for node in self.nodes for tensor in node.inputs)

    def clear_cache(self):
        """Drop what every layer and the loss kept from a forward pass for its backward."""
        for layer in self.layers:
            layer.clear_cache()
        if self.loss is not None:
            self.loss.clear_cache()

    # ----- Keras-style training API ------------------------------------------------------
    def compile(self, optimizer="adam", loss="binary_crossentropy"):
        """``optimizer``: an optimizer object, or a name Keras takes for one minitensor has ("adam", any
        case); ``loss``: a Loss or its name (``losses.get``)."""
        self.optimizer = _optimizer(optimizer)
        self.loss = loss_module.get(loss) if isinstance(loss, str) else loss
        return self

    def _to_model_array(self, x, what):
        """NumPy or CuPy input -> an array of the model's dtype on the model's device."""
        if not hasattr(x, "shape"):
            x = np.asarray(x)
        if x.dtype.kind not in "fiu":
            raise TypeError(f"{what} must be numeric, got dtype {x.dtype}")
        x = backend.to_device(x, self.device)
        xp = backend.get_array_module(x)
        return xp.ascontiguousarray(x, dtype=self.dtype)

    def _to_targets(self, y):
        """Targets on the model's device: one-hot like the output, or class indices (one axis fewer, an
        integer dtype), which travel as they are (1 byte a pixel for uint8 against 4 per class) and
        are expanded to one-hot on the device. Host indices are range-checked before they travel."""
        num_classes = self.output_shape[-1]
        if getattr(y, "ndim", None) != len(self.output_shape) - 1 or getattr(y, "dtype", None) is None \
                or y.dtype.kind not in "iu":
            return self._to_model_array(y, "y")
        if isinstance(y, np.ndarray) and y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"class indices must be in 0..{num_classes - 1} for a {num_classes}-class output, "
                             f"got {y.min()}..{y.max()}")
        labels = backend.to_device(y, self.device)
        return backend.get_array_module(labels).eye(num_classes, dtype=self.dtype)[labels]

    def _output_layer_uses_logits(self):
        layer = self.output.producer
        if not getattr(self.loss, "from_logits", False):
            return False
        if not hasattr(layer, "pre_activation"):
            raise ValueError(f"loss {type(self.loss).__name__}(from_logits=True) needs an output layer that keeps "
                             f"its logits (a Conv2D), got {type(layer).__name__}")
        return True

    def _loss_and_gradient(self, x, y, sample_weight):
        if self.loss is None:
            raise RuntimeError("call model.compile(optimizer, loss) before training or evaluating")
        x = self._to_model_array(x, "x")
        y = self._to_targets(y)
        if sample_weight is not None:
            sample_weight = self._to_model_array(sample_weight, "sample_weight")
        probabilities = self.forward(x)
        use_logits = self._output_layer_uses_logits()
        prediction = self.output.producer.pre_activation() if use_logits else probabilities
        value = self.loss.forward(prediction, y, sample_weight)
        return value, use_logits

    def train_step(self, x, y, sample_weight=None):
        """One step (forward, loss, backward, optimizer update) that does not wait for the device.

        Returns the loss before the update as a scalar on the model's device, for the loop to read
        when it needs it. ``y`` is one-hot like the output, or class indices (N, H, W), integers.
        A NaN or infinite loss (NaN targets or weights, divergence) changes no weight and no
        moment: on the CPU the update is skipped, on the GPU the fused Adam kernel checks the
        loss on the device and leaves everything as it was. Adam's step count still advances
        there, since the host never looked; ``train_on_batch`` puts it back.
        """
        if self.optimizer is None:
            raise RuntimeError("call model.compile(optimizer, loss) before training")
        value = self.compute_gradients(x, y, sample_weight, skip_if_not_finite=True)
        on_host = backend.device_of(value) == backend.CPU
        if not (on_host and not math.isfinite(float(value))):
            self.optimizer.step(self.params, self.grads, guard=None if on_host else value)
        return value

    def compute_gradients(self, x, y, sample_weight=None, skip_if_not_finite=False):
        """Forward, loss and backward, no update: the loss (a device scalar), dL/dparams left in ``grads``
        (data_parallel.py sums them across processes). ``skip_if_not_finite``: a NaN loss on the CPU skips backward."""
        value, use_logits = self._loss_and_gradient(x, y, sample_weight)
        if skip_if_not_finite and backend.device_of(value) == backend.CPU and not math.isfinite(float(value)):
            self.clear_cache()
        else:
            self.backward(self.loss.backward(), from_logits=use_logits, input_grad=False)
        return value

    def train_on_batch(self, x, y, sample_weight=None) -> float:
        """``train_step``, then the loss as a Python float: the step's one read from the device.

        A non-finite loss is returned with the weights, the moments and the step count of the
        last good step.
        """
        value = float(self.train_step(x, y, sample_weight))
        if not math.isfinite(value) and backend.device_of(self.params[0]) != backend.CPU:
            self.optimizer.iterations -= 1     # the device skipped the update (see train_step)
        return value

    def test_step(self, x, y, sample_weight=None):
        """The loss on a batch as a scalar on the model's device, without changing anything."""
        value, _ = self._loss_and_gradient(x, y, sample_weight)
        self.clear_cache()
        return value

    def test_on_batch(self, x, y, sample_weight=None) -> float:
        """The loss on a batch as a Python float, without changing anything."""
        return float(self.test_step(x, y, sample_weight))

    def predict(self, x, batch_size=32):
        """Output probabilities as a NumPy array, whatever the device; x is NumPy (N, H, W, C)."""
        x = x if hasattr(x, "shape") else np.asarray(x)    # a list, as Keras takes it
        if getattr(x, "ndim", None) == 3:
            raise ValueError(f"predict expects a batch (N, H, W, C), got shape {tuple(x.shape)}; use x[None]")
        if len(x) == 0:
            raise ValueError(f"predict got an empty batch (shape {tuple(x.shape)}): give it at least one image")
        outputs = []
        for start in range(0, len(x), batch_size):
            batch = self._to_model_array(x[start:start + batch_size], "x")
            outputs.append(backend.to_numpy(self.forward(batch)))
            self.clear_cache()
        return np.concatenate(outputs, axis=0)

    # ----- summary ------------------------------------------------------------------------
    def summary(self, print_fn=print, line_length=104):
        """Print and return Keras's table of the layers (minitensor/summary.py writes it)."""
        text = summary_text(self, line_length)
        if print_fn is not None:
            print_fn(text)
        return text

    # ----- saving and loading -------------------------------------------------------------
    def get_config(self):
        """The architecture as plain data: every layer's class, config and inputs, in call order."""
        return {
            "name": self.name,
            "format_version": FORMAT_VERSION,
            "layers": [{"class_name": type(n.layer).__name__, "config": n.layer.get_config(),
                        "inbound": [t.producer.name for t in n.inputs]} for n in self.nodes],
        }

    def weights_dict(self):
        return {f"weights/{layer.name}/{wname}": w for layer in self.layers
                for wname, w in zip(layer.weight_names, layer.get_weights())}

    def save(self, path, extra=None):
        """Write weights, architecture and optimizer state to one ``.npz``, atomically (a temporary file
        renamed over ``path`` once complete: an interrupted save never destroys the previous file).
        ``extra`` is a dict of JSON-able training state (epoch, callbacks, RNG) kept alongside."""
        if os.path.isdir(path):
            raise ModelFileError(f"{path}: is a folder; give a file path such as {os.path.join(path, 'model.npz')}")
        optimizer_state = self.optimizer.get_state() if self.optimizer is not None else None
        atomic_savez(path, self.file_arrays(self.weights_dict(), optimizer_state, extra))

    def file_arrays(self, weights, optimizer_state=None, extra=None):
        """The arrays of a saved model file: this model's architecture, ``weights`` keyed as
        ``weights_dict`` keys them, ``optimizer/``-prefixed optimizer state and JSON ``extra``."""
        arrays = {"config": np.array(json.dumps(self.get_config())), **weights}
        for key, value in (optimizer_state or {}).items():
            arrays[f"optimizer/{key}"] = np.asarray(value)
        arrays["extra"] = np.array(json.dumps(extra or {}))
        return arrays

    def load_weights(self, path):
        """Load the weights of a minitensor ``.npz`` (from ``save``) into this model, checking every shape."""
        data = read_npz(path)
        self.assign_weights(with_prefix(data, "weights/"), path)
        return data

    def assign_weights(self, named, source):
        """Assign {"layer/weight": array} (from ``source``, named in errors); all checks come before any change."""
        new_weights = []
        for layer in self.layers:
            arrays = []
            for wname, current in zip(layer.weight_names, layer.params):
                key = f"{layer.name}/{wname}"
                if key not in named:
                    raise ModelFileError(f"{source}: no weight {key!r} for layer {layer.name!r} of model "
                                         f"{self.name!r}; is it a file of another model?")
                if tuple(named[key].shape) != tuple(current.shape):
                    raise ModelFileError(f"{source}: weight {key!r} has shape {tuple(named[key].shape)}, layer "
                                         f"{layer.name!r} of model {self.name!r} needs {tuple(current.shape)}")
                arrays.append(named[key])
            new_weights.append(arrays)
        for layer, arrays in zip(self.layers, new_weights):
            if arrays:
                layer.set_weights(arrays)

    save_keras_weights = keras_io.write_keras_weights   # (self, path): a Keras 3 .weights.h5 for Keras's load_weights

    def load_keras_weights(self, path):
        """Load weights saved by Keras (legacy ``.h5`` or Keras 3 ``.weights.h5``), matched by layer name."""
        self.assign_weights(keras_io.read_keras_weights(path, self), path)   # keras_io imports h5py when used
