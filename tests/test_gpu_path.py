"""The GPU path as a whole: what one training step costs the device, train.py end to end, the setup check.

The ``gpu`` tests run on a real GPU where one is usable and on the strict CPU stand-in for CuPy
(tests/cupy_standin.py) elsewhere, as CI does; the setup-check tests build broken CuPys on purpose.
"""
import types

import numpy as np
import pytest

import cupy_standin
import train
from minitensor import backend, set_seed
from minitensor.losses import BinaryCrossentropy
from minitensor.optimizers import Adam
from unet import small_unet


def batch(seed=0, size=32, count=2):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (count, size, size, 3)).astype(np.float32)
    y = np.eye(4, dtype=np.float32)[rng.integers(0, 4, (count, size, size))]
    return x, y


# ----- the stand-in is strict where CuPy is -------------------------------------------------------------

@pytest.mark.gpu
def test_the_standin_refuses_what_cupy_refuses(gpu_backend):
    if gpu_backend is None:
        pytest.skip("a real GPU: these are the stand-in's own checks")
    cupy = gpu_backend
    device = cupy.zeros((2, 3), cupy.float32)
    with pytest.raises(TypeError, match="Unsupported type"):
        device + np.ones((2, 3), np.float32)
    with pytest.raises(TypeError, match="Unsupported type"):
        np.ones((2, 3), np.float32) + device
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array"):
        np.asarray(device)
    with pytest.raises(AttributeError, match="no attribute 'nan_to_num_plus'"):
        cupy.nan_to_num_plus
    with pytest.raises(AttributeError, match="no attribute 'tolist_twice'"):
        device.tolist_twice()
    assert "ndarray" in cupy.MODULE_NAMES and "zeros" in cupy.MODULE_NAMES


@pytest.mark.gpu
def test_the_standin_counts_reads_of_device_memory(gpu_backend):
    if gpu_backend is None:
        pytest.skip("a real GPU: these are the stand-in's own checks")
    cupy = gpu_backend
    device = cupy.asarray(np.arange(6, dtype=np.float32))
    total = device.sum()
    assert isinstance(total, cupy.ndarray) and total.shape == ()       # reductions stay on the device
    assert cupy.COUNTS["syncs"] == 0
    assert float(total) == 15.0
    assert cupy.COUNTS["syncs"] == 1 and cupy.COUNTS["to_host"] == 1 and cupy.COUNTS["to_device"] == 1
    before = cupy.COUNTS["calls"]
    device.reshape(2, 3)[0]                                            # views launch nothing
    assert cupy.COUNTS["calls"] == before


def test_the_standin_allows_only_names_that_cupy_13_and_14_both_have():
    """cupy_names.txt (13.6, the gpu-cuda12 extra's) and cupy_names_14.txt (14.2, what the GPU machine has):
    a name of one of them only is an AttributeError that says which CuPy lacks it."""
    versions = cupy_standin._NAMES_BY_VERSION
    assert list(versions) == ["13.6.0", "14.2.0"]
    assert all(len(names["cupy"]) > 400 and len(names["cupy.ndarray"]) > 50 for names in versions.values())
    assert "sparse" in versions["13.6.0"]["cupy"] and "sparse" not in versions["14.2.0"]["cupy"]
    with pytest.raises(AttributeError, match=r"'sparse' \(CuPy 14.2.0 lacks it\)"):
        cupy_standin.sparse
    with pytest.raises(AttributeError, match=r"'mT' \(CuPy 13.6.0 lacks it\)"):
        cupy_standin.asarray(np.zeros((2, 2), np.float32)).mT
    used = {"cupy.cuda.runtime": ("getDevice", "getDeviceCount", "getDeviceProperties"),   # by backend, gpu.py
            "cupy._core._routines_linalg": ("set_compute_type", "COMPUTE_TYPE_TF32", "COMPUTE_TYPE_DEFAULT")}
    for section, names in used.items():
        for name in names:
            assert all(name in version[section] for version in versions.values()), (section, name)


@pytest.mark.gpu
def test_each_device_gets_its_own_compiled_kernels(gpu_backend, monkeypatch):
    """gpu.PROGRAM.module is keyed by device: a module's kernels belong to the device it was loaded on (the stand-in
    refuses a launch anywhere else, as a CUDA function handle does), so one rank per GPU, or one process
    switching devices, runs each device's own copy."""
    from minitensor.kernels import gpu, reference

    cupy = backend.cupy_module()
    if gpu_backend is not None:
        monkeypatch.setattr(gpu_backend, "DEVICE_COUNT", 2)
    elif cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("one GPU here; the stand-in checks this with two devices")
    x = np.arange(2 * 3 * 3 * 2, dtype=np.float32).reshape(2, 3, 3, 2)
    for device in (0, 1, 0):
        with cupy.cuda.Device(device):
            np.testing.assert_array_equal(gpu.upsample_forward(cupy.asarray(x), 2, 2).get(),
                                          reference.upsample_forward(x, 2, 2))
    assert gpu.PROGRAM.module("float", 0) is not gpu.PROGRAM.module("float", 1)
    if gpu_backend is not None:
        assert [gpu.PROGRAM.module("float", device).device_id for device in (0, 1)] == [0, 1]
        with pytest.raises(gpu_backend.cuda.runtime.CUDARuntimeError, match="invalid device ordinal"):
            gpu_backend.cuda.Device(2).use()


# ----- one training step on the device ---------------------------------------------------------------------

# The budget of one small_unet train_on_batch (32x32, batch 2, bce-logits), counted on the stand-in:
# 107 kernel launches (53 im2col, 16 pooling/upsampling, 38 fused Adam updates), the GEMMs, the
# bias, ReLU and loss elementwise operations and their allocations came to 407 when this was written.
DEVICE_CALLS_PER_STEP = 410


@pytest.mark.gpu
def test_one_training_step_reads_the_device_once(gpu_backend):
    if gpu_backend is None:
        pytest.skip("counted on the stand-in")
    set_seed(0)
    model = small_unet((32, 32, 3)).compile(Adam(1e-3), BinaryCrossentropy(from_logits=True)).to("gpu")
    x, y = batch()
    labels = y.argmax(-1).astype(np.uint8)       # class indices: 1 byte a pixel instead of 16
    model.train_on_batch(x, labels)              # the first step creates Adam's moments
    gpu_backend.reset_counts()
    loss = model.train_on_batch(x, labels)
    counts = gpu_backend.COUNTS
    assert np.isfinite(loss)
    assert counts["syncs"] == 1 and counts["to_host"] == 1 and counts["bytes_to_host"] == 4   # the loss, float32
    assert counts["to_device"] == 2 and counts["bytes_to_device"] == x.nbytes + labels.nbytes  # the batch
    assert counts["launches"] == 53 + 16 + 38
    assert counts["calls"] <= DEVICE_CALLS_PER_STEP, dict(counts)


@pytest.mark.gpu
def test_a_train_step_does_not_wait_for_the_device(gpu_backend):
    if gpu_backend is None:
        pytest.skip("counted on the stand-in")
    set_seed(0)
    model = small_unet((32, 32, 3), base_filters=2).compile(Adam(1e-3), BinaryCrossentropy(from_logits=True)).to("gpu")
    x, y = batch()
    gpu_backend.reset_counts()
    losses = [model.train_step(x, y.argmax(-1).astype(np.uint8)) for _ in range(3)]
    assert gpu_backend.COUNTS["syncs"] == 0 and gpu_backend.COUNTS["to_host"] == 0
    assert all(isinstance(loss, gpu_backend.ndarray) for loss in losses)


@pytest.mark.gpu
def test_the_training_loop_reads_the_losses_eight_batches_at_a_time(gpu_backend, tmp_path):
    if gpu_backend is None:
        pytest.skip("counted on the stand-in")
    syncs = []
    argv = ["--device", "gpu", "--num-images", "44", "--num-val", "4", "--num-test", "4", "--image-size", "32",
            "--batch-size", "4", "--epochs", "1", "--quiet", "--data", str(tmp_path / "shape"),
            "--weights-dir", str(tmp_path / "w"), "--results-dir", str(tmp_path / "r")]
    assert train.main(argv, on_batch_end=lambda trainer: syncs.append(gpu_backend.COUNTS["syncs"])) == 0
    assert len(syncs) == 9                                       # 36 training images in batches of 4
    # no read in batches 1-7, one for the eight losses at batch 8, one for the last at the epoch's end
    assert syncs[6] == syncs[0] and syncs[7] == syncs[6] + 1 and syncs[8] == syncs[7] + 1


@pytest.mark.gpu
def test_training_steps_on_the_device_equal_the_cpu(gpu_backend):
    """Five Adam steps of small_unet: the GPU path (fused Adam, one-piece convolutions) against the CPU path.

    On the stand-in, whose arithmetic is NumPy's, they must agree bit for bit. On a real GPU cuBLAS
    sums in another order, and Adam turns a rounding-level change of a near-zero gradient into a
    step of up to the learning rate, so the weights are compared at that scale.
    """
    from minitensor import kernels

    models = []
    for device in ("cpu", "gpu"):
        set_seed(1)
        models.append(small_unet((32, 32, 3), base_filters=4).compile(Adam(1e-3), BinaryCrossentropy(from_logits=True)))
        models[-1].to(device)
    for step in range(5):
        x, y = batch(step)
        with kernels.conv_algorithm("gemm"):       # the CPU's own GEMM path, the GPU's algorithm
            losses = [model.train_on_batch(x, y) for model in models]
        np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    for cpu_weight, gpu_weight in zip(*(model.get_weights() for model in models)):
        if gpu_backend is not None:
            np.testing.assert_array_equal(gpu_weight, cpu_weight)
        else:
            np.testing.assert_allclose(gpu_weight, cpu_weight, atol=5 * 2e-3)


@pytest.mark.gpu
def test_train_py_runs_end_to_end_on_the_gpu(gpu_backend, tmp_path, capsys):
    argv = ["--device", "gpu", "--num-images", "20", "--num-val", "4", "--num-test", "4", "--image-size", "32",
            "--batch-size", "4", "--epochs", "2", "--quiet", "--data", str(tmp_path / "shape"),
            "--weights-dir", str(tmp_path / "w"), "--results-dir", str(tmp_path / "r")]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "device: gpu" in out and "Epoch 2/2 - loss" in out and "mean IoU" in out
    assert (tmp_path / "r" / "metrics.json").exists() and (tmp_path / "w" / "last.npz").exists()
    assert train.main(argv[:argv.index("--epochs")] + ["--epochs", "3"] + argv[argv.index("--epochs") + 2:]
                      + ["--resume"]) == 0                  # a GPU checkpoint resumes on the GPU


@pytest.mark.gpu
def test_tf32_is_a_real_switch_off_by_default(gpu_backend):
    if gpu_backend is None:
        pytest.skip("the stand-in records the compute type; a real GPU would need a timing to show it")
    linalg = gpu_backend._core._routines_linalg
    backend.set_tf32(True)
    assert linalg.compute_types[np.dtype(np.float32)] == linalg.COMPUTE_TYPE_TF32
    backend.set_tf32(False)
    assert linalg.compute_types[np.dtype(np.float32)] == linalg.COMPUTE_TYPE_DEFAULT


# ----- the setup check ---------------------------------------------------------------------------------------

def broken_cupy(failure):
    """The stand-in with one part broken: 'kernel' (NVRTC cannot compile), 'gemm' (cuBLAS missing), 'device'."""
    def fail(*args, **kwargs):
        raise RuntimeError({"kernel": "nvrtc: error: failed to open libnvrtc-builtins.so.12",
                            "gemm": "libcublas.so.12: cannot open shared object file",
                            "device": "cudaErrorNoDevice: no CUDA-capable device is detected"}[failure])

    class Array(cupy_standin.ndarray):
        __slots__ = ()
        __module__ = "cupy._core.core"

        def __matmul__(self, other):
            return fail() if failure == "gemm" else super().__matmul__(other)

    def asarray(a, dtype=None):
        return Array(np.array(a, dtype=dtype))

    runtime = types.SimpleNamespace(getDeviceCount=fail if failure == "device" else (lambda: 1))
    return types.SimpleNamespace(asarray=asarray, RawKernel=fail if failure == "kernel" else cupy_standin.RawKernel,
                                 cuda=types.SimpleNamespace(runtime=runtime))


@pytest.mark.parametrize("failure,named", [("kernel", "NVRTC"), ("gemm", "cuBLAS"), ("device", "no CUDA driver")])
def test_a_gpu_that_cannot_compute_is_not_available(monkeypatch, capsys, tmp_path, failure, named):
    monkeypatch.setattr(backend, "_cupy", broken_cupy(failure))
    monkeypatch.setattr(backend, "_cupy_error", None)
    monkeypatch.setattr(backend, "_gpu_status", None)
    usable, reason = backend.gpu_status()
    assert not usable and named in reason
    assert backend.resolve_device("auto") == "cpu"
    with pytest.raises(RuntimeError, match=named):
        backend.resolve_device("gpu")
    assert train.main(["--device", "gpu", "--epochs", "1", "--data", str(tmp_path / "d")]) == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize("value,required", [("", False), ("0", False), ("1", True), (" 1 ", True)])
def test_minitensor_require_gpu_is_read_strictly(monkeypatch, value, required):
    monkeypatch.setenv("MINITENSOR_REQUIRE_GPU", value)
    assert backend.gpu_required() is required
    monkeypatch.setenv("MINITENSOR_REQUIRE_GPU", "yes")
    with pytest.raises(ValueError, match="MINITENSOR_REQUIRE_GPU='yes': expected 1"):
        backend.gpu_required()


def test_the_probe_runs_once_per_process(monkeypatch):
    calls = []
    monkeypatch.setattr(backend, "_gpu_status", None)
    monkeypatch.setattr(backend, "_probe_gpu", lambda: calls.append(1) or (False, "no GPU here"))
    assert [backend.is_gpu_available() for _ in range(3)] == [False] * 3 and calls == [1]


def test_auto_says_why_it_chose_the_cpu(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(backend, "_gpu_status", (False, "CuPy could not be imported (no module)"))
    argv = ["--num-images", "12", "--num-val", "4", "--num-test", "2", "--image-size", "32", "--batch-size", "4",
            "--epochs", "1", "--quiet", "--data", str(tmp_path / "d"), "--weights-dir", str(tmp_path / "w"),
            "--results-dir", str(tmp_path / "r")]
    assert train.main(argv) == 0
    assert "device: cpu (no usable GPU: CuPy could not be imported (no module))" in capsys.readouterr().out
