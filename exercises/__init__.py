"""Exercises: write six backward passes (and one optimizer step) yourself, and check them.

    python -m exercises          # check all six, say which pass
    python -m exercises 3        # check exercise 3 only

Each ``exN_*.py`` here is a stub that raises NotImplementedError until you write it; its docstring
says what to compute, the shapes, and where in minitensor the same thing is derived. The checks
(``exercises/checks.py``) compare your code with minitensor's own layers, losses and optimizer,
and with central differences. Reference solutions are in ``exercises/solutions/`` (the test suite
checks them, so every exercise is known to be solvable): try first, look after. README.md has the
list and the order.
"""

# (number, module, what you write): the order to do them in.
EXERCISES = [
    (1, "ex1_conv_backward", "conv2d_backward: a stride-1 convolution's dx, dW, db as loops"),
    (2, "ex2_maxpool_routing", "maxpool2d_backward: route each window's gradient to its maximum"),
    (3, "ex3_softmax_cross_entropy", "softmax_cross_entropy: the loss and its gradient p - t"),
    (4, "ex4_strided_conv_dx", "col2im and conv2d_input_grad: a strided convolution's dx"),
    (5, "ex5_avgpool_layer", "AvgPool2D: a whole layer, forward and backward"),
    (6, "ex6_adam_step", "adam_step: one step of Adam, as Keras takes it"),
]
