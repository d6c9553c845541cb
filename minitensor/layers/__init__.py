"""minitensor layers: one file per layer, forward and backward side by side.

conv2d.py (Conv2D), pooling.py (MaxPool2D), upsampling.py (UpSampling2D), cropping.py
(Cropping2D), merge.py (Concatenate), activations.py (ReLU, Softmax), base.py (the Layer
contract, Input and the symbolic tensors of the model graph).
"""
from .activations import ReLU, Softmax
from .base import LAYER_CLASSES, Input, InputLayer, Layer, SymbolicTensor, register_layer, set_seed
from .conv2d import Conv2D
from .cropping import Cropping2D
from .merge import Concatenate
from .pooling import MaxPool2D
from .upsampling import UpSampling2D

# Keras's aliases, so the post's spelling works too.
MaxPooling2D = MaxPool2D

__all__ = [
    "LAYER_CLASSES", "Concatenate", "Conv2D", "Cropping2D", "Input", "InputLayer", "Layer", "MaxPool2D",
    "MaxPooling2D", "ReLU", "Softmax", "SymbolicTensor", "UpSampling2D", "register_layer", "set_seed",
]
