"""Losses with Keras's semantics and hand-written gradients.

Every loss maps a prediction ``y_pred`` of shape (..., K) (N, H, W, K for a U-Net: K values
per pixel) and a target ``y_true`` of the same shape to one number, in two steps, as Keras does:

1. a per-pixel loss ``l`` of shape (...,): the per-element loss averaged (binary
   cross-entropy) or summed (categorical cross-entropy) over the last axis K;
2. Keras's "sum_over_batch_size" reduction with an optional per-pixel ``sample_weight`` w:

       L = sum(w * l) / P        P = number of pixels = prod(y_pred.shape[:-1])

   (note: divided by P, not by sum(w); without a weight, w = 1 and L is the mean of l).

So every backward has the same outer factor, ``dL/dy_pred = (w / P)[..., None] * dl/dy_pred``,
and each class derives only ``dl/dy_pred`` for one pixel in its docstring.

``loss.forward(y_pred, y_true, sample_weight=None)`` returns L as a scalar on the inputs' device
(nothing is read back to the host: a training loop reads it when it needs it) and keeps its
inputs; ``loss(...)`` returns it as a Python float. ``loss.backward()`` returns dL/dy_pred with
y_pred's shape, dtype and device, and frees them.
"""
from __future__ import annotations

import functools

import numpy as np

from .backend import get_array_module

# keras.config.epsilon(): probabilities are clipped to [EPSILON, 1 - EPSILON] before the log.
EPSILON = 1e-7

_SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class Loss:
    """What every loss shares: input checks, the reduction, and the forward-to-backward cache.

    A subclass writes two methods for one pixel's loss l (over the last axis):
    ``_per_pixel_loss(xp, y_pred, y_true) -> l`` of shape y_pred.shape[:-1], and
    ``_per_pixel_gradient(xp, y_pred, y_true) -> dl/dy_pred``, a new array of y_pred's shape.
    """

    from_logits = False

    def __init__(self):
        self._cache = None

    def __call__(self, y_pred, y_true, sample_weight=None) -> float:
        """The loss as a Python float (on the GPU this waits for the device and copies one number)."""
        return float(self.forward(y_pred, y_true, sample_weight))

    def forward(self, y_pred, y_true, sample_weight=None):
        """L = sum(sample_weight * per_pixel_loss) / number_of_pixels, a scalar on the inputs' device.

        Nothing is read back to the host here: a training loop decides when it needs the number.
        """
        xp = get_array_module(y_pred, y_true, sample_weight)
        y_true, sample_weight = _check_inputs(y_pred, y_true, sample_weight)
        per_pixel = self._per_pixel_loss(xp, y_pred, y_true)
        if sample_weight is not None:
            per_pixel *= sample_weight
        num_pixels = per_pixel.size
        self._cache = (y_pred, y_true, sample_weight, num_pixels)
        return xp.sum(per_pixel) / num_pixels

    def clear_cache(self):
        """Drop the arrays ``forward`` kept for ``backward`` (after an evaluation, they only hold memory)."""
        self._cache = None

    def backward(self):
        """dL/dy_pred = (sample_weight / number_of_pixels)[..., None] * d per_pixel_loss / dy_pred."""
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward() needs a forward() first (and frees it)")
        y_pred, y_true, sample_weight, num_pixels = self._cache
        self._cache = None
        xp = get_array_module(y_pred)
        grad = self._per_pixel_gradient(xp, y_pred, y_true)
        if sample_weight is None:
            grad *= 1.0 / num_pixels
        else:
            grad *= (sample_weight / num_pixels)[..., None]
        return grad

    def _per_pixel_loss(self, xp, y_pred, y_true):
        """(N, H, W) loss per pixel; every loss defines its own."""
        raise NotImplementedError(f"{type(self).__name__} must define _per_pixel_loss")

    def _per_pixel_gradient(self, xp, y_pred, y_true):
        """d per_pixel_loss / d y_pred, shaped like y_pred; every loss defines its own."""
        raise NotImplementedError(f"{type(self).__name__} must define _per_pixel_gradient")

    def __repr__(self):
        return f"{type(self).__name__}(from_logits={self.from_logits})"


class BinaryCrossentropy(Loss):
    """Binary cross-entropy, averaged over the last axis (Keras's ``BinaryCrossentropy``).

    Each of the K channels is an independent yes/no question with target t in [0, 1].

    Probabilities (``from_logits=False``), as Keras: p is first clipped to [eps, 1 - eps]
    (eps = 1e-7), then

        l = mean_k -(t log p + (1 - t) log(1 - p))
        dl/dp = (1/K) (-t/p + (1 - t)/(1 - p)) = (1/K) (p - t) / (p (1 - p))

    times the derivative of the clip: 1 for eps <= p <= 1 - eps and 0 strictly outside.
    TensorFlow's clip_by_value is maximum(minimum(p, 1 - eps), eps), whose gradient goes to p
    on a tie, so p exactly at a bound still gets the gradient; we do the same
    (tests/test_losses.py compares against live TensorFlow at both bounds, in both dtypes).
    Hence p = 0 or p = 1 gives a finite loss (-log(1e-7) ~= 16.1) and zero gradient.

    Logits (``from_logits=True``): p = sigmoid(z), and with
    log sigmoid(z) = -log(1 + e^-z) and log(1 - sigmoid(z)) = -z - log(1 + e^-z),

        l = mean_k log(1 + e^-z) + (1 - t) z = mean_k max(z, 0) - z t + log1p(e^-|z|)
        dl/dz = (1/K) (sigmoid(z) - t)

    The right-hand form (also TensorFlow's) only ever exponentiates -|z| <= 0, so it neither
    overflows nor loses log(1 + tiny) to rounding, and it needs no clipping.

    Keras uses the logits behind your back. With Keras 3 on the TensorFlow backend (checked
    with Keras 3.15.1 and TF 2.21), ``keras.activations.softmax`` and ``keras.ops.softmax`` (so
    also any layer built with ``activation="softmax"``, like the post's final
    ``Conv2D(..., activation="softmax")``) store their input on the output tensor as
    ``output._keras_logits``; so do the sigmoids. ``binary_crossentropy`` in
    keras/src/backend/tensorflow/nn.py calls ``_get_logits(output, from_logits, "Sigmoid", ...)``,
    which looks for that attribute first, whatever activation put it there, and if present
    swaps the probabilities for the logits and sets from_logits=True: the result is
    ``tf.nn.sigmoid_cross_entropy_with_logits`` of the *pre-softmax* logits. (Its other test,
    on the graph op's type, only fires for an op literally named "Sigmoid".) The attribute sits
    on that one Python tensor object, so anything that makes a new tensor drops it: tf.identity,
    tf.cast (including the cast in ``Loss.__call__`` when y_pred's dtype differs from the loss's
    dtype), a round trip through NumPy; ``tf.nn.softmax`` never sets it. Then, and only then,
    Keras falls back to the clipped probabilities. Inside ``model.compile(loss=
    BinaryCrossentropy())`` (or ``loss="binary_crossentropy"``) followed by ``fit``,
    ``train_on_batch`` or ``evaluate``, the model's output is the activation's own tensor, with
    or without XLA, so the loss Keras reports and differentiates is sigmoid-BCE of the logits,
    with gradient (sigmoid(z) - t)/K: every channel is trained as an independent sigmoid and
    the softmax is bypassed entirely. tests/test_losses.py checks all of this live.

    So code that compiles ``loss=BinaryCrossentropy()`` on a softmax output trains on
    ``BinaryCrossentropy(from_logits=True)`` applied to the logits, while the same code read
    literally means ``BinaryCrossentropy()`` on the softmax probabilities; the two give
    different numbers and different gradients. minitensor offers both readings and hides
    nothing: the lesson is that a loss should be handed logits, explicitly.
    """

    def __init__(self, from_logits=False):
        super().__init__()
        self.from_logits = bool(from_logits)

    def _per_pixel_loss(self, xp, y_pred, y_true):
        if self.from_logits:
            z = y_pred
            elementwise = xp.maximum(z, 0) - z * y_true + xp.log1p(xp.exp(-xp.abs(z)))
        else:
            p = _clip_probabilities(xp, y_pred)
            elementwise = -(y_true * xp.log(p) + (1 - y_true) * xp.log(1 - p))
        return xp.mean(elementwise, axis=-1)

    def _per_pixel_gradient(self, xp, y_pred, y_true):
        if self.from_logits:
            grad = _sigmoid(xp, y_pred) - y_true
        else:
            p = _clip_probabilities(xp, y_pred)
            grad = (p - y_true) / (p * (1 - p))
            grad *= _inside_clip_range(y_pred)
        grad /= y_pred.shape[-1]
        return grad


class CategoricalCrossentropy(Loss):
    """Categorical cross-entropy, summed over the last axis (Keras's ``CategoricalCrossentropy``).

    Probabilities (``from_logits=False``), exactly as Keras's TensorFlow backend computes it:
    renormalise by the sum s = sum_k p_k (so rows that do not sum to 1 still give a
    distribution), clip to [eps, 1 - eps], and

        q = p / s,    l = -sum_k t_k log clip(q_k)

    The gradient goes through the clip and then the normalisation. Through the clip,
    a_k = dl/dq_k = -t_k / clip(q_k) where eps <= q_k <= 1 - eps, else 0 (ties pass, as in
    BinaryCrossentropy). Through the normalisation, dq_j/dp_k = (delta_jk - q_j) / s, so

        dl/dp_k = sum_j a_j (delta_jk - q_j) / s = (a_k - sum_j a_j q_j) / s

    A pixel whose K = 1 has q = 1 > 1 - eps, a constant loss and zero gradient.

    Logits (``from_logits=True``): the log-softmax cross-entropy, computed exactly as
    SoftmaxCrossEntropy (see there for the derivation and why it is the better choice).
    """

    def __init__(self, from_logits=False):
        super().__init__()
        self.from_logits = bool(from_logits)

    def _per_pixel_loss(self, xp, y_pred, y_true):
        if self.from_logits:
            return _softmax_cross_entropy(xp, y_pred, y_true)
        q = y_pred / xp.sum(y_pred, axis=-1, keepdims=True)
        return -xp.sum(y_true * xp.log(_clip_probabilities(xp, q)), axis=-1)

    def _per_pixel_gradient(self, xp, y_pred, y_true):
        if self.from_logits:
            return _softmax_cross_entropy_gradient(xp, y_pred, y_true)
        total = xp.sum(y_pred, axis=-1, keepdims=True)
        q = y_pred / total
        dl_dq = -y_true / _clip_probabilities(xp, q)
        dl_dq *= _inside_clip_range(q)
        grad = dl_dq - xp.sum(dl_dq * q, axis=-1, keepdims=True)
        grad /= total
        return grad


class SoftmaxCrossEntropy(Loss):
    """Softmax and categorical cross-entropy fused into one loss on logits z.

    With p = softmax(z) and log p_k = z_k - logsumexp(z), where
    logsumexp(z) = m + log sum_j exp(z_j - m) and m = max_j z_j (so no exp overflows):

        l = -sum_k t_k log p_k = -sum_k t_k z_k + (sum_k t_k) logsumexp(z)
        dl/dz_k = -t_k + (sum_j t_j) p_k = p_k - t_k     for a one-hot (or any summing-to-1) t

    That is the whole backward: ``softmax - onehot`` (we keep the factor sum_j t_j, which is 1
    for the targets a segmentation mask gives, so the gradient stays exact for any target;
    TensorFlow's fused op returns p - t and is only right when t sums to 1).

    Why fuse instead of chaining a Softmax layer and CategoricalCrossentropy on probabilities?
    - The chain's backward multiplies dl/dp = -t/p by the K x K softmax Jacobian
      p_k (delta_ki - p_i); the product collapses to p - t, so fused we never form either.
    - No division by tiny probabilities: the chain computes t/p. For a confidently wrong
      pixel p underflows (in float32, once the logits differ by ~104), so t/p = inf and
      inf * 0 in the Jacobian gives nan; with Keras's clip at 1e-7 instead, the clip's zero
      gradient silences exactly the pixels that most need to learn.
    - Numerically stable: log p comes from z - logsumexp(z), never from log(exp(...)), so a
      probability that underflows to 0 still has a finite, exact log and loss.
    - One pass: one exp, one sum and one log per pixel forward, one subtraction backward.

    ``from_logits`` is always True. Same numbers as CategoricalCrossentropy(from_logits=True).
    """

    from_logits = True

    def _per_pixel_loss(self, xp, y_pred, y_true):
        return _softmax_cross_entropy(xp, y_pred, y_true)

    def _per_pixel_gradient(self, xp, y_pred, y_true):
        return _softmax_cross_entropy_gradient(xp, y_pred, y_true)


def _softmax_cross_entropy(xp, logits, target):
    """-sum_k t_k log softmax(z)_k over the last axis, via log-sum-exp."""
    return -xp.sum(target * _log_softmax(xp, logits), axis=-1)


def _softmax_cross_entropy_gradient(xp, logits, target):
    """(sum_j t_j) softmax(z) - t: the gradient of _softmax_cross_entropy (p - t for one-hot t)."""
    grad = xp.exp(_log_softmax(xp, logits))
    grad *= xp.sum(target, axis=-1, keepdims=True)
    grad -= target
    return grad


def _log_softmax(xp, z):
    shifted = z - xp.max(z, axis=-1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))


def _sigmoid(xp, z):
    # exp(-|z|) is in (0, 1], so neither branch can overflow.
    e = xp.exp(-xp.abs(z))
    return xp.where(z >= 0, 1 / (1 + e), e / (1 + e))


def _clip_bounds(dtype):
    """[EPSILON, 1 - EPSILON] rounded to the array's dtype, as TensorFlow rounds the clip bounds."""
    return dtype.type(EPSILON), dtype.type(1.0 - EPSILON)


def _clip_probabilities(xp, p):
    low, high = _clip_bounds(p.dtype)
    return xp.clip(p, low, high)


def _inside_clip_range(p):
    """1 where the clip lets the gradient through (bounds included), 0 where it was active."""
    low, high = _clip_bounds(p.dtype)
    return (p >= low) & (p <= high)


def _check_inputs(y_pred, y_true, sample_weight):
    """Validate shapes and dtypes; return y_true and sample_weight cast to y_pred's dtype."""
    for name, array in (("y_pred", y_pred), ("y_true", y_true)):
        if not hasattr(array, "shape") or not hasattr(array, "dtype"):
            raise TypeError(f"{name} must be a NumPy or CuPy array, got {type(array).__name__}")
    if y_pred.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"y_pred must be float32 or float64, got {y_pred.dtype} (cast it first)")
    if y_pred.ndim == 0 or y_pred.size == 0:
        raise ValueError(f"y_pred must have a last (class) axis and at least one element, got shape {y_pred.shape}")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_pred has shape {y_pred.shape}; they must match")
    y_true = y_true.astype(y_pred.dtype, copy=False)
    if sample_weight is not None:
        if not hasattr(sample_weight, "shape"):
            raise TypeError(f"sample_weight must be an array, got {type(sample_weight).__name__}")
        if sample_weight.shape != y_pred.shape[:-1]:
            raise ValueError(
                f"sample_weight has shape {sample_weight.shape} but must be one weight per pixel, "
                f"y_pred.shape[:-1] = {y_pred.shape[:-1]}"
            )
        sample_weight = sample_weight.astype(y_pred.dtype, copy=False)
    return y_true, sample_weight


_BY_NAME = {
    "bce": BinaryCrossentropy,
    "binary_crossentropy": BinaryCrossentropy,
    "bce_logits": functools.partial(BinaryCrossentropy, from_logits=True),
    "categorical_crossentropy": CategoricalCrossentropy,
    "softmax_cross_entropy": SoftmaxCrossEntropy,
}


def get(name):
    """A new loss from its name (see ``_BY_NAME``); a Loss instance is returned as it is."""
    if isinstance(name, Loss):
        return name
    try:
        return _BY_NAME[str(name).lower()]()
    except KeyError:
        raise ValueError(f"unknown loss {name!r}: expected one of {', '.join(sorted(_BY_NAME))}") from None
