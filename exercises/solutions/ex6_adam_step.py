"""Solution to exercise 6: one Adam step (Keras's rule)."""
import numpy as np


def adam_step(param, grad, m, v, t, learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    m = beta_1 * m + (1 - beta_1) * grad
    v = beta_2 * v + (1 - beta_2) * grad ** 2
    lr_t = learning_rate * np.sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t)
    return param - lr_t * m / (np.sqrt(v) + epsilon), m, v
