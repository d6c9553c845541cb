"""Optimizers: update parameter arrays in place from their gradients.

``opt.step(params, grads)`` takes two lists in the same order every call (a model's
``params`` and the matching ``grads``) and updates each parameter array in place, on its own
device. The optimizer's per-parameter state is matched by position in that list, as Keras
matches it by variable index.
"""
from __future__ import annotations

import math

import numpy as np

from . import kernels
from .backend import device_of, get_array_module, to_device, to_numpy


class Adam:
    """Adam with exactly Keras 3's update rule (keras/src/optimizers/adam.py).

    At step t = 1, 2, ... with gradient g, for every parameter:

        lr_t = learning_rate * sqrt(1 - beta_2^t) / (1 - beta_1^t)
        m += (g - m) (1 - beta_1)          i.e. m = beta_1 m + (1 - beta_1) g
        v += (g^2 - v) (1 - beta_2)        i.e. v = beta_2 v + (1 - beta_2) g^2
        param -= lr_t m / (sqrt(v) + epsilon)

    m and v start at zero, so early on they are biased towards zero by the factors
    (1 - beta_1^t) and (1 - beta_2^t); lr_t undoes both biases in one scalar. That is the
    original paper's "efficient version" (Kingma & Ba, section 2): epsilon is added to the
    square root of the *uncorrected* v, and the default epsilon is 1e-7.

    PyTorch's ``torch.optim.Adam`` differs: it bias-corrects v first and adds epsilon there,
    param -= lr m_hat / (sqrt(v_hat) + eps) with m_hat = m / (1 - beta_1^t) and
    v_hat = v / (1 - beta_2^t), and its default eps is 1e-8. Rewriting Keras's rule in
    PyTorch's form gives param -= lr m_hat / (sqrt(v_hat) + epsilon / sqrt(1 - beta_2^t)):
    Keras's effective epsilon is larger than its nominal one early on (about 32 times at
    step 1 with beta_2 = 0.999) and approaches it after a few thousand steps. The two only
    differ where sqrt(v_hat) is comparable to epsilon, i.e. for tiny gradients, but there they
    do, so the same hyperparameters do not give the same run in both frameworks.

    We reproduce Keras's arithmetic, not only its formula, so that a run tracks a Keras run
    to the last bit (on the CPU where tests/test_optimizers.py was written, five steps gave
    bit-identical parameters in float32 and float64). Two details matter:
    - lr_t is computed in the parameter's dtype from learning_rate, beta_1 and beta_2
      rounded to float32, because Keras keeps learning_rate in a float32 variable and
      ``ops.cast(0.999, "float64")`` goes through a float32 tensor. In float32,
      1 - 0.999 = 0.00099998713, so lr_t at step 1 is 6.6e-6 relatively off the exact value,
      in Keras and here; a float64 model gets the same float32-rounded hyperparameters.
    - the last line is evaluated as (m lr_t) / (sqrt(v) + epsilon), in that order.
    """

    def __init__(self, learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        self.learning_rate = learning_rate
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.iterations = 0
        # First and second moments, one pair per parameter, created at the first step
        # (or restored by set_state as NumPy arrays, moved to the parameter's device then).
        self._momentums = []
        self._velocities = []

    @property
    def learning_rate(self) -> float:
        return self._learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        value = float(value)
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"learning_rate must be a finite number >= 0, got {value}")
        self._learning_rate = value

    def step(self, params, grads, guard=None):
        """Apply one Adam update to every array in ``params``, in place.

        ``guard``, a scalar (on the parameters' device): where it is NaN or infinite, nothing
        changes. Model.train_step passes the loss, so a diverged step is never applied; on the
        GPU the fused kernel checks it without a read back to the host.
        """
        params, grads = list(params), list(grads)
        self._check(params, grads)
        if not self._momentums:
            self._momentums = [None] * len(params)
            self._velocities = [None] * len(params)
        t = self.iterations + 1
        for index, (param, grad) in enumerate(zip(params, grads)):
            m, v = self._moments(index, param)
            scalar = param.dtype.type
            # One call per parameter: on the GPU a single fused kernel (kernels/gpu.py).
            kernels.adam_update(param, grad, m, v, self._step_size(param.dtype, t), scalar(1 - self.beta_1),
                                scalar(1 - self.beta_2), scalar(self.epsilon), guard)
        self.iterations = t

    def _step_size(self, dtype, t):
        """lr_t = learning_rate sqrt(1 - beta_2^t) / (1 - beta_1^t), rounded as Keras rounds it.

        A NumPy scalar of the parameter's dtype; see the class docstring for the float32 detour.
        """
        def as_in_keras(value):
            return dtype.type(np.float32(value))

        t = dtype.type(t)
        return (as_in_keras(self.learning_rate) * np.sqrt(1 - as_in_keras(self.beta_2) ** t)
                / (1 - as_in_keras(self.beta_1) ** t))

    def get_state(self) -> dict:
        """Everything a resumed run needs to continue bit-exactly, as NumPy arrays and numbers.

        Keys: iterations, learning_rate, beta_1, beta_2, epsilon, and momentum_<i>, velocity_<i>
        for each parameter i once the moments exist. The arrays are copies on the CPU, so the
        dict can go straight to ``np.savez`` and later steps do not change it.
        """
        state = {
            "iterations": self.iterations,
            "learning_rate": self.learning_rate,
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
        }
        for index, (m, v) in enumerate(zip(self._momentums, self._velocities)):
            if m is not None:
                state[f"momentum_{index}"] = _host_copy(m)
                state[f"velocity_{index}"] = _host_copy(v)
        return state

    def set_state(self, state, device=None):
        """Restore what ``get_state`` returned (also a loaded ``np.savez`` file).

        The moments are copied, so stepping never changes ``state``. They stay on the CPU
        until the next ``step`` moves each one to its parameter's device, or go to ``device``
        ("cpu" or "gpu") now when it is given.
        """
        self.iterations = int(state["iterations"])
        self.learning_rate = float(state["learning_rate"])
        self.beta_1 = float(state["beta_1"])
        self.beta_2 = float(state["beta_2"])
        self.epsilon = float(state["epsilon"])
        count = sum(1 for key in state if key.startswith("momentum_"))
        self._momentums = [np.array(state[f"momentum_{index}"]) for index in range(count)]
        self._velocities = [np.array(state[f"velocity_{index}"]) for index in range(count)]
        if device is not None:
            self._momentums = [to_device(m, device) for m in self._momentums]
            self._velocities = [to_device(v, device) for v in self._velocities]

    def _moments(self, index, param):
        """The (m, v) pair of parameter ``index``, created or moved to match ``param``."""
        m, v = self._momentums[index], self._velocities[index]
        if m is None:
            xp = get_array_module(param)
            m, v = xp.zeros_like(param), xp.zeros_like(param)
        else:
            if m.shape != param.shape or m.dtype != param.dtype:
                raise ValueError(
                    f"optimizer state for parameter {index} is {m.dtype} {m.shape} but the parameter is "
                    f"{param.dtype} {param.shape}: was the state saved for a different model?"
                )
            device = device_of(param)
            m, v = to_device(m, device), to_device(v, device)
        self._momentums[index], self._velocities[index] = m, v
        return m, v

    def _check(self, params, grads):
        if len(params) != len(grads):
            raise ValueError(f"step() got {len(params)} parameters but {len(grads)} gradients")
        if self._momentums and len(self._momentums) != len(params):
            raise ValueError(
                f"this optimizer holds state for {len(self._momentums)} parameters but step() got "
                f"{len(params)}: use one optimizer per model, with the same parameter list every step"
            )
        for index, (param, grad) in enumerate(zip(params, grads)):
            if param.shape != grad.shape:
                raise ValueError(
                    f"parameter {index} has shape {param.shape} but its gradient has shape {grad.shape}"
                )
            if param.dtype != grad.dtype:
                raise TypeError(f"parameter {index} is {param.dtype} but its gradient is {grad.dtype}")
            if param.dtype.kind != "f":
                raise TypeError(f"parameter {index} is {param.dtype}; only floating-point parameters can be trained")

    def __repr__(self):
        return (
            f"Adam(learning_rate={self.learning_rate}, beta_1={self.beta_1}, beta_2={self.beta_2}, "
            f"epsilon={self.epsilon}, iterations={self.iterations})"
        )


def _host_copy(array):
    """A NumPy copy of ``array`` that later in-place updates cannot change."""
    host = to_numpy(array)
    return host.copy() if host is array else host
