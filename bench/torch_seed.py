"""The seed's two U-Nets in PyTorch, layer for layer, for the benchmark's PyTorch side.

Same layers, channel counts, paddings ('valid' 3x3 in ``torch_unet``, 'same' 3x3 in
``torch_small_unet``), crops (88/40/16/4 per side), nearest 2x upsampling and concatenation
order ([cropped encoder map, upsampled decoder map]) as bench/keras_seed.py and unet/models.py;
the modules carry the Keras layer names. Two differences are PyTorch's, not the network's:

* PyTorch tensors are NCHW; the benchmark keeps them in ``torch.channels_last`` memory format,
  which stores them NHWC underneath (the layout of minitensor and Keras) and is the fast path
  of PyTorch's CPU (oneDNN) and GPU (cuDNN) convolutions.
* ``forward`` returns the *logits* (the last 1x1 conv before its softmax): the benchmark trains on
  ``F.binary_cross_entropy_with_logits(logits, y)``, which is exactly what Keras 3 computes for
  the seed's ``BinaryCrossentropy()`` on a softmax output and what minitensor's
  ``BinaryCrossentropy(from_logits=True)`` computes (see minitensor/losses.py). ``probabilities``
  applies the softmax over channels, as the seed's model outputs.

The convolutions start as Keras's do (glorot-uniform kernels, zero biases), not with PyTorch's
default initialisation. ``set_keras_weights`` loads weights in Keras order (HWIO kernel, then bias, per conv) so a test
can check that this network computes the same function as the other two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CONV_NAMES = (
    "encoder_conv1_1", "encoder_conv1_2", "encoder_conv2_1", "encoder_conv2_2", "encoder_conv3_1",
    "encoder_conv3_2", "encoder_conv4_1", "encoder_conv4_2", "encoder_conv5_1", "encoder_conv5_2",
    "decoder_conv4_1", "decoder_conv4_2", "decoder_conv3_1", "decoder_conv3_2", "decoder_conv2_1",
    "decoder_conv2_2", "decoder_conv1_1", "decoder_conv1_2", "conv_softmax",
)


def _crop(x, c):
    """Keras's Cropping2D(((c, c), (c, c))) on an NCHW tensor."""
    return x if c == 0 else x[:, :, c:-c, c:-c]


def _up(x):
    """Keras's UpSampling2D((2, 2)): nearest neighbour, each pixel repeated 2x2."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


class _SeedUNet(nn.Module):
    """Shared wiring of both networks; the subclasses differ only in widths, padding and crops."""

    def __init__(self, widths, in_channels, num_classes, padding, crops):
        super().__init__()
        self.crops = crops
        e1, e2, e3, e4, e5 = widths
        specs = [  # (name, in, out) in the order the seed creates its layers (= Keras's weight order)
            ("encoder_conv1_1", in_channels, e1), ("encoder_conv1_2", e1, e1),
            ("encoder_conv2_1", e1, e2), ("encoder_conv2_2", e2, e2),
            ("encoder_conv3_1", e2, e3), ("encoder_conv3_2", e3, e3),
            ("encoder_conv4_1", e3, e4), ("encoder_conv4_2", e4, e4),
            ("encoder_conv5_1", e4, e5), ("encoder_conv5_2", e5, e5),
            ("decoder_conv4_1", e4 + e5, e4), ("decoder_conv4_2", e4, e4),
            ("decoder_conv3_1", e3 + e4, e3), ("decoder_conv3_2", e3, e3),
            ("decoder_conv2_1", e2 + e3, e2), ("decoder_conv2_2", e2, e2),
            ("decoder_conv1_1", e1 + e2, e1), ("decoder_conv1_2", e1, e1),
        ]
        for name, cin, cout in specs:
            self.add_module(name, nn.Conv2d(cin, cout, 3, 1, padding))
        self.conv_softmax = nn.Conv2d(e1, num_classes, 1, 1, 0)
        self.reset_parameters_as_keras()

    @torch.no_grad()
    def reset_parameters_as_keras(self):
        """Keras's Conv2D defaults: glorot-uniform kernels, zero biases (PyTorch's own default differs).

        PyTorch draws U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases, smaller than
        glorot's sqrt(6 / (fan_in + fan_out)); through 23 ReLU convs without normalisation that
        shrinks the activations and changes how the first Adam steps move the loss, so the three
        engines would not start from comparable networks.
        """
        for conv in self.convs():
            nn.init.xavier_uniform_(conv.weight)   # fan_in = C*KH*KW, fan_out = OC*KH*KW, as Keras
            nn.init.zeros_(conv.bias)

    def _block(self, x, *names):
        for name in names:
            x = F.relu(getattr(self, name)(x))
        return x

    def forward(self, x):
        """x (N, C, H, W) -> logits (N, num_classes, OH, OW), before the softmax."""
        c1, c2, c3, c4 = self.crops
        x1 = self._block(x, "encoder_conv1_1", "encoder_conv1_2")
        x2 = self._block(F.max_pool2d(x1, 2), "encoder_conv2_1", "encoder_conv2_2")
        x3 = self._block(F.max_pool2d(x2, 2), "encoder_conv3_1", "encoder_conv3_2")
        x4 = self._block(F.max_pool2d(x3, 2), "encoder_conv4_1", "encoder_conv4_2")
        x5 = self._block(F.max_pool2d(x4, 2), "encoder_conv5_1", "encoder_conv5_2")
        y = torch.cat([_crop(x4, c4), _up(x5)], dim=1)
        y = torch.cat([_crop(x3, c3), _up(self._block(y, "decoder_conv4_1", "decoder_conv4_2"))], dim=1)
        y = torch.cat([_crop(x2, c2), _up(self._block(y, "decoder_conv3_1", "decoder_conv3_2"))], dim=1)
        y = torch.cat([_crop(x1, c1), _up(self._block(y, "decoder_conv2_1", "decoder_conv2_2"))], dim=1)
        y = self._block(y, "decoder_conv1_1", "decoder_conv1_2")
        return self.conv_softmax(y)

    def probabilities(self, x):
        """The seed's model output: softmax over the class channels."""
        return torch.softmax(self.forward(x), dim=1)

    def convs(self):
        return [getattr(self, name) for name in CONV_NAMES]


def torch_unet(num_classes=21, base_filters=64, in_channels=3, crops=(88, 40, 16, 4)):
    """The original U-Net of the seed: 'valid' 3x3 convs, crops 88/40/16/4, 64..1024 channels.

    The crops do not depend on the input size: every valid size (572, 556, ..., 188) leaves the
    same margins (see unet.models.valid_unet_sizes).
    """
    f = base_filters
    return _SeedUNet((f, 2 * f, 4 * f, 8 * f, 16 * f), in_channels, num_classes, 0, tuple(crops))


def torch_small_unet(num_classes=4, base_filters=32, in_channels=3):
    """The seed's small U-Net: 'same' 3x3 convs (padding 1, as TF for an odd kernel), no crops, 32..256 channels."""
    f = base_filters
    return _SeedUNet((f, f, 2 * f, 4 * f, 8 * f), in_channels, num_classes, 1, (0, 0, 0, 0))


@torch.no_grad()
def set_keras_weights(model, weights):
    """Load Keras-ordered weights ([kernel HWIO, bias] per conv, as get_weights()) into ``model``."""
    weights = list(weights)
    convs = model.convs()
    if len(weights) != 2 * len(convs):
        raise ValueError(f"expected {2 * len(convs)} arrays (kernel and bias of {len(convs)} convs), got {len(weights)}")
    for i, conv in enumerate(convs):
        kernel, bias = weights[2 * i], weights[2 * i + 1]
        conv.weight.copy_(torch.as_tensor(kernel).permute(3, 2, 0, 1))   # HWIO -> OIHW
        conv.bias.copy_(torch.as_tensor(bias))
    return model


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
