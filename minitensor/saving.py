"""Loading a saved model: the architecture rebuilt from its config, then its weights and Adam's state.

``Model.save`` writes one ``.npz`` (minitensor/files.py writes it atomically); ``load_model`` reads
it back into a new Model. It sits above model.py, which it imports; model.py never imports it.
"""
from __future__ import annotations

import json

from . import backend, optimizers as optimizer_module
from .files import ModelFileError, read_npz, with_prefix
from .layers.base import LAYER_CLASSES, InputLayer, SymbolicTensor
from .model import Model


def layer_class(name, custom_objects=None):
    """The layer class a model file names: the caller's ``custom_objects`` first, then the registry."""
    cls = (custom_objects or {}).get(name) or LAYER_CLASSES.get(name)
    if cls is None:
        raise ModelFileError(f"unknown layer class {name!r} in the model file: if it is your own layer, pass "
                             f"load_model(path, custom_objects={{{name!r}: {name}}}) or decorate the class "
                             f"with @minitensor.register_layer; minitensor has {', '.join(sorted(LAYER_CLASSES))}")
    return cls


def model_from_config(config, custom_objects=None):
    """Rebuild a Model from ``Model.get_config()``; ``custom_objects`` maps class names to a user's layers."""
    tensors = {}
    for entry in config["layers"]:
        cls = layer_class(entry["class_name"], custom_objects)
        layer_config = dict(entry["config"])
        if cls is InputLayer:
            layer = InputLayer(layer_config.pop("shape"), **layer_config)
            tensors[layer.name] = SymbolicTensor(layer.input_shape, layer, [], layer.dtype)
            continue
        layer = cls(**layer_config)
        inbound = [tensors[name] for name in entry["inbound"]]
        tensors[layer.name] = layer(inbound if len(inbound) > 1 else inbound[0])
    first, last = config["layers"][0]["config"]["name"], config["layers"][-1]["config"]["name"]
    return Model(tensors[first], tensors[last], name=config["name"])


def load_model(path, device="cpu", custom_objects=None):
    """Load a model saved with ``Model.save``: architecture, weights and (if saved) optimizer state.

    ``custom_objects`` ({class name: class}) names layers of your own that are not registered
    (``minitensor.register_layer``). Returns the model. The ``extra`` training state a checkpoint
    carries is not the model's: ``minitensor.checkpoint.read_checkpoint`` reads it.
    """
    data = read_npz(path)
    if "config" not in data:
        raise ModelFileError(f"{path}: has no model architecture (was it written by Model.save?)")
    try:
        config = json.loads(str(data["config"]))
        model = model_from_config(config, custom_objects)
    except ModelFileError:
        raise
    except Exception as exc:
        raise ModelFileError(f"{path}: the model architecture in the file cannot be rebuilt: {exc}") from exc
    model.assign_weights(with_prefix(data, "weights/"), path)
    optimizer_state = with_prefix(data, "optimizer/")
    if optimizer_state:
        model.optimizer = optimizer_module.Adam()
        model.optimizer.set_state(optimizer_state)
    return model.to(device) if device != backend.CPU else model
