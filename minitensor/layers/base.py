"""The Layer contract every minitensor layer keeps, and the symbolic tensors of the model graph.

A layer is used in two ways:

* **Eagerly, on arrays** (how layers are tested and how a learner pokes at them)::

      y = layer.forward(x)        # caches what backward needs
      dx = layer.backward(dy)     # uses and frees that cache; fills layer.grads

* **Symbolically, to build a model** (the Keras functional style of the post)::

      x = Input((128, 128, 3))
      y = Conv2D(32, 3, padding="same")(x)   # returns a SymbolicTensor, records the graph

Parameters live in ``layer.params`` (arrays, on the layer's device) and their gradients in
``layer.grads``, in the same order as ``get_weights()`` (Keras's order: kernel, then bias).
"""
from __future__ import annotations

import itertools
import re

import numpy as np

from .. import backend

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# One generator for all weight initialisation, so a whole model is reproducible from one seed
# (minitensor.set_seed) while a layer can still take its own seed.
_init_rng = np.random.default_rng()
_name_counters: dict[str, itertools.count] = {}
_call_counter = itertools.count()   # orders symbolic tensors by creation: always a valid run order


def set_seed(seed: int) -> None:
    """Seed the generator that initialises layer weights (like keras.utils.set_random_seed)."""
    global _init_rng
    _init_rng = np.random.default_rng(seed)


def init_rng(seed=None) -> np.random.Generator:
    """The generator a layer draws its initial weights from: its own if seeded, else the global one."""
    return _init_rng if seed is None else np.random.default_rng(seed)


def _auto_name(cls_name: str) -> str:
    """conv2d, conv2d_1, conv2d_2, ... as Keras names unnamed layers."""
    base = re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", cls_name).lower().replace("2_d", "2d")
    counter = _name_counters.setdefault(base, itertools.count())
    index = next(counter)
    return base if index == 0 else f"{base}_{index}"


def check_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"minitensor computes in float32 or float64, not {dtype}")
    return dtype


def normalize_pair(value, what):
    """2 -> (2, 2); (2, 3) -> (2, 3); anything else is an error naming ``what``."""
    if isinstance(value, int):
        pair = (value, value)
    else:
        pair = tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in pair):
        raise ValueError(f"{what} must be a positive int or a pair of positive ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def window_output_and_padding(size, window, stride, padding):
    """Output length and (pad_before, pad_after) of a sliding window along one axis, as TensorFlow.

    'valid': no padding, out = floor((size - window) / stride) + 1.
    'same':  out = ceil(size / stride); the padding needed to get there is split with the odd
             pixel at the end (bottom/right), which is what TensorFlow does and why a stride-2
             'same' conv can pad 0 on top and 1 at the bottom.
    """
    if padding == "valid":
        out = (size - window) // stride + 1
        return out, 0, 0
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return out, total // 2, total - total // 2


def check_padding(padding):
    padding = str(padding).lower()
    if padding not in ("valid", "same"):
        raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
    return padding


class SymbolicTensor:
    """A placeholder for the output of a layer while a model is being built (Keras's KerasTensor).

    It knows its shape (without the batch axis), the layer that produced it and that layer's
    inputs; following ``producer``/``inputs`` backwards from a model's output gives its graph.
    """

    def __init__(self, shape, producer, inputs, dtype):
        self.shape = tuple(shape)
        self.producer = producer
        self.inputs = list(inputs)
        self.dtype = np.dtype(dtype)
        self.call_index = next(_call_counter)

    def __repr__(self):
        return f"<SymbolicTensor shape=(None, {', '.join(map(str, self.shape))}) from {self.producer.name!r}>"


# Every layer class a saved model can name, by class name: minitensor's own register themselves
# (Layer.__init_subclass__); a user's layer is added by ``register_layer`` or passed to
# ``load_model(..., custom_objects=...)``, as Keras does it.
LAYER_CLASSES: dict[str, type] = {}


def register_layer(cls):
    """Make a Layer subclass loadable by ``load_model`` under its class name (usable as a decorator).

    A second, different class of the same name is refused: a saved model must name one class.
    """
    if not (isinstance(cls, type) and issubclass(cls, Layer)):
        raise TypeError(f"register_layer takes a Layer subclass, got {cls!r}")
    known = LAYER_CLASSES.get(cls.__name__)
    if known is not None and known is not cls:
        raise ValueError(f"a layer class named {cls.__name__!r} is registered already ({known.__module__}."
                         f"{known.__qualname__}); rename {cls.__module__}.{cls.__qualname__}")
    LAYER_CLASSES[cls.__name__] = cls
    return cls


class Layer:
    """Base class: naming, dtype, parameters, device, the symbolic call, weight I/O.

    Subclasses implement ``build(input_shape)`` (create params), ``compute_output_shape``,
    ``forward`` and ``backward``; minitensor's own subclasses are registered for loading as they
    are defined (a user's: ``register_layer``).
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__module__.startswith("minitensor."):
            register_layer(cls)

    #: names of the weights in get_weights() order, as Keras and .h5 files call them
    weight_names: tuple[str, ...] = ()
    #: True if backward(dy, input_grad=False) can skip computing dx (saves work for the first layer)
    can_skip_input_grad = False
    #: the gradient checks ``python -m minitensor.gradcheck`` runs on this layer, declared where the layer
    #: is: example name -> (constructor arguments, input shapes without the batch axis), built in float64
    gradcheck_examples: dict[str, tuple[dict, list]] = {}
    #: the ONNX operator the layer is, where it is exactly one elementwise operator on one input and has no
    #: weights ("Relu"; elementwise, so the graph's NCHW layout changes nothing): minitensor/onnx_export.py
    #: writes it with ``onnx_attributes()`` and needs no converter for it. Read only from the class that declares it, so a subclass that computes otherwise is not
    #: exported as its parent.
    onnx_operator: str | None = None

    def onnx_attributes(self) -> dict:
        """The attributes of ``onnx_operator`` for this layer's settings (a leaky ReLU's ``alpha``)."""
        return {}

    def __init__(self, name=None, dtype="float32"):
        self.name = name or _auto_name(type(self).__name__)
        self.dtype = check_dtype(dtype)
        self.params: list = []
        self.grads: list = []
        self.built = False
        self.input_shape = None     # without the batch axis, set by build
        self.device = backend.CPU

    # ----- building and the symbolic call -------------------------------------------------
    def build(self, input_shape):
        self.input_shape = tuple(input_shape)
        self.built = True

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def __call__(self, inputs):
        symbolic = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        if all(isinstance(t, SymbolicTensor) for t in symbolic):
            shapes = [t.shape for t in symbolic]
            shape_arg = shapes if isinstance(inputs, (list, tuple)) else shapes[0]
            if not self.built:
                self.build(shape_arg)
            return SymbolicTensor(self.compute_output_shape(shape_arg), self, symbolic, self.dtype)
        return self.forward(inputs)

    # ----- checks shared by the layers ----------------------------------------------------
    def _check_input(self, x, what="input"):
        """Check rank, dtype and device of one NHWC array, with errors that say the fix."""
        if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
            raise TypeError(f"layer {self.name!r}: expected a NumPy or CuPy array as {what}, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(
                f"layer {self.name!r}: expected a 4-D {what} (batch, height, width, channels), "
                f"got shape {tuple(x.shape)}; add a batch axis with x[None] for a single image"
            )
        if x.dtype != self.dtype:
            hint = "cast it with x.astype(np.float32)" if self.dtype == np.float32 else f"cast it to {self.dtype}"
            if x.dtype in FLOAT_DTYPES:
                hint += f" or build the layer with dtype='{x.dtype}'"
            raise TypeError(f"layer {self.name!r}: expected {self.dtype} {what}, got {x.dtype}; {hint}")
        if self.params and backend.device_of(x) != self.device:
            raise TypeError(
                f"layer {self.name!r}: {what} is on the {backend.device_of(x)} but the weights are on the "
                f"{self.device}; move one of them (minitensor.to_device(x, '{self.device}') or model.to(...))"
            )
        if self.params and x.shape[-1] != self.input_shape[-1]:
            raise ValueError(
                f"layer {self.name!r} was built for {self.input_shape[-1]} input channels, got {x.shape[-1]} "
                f"(input shape {tuple(x.shape)})"
            )

    # ----- weights --------------------------------------------------------------------------
    def get_weights(self):
        """Copies of the parameters as NumPy arrays, in Keras's order."""
        return [backend.to_numpy(p).copy() for p in self.params]

    def set_weights(self, weights):
        """Replace the parameters; shapes must match exactly (no silent broadcasting)."""
        weights = list(weights)
        if len(weights) != len(self.params):
            raise ValueError(f"layer {self.name!r} has {len(self.params)} weights, got {len(weights)}")
        for i, (old, new) in enumerate(zip(self.params, weights)):
            if tuple(new.shape) != tuple(old.shape):
                raise ValueError(
                    f"layer {self.name!r}: weight {self.weight_names[i]!r} has shape {tuple(old.shape)}, "
                    f"got {tuple(new.shape)}"
                )
        xp = backend.get_array_module(*self.params) if self.params else np
        self.params = [xp.asarray(backend.to_device(w, self.device), dtype=self.dtype).copy() for w in weights]
        self.grads = [xp.zeros_like(p) for p in self.params]

    def count_params(self) -> int:
        return int(sum(int(np.prod(p.shape)) for p in self.params))

    def to(self, device):
        """Move parameters (and gradients) to "cpu" or "gpu"; returns self."""
        device = backend.check_device(device)
        self.params = [backend.to_device(p, device) for p in self.params]
        self.grads = [backend.to_device(g, device) for g in self.grads]
        self.device = device
        self.clear_cache()
        return self

    def clear_cache(self):
        """Drop whatever forward kept for backward (called by backward and by Model)."""
        self._cache = None

    def get_config(self) -> dict:
        return {"name": self.name, "dtype": str(self.dtype)}

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r})"

    # ----- the two passes ---------------------------------------------------------------
    def forward(self, x):  # pragma: no cover - every layer overrides it
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def backward(self, dy):  # pragma: no cover - every layer overrides it
        raise NotImplementedError(f"{type(self).__name__} must implement backward")

    def _pop_cache(self):
        cache = getattr(self, "_cache", None)
        if cache is None:
            raise RuntimeError(f"layer {self.name!r}: backward called without a forward before it")
        self._cache = None   # free activations as soon as backward has used them
        return cache


class InputLayer(Layer):
    """The entry of a model: checks the input and passes it on unchanged."""

    def __init__(self, shape, name=None, dtype="float32"):
        super().__init__(name=name, dtype=dtype)
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) <= 0:
            raise ValueError(f"Input shape must be (height, width, channels) with positive sizes, got {shape}")
        self.build(shape)

    def forward(self, x):
        self._check_input(x)
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"model input {self.name!r} expects images of shape {self.input_shape} (height, width, channels), "
                f"got a batch of shape {tuple(x.shape)}"
            )
        return x

    def backward(self, dy):
        return dy

    def get_config(self):
        return {**super().get_config(), "shape": list(self.input_shape)}


def Input(shape, name=None, dtype="float32") -> SymbolicTensor:  # noqa: N802  (Keras's name)
    """Start a model graph, as keras.layers.Input: ``x = Input((128, 128, 3), name="input")``."""
    layer = InputLayer(shape, name=name, dtype=dtype)
    return SymbolicTensor(layer.input_shape, layer, [], layer.dtype)
