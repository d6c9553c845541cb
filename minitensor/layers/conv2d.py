"""Conv2D: a 2-D convolution, forward and backward, and where each formula comes from.

Shapes (Keras's layout): x (N, H, W, C), kernel W (KH, KW, C, OC) "HWIO", bias b (OC,),
output y (N, OH, OW, OC).

Forward
    Written per element (x = 0 outside the image, SH, SW the strides, PT, PL the top and left padding):

        Z[n, oh, ow, o] = b[o] + sum_{i, j, c} x[n, oh*SH + i - PT, ow*SW + j - PL, c] * W[i, j, c, o]
        y = activation(Z)

    im2col copies every KH x KW x C input patch into one row of a matrix, so the whole
    convolution becomes a single matrix product (GEMM):

        X_col = im2col(x)              (N*OH*OW, KH*KW*C)   one row per output pixel
        W_col = W.reshape(KH*KW*C, OC)                      HWIO already has this order:
                                                            a free reshape, no transpose
        Z     = X_col @ W_col + b      (N*OH*OW, OC)        reshaped to (N, OH, OW, OC)

Backward, given dy = dL/dy.

    dZ = dL/dZ through the activation. For ReLU it is elementwise, dZ = dy * f'(Z): dy where
    y > 0 (activations.py). For softmax it is not elementwise but
    the Jacobian-vector product y * (dy - sum(dy * y)) over the channels (activations.py). A
    softmax output layer trained on logits gets dZ = dL/dZ straight from the loss and skips this
    step (losses.py derives p - t and (sigmoid(z) - t)/K; Model.backward passes from_logits).

    Weight gradient: Z is linear in W, and W[i, j, c, o] meets one input value per output pixel:

        dW[i, j, c, o] = sum_{n, oh, ow} dZ[n, oh, ow, o] * x[n, oh*SH + i - PT, ow*SW + j - PL, c]

    The x factor is X_col[(n, oh, ow), (i, j, c)], so this is dW_col = X_col^T @ dZ, one GEMM
    over the rows of X_col. Bias: db[o] = sum_{n, oh, ow} dZ[n, oh, ow, o] = 1^T @ dZ, computed as
    a GEMV with a vector of ones (on CuPy far faster than dZ.sum(axis=0) over a tall matrix; the
    same sum, but added in another order, so in float32 it rounds differently from sum(axis=0)).

    Input gradient: x[n, h, w, c] is copied into X_col once for every window that covers it, so
    its gradient is the sum over those copies: dX_col = dZ @ W_col^T, then dx = col2im(dX_col),
    which adds each patch's gradient back onto the pixels it was copied from (col2im is the
    adjoint of im2col; kernels/reference.py checks <im2col(x), c> = <x, col2im(c)>).

    With stride 1 the same sum is itself a convolution: x[n, h, w, c] meets W[i, j, c, o] in the
    output pixel (h - i + PT, w - j + PL), so

        dx[n, h, w, c] = sum_{i, j, o} dZ[n, h - i + PT, w - j + PL, o] * W[i, j, c, o]     (dZ = 0 outside)

    and with i' = KH-1-i, j' = KW-1-j this is

        dx[n, h, w, c] = sum_{i', j', o} dZ[n, h + i' - (KH-1-PT), w + j' - (KW-1-PL), o] * W_flip[i', j', o, c]
        W_flip[i', j', o, c] = W[KH-1-i', KW-1-j', c, o]

    an ordinary stride-1 convolution of dZ, zero-padded by KH-1-PT on top and KW-1-PL on the
    left, with the kernel flipped in space and its in/out channels swapped: the forward's own
    code, which the fast kernels use instead of building dX_col (KH*KW*C values per pixel).
    A 1x1 stride-1 kernel needs no im2col at all: Z = x @ W_col, dx = dZ @ W_col^T.

    We keep x, not X_col, for backward and rebuild X_col there: X_col is KH*KW (9x) larger than
    x, and for the 572x572 U-Net storing them all would take many gigabytes.

Where it runs. This file says what is computed; minitensor.kernels decides how. The three
products are ``kernels.conv2d_forward`` (Z, with b, and ReLU applied in the same pass),
``kernels.conv2d_kernel_grad`` (dW) and ``kernels.conv2d_input_grad`` (dx), each given the
layer's geometry (kernels.ConvGeometry). kernels/reference.py writes them as above in a few
lines each (im2col -> GEMM -> col2im; learning mode, ``MINITENSOR_KERNELS=reference``, runs
exactly that); the fast twins compute the same sums (kernels/conv_gemm.py in cache-sized pieces
on the CPU and in one cuBLAS product on the GPU, Winograd F(2x2, 3x3) and a direct convolution
on the CPU), and kernels/conv_policy.py picks one per product and shape. tests/test_layers.py
checks every path against central differences, the loops of kernels/naive.py and TensorFlow.
"""
from __future__ import annotations

import numpy as np

from .. import backend, kernels
from .activations import activation_backward, activation_forward, check_activation
from .base import Layer, check_padding, init_rng, normalize_pair, window_output_and_padding


def glorot_uniform(shape, rng, dtype):
    """Keras's default kernel initialiser: U(-limit, limit), limit = sqrt(6 / (fan_in + fan_out))."""
    receptive_field = int(np.prod(shape[:-2]))
    fan_in, fan_out = shape[-2] * receptive_field, shape[-1] * receptive_field
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


class Conv2D(Layer):
    """2-D convolution with Keras's constructor: ``Conv2D(64, (3, 3), (1, 1), 'valid', activation='relu')``.

    Args:
        filters: OC, the number of output channels.
        kernel_size: int or (KH, KW).
        strides: int or (SH, SW).
        padding: 'valid' (no padding) or 'same' (TensorFlow's rule, odd pixel at the bottom/right).
        activation: None, 'relu' or 'softmax' (over channels), fused into the layer as in Keras.
        use_bias: add a bias per output channel.
        seed: seed for this layer's glorot-uniform kernel; None draws from minitensor.set_seed's generator.
    """

    weight_names = ("kernel", "bias")
    can_skip_input_grad = True
    gradcheck_examples = {
        "conv2d": ({"filters": 4, "kernel_size": 3, "seed": 1}, [(7, 6, 3)]),
        "conv2d_same_stride2": ({"filters": 3, "kernel_size": 3, "strides": 2, "padding": "same", "seed": 1},
                                [(7, 8, 2)]),
        "conv2d_relu": ({"filters": 4, "kernel_size": 3, "padding": "same", "activation": "relu", "seed": 1},
                        [(5, 5, 2)]),
        "conv2d_softmax": ({"filters": 4, "kernel_size": 1, "activation": "softmax", "seed": 1}, [(5, 5, 3)]),
    }

    def __init__(self, filters, kernel_size, strides=1, padding="valid", activation=None, use_bias=True,
                 name=None, dtype="float32", seed=None):
        super().__init__(name=name, dtype=dtype)
        if not isinstance(filters, (int, np.integer)) or filters <= 0:
            raise ValueError(f"filters must be a positive int, got {filters!r}")
        self.filters = int(filters)
        self.kernel_size = normalize_pair(kernel_size, "kernel_size")
        self.strides = normalize_pair(strides, "strides")
        self.padding = check_padding(padding)
        self.activation = check_activation(activation)
        self.use_bias = bool(use_bias)
        self.seed = seed
        if not self.use_bias:
            self.weight_names = ("kernel",)

    def build(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"layer {self.name!r} expects (height, width, channels) inputs, got {input_shape}")
        super().build(input_shape)
        in_channels = input_shape[-1]
        kernel_h, kernel_w = self.kernel_size
        kernel = glorot_uniform((kernel_h, kernel_w, in_channels, self.filters), init_rng(self.seed), self.dtype)
        self.params = [kernel]
        if self.use_bias:
            self.params.append(np.zeros(self.filters, dtype=self.dtype))
        self.params = [backend.to_device(p, self.device) for p in self.params]
        xp = backend.get_array_module(*self.params)
        self.grads = [xp.zeros_like(p) for p in self.params]

    def _geometry(self, height, width):
        """The kernels.ConvGeometry of this layer for an input of height x width (Keras's padding rule)."""
        (kernel_h, kernel_w), (stride_h, stride_w) = self.kernel_size, self.strides
        out_h, pad_top, _ = window_output_and_padding(height, kernel_h, stride_h, self.padding)
        out_w, pad_left, _ = window_output_and_padding(width, kernel_w, stride_w, self.padding)
        if out_h <= 0 or out_w <= 0:
            raise ValueError(
                f"layer {self.name!r}: input of {height}x{width} is smaller than the {kernel_h}x{kernel_w} kernel "
                f"with 'valid' padding; use a larger input or padding='same'"
            )
        return kernels.ConvGeometry(kernel_h, kernel_w, stride_h, stride_w, pad_top, pad_left, out_h, out_w)

    def compute_output_shape(self, input_shape):
        geometry = self._geometry(input_shape[0], input_shape[1])
        return (geometry.out_h, geometry.out_w, self.filters)

    def forward(self, x):
        """x (N, H, W, C) -> y (N, OH, OW, OC): Z = conv(x, W) + b, y = activation(Z)."""
        self._check_input(x)
        if not self.built:
            self.build(x.shape[1:])
        geometry = self._geometry(x.shape[1], x.shape[2])
        bias = self.params[1] if self.use_bias else None
        relu = self.activation == "relu"
        z = kernels.conv2d_forward(x, self.params[0], bias, geometry, relu=relu)   # with ReLU: max(Z, 0) already
        y = z if relu else activation_forward(self.activation, z)
        # Softmax's logits are kept for losses that take logits (pre_activation); ReLU needs only y.
        self._cache = (x, y, z if self.activation == "softmax" else None, geometry)
        return y

    def backward(self, dy, from_logits=False, input_grad=True):
        """dy (N, OH, OW, OC) -> dx (N, H, W, C); fills self.grads = [dW, db].

        With ``from_logits=True``, dy is the gradient with respect to the pre-activation output Z
        (the logits) and the activation's backward is skipped: the loss started backward there
        (losses.py derives p - t and (sigmoid(z) - t)/K; docs/unet_backward.md, section 1, shows
        the three losses side by side; Model.backward passes the flag to the output layer).
        With ``input_grad=False`` dx is not computed (None is returned): nobody needs the
        gradient of the images fed to the first layer, and it costs as much as dW.
        """
        x, y, _, geometry = self._pop_cache()
        xp = backend.get_array_module(x, dy)
        dz = dy if from_logits else activation_backward(self.activation, dy, y)    # dZ = dL/dZ through f
        dz = xp.ascontiguousarray(dz)                                  # (N, OH, OW, OC), read by all three
        self.grads[0] = kernels.conv2d_kernel_grad(x, dz, geometry)    # dW = X_col^T @ dZ
        if self.use_bias:
            dz_matrix = dz.reshape(-1, self.filters)                   # dZ, one row per output pixel
            self.grads[1] = xp.ones(dz_matrix.shape[0], dtype=dz.dtype) @ dz_matrix     # db = 1^T @ dZ
        if not input_grad:
            return None
        return kernels.conv2d_input_grad(dz, self.params[0], x.shape, geometry)   # dx = col2im(dZ @ W_col^T)

    def pre_activation(self):
        """Z, the logits of the last forward, for losses that take logits (Keras's ``_keras_logits``)."""
        cache = getattr(self, "_cache", None)
        if cache is None:
            raise RuntimeError(f"layer {self.name!r}: no forward has been run")
        _, y, z, _ = cache
        if self.activation == "relu":
            raise ValueError(f"layer {self.name!r}: logits are kept only for a softmax or linear output layer")
        return y if self.activation is None else z

    def get_config(self):
        return {
            **super().get_config(), "filters": self.filters, "kernel_size": list(self.kernel_size),
            "strides": list(self.strides), "padding": self.padding, "activation": self.activation,
            "use_bias": self.use_bias,
        }
