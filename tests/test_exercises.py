"""The exercises (exercises/, python -m exercises): every reference solution passes its check, every
stub is reported as not written yet, and each check fails a plausible wrong answer."""
import importlib
import subprocess
import sys
import types

import numpy as np
import pytest

from exercises import EXERCISES
from exercises.__main__ import main, run

MODULES = [name for _, name, _ in EXERCISES]


def solution(name):
    return importlib.import_module(f"exercises.solutions.{name}")


def variant(name, **replacements):
    """The solution module with some of its functions (or classes) replaced: a wrong answer."""
    module = types.ModuleType(f"wrong_{name}")
    module.__dict__.update(vars(solution(name)))
    module.__dict__.update(replacements)
    return module


@pytest.mark.parametrize("name", MODULES)
def test_every_solution_passes_its_check(name):
    assert run(0, name, "exercises.solutions") == ("passed", "")


@pytest.mark.parametrize("name", MODULES)
def test_every_stub_is_not_written_yet(name):
    status, detail = run(0, name)
    assert status == "not written yet" and "exercise" in detail


def scaled_first(function, factor=1.01):
    def wrong(*args, **kwargs):
        out = function(*args, **kwargs)
        return (out[0] * factor, *out[1:]) if isinstance(out, tuple) else out * factor
    return wrong


def wrong_answers():
    conv, pool, ce, strided, avg, adam = (solution(n) for n in MODULES)

    def last_max_on_ties(x, dy):
        flipped = pool.maxpool2d_backward(x[:, ::-1, ::-1, :], dy[:, ::-1, ::-1, :])   # argmax from the other end
        return flipped[:, ::-1, ::-1, :]

    def without_the_mean(logits, targets):
        loss, grad = ce.softmax_cross_entropy(logits, targets)
        return loss, grad * (logits.size // logits.shape[-1])

    def overflowing(logits, targets):
        p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        return -np.sum(targets * np.log(p)) / (logits.size // logits.shape[-1]), (p - targets) / (logits.size // 5)

    def keeps_the_padding_rows(cols, x_shape, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w):
        return strided.col2im(cols, x_shape, kh, kw, sh, sw, 0, 0, out_h, out_w)        # ignores the padding

    class HalfTheGradient(avg.AvgPool2D):
        def backward(self, dy):
            return super().backward(dy) / 2

    def no_bias_correction(param, grad, m, v, t, learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        m = beta_1 * m + (1 - beta_1) * grad
        v = beta_2 * v + (1 - beta_2) * grad ** 2
        return param - learning_rate * m / (np.sqrt(v) + epsilon), m, v

    return [
        ("ex1_conv_backward", dict(conv2d_backward=scaled_first(conv.conv2d_backward))),
        ("ex2_maxpool_routing", dict(maxpool2d_backward=last_max_on_ties)),
        ("ex2_maxpool_routing", dict(maxpool2d_backward=scaled_first(pool.maxpool2d_backward))),
        ("ex3_softmax_cross_entropy", dict(softmax_cross_entropy=without_the_mean)),
        ("ex3_softmax_cross_entropy", dict(softmax_cross_entropy=overflowing)),
        ("ex4_strided_conv_dx", dict(col2im=keeps_the_padding_rows)),
        ("ex4_strided_conv_dx", dict(conv2d_input_grad=scaled_first(strided.conv2d_input_grad))),
        ("ex5_avgpool_layer", dict(AvgPool2D=HalfTheGradient)),
        ("ex6_adam_step", dict(adam_step=no_bias_correction)),
    ]


@pytest.mark.parametrize("case", range(9))
def test_each_check_fails_a_wrong_answer(case, monkeypatch):
    name, replacements = wrong_answers()[case]
    from exercises import checks

    with pytest.raises(AssertionError):
        getattr(checks, f"check_{name}")(variant(name, **replacements))


def test_the_command_lists_every_exercise_with_its_status(capsys):
    assert main([]) == 1                                    # the stubs: nothing passes yet
    out = capsys.readouterr().out
    assert out.count("not written yet") == len(EXERCISES) and "0 of 6 pass" in out
    assert main(["2", "--solutions"]) == 0
    assert "2. maxpool2d_backward" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main(["9"])
    assert exited.value.code == 2


def test_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "exercises", "--solutions"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 of 6 pass" in done.stdout
