"""Solution to exercise 3: softmax cross-entropy, dL/dz = (p - t) / P."""
import numpy as np


def softmax_cross_entropy(logits, targets):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    pixels = logits.size // logits.shape[-1]
    loss = -np.sum(targets * log_p) / pixels
    return loss, (np.exp(log_p) - targets) / pixels
