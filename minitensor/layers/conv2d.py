"""Conv2D: a 2-D convolution as one matrix product (im2col + GEMM), forward and backward.

Shapes (Keras's layout): x (N, H, W, C), kernel W (KH, KW, C, OC) "HWIO", bias b (OC,),
output y (N, OH, OW, OC).

Forward
    im2col copies every KH x KW x C input patch into one row of a matrix, so the whole
    convolution becomes a single GEMM (the fast part, done by BLAS or cuBLAS):

        X_col = im2col(x)              (N*OH*OW, KH*KW*C)   one row per output pixel
        W_col = W.reshape(KH*KW*C, OC)                      HWIO already has this order:
                                                            a free reshape, no transpose
        Z     = X_col @ W_col + b      (N*OH*OW, OC)        reshaped to (N, OH, OW, OC)
        y     = activation(Z)

Backward, given dy = dL/dy. The code runs three things; here is where each comes from.

    dZ = dy * f'(Z), elementwise: for ReLU, dy where y > 0 (activations.py). A softmax output
    layer trained on logits gets dZ = dL/dZ straight from the loss and skips this step (losses.py
    derives p - t and (sigmoid(z) - t)/K; Model.backward passes from_logits).

    Written per element (x = 0 outside the image, SH = SW = stride, PT, PL = top and left padding):

        Z[n, oh, ow, o] = b[o] + sum_{i, j, c} x[n, oh*SH + i - PT, ow*SW + j - PL, c] * W[i, j, c, o]

    Weight gradient: Z is linear in W, and W[i, j, c, o] meets one input value per output pixel:

        dW[i, j, c, o] = sum_{n, oh, ow} dZ[n, oh, ow, o] * x[n, oh*SH + i - PT, ow*SW + j - PL, c]

    The x factor is X_col[(n, oh, ow), (i, j, c)], so this is dW_col = X_col^T @ dZ, one GEMM
    over the rows of X_col (rebuilt from x, see below). Bias: db[o] = sum_{n, oh, ow} dZ[n, oh, ow, o]
    = 1^T @ dZ, computed as a GEMV with a vector of ones (on CuPy far faster than dZ.sum(axis=0)
    over a tall matrix; the same numbers).

    Input gradient with stride 1 (every convolution of both U-Nets): x[n, h, w, c] meets
    W[i, j, c, o] in the output pixel (h - i + PT, w - j + PL), so

        dx[n, h, w, c] = sum_{i, j, o} dZ[n, h - i + PT, w - j + PL, o] * W[i, j, c, o]     (dZ = 0 outside)

    and with i' = KH-1-i, j' = KW-1-j this is

        dx[n, h, w, c] = sum_{i', j', o} dZ[n, h + i' - (KH-1-PT), w + j' - (KW-1-PL), o] * W_flip[i', j', o, c]
        W_flip[i', j', o, c] = W[KH-1-i', KW-1-j', c, o]

    an ordinary stride-1 convolution of dZ, zero-padded by KH-1-PT on top and KW-1-PL on the
    left, with the kernel flipped in space and its in/out channels swapped: the forward's own
    code, im2col(dZ) @ W_flip. A 1x1 kernel needs no im2col at all: dx = dZ @ W_col^T.

    Strided convolutions (none in the U-Nets) keep the textbook form: dX_col = dZ @ W_col^T,
    then dx = col2im(dX_col), which adds each patch's gradient back into the pixels it was
    copied from (the windows overlap). col2im is used only there; for stride 1 the flipped
    kernel does the same sum without building dX_col (KH*KW*C values per pixel), a third faster
    on the 128 px layers.

We keep x, not X_col, for backward and rebuild X_col there: X_col is KH*KW (9x) larger than x,
and for the 572x572 U-Net storing them all would take many gigabytes. On the CPU, X_col is not
even built whole: ``column_pieces`` builds it a band of output rows at a time, in the same small
reused scratch memory, so each piece is still in the cache when the matrix product reads it:
forward does its GEMM band by band into the output, and dW is the sum of the bands' X_col^T @ dZ
(the rows of X_col are independent, so only the order of dW's float sums changes). On the GPU it
is built whole, in one launch, and multiplied with ``@``. tests/test_layers.py checks every path
against central differences and TensorFlow.

The same three products, faster on the CPU. im2col + GEMM is the path to read; on the CPU the
wide, few-channel 3x3 layers (most of a U-Net's time) go instead to Winograd F(2x2, 3x3)
(kernels/cpu_winograd.py: the same Z, dW and, through the flipped kernel, dx, with 2.25x fewer
multiplications and no X_col), with bias and ReLU applied in the same pass. Which layer takes
which is ``_fast_algorithm`` (``prefers_winograd``), switched with kernels.set_conv_algorithm
('auto', 'winograd', 'direct', 'gemm') or MINITENSOR_CONV; tests/test_conv_algorithms.py
checks every choice against this file's GEMM path, central differences and TensorFlow.
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


#: On the CPU, X_col is built this many bytes at a time, so that it is still in the cache when
#: the matrix product reads it (the L3 cache of the machines we measure on holds 32 MiB).
CPU_PIECE_BYTES = 8 << 20


def _pieces(xp, n_images, out_h, row_bytes):
    """(first image, end image, first row, end row) of each piece of the output."""
    if xp is not np:
        return [(0, n_images, 0, out_h)]       # the GPU is fastest with one large launch per layer
    rows = max(1, CPU_PIECE_BYTES // row_bytes)
    if rows >= out_h:                          # whole images fit: take several at once
        images = rows // out_h
        return [(n, min(n + images, n_images), 0, out_h) for n in range(0, n_images, images)]
    return [(n, n + 1, row, min(row + rows, out_h)) for n in range(n_images) for row in range(0, out_h, rows)]


def column_pieces(x, kernel_size, strides, pad_top, pad_left, out_h, out_w):
    """Yield ``(images, rows, X_col piece)``: X_col in pieces, one band of output rows at a time.

    Each piece is im2col of just the input rows that band of output rows reads, built in the
    same reused scratch memory; ``x[images, rows]``-shaped slices of the output belong to it.
    Mathematically nothing changes: the rows of X_col are independent, so Z = X_col @ W_col can
    be computed band by band, and dW = X_col^T @ dZ is the sum over bands.
    """
    xp = backend.get_array_module(x)
    n_images, height, _, channels = x.shape
    (kernel_h, kernel_w), (stride_h, stride_w) = kernel_size, strides
    columns = kernel_h * kernel_w * channels
    for first, last, row_a, row_b in _pieces(xp, n_images, out_h, out_w * columns * x.dtype.itemsize):
        top = row_a * stride_h - pad_top                     # first input row read (may be padding)
        start, stop = max(top, 0), min(height, (row_b - 1) * stride_h - pad_top + kernel_h)
        scratch = backend.scratch_array(((last - first) * (row_b - row_a) * out_w, columns), x.dtype, x)
        cols = kernels.im2col(x[first:last, start:stop], kernel_h, kernel_w, stride_h, stride_w, start - top,
                              pad_left, row_b - row_a, out_w, out=scratch)
        yield slice(first, last), slice(row_a, row_b), cols


def convolve_as_gemm(x, kernel_size, strides, pad_top, pad_left, out_h, out_w, matrix):
    """im2col(x) @ matrix, piece by piece: (N, out_h, out_w, matrix.shape[1]).

    On the GPU there is one piece, and ``@`` writes a new result: CuPy sends ``matmul(out=)``
    through its slower general path, ``@`` straight to cuBLAS.
    """
    xp = backend.get_array_module(x, matrix)
    if xp is not np:
        ((_, _, cols),) = column_pieces(x, kernel_size, strides, pad_top, pad_left, out_h, out_w)
        return (cols @ matrix).reshape(x.shape[0], out_h, out_w, matrix.shape[1])
    out = xp.empty((x.shape[0], out_h, out_w, matrix.shape[1]), dtype=x.dtype)
    for images, rows, cols in column_pieces(x, kernel_size, strides, pad_top, pad_left, out_h, out_w):
        xp.matmul(cols, matrix, out=out[images, rows].reshape(-1, matrix.shape[1]))
    return out


#: Where ``conv_algorithm("auto")`` uses Winograd (see prefers_winograd).
WINOGRAD_MIN_PIXELS = 8192
WINOGRAD_MAX_CHANNEL_PRODUCT = {"forward": 512 * 512, "kernel_grad": 512 * 256}


def prefers_winograd(pixels, in_channels, out_channels, product="forward"):
    """Whether 'auto' gives one product of a 3x3 stride-1 layer to Winograd F(2x2, 3x3).

    ``pixels`` is N*OH*OW, the output pixels of the whole batch; ``product`` is "forward" (also
    used for dx, the same convolution with the channels swapped) or "kernel_grad" (dW).
    Measured per layer shape on the 2-core EPYC with ``python -m bench.conv_shapes``
    (docs/benchmarks.md, "Choosing the algorithm"): Winograd's 2.25x fewer multiplications win by
    1.4-2x on the wide layers (32-128 px at batch 16 in small_unet, 100-140 px at batch 1 in unet).
    Below 8192 output pixels in the batch its transforms and fixed costs are barely repaid (the
    forward still wins on some 16 px layers in isolation, but whole steps were no faster), and
    dW sweeps a 16 x C x OC partial sum every 4 tiles, which stops paying once that no longer
    fits the cache (above 512 x 256 channels); the forward holds only the transformed kernel,
    up to 512 x 512.
    """
    return pixels >= WINOGRAD_MIN_PIXELS and in_channels * out_channels <= WINOGRAD_MAX_CHANNEL_PRODUCT[product]


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
        """(out_h, out_w, pad_top, pad_left) for an input of this size."""
        (kernel_h, kernel_w), (stride_h, stride_w) = self.kernel_size, self.strides
        out_h, pad_top, _ = window_output_and_padding(height, kernel_h, stride_h, self.padding)
        out_w, pad_left, _ = window_output_and_padding(width, kernel_w, stride_w, self.padding)
        if out_h <= 0 or out_w <= 0:
            raise ValueError(
                f"layer {self.name!r}: input of {height}x{width} is smaller than the {kernel_h}x{kernel_w} kernel "
                f"with 'valid' padding; use a larger input or padding='same'"
            )
        return out_h, out_w, pad_top, pad_left

    def compute_output_shape(self, input_shape):
        out_h, out_w, _, _ = self._geometry(input_shape[0], input_shape[1])
        return (out_h, out_w, self.filters)

    def _is_pointwise(self):
        """A 1x1 conv with stride 1 is already a matrix product: each pixel is its own patch."""
        return self.kernel_size == (1, 1) and self.strides == (1, 1)

    def _fast_algorithm(self, x, out_h, out_w, product="forward"):
        """The CPU kernel this product runs instead of im2col + GEMM: 'winograd', 'direct' or None.

        ``product`` is "forward" (also for dx) or "kernel_grad". Set by kernels.set_conv_algorithm:
        'auto' (the default) gives Winograd to the 3x3 stride-1 products where it measured faster
        (``prefers_winograd``) and im2col + GEMM to the rest; 'winograd' gives it to every 3x3
        stride-1 layer; 'direct' sends every stride-1 layer to the direct kernel; 'gemm' keeps
        im2col + GEMM everywhere. Pointwise (1x1) layers, strided ones and the GPU always keep
        the matrix product."""
        choice = kernels.get_conv_algorithm()
        if choice == "gemm" or self.strides != (1, 1) or self._is_pointwise():
            return None
        if backend.get_array_module(x) is not np:
            return None
        if choice == "direct":
            return "direct"
        if self.kernel_size != (3, 3):
            return None
        pixels = x.shape[0] * out_h * out_w
        if choice == "winograd" or prefers_winograd(pixels, x.shape[-1], self.filters, product):
            return "winograd"
        return None

    def forward(self, x):
        """x (N, H, W, C) -> y (N, OH, OW, OC)."""
        self._check_input(x)
        if not self.built:
            self.build(x.shape[1:])
        geometry = self._geometry(x.shape[1], x.shape[2])
        out_h, out_w, pad_top, pad_left = geometry
        kernel_matrix = self.params[0].reshape(-1, self.filters)      # W_col, a free reshape of HWIO
        algorithm = self._fast_algorithm(x, out_h, out_w)
        if algorithm is not None:
            # The same sums without im2col (kernels/cpu_winograd.py, cpu_conv.py), bias and ReLU in one pass.
            bias = self.params[1] if self.use_bias else None
            z = kernels.conv2d_forward(x, self.params[0], bias, pad_top, pad_left, out_h, out_w,
                                       relu=self.activation == "relu", algorithm=algorithm)
            y = z if self.activation == "relu" else activation_forward(self.activation, z)
        else:
            if self._is_pointwise():
                z = (x.reshape(-1, x.shape[-1]) @ kernel_matrix).reshape(x.shape[0], out_h, out_w, self.filters)
            else:
                z = convolve_as_gemm(x, self.kernel_size, self.strides, pad_top, pad_left, out_h, out_w,
                                     kernel_matrix)
            if self.use_bias:
                z += self.params[1]
            if self.activation == "relu":
                y = backend.get_array_module(z).maximum(z, 0, out=z)   # z is ours: no second array
            else:
                y = activation_forward(self.activation, z)
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
        dz = dy if from_logits else activation_backward(self.activation, dy, y)
        dz = xp.ascontiguousarray(dz)                                  # (N, OH, OW, OC)
        dz_matrix = dz.reshape(-1, self.filters)                      # dZ, one row per output pixel
        kernel_matrix = self.params[0].reshape(-1, self.filters)
        kernel_grad_algorithm = self._fast_algorithm(x, geometry[0], geometry[1], "kernel_grad")
        self.grads[0] = self._kernel_gradient(x, dz, geometry, kernel_grad_algorithm).reshape(self.params[0].shape)
        if self.use_bias:
            # A GEMV with a ones vector: much faster than dz.sum(axis=0) on a tall matrix (CuPy).
            self.grads[1] = xp.ones(dz_matrix.shape[0], dtype=dz.dtype) @ dz_matrix
        if not input_grad:
            return None
        if self._is_pointwise():
            return (dz_matrix @ kernel_matrix.T).reshape(x.shape)
        if self.strides == (1, 1):
            # dx is a convolution whose output is x's own N x H x W pixels
            algorithm = self._fast_algorithm(x, x.shape[1], x.shape[2], "forward")
            return self._input_gradient_by_flipped_kernel(dz, x.shape, geometry, algorithm)
        dcols = dz_matrix @ kernel_matrix.T                               # dX_col = dZ @ W_col^T
        out_h, out_w, pad_top, pad_left = geometry
        return kernels.col2im(dcols, x.shape, *self.kernel_size, *self.strides, pad_top, pad_left, out_h, out_w)

    def _kernel_gradient(self, x, dz, geometry, algorithm):
        """dW_col = X_col^T @ dZ, summed piece by piece over the pieces of X_col (see column_pieces);
        or the same sums by a fast CPU kernel (``algorithm``), which never builds X_col."""
        if self._is_pointwise():
            return x.reshape(-1, x.shape[-1]).T @ dz.reshape(-1, self.filters)
        out_h, out_w, pad_top, pad_left = geometry
        if algorithm is not None:
            return kernels.conv2d_kernel_grad(x, dz, *self.kernel_size, pad_top, pad_left, algorithm=algorithm)
        grad = None
        for images, rows, cols in column_pieces(x, self.kernel_size, self.strides, pad_top, pad_left, out_h, out_w):
            piece = cols.T @ dz[images, rows].reshape(-1, self.filters)
            if grad is None:
                grad = piece
            else:
                grad += piece
        return grad

    def _input_gradient_by_flipped_kernel(self, dz, x_shape, geometry, algorithm):
        """Stride 1: dx = im2col(dZ, padded by K-1-P) @ W flipped in space, channels swapped
        (or that convolution by a fast CPU kernel)."""
        _, _, pad_top, pad_left = geometry
        kernel_h, kernel_w = self.kernel_size
        xp = backend.get_array_module(dz)
        flipped = xp.ascontiguousarray(self.params[0][::-1, ::-1].transpose(0, 1, 3, 2))   # (KH, KW, OC, C)
        if algorithm is not None:
            return kernels.conv2d_forward(dz, flipped, None, kernel_h - 1 - pad_top, kernel_w - 1 - pad_left,
                                          x_shape[1], x_shape[2], algorithm=algorithm)
        flipped = flipped.reshape(-1, x_shape[-1])
        return convolve_as_gemm(dz, self.kernel_size, (1, 1), kernel_h - 1 - pad_top, kernel_w - 1 - pad_left,
                                x_shape[1], x_shape[2], flipped)

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
