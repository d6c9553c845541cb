"""Read weights written by Keras, so a model trained with the post's code runs on minitensor.

Two layouts exist, and both are read by layer *name* (the post's code names every layer):

* legacy ``.h5`` (Keras 2's ``save_weights('x.h5')``, what the post's ModelCheckpoint with
  ``save_weights_only=True`` writes, and Keras 3's legacy writer): the root attribute
  ``layer_names`` lists the layers; group ``<layer>`` has an attribute ``weight_names`` such as
  ``[b'conv/kernel:0', b'conv/bias:0']`` and a dataset at each of those paths.
* Keras 3 ``.weights.h5``: groups ``layers/<key>/vars`` whose attribute ``name`` is the layer's
  name, holding datasets ``0``, ``1``, ... in the layer's weight order (kernel, then bias).

Keras's kernels are HWIO and its data NHWC, as ours, so the arrays are used unchanged.
"""
from __future__ import annotations

import os

import numpy as np

from .files import ModelFileError


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
