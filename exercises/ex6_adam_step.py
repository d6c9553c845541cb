"""Exercise 6: one step of Adam, as Keras takes it.

At step t = 1, 2, ... with gradient g (t counts from 1; m and v start at zeros):

    m = beta_1 m + (1 - beta_1) g
    v = beta_2 v + (1 - beta_2) g^2
    lr_t = learning_rate * sqrt(1 - beta_2^t) / (1 - beta_1^t)
    param = param - lr_t m / (sqrt(v) + epsilon)

Return the new (param, m, v); do not change the arrays you are given. Before writing it: at
t = 1, what is the step, whatever the size of g? (docs/unet_backward.md section 4 prints it.)
lr_t undoes the bias of m and v towards their zero start; minitensor/optimizers.py says why
epsilon sits where it does and how PyTorch's Adam differs.

Check: python -m exercises 6   (against minitensor's Adam, over three steps)
"""
import numpy as np  # noqa: F401  (for your code)


def adam_step(param, grad, m, v, t, learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """One Adam update: returns (new param, new m, new v)."""
    raise NotImplementedError("exercise 6: write adam_step in exercises/ex6_adam_step.py")
