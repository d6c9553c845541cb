"""minitensor.optimizers.Adam: against live Keras, resuming from saved state, learning-rate changes, errors."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported

import numpy as np
import pytest

from minitensor import backend
from minitensor.optimizers import Adam

# A conv kernel, its bias and a dense weight: a few shapes, as a model's parameter list has.
SHAPES = [(3, 3, 2, 4), (4,), (5, 3)]


@pytest.fixture(scope="module")
def keras():
    pytest.importorskip("tensorflow")
    import keras

    return keras


def make_params(rng, dtype):
    return [rng.standard_normal(shape).astype(dtype) for shape in SHAPES]


def make_gradient_steps(rng, dtype, num_steps):
    # Gradients over a few orders of magnitude, so that epsilon matters for some entries.
    return [[(rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 1, shape)).astype(dtype) for shape in SHAPES]
            for _ in range(num_steps)]


def run_keras_adam(keras, params, gradient_steps, learning_rates):
    variables = [keras.Variable(p, dtype=p.dtype.name) for p in params]
    optimizer = keras.optimizers.Adam(learning_rate=learning_rates[0])
    for learning_rate, grads in zip(learning_rates, gradient_steps):
        optimizer.learning_rate = learning_rate
        optimizer.apply_gradients(zip(grads, variables))
    return [v.numpy() for v in variables]


def run_adam(optimizer, params, gradient_steps, learning_rates=None):
    for step, grads in enumerate(gradient_steps):
        if learning_rates is not None:
            optimizer.learning_rate = learning_rates[step]
        optimizer.step(params, grads)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_five_steps_match_keras(keras, dtype):
    rng = np.random.default_rng(0)
    initial = make_params(rng, dtype)
    gradient_steps = make_gradient_steps(rng, dtype, 5)
    expected = run_keras_adam(keras, initial, gradient_steps, [1e-3] * 5)

    params = [p.copy() for p in initial]
    optimizer = Adam()
    run_adam(optimizer, params, gradient_steps)
    assert optimizer.iterations == 5
    for param, start, keras_param in zip(params, initial, expected):
        assert param.dtype == dtype
        np.testing.assert_allclose(param, keras_param, rtol=1e-6)
        if dtype == np.float64:
            # The updates themselves (float32 rounding of param would swamp them in float32).
            np.testing.assert_allclose(param - start, keras_param - start, rtol=1e-6)


def test_learning_rate_change_takes_effect_as_in_keras(keras):
    rng = np.random.default_rng(1)
    initial = make_params(rng, np.float64)
    gradient_steps = make_gradient_steps(rng, np.float64, 5)
    learning_rates = [1e-3, 1e-3, 1e-2, 1e-2, 2e-4]  # as ReduceLROnPlateau or a warm-up would
    expected = run_keras_adam(keras, initial, gradient_steps, learning_rates)

    params = [p.copy() for p in initial]
    run_adam(Adam(), params, gradient_steps, learning_rates)
    for param, start, keras_param in zip(params, initial, expected):
        np.testing.assert_allclose(param - start, keras_param - start, rtol=1e-6)


def test_learning_rate_zero_leaves_params_unchanged_but_moves_the_moments():
    rng = np.random.default_rng(2)
    params = make_params(rng, np.float32)
    before = [p.copy() for p in params]
    optimizer = Adam(learning_rate=0.0)
    run_adam(optimizer, params, make_gradient_steps(rng, np.float32, 2))
    for param, start in zip(params, before):
        np.testing.assert_array_equal(param, start)
    assert optimizer.iterations == 2
    assert np.any(optimizer.get_state()["momentum_0"] != 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_resuming_from_state_is_bit_exact(tmp_path, dtype):
    rng = np.random.default_rng(3)
    initial = make_params(rng, dtype)
    gradient_steps = make_gradient_steps(rng, dtype, 6)

    uninterrupted = [p.copy() for p in initial]
    run_adam(Adam(learning_rate=3e-3), uninterrupted, gradient_steps)

    params = [p.copy() for p in initial]
    first = Adam(learning_rate=3e-3)
    run_adam(first, params, gradient_steps[:3])
    state = first.get_state()
    run_adam(first, [p.copy() for p in params], gradient_steps[3:])  # later steps must not touch `state`
    np.savez(tmp_path / "optimizer.npz", **state)  # through a file, as a checkpoint goes

    resumed = Adam()  # default hyperparameters: set_state brings back the saved ones
    with np.load(tmp_path / "optimizer.npz") as saved:
        resumed.set_state(saved)
    assert resumed.iterations == 3 and resumed.learning_rate == 3e-3
    run_adam(resumed, params, gradient_steps[3:])
    for param, reference in zip(params, uninterrupted):
        np.testing.assert_array_equal(param, reference)


def test_state_holds_numpy_copies_and_numbers():
    rng = np.random.default_rng(4)
    params = make_params(rng, np.float32)
    optimizer = Adam()
    assert optimizer.get_state() == {"iterations": 0, "learning_rate": 1e-3, "beta_1": 0.9, "beta_2": 0.999,
                                     "epsilon": 1e-7}
    run_adam(optimizer, params, make_gradient_steps(rng, np.float32, 1))
    state = optimizer.get_state()
    assert sorted(state) == sorted(["iterations", "learning_rate", "beta_1", "beta_2", "epsilon"]
                                   + [f"{kind}_{i}" for kind in ("momentum", "velocity") for i in range(3)])
    for i, param in enumerate(params):
        for kind in ("momentum", "velocity"):
            moment = state[f"{kind}_{i}"]
            assert type(moment) is np.ndarray and moment.shape == param.shape and moment.dtype == np.float32
            assert moment is not optimizer._momentums[i] and moment is not optimizer._velocities[i]


def test_set_state_onto_a_device_now():
    rng = np.random.default_rng(5)
    params = make_params(rng, np.float64)
    optimizer = Adam()
    run_adam(optimizer, params, make_gradient_steps(rng, np.float64, 1))
    restored = Adam()
    restored.set_state(optimizer.get_state(), device="cpu")
    for ours, theirs in zip(restored._momentums, optimizer._momentums):
        assert type(ours) is np.ndarray
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.gpu
def test_gpu_steps_match_cpu_and_state_moves_between_devices():
    rng = np.random.default_rng(7)
    cpu_params = make_params(rng, np.float32)
    gradient_steps = make_gradient_steps(rng, np.float32, 4)
    gpu_params = [backend.to_device(p, "gpu") for p in cpu_params]
    gpu_steps = [[backend.to_device(g, "gpu") for g in grads] for grads in gradient_steps]

    run_adam(Adam(), cpu_params, gradient_steps)
    gpu_optimizer = Adam()
    run_adam(gpu_optimizer, gpu_params, gpu_steps[:3])
    state = gpu_optimizer.get_state()
    assert all(type(value) is np.ndarray for key, value in state.items() if key.startswith(("momentum", "velocity")))

    resumed = Adam()
    resumed.set_state(state)  # NumPy moments, moved to the GPU by the next step
    resumed_params = [p.copy() for p in gpu_params]
    run_adam(resumed, resumed_params, gpu_steps[3:])
    assert all(backend.device_of(m) == "gpu" for m in resumed._momentums)
    run_adam(gpu_optimizer, gpu_params, gpu_steps[3:])
    for cpu_param, gpu_param, resumed_param in zip(cpu_params, gpu_params, resumed_params):
        np.testing.assert_array_equal(backend.to_numpy(resumed_param), backend.to_numpy(gpu_param))
        np.testing.assert_allclose(backend.to_numpy(gpu_param), cpu_param, rtol=1e-6)

    on_gpu_now = Adam()
    on_gpu_now.set_state(state, device="gpu")
    assert all(backend.device_of(v) == "gpu" for v in on_gpu_now._velocities)


def test_step_updates_the_given_arrays_in_place():
    rng = np.random.default_rng(6)
    params = make_params(rng, np.float32)
    same_objects = list(params)
    before = [p.copy() for p in params]
    Adam().step(params, make_gradient_steps(rng, np.float32, 1)[0])
    for param, original, start in zip(params, same_objects, before):
        assert param is original
        assert np.all(param != start)


def test_shape_and_dtype_mismatches_are_clear_errors():
    params = [np.zeros((3, 3)), np.zeros(4)]
    with pytest.raises(ValueError, match=r"parameter 1 has shape \(4,\) but its gradient has shape \(5,\)"):
        Adam().step(params, [np.zeros((3, 3)), np.zeros(5)])
    with pytest.raises(ValueError, match="2 parameters but 1 gradients"):
        Adam().step(params, [np.zeros((3, 3))])
    with pytest.raises(TypeError, match="parameter 0 is float64 but its gradient is float32"):
        Adam().step(params, [np.zeros((3, 3), np.float32), np.zeros(4)])

    optimizer = Adam()
    optimizer.step(params, [np.ones((3, 3)), np.ones(4)])
    with pytest.raises(ValueError, match="holds state for 2 parameters"):
        optimizer.step(params[:1], [np.ones((3, 3))])

    restored = Adam()
    restored.set_state(optimizer.get_state())
    with pytest.raises(ValueError, match="different model"):
        restored.step([np.zeros((3, 2)), np.zeros(4)], [np.ones((3, 2)), np.ones(4)])


def test_learning_rate_must_be_a_finite_non_negative_number():
    optimizer = Adam()
    optimizer.learning_rate = np.float32(5e-4)  # e.g. a value computed by a schedule
    assert optimizer.learning_rate == float(np.float32(5e-4)) and type(optimizer.learning_rate) is float
    for bad in (-1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="learning_rate"):
            optimizer.learning_rate = bad
