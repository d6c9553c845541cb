"""The geometry of one convolution: what every convolution op takes instead of eight loose ints.

A window of a KH x KW kernel with strides (SH, SW) and zero padding ``pad_top`` / ``pad_left``
at output position (oh, ow) covers the input rows ``oh*SH - pad_top + i`` (i < KH) and columns
``ow*SW - pad_left + j`` (j < KW). The padding at the bottom and right is implied by the
output size: whatever the last window reads beyond the input is zero.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel size, strides, padding before the input, and output size of one convolution.

    ``layers.Conv2D`` works the padding and output size out from its ``padding`` argument
    (Keras's rule) and hands the result to the kernels; nothing here knows about 'same' or 'valid'.
    """

    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    pad_top: int
    pad_left: int
    out_h: int
    out_w: int

    def __post_init__(self):
        for name in ("kernel_h", "kernel_w", "stride_h", "stride_w", "out_h", "out_w", "pad_top", "pad_left"):
            value, minimum = getattr(self, name), 0 if name.startswith("pad") else 1
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"ConvGeometry: {name} must be an int >= {minimum}, got {value!r}")
            object.__setattr__(self, name, int(value))

    @property
    def window(self):
        """(kh, kw, sh, sw, pad_top, pad_left, out_h, out_w): the arguments of im2col and col2im."""
        return (self.kernel_h, self.kernel_w, self.stride_h, self.stride_w, self.pad_top, self.pad_left,
                self.out_h, self.out_w)

    @property
    def kernel_size(self):
        return self.kernel_h, self.kernel_w

    @property
    def unit_stride(self) -> bool:
        return (self.stride_h, self.stride_w) == (1, 1)

    @property
    def pointwise(self) -> bool:
        """A 1x1 kernel with stride 1: every pixel is its own patch, the convolution a plain matrix product."""
        return self.kernel_size == (1, 1) and self.unit_stride

    def flipped(self, height: int, width: int) -> "ConvGeometry":
        """The geometry of the input gradient of a stride-1 convolution as a convolution of dZ.

        dx[n, h, w, c] = sum_{i', j', o} dZ[n, h + i' - (KH-1-PT), w + j' - (KW-1-PL), o] * W_flip[i', j', o, c]
        (layers/conv2d.py derives it): stride 1, padding KH-1-PT and KW-1-PL, output x's own H x W.
        """
        if not self.unit_stride:
            raise ValueError(f"the flipped-kernel form of dx needs stride 1, got {self.stride_h}x{self.stride_w}")
        return ConvGeometry(self.kernel_h, self.kernel_w, 1, 1, self.kernel_h - 1 - self.pad_top,
                            self.kernel_w - 1 - self.pad_left, height, width)


def flip_kernel(kernel, xp):
    """W_flip[i', j', o, c] = W[KH-1-i', KW-1-j', c, o]: (KH, KW, C, OC) -> (KH, KW, OC, C), C-contiguous."""
    return xp.ascontiguousarray(kernel[::-1, ::-1].transpose(0, 1, 3, 2))
