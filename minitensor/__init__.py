"""minitensor: a small deep-learning engine with every backward pass written by hand.

NumPy on the CPU (hot kernels in numba), CuPy on the GPU; NHWC data and HWIO kernels as in
Keras. Read it bottom-up: backend.py -> kernels/ -> layers/, losses.py, optimizers.py ->
model.py -> saving.py. ``python -m minitensor.gradcheck --all`` checks every backward pass numerically.
"""
from . import cpu_runtime

cpu_runtime.apply_before_numpy()   # first: CPU settings that OpenBLAS reads when NumPy loads (cpu_runtime.py)

from . import backend, kernels, layers, losses, optimizers  # noqa: E402  (after the CPU settings)
from .backend import get_array_module, is_gpu_available, to_device, to_numpy
from .layers import (Concatenate, Conv2D, Cropping2D, Input, Layer, MaxPool2D, MaxPooling2D, ReLU, Softmax,
                     UpSampling2D, register_layer, set_seed)
from .files import ModelFileError
from .keras_io import write_keras_weights as save_keras_weights
from .model import Model
from .onnx_export import OnnxExportError, export_onnx
from .saving import load_model

__version__ = "0.1.0"

__all__ = [
    "Concatenate", "Conv2D", "Cropping2D", "Input", "Layer", "MaxPool2D", "MaxPooling2D", "Model", "ModelFileError",
    "OnnxExportError", "ReLU", "Softmax", "UpSampling2D", "backend", "export_onnx", "get_array_module",
    "is_gpu_available", "kernels", "layers", "load_model", "losses", "optimizers", "register_layer",
    "save_keras_weights", "set_seed", "to_device", "to_numpy",
]
