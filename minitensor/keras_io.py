"""Keras weight files, both ways: read weights written by Keras, so a model trained with the post's code
runs on minitensor, and write a minitensor model's weights for the same model built in Keras.

Two layouts exist, and both are read by layer *name* (the post names every layer):

* legacy ``.h5`` (Keras 2's ``save_weights('x.h5')``, what the post's ModelCheckpoint with
  ``save_weights_only=True`` writes, and Keras 3's legacy writer): the root attribute
  ``layer_names`` lists the layers; group ``<layer>`` has an attribute ``weight_names`` such as
  ``[b'conv/kernel:0', b'conv/bias:0']`` and a dataset at each of those paths.
* Keras 3 ``.weights.h5``: groups ``layers/<key>/vars`` whose attribute ``name`` is the layer's
  name, holding datasets ``0``, ``1``, ... in the layer's weight order (kernel, then bias).

``write_keras_weights`` (``Model.save_keras_weights``) writes the Keras 3 layout. Keras itself
reads it by *key*, not by name: ``<key>`` is the snake-cased Keras class name with a counter
(``conv2d``, ``conv2d_1``, ...) in the order its Functional model lists the layers, so the keys
are given in that order (``keras_layer_order``), and the names as well for our reader.

Keras's kernels are HWIO and its data NHWC, as ours, so the arrays are used unchanged.
"""
from __future__ import annotations

import io
import os
import re

import numpy as np

from .files import ModelFileError, atomic_write_bytes

KERAS_SUFFIX = ".weights.h5"
# minitensor class name -> the Keras class of the same layer, where the two differ (MaxPool2D is
# Keras's alias of MaxPooling2D: its saved key is max_pooling2d).
KERAS_CLASS_NAMES = {"MaxPool2D": "MaxPooling2D"}


def _decode(value):
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _read_attribute_list(group, name):
    """Keras splits long attribute lists into name0, name1, ... when they exceed HDF5's header limit."""
    if name in group.attrs:
        return [_decode(v) for v in group.attrs[name]]
    values, chunk = [], 0
    while f"{name}{chunk}" in group.attrs:
        values += [_decode(v) for v in group.attrs[f"{name}{chunk}"]]
        chunk += 1
    return values


def _legacy_layers(f):
    """{layer name: [arrays in saved order]} from a legacy Keras .h5 weights file."""
    group = f["model_weights"] if "model_weights" in f else f   # a whole-model .h5 nests them
    result = {}
    for layer_name in _read_attribute_list(group, "layer_names"):
        layer_group = group[layer_name]
        result[layer_name] = [np.asarray(layer_group[w]) for w in _read_attribute_list(layer_group, "weight_names")]
    return result


def _keras3_layers(f):
    """{layer name: [arrays in order]} from a Keras 3 .weights.h5 file."""
    result = {}
    for key in f["layers"]:
        variables = f["layers"][key].get("vars")
        if variables is None:
            continue
        name = _decode(variables.attrs.get("name", key))
        result[name] = [np.asarray(variables[str(i)]) for i in range(len(variables))]
    return result


def read_keras_weights(path, model):
    """{"layer/weight": array} for every weighted layer of ``model`` found in a Keras weights file.

    Raises ModelFileError (a ValueError) naming the file and the problem: missing file, not an
    HDF5 file, a layer of the model absent from the file, or a wrong number of arrays.
    """
    import h5py

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as f:
            by_layer = _keras3_layers(f) if "layers" in f and "layer_names" not in f.attrs else _legacy_layers(f)
    except ModelFileError:
        raise
    except Exception as exc:
        raise ModelFileError(f"{path}: not a readable Keras weights file (.h5 or .weights.h5): {exc}") from exc
    named = {}
    for layer in model.layers:
        if not layer.params:
            continue
        if layer.name not in by_layer:
            raise ModelFileError(f"{path}: no weights for layer {layer.name!r} of model {model.name!r}; the file "
                                 f"has layers {', '.join(sorted(by_layer)) or '(none)'}")
        arrays = by_layer[layer.name]
        if len(arrays) != len(layer.weight_names):
            raise ModelFileError(f"{path}: layer {layer.name!r} has {len(arrays)} arrays in the file, "
                                 f"expected {len(layer.weight_names)} ({', '.join(layer.weight_names)})")
        for weight_name, array in zip(layer.weight_names, arrays):
            named[f"{layer.name}/{weight_name}"] = array
    return named


def _snake_case(name):
    """Keras's naming.to_snake_case: Conv2D -> conv2d, MaxPooling2D -> max_pooling2d, ReLU -> re_lu."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def keras_layer_order(model):
    """``model.layers`` in the order a Keras Functional model of the same graph lists them.

    Keras (keras/src/ops/function.py, ``map_graph``) sorts its layers by depth, the longest path
    from the layer to the output, deepest (the input) first, and breaks ties by the order in
    which a depth-first walk from the output first meets them. Our order is the order of the
    calls; the two can differ (the original U-Net's crops come right before their
    concatenations in Keras's), and Keras counts the keys of each class in its own order.
    """
    first_met, finished = {}, []

    def walk(tensor):                        # every layer is called once in a Model: a layer is a node
        if id(tensor) in first_met:
            return
        first_met[id(tensor)] = len(first_met)
        for parent in tensor.inputs:
            walk(parent)
        finished.append(tensor)              # after its inputs: reversed, consumers come first

    walk(model.output)
    depth = {}
    for tensor in reversed(finished):
        below = depth.setdefault(id(tensor), 0)
        for parent in tensor.inputs:
            depth[id(parent)] = max(depth.get(id(parent), 0), below + 1)
    finished.sort(key=lambda t: (-depth[id(t)], first_met[id(t)]))
    return [tensor.producer for tensor in finished]


def write_keras_weights(model, path):
    """Write the model's weights to ``path`` as a Keras 3 ``.weights.h5``, atomically.

    The same model built in Keras (the post's code, with the same layer classes in the same
    graph) loads it with ``keras_model.load_weights(path)``; ``Model.load_keras_weights`` reads it
    back. Keras reads a file of this layout only under a name ending in ``.weights.h5``, so any
    other name is refused (ModelFileError), as Keras's ``save_weights`` refuses it.
    """
    import h5py

    path = os.fspath(path)
    if not path.endswith(KERAS_SUFFIX):
        raise ModelFileError(f"{path}: a Keras 3 weights file must be named *{KERAS_SUFFIX} (Keras's load_weights "
                             f"reads this layout by that name), e.g. {os.path.splitext(path)[0]}{KERAS_SUFFIX}")
    if os.path.isdir(path):
        raise ModelFileError(f"{path}: is a folder; give a file path such as {os.path.join(path, 'model.weights.h5')}")
    buffer, counts = io.BytesIO(), {}
    with h5py.File(buffer, "w") as f:
        for layer in keras_layer_order(model):
            base = _snake_case(KERAS_CLASS_NAMES.get(type(layer).__name__, type(layer).__name__))
            counts[base] = counts.get(base, -1) + 1          # Keras's _get_unique_name: key, key_1, key_2, ...
            variables = f.create_group(f"layers/{base}_{counts[base]}" if counts[base] else f"layers/{base}")
            variables = variables.create_group("vars")
            variables.attrs["name"] = layer.name
            for index, array in enumerate(layer.get_weights()):
                variables[str(index)] = array
        f.create_group("vars").attrs["name"] = model.name
    atomic_write_bytes(path, buffer.getvalue())
    return path
