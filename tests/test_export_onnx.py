"""ONNX export (minitensor/onnx_export.py) and the export command (minitensor/export.py).

Each exported file is checked by ``onnx.checker`` and run by two runtimes that share no code with
minitensor: onnxruntime and OpenCV's own dnn module (``cv2.dnn.readNetFromONNX``, what a user
deploying with OpenCV alone runs). Both must give minitensor's outputs to float32 rounding, on
both U-Nets with random weights (non-zero biases), a batch of two, and on a small model that puts
every exportable layer in the forms the U-Nets do not use (strides, 'same' padding with an odd
pixel, a 3x3 pool, non-square upsampling, uneven crops, no bias, a linear conv, ReLU and Softmax
layers, a concatenation along the width).
"""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

import minitensor
from minitensor import (Concatenate, Conv2D, Cropping2D, Input, Layer, MaxPool2D, Model, ReLU, Softmax, UpSampling2D,
                        set_seed)
from unet import small_unet, unet

onnx = pytest.importorskip("onnx", reason="the onnx package is not installed (pip install 'minitensor[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")

RTOL, ATOL = 1e-4, 1e-6
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def randomized(model, seed=0):
    """The model with every weight moved off its initial value (biases start at zero: a bias that is
    dropped or misplaced would not show)."""
    rng = np.random.default_rng(seed)
    model.set_weights([w + 0.05 * rng.standard_normal(w.shape).astype(w.dtype) for w in model.get_weights()])
    return model


def layer_zoo():
    set_seed(5)
    x = Input((13, 17, 3), name="image")
    a = Conv2D(4, 3, strides=2, padding="same", name="strided")(x)          # pads 1 top/left, 1 bottom/right...
    b = ReLU(name="relu")(a)
    c = MaxPool2D(2, strides=1, padding="same", name="pool_same")(b)       # ...0 top/left, 1 bottom/right
    c = MaxPool2D(3, strides=2, name="pool3")(c)
    d = UpSampling2D((2, 3), name="up_2x3")(c)
    e = Cropping2D(((1, 0), (2, 3)), name="crop_uneven")(d)
    f = Conv2D(5, (3, 2), activation="relu", use_bias=False, name="no_bias")(e)
    g = Cropping2D(((1, 1), (0, 1)), name="crop_skip")(e)
    h = Concatenate(name="concat_channels")([g, f])
    h1 = Conv2D(9, 1, name="linear")(h)
    h2 = Concatenate(axis=1, name="concat_width")([h, h1])
    i = Conv2D(3, 1, activation="softmax", name="head")(h2)
    return randomized(Model(x, Softmax(axis=1, name="softmax_rows")(i), name="zoo"), seed=1)


MODELS = {
    "small_unet": lambda: randomized(small_unet((32, 32, 3), num_classes=4, base_filters=4)),
    "unet": lambda: randomized(unet((188, 188, 3), num_classes=3, base_filters=2)),   # 188: its smallest input
    "layer_zoo": layer_zoo,
}


def run_onnxruntime(path, x):
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x})
    return output


def run_opencv(path, x):
    net = cv2.dnn.readNetFromONNX(os.fspath(path))
    net.setInput(x)
    return net.forward()


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_onnxruntime_and_opencv_give_minitensors_outputs(tmp_path, kind):
    model = MODELS[kind]()
    path = minitensor.export_onnx(model, tmp_path / f"{kind}.onnx")
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    (graph_input,), (graph_output,) = proto.graph.input, proto.graph.output
    dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    assert dims == ["batch", *model.input.shape]            # NHWC in, any batch size
    dims = [d.dim_param or d.dim_value for d in graph_output.type.tensor_type.shape.dim]
    assert dims == ["batch", *model.output.shape]           # NHWC out

    x = np.random.default_rng(2).uniform(-1, 1, (2, *model.input.shape)).astype(np.float32)
    expected = model.predict(x)
    assert expected.std() > 1e-3                             # outputs that differ, not a constant
    for runtime in (run_onnxruntime, run_opencv):
        got = runtime(path, x)
        assert got.shape == expected.shape, runtime.__name__
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL, err_msg=runtime.__name__)


def test_every_layer_class_the_registry_holds_can_be_exported():
    from minitensor.layers import LAYER_CLASSES
    from minitensor.onnx_export import CONVERTERS, declares_operator

    ours = {name for name, cls in LAYER_CLASSES.items() if cls.__module__.startswith("minitensor.")}
    assert ours - {"InputLayer"} == set(CONVERTERS) | {name for name in ours if declares_operator(LAYER_CLASSES[name])}
    assert not set(CONVERTERS) & {name for name in ours if declares_operator(LAYER_CLASSES[name])}


class Doubling(Layer):
    """A user's layer: y = 2x (not registered: the registry is global to the test session)."""

    def forward(self, x):
        return 2 * x

    def backward(self, dy):
        return 2 * dy


def model_with_doubling():
    x = Input((16, 16, 3), name="input")
    y = Doubling(name="times_two")(Conv2D(4, 3, padding="same", name="conv")(x))
    return Model(x, Conv2D(2, 1, activation="softmax", name="head")(y))


def test_a_layer_that_cannot_be_exported_is_named_and_nothing_is_written(tmp_path):
    path = tmp_path / "model.onnx"
    with pytest.raises(minitensor.OnnxExportError, match=r"layer 'times_two' \(Doubling\) cannot be exported"):
        minitensor.export_onnx(model_with_doubling(), path)
    assert os.listdir(tmp_path) == []


class Negation(Layer):
    """A user's layer that names its ONNX operator: y = -x is ONNX's Neg, so it exports without a converter."""

    onnx_operator = "Neg"

    def forward(self, x):
        return -x

    def backward(self, dy):
        return -dy


class ClippedReLU(ReLU):
    """A user's subclass that computes otherwise than its parent: it must not be exported as Relu."""

    def forward(self, x):
        return np.minimum(super().forward(x), 1)


def test_a_layer_that_names_its_onnx_operator_exports_and_a_subclass_does_not_inherit_it(tmp_path):
    x = Input((8, 8, 3), name="input")
    model = Model(x, Negation(name="negate")(Conv2D(2, 3, padding="same", name="conv", seed=1)(x)))
    batch = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    path = minitensor.export_onnx(model, tmp_path / "negation.onnx")
    np.testing.assert_allclose(run_onnxruntime(path, batch), model.predict(batch), rtol=RTOL, atol=ATOL)
    clipped = Model(x, ClippedReLU(name="clip")(x))
    with pytest.raises(minitensor.OnnxExportError, match=r"'clip' \(ClippedReLU\) cannot be exported.*set its onnx_operator"):
        minitensor.export_onnx(clipped, tmp_path / "clipped.onnx")


def test_a_float64_model_is_refused_with_the_fix(tmp_path):
    model = small_unet((16, 16, 3), base_filters=2, dtype="float64")
    with pytest.raises(minitensor.OnnxExportError, match="float64.*dtype='float32'"):
        minitensor.export_onnx(model, tmp_path / "model.onnx")


# ----- the command --------------------------------------------------------------------------

def export_command(*args):
    """``python -m minitensor.export ...`` as a user runs it, in its own process."""
    return subprocess.run([sys.executable, "-m", "minitensor.export", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_the_command_writes_onnx_that_runs_as_the_saved_model(tmp_path):
    model = randomized(small_unet((16, 16, 3), base_filters=2))
    model.save(tmp_path / "last.npz")
    done = export_command(tmp_path / "last.npz", tmp_path / "unet.onnx")
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "unet.onnx" in done.stdout
    x = np.random.default_rng(3).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(run_onnxruntime(tmp_path / "unet.onnx", x), model.predict(x), rtol=RTOL, atol=ATOL)


def refused(done, *words):
    """Exit status 2, one error line naming each of ``words``, no traceback."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: "), done.stderr
    for word in words:
        assert word in done.stderr, (word, done.stderr)
    return done.stderr


def test_the_command_refuses_what_is_not_a_minitensor_model(tmp_path):
    (tmp_path / "random.npz").write_bytes(np.random.default_rng(0).bytes(2000))
    refused(export_command(tmp_path / "random.npz", tmp_path / "a.onnx"), "random.npz", "not a readable minitensor")
    small_unet((16, 16, 3), base_filters=2).save_keras_weights(tmp_path / "keras.weights.h5")
    refused(export_command(tmp_path / "keras.weights.h5", tmp_path / "a.onnx"), "HDF5", "load_keras_weights")
    refused(export_command(tmp_path / "missing.npz", tmp_path / "a.onnx"), "missing.npz", "no such file")
    assert not (tmp_path / "a.onnx").exists()


def test_the_command_names_a_layer_class_it_does_not_know(tmp_path):
    model_with_doubling().save(tmp_path / "custom.npz")      # a class the command cannot know
    refused(export_command(tmp_path / "custom.npz", tmp_path / "a.onnx"), "unknown layer class 'Doubling'")
    assert not (tmp_path / "a.onnx").exists()


def test_the_command_refuses_outputs_it_cannot_or_must_not_write(tmp_path):
    small_unet((16, 16, 3), base_filters=2).save(tmp_path / "model.npz")
    (tmp_path / "kept.onnx").write_bytes(b"the user's file")
    refused(export_command(tmp_path / "model.npz", tmp_path / "kept.onnx"), "kept.onnx", "exists", "--overwrite")
    assert (tmp_path / "kept.onnx").read_bytes() == b"the user's file"
    refused(export_command(tmp_path / "model.npz", tmp_path / "model.npz" / "a.onnx"), "is a file, not a folder")
    refused(export_command(tmp_path / "model.npz", "/proc/minitensor-test.onnx"), "/proc/minitensor-test.onnx",
            "cannot write")
    refused(export_command(tmp_path / "model.npz", tmp_path / "model.h5"), ".onnx", ".weights.h5")
    refused(export_command(tmp_path / "model.npz", tmp_path), "is a folder")
    assert sorted(os.listdir(tmp_path)) == ["kept.onnx", "model.npz"]
    done = export_command(tmp_path / "model.npz", tmp_path / "kept.onnx", "--overwrite")
    assert done.returncode == 0, done.stderr
    onnx.checker.check_model(onnx.load(tmp_path / "kept.onnx"))
