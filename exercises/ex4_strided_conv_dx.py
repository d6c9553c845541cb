"""Exercise 4: a strided convolution's input gradient, through col2im.

A convolution is Z = im2col(x) @ W_col with W_col = w.reshape(KH*KW*C, F) (exercises/given.py
writes im2col). So dL/d(im2col(x)) = dZ @ W_col^T, a matrix of the same shape as im2col(x). Each
of its entries belongs to the pixel of x that im2col copied there (or to the padding), and a
pixel copied into several windows gets the sum of their gradients.

1. col2im(cols, x_shape, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w) -> dx (x_shape): add
   every entry of cols back onto the pixel im2col took it from; drop the entries that came from
   the padding. It is the adjoint (transpose) of im2col: <im2col(x), c> = <x, col2im(c)>.
2. conv2d_input_grad(dy, w, x_shape, stride, padding) -> dx for stride 1 or 2, 'valid' or 'same'
   (use given.geometry for the numbers): dZ @ W_col^T, then col2im.

With stride 2 and 'same' padding on an odd size, TensorFlow pads one more pixel at the bottom and
the right than at the top and left: geometry() returns only pad_top and pad_left, because the
bottom/right padding is whatever the windows reach past the edge, which col2im simply drops.
minitensor/layers/conv2d.py derives all this; docs/figures/ draws it.

Check: python -m exercises 4
"""
import numpy as np  # noqa: F401  (for your code)

from .given import geometry, im2col  # noqa: F401  (yours to use; the checks compare col2im with im2col)


def col2im(cols, x_shape, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w):
    """The adjoint of im2col: each entry of cols added back onto the pixel it was copied from."""
    raise NotImplementedError("exercise 4: write col2im in exercises/ex4_strided_conv_dx.py")


def conv2d_input_grad(dy, w, x_shape, stride, padding):
    """dL/dx of a convolution with kernel w (KH, KW, C, F), given dy = dL/dZ (N, OH, OW, F)."""
    raise NotImplementedError("exercise 4: write conv2d_input_grad in exercises/ex4_strided_conv_dx.py")
