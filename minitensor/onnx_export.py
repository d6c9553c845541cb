"""A minitensor Model as an ONNX graph, to run it with onnxruntime, OpenCV's dnn module or any ONNX runtime.

    minitensor.export_onnx(model, "unet.onnx")          # or: python -m minitensor.export last.npz unet.onnx

The file takes and returns what the model does: NHWC float32 batches, (N, H, W, C) in and
(N, H', W', classes) out, with the batch size free. Inside, the graph is NCHW, the layout ONNX
defines its operators in: a Transpose at each end, every weight laid out for it once here.

How each layer becomes ONNX operators (opset 13), and why they compute the same numbers:

* Conv2D -> Conv (+ Relu or Softmax). ONNX kernels are OIHW, ours HWIO: ``W.transpose(3, 2, 0, 1)``.
  'same' padding becomes explicit pads, the ones the layer computes (the odd pixel at the
  bottom/right, as TensorFlow does); ONNX's own ``auto_pad=SAME_UPPER`` means the same, but
  explicit pads are what every runtime reads alike.
* MaxPool2D -> MaxPool with the same explicit pads (a padded cell never wins a max).
* UpSampling2D -> Resize, mode 'nearest', coordinates 'asymmetric' and nearest_mode 'floor': the
  source of output pixel h is floor(h / 2) = h // 2, our y[h] = x[h // SH].
* Cropping2D -> Slice on the H and W axes.
* Concatenate -> Concat and Softmax -> Softmax, with each NHWC axis moved to its NCHW place.
* A layer that is one ONNX operator without weights says so itself (``Layer.onnx_operator``: ReLU's
  is "Relu"; elementwise, so the layout does not matter): no converter here. A user's layer may
  declare one too.

Any other layer (one of the user's) cannot be exported: ``OnnxExportError`` names it and the two fixes.
The ``onnx`` package (``pip install 'minitensor[onnx]'``) is imported only when exporting.
"""
from __future__ import annotations

import os

import numpy as np

from .files import atomic_write_bytes
from .layers.base import window_output_and_padding

OPSET = 13                       # Resize, Slice and Softmax in their current forms; read by onnxruntime and OpenCV
TO_NCHW, TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]
NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1}     # an axis of the NHWC batch -> the same axis of the NCHW one


class OnnxExportError(ValueError):
    """A model that cannot be written as ONNX; the message names the layer (its name and class) and why."""


def _onnx():
    try:
        import onnx
    except ImportError:
        raise OnnxExportError("ONNX export needs the onnx package: pip install 'minitensor[onnx]' "
                              "(or pip install onnx)") from None
    return onnx


class _Graph:
    """The nodes and initialisers (weights, constants) of the ONNX graph being written."""

    def __init__(self, onnx, dtype):
        self.onnx, self.dtype = onnx, np.dtype(dtype)
        self.nodes, self.initializers = [], []

    def constant(self, name, array):
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op, inputs, output, name, **attributes):
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [output], name=name, **attributes))
        return output


def _pads(layer, input_shape, kernel, strides):
    """ONNX pads [top, left, bottom, right] for this layer on an (H, W, C) input: the layer's own rule."""
    (top, bottom), (left, right) = (window_output_and_padding(size, k, s, layer.padding)[1:]
                                    for size, k, s in zip(input_shape[:2], kernel, strides))
    return [top, left, bottom, right]


def _conv2d(graph, layer, inputs, shapes, output):
    kernel = np.asarray(layer.get_weights()[0], dtype=graph.dtype).transpose(3, 2, 0, 1)    # HWIO -> OIHW
    operands = [inputs[0], graph.constant(f"{layer.name}/kernel", kernel)]
    if layer.use_bias:
        operands.append(graph.constant(f"{layer.name}/bias", np.asarray(layer.get_weights()[1], dtype=graph.dtype)))
    activation = layer.activation
    z = graph.node("Conv", operands, output if activation is None else f"{layer.name}/logits", layer.name,
                   kernel_shape=list(layer.kernel_size), strides=list(layer.strides),
                   pads=_pads(layer, shapes[0], layer.kernel_size, layer.strides))
    if activation == "relu":
        graph.node("Relu", [z], output, f"{layer.name}/relu")
    elif activation == "softmax":       # over the channels: axis 1 of NCHW
        graph.node("Softmax", [z], output, f"{layer.name}/softmax", axis=1)


def _maxpool2d(graph, layer, inputs, shapes, output):
    graph.node("MaxPool", inputs, output, layer.name, kernel_shape=list(layer.pool_size),
               strides=list(layer.strides), pads=_pads(layer, shapes[0], layer.pool_size, layer.strides))


def _upsampling2d(graph, layer, inputs, shapes, output):
    scales = graph.constant(f"{layer.name}/scales", np.array([1, 1, *layer.size], dtype=np.float32))
    graph.node("Resize", [inputs[0], "", scales], output, layer.name, mode="nearest",
               coordinate_transformation_mode="asymmetric", nearest_mode="floor")


def _cropping2d(graph, layer, inputs, shapes, output):
    (top, bottom), (left, right) = layer.cropping
    height, width = shapes[0][:2]
    starts = graph.constant(f"{layer.name}/starts", np.array([top, left], dtype=np.int64))
    ends = graph.constant(f"{layer.name}/ends", np.array([height - bottom, width - right], dtype=np.int64))
    axes = graph.constant(f"{layer.name}/axes", np.array([2, 3], dtype=np.int64))
    graph.node("Slice", [inputs[0], starts, ends, axes], output, layer.name)


def _concatenate(graph, layer, inputs, shapes, output):
    axis = layer.axis % len(shapes[0]) + 1           # the layer's axis counts without the batch (as Keras's)
    graph.node("Concat", inputs, output, layer.name, axis=NCHW_AXIS[axis])


def _softmax(graph, layer, inputs, shapes, output):
    graph.node("Softmax", inputs, output, layer.name, axis=NCHW_AXIS[layer.axis % 4])   # an axis of the batch


CONVERTERS = {"Conv2D": _conv2d, "MaxPool2D": _maxpool2d, "UpSampling2D": _upsampling2d,
              "Cropping2D": _cropping2d, "Concatenate": _concatenate, "Softmax": _softmax}


def _declared_operator(graph, layer, inputs, shapes, output):
    """A layer that is one ONNX operator (``Layer.onnx_operator``, ReLU's "Relu"): that node, its attributes."""
    graph.node(type(layer).onnx_operator, inputs, output, layer.name, **layer.onnx_attributes())


def declares_operator(cls):
    """Whether ``cls`` itself (not a parent it may compute differently from) names its ONNX operator."""
    return vars(cls).get("onnx_operator") is not None


def _converter(layer):
    """The converter of the layer's class; minitensor's classes only (a subclass may compute otherwise)."""
    cls = type(layer)
    converter = CONVERTERS.get(cls.__name__) if cls.__module__.startswith("minitensor.") else None
    if converter is None and declares_operator(cls):
        converter = _declared_operator
    if converter is None:
        raise OnnxExportError(f"layer {layer.name!r} ({cls.__name__}) cannot be exported to ONNX: the exporter "
                              f"writes the layers {', '.join(sorted(CONVERTERS))} and those that name their ONNX "
                              f"operator; if {cls.__name__} is one ONNX operator without weights, set its "
                              f"onnx_operator (and onnx_attributes), else add a converter for it to "
                              f"minitensor/onnx_export.py (CONVERTERS)")
    return converter


def to_onnx(model):
    """The model as an ``onnx.ModelProto``, checked by ``onnx.checker``; OnnxExportError if it cannot be."""
    onnx = _onnx()
    if model.dtype != np.float32:
        raise OnnxExportError(f"model {model.name!r} computes in {model.dtype}; ONNX export writes float32 "
                              f"(what OpenCV and most runtimes run): build it with dtype='float32' and copy "
                              f"the weights over (set_weights)")
    converters = [_converter(node.layer) for node in model.nodes[1:]]     # every refusal before any work
    graph = _Graph(onnx, model.dtype)
    input_name = model.nodes[0].layer.name
    names = {id(model.input): graph.node("Transpose", [input_name], f"{input_name}/nchw", f"{input_name}/nchw",
                                         perm=TO_NCHW)}
    for node, converter in zip(model.nodes[1:], converters):
        output = f"{node.layer.name}/nchw" if node.output is model.output else node.layer.name
        converter(graph, node.layer, [names[id(t)] for t in node.inputs], [t.shape for t in node.inputs], output)
        names[id(node.output)] = output
    output_name = model.output.producer.name
    graph.node("Transpose", [names[id(model.output)]], output_name, f"{output_name}/nhwc", perm=TO_NHWC)
    float32 = onnx.TensorProto.FLOAT
    onnx_graph = onnx.helper.make_graph(
        graph.nodes, model.name,
        [onnx.helper.make_tensor_value_info(input_name, float32, ["batch", *model.input.shape])],
        [onnx.helper.make_tensor_value_info(output_name, float32, ["batch", *model.output.shape])],
        initializer=graph.initializers)
    proto = onnx.helper.make_model(onnx_graph, producer_name="minitensor",
                                   opset_imports=[onnx.helper.make_opsetid("", OPSET)])
    proto.ir_version = min(proto.ir_version, 8)        # what onnxruntime and OpenCV releases of 2023 on read
    proto.doc_string = (f"{model.name}, exported by minitensor: input {input_name!r} NHWC float32 "
                        f"(batch, {', '.join(map(str, model.input.shape))}), output {output_name!r} NHWC")
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model, path):
    """Write ``model`` to ``path`` as an ONNX file, atomically (an existing file is replaced whole or not at all).

    Returns ``path``. Raises OnnxExportError naming a layer that cannot be exported (or a missing
    ``onnx`` package), OSError naming ``path`` if it cannot be written.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise OnnxExportError(f"{path}: is a folder; give a file path such as {os.path.join(path, 'model.onnx')}")
    atomic_write_bytes(path, to_onnx(model).SerializeToString())
    return path
