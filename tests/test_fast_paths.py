"""Backend fast paths (``Device.kernels``) against the portable path on the same inputs, and the benchmark script."""

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

import portanet as pn
from portanet import activations, optimizers, to_numpy
from portanet.testing import assert_close

RTOL = 1e-5  # float32: the fast kernels round in another order than the portable expressions


def _fast(device):
    if device.kernels is None:
        pytest.skip(f"backend {device.backend} has no fast path: the portable path is the only one")
    return device.kernels


def _arrays(device, *shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [device.asarray(rng.standard_normal(shape), "float32") for shape in shapes]


def test_numpy_has_fast_paths_cupy_only_when_enabled_and_other_backends_do_not(device):
    cupy_enabled = os.environ.get("PORTANET_CUPY_KERNELS") == "1"
    expected = device.backend == "numpy" or (device.backend == "cupy" and cupy_enabled)
    assert (device.kernels is not None) == expected


def test_portable_is_the_same_device_with_the_portable_path_only(device):
    portable = device.portable()
    assert portable == device and hash(portable) == hash(device) and portable.kernels is None
    assert device.kernels is not None or device.backend != "numpy"


def test_relu_forward_in_place_matches_the_portable_relu(device):
    fast = _fast(device)
    (z,) = _arrays(device, (64, 33))
    z[0, :3] = 0.0
    expected = activations.ReLU().forward(z, device.xp)
    out = fast.relu_(z)
    assert_close(out, expected, device=device, rtol=0, atol=0)
    assert_close(z, expected, device=device, rtol=0, atol=0)


@pytest.mark.parametrize("classes", [10, 100], ids=["narrow", "wide"])
def test_softmax_in_place_matches_the_portable_softmax(device, classes):
    fast = _fast(device)
    (z,) = _arrays(device, (33, classes), seed=10)
    z = z * 40.0
    expected = activations.Softmax().forward(z, device.xp)
    assert_close(fast.activate_(activations.Softmax().kernel, z), expected, device=device, rtol=RTOL, atol=1e-7)
    assert_close(z, expected, device=device, rtol=RTOL, atol=1e-7)


def test_activations_without_a_kernel_are_left_to_the_portable_path(device):
    fast = _fast(device)
    (z,) = _arrays(device, (4, 3), seed=11)
    before = to_numpy(z).copy()
    assert fast.activate_(activations.Tanh().kernel, z) is None
    assert fast.activation_grad(activations.Softmax().kernel, z, z) is None
    np.testing.assert_array_equal(to_numpy(z), before)


def test_relu_backward_matches_the_portable_derivative_and_leaves_inputs_alone(device):
    fast = _fast(device)
    grad, z = _arrays(device, (64, 33), (64, 33), seed=1)
    a = activations.ReLU().forward(z, device.xp)
    before = to_numpy(grad).copy()
    assert_close(fast.relu_grad(grad, a), activations.ReLU().backward(grad, None, a, device.xp), device=device,
                 rtol=0, atol=0)
    np.testing.assert_array_equal(to_numpy(grad), before)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_dense_grads_written_into_views_match_the_portable_products(device, bias):
    fast = _fast(device)
    x, gz = _arrays(device, (32, 20), (32, 7), seed=2)
    flat = device.zeros((20 * 7 + 7,), "float32")
    grad_kernel = device.xp.reshape(flat[:140], (20, 7))
    grad_bias = flat[140:] if bias else None
    fast.dense_grads(x, gz, grad_kernel, grad_bias)
    assert_close(grad_kernel, x.T @ gz, device=device, rtol=RTOL, atol=RTOL)
    assert_close(flat[140:], device.xp.sum(gz, axis=0) if bias else device.zeros((7,), "float32"), device=device,
                 rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("shape", [(7, 3), (64, 10)])
def test_fused_sparse_crossentropy_matches_the_portable_loss_and_keeps_the_logits(device, shape):
    fast = _fast(device)
    (z,) = _arrays(device, shape, seed=8)
    z = z * 30.0  # large logits: both must stay finite
    labels = device.asarray(np.random.default_rng(9).integers(0, shape[1], shape[0]), "int64")
    before = to_numpy(z).copy()
    probs = fast.softmax_(device.xp.asarray(z, copy=True))
    probs_before = to_numpy(probs).copy()
    per, grad = fast.sparse_softmax_crossentropy(z, probs, labels)
    per_ref, grad_ref = pn.SparseCategoricalCrossentropy().per_sample_logits(z, labels, device.xp)
    assert_close(per, per_ref, device=device, rtol=RTOL, atol=1e-5)
    assert_close(grad, grad_ref, device=device, rtol=RTOL, atol=1e-6)
    np.testing.assert_array_equal(to_numpy(z), before)
    np.testing.assert_array_equal(to_numpy(probs), probs_before)  # the caller's probabilities, left as they were


@pytest.mark.parametrize("config", [
    {"name": "adam", "lr": 0.01},
    {"name": "adam", "lr": 0.01, "weight_decay": 0.1},
    {"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
], ids=["adam", "adam-l2", "adamw"])
def test_fast_optimizer_steps_match_the_portable_steps(device, config):
    fast = _fast(device)
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(1000)
    grads = [device.asarray(rng.standard_normal(1000), "float32") for _ in range(5)]
    portable, quick = optimizers.get(dict(config)), optimizers.get(dict(config))
    p_portable, p_fast = device.asarray(p0, "float32"), device.asarray(p0, "float32")
    for g in grads:
        portable.step(p_portable, g)
        quick.step(p_fast, g, fast=fast)
    assert_close(p_fast, p_portable, device=device, rtol=RTOL, atol=RTOL)
    for slot in ("m", "v"):
        assert_close(quick.state[slot], portable.state[slot], device=device, rtol=RTOL, atol=1e-7)


def test_optimizers_without_fast_kernels_fall_back_to_the_portable_step(device):
    fast = _fast(device)
    p_portable, p_fast = device.asarray(np.ones(8), "float32"), device.asarray(np.ones(8), "float32")
    (g,) = _arrays(device, (8,), seed=4)
    optimizers.get({"name": "sgd", "lr": 0.1, "momentum": 0.9}).step(p_portable, g)
    optimizers.get({"name": "sgd", "lr": 0.1, "momentum": 0.9}).step(p_fast, g, fast=fast)
    assert_close(p_fast, p_portable, device=device, rtol=0, atol=0)


def _pair(device, activation, seed=0):
    """The same compiled model twice: with the device's fast path and with the portable path only."""
    models = []
    for dev in (device, device.portable()):
        model = pn.Model([pn.Dense(16, activation), pn.Dense(8, "tanh"), pn.Dense(3, "softmax")], device=dev, seed=seed)
        model.compile(loss="sparse_categorical_crossentropy", optimizer=pn.Adam(lr=0.01))
        models.append(model.build(5))
    return models


@pytest.mark.parametrize("activation", ["relu", "elu"])
def test_gradients_match_the_portable_path(device, activation):
    _fast(device)
    quick, portable = _pair(device, activation)
    assert quick.layers[0]._kernels is device.kernels and portable.layers[0]._kernels is None
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((24, 5)), rng.integers(0, 3, 24)
    loss_fast, grads_fast = quick.loss_and_grads(x, y)
    loss_portable, grads_portable = portable.loss_and_grads(x, y)
    assert loss_fast == pytest.approx(loss_portable, rel=RTOL)
    for name, grad in grads_portable.items():
        assert_close(grads_fast[name], grad, device=device, rtol=RTOL, atol=1e-6, err_msg=name)


def test_training_matches_the_portable_path(device):
    _fast(device)
    quick, portable = _pair(device, "relu")
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((96, 5)), rng.integers(0, 3, 96)
    h_fast = quick.fit(x, y, epochs=3, batch_size=16, verbose=0)
    h_portable = portable.fit(x, y, epochs=3, batch_size=16, verbose=0)
    assert h_fast.history["loss"] == pytest.approx(h_portable.history["loss"], rel=1e-4)
    assert_close(quick.parameter_buffer.values, portable.parameter_buffer.values, device=device, rtol=1e-4, atol=1e-5)
    assert_close(quick.predict(x), portable.predict(x), device=device, rtol=1e-4, atol=1e-5)


def test_moving_a_model_rebinds_its_layers_to_the_new_devices_fast_path(device):
    model = pn.Model([pn.Dense(4, "relu"), pn.Dense(2)], seed=0).build(3)
    model.to(device)
    assert all(layer._kernels is device.kernels for layer in model.layers)


def _benchmark_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "mlp.py"
    spec = importlib.util.spec_from_file_location("portanet_benchmark_mlp", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_reports_each_contestant_with_ratios_to_pytorch_and_the_gemm_bound(capsys):
    pytest.importorskip("threadpoolctl")
    bench = _benchmark_module()
    report = bench.main(["--json", "--samples", "1024", "--repeats", "1", "--shapes", "overhead", "--no-sklearn",
                         "--no-memory", "--threads", "1"])
    shape = report["shapes"]["overhead"]
    assert {"portanet", "portanet_portable", "gemm_bound"} <= set(shape["seconds"])
    assert shape["ratio_to_gemm_bound"]["portanet"] > 0
    assert report["predict"]["ratio_to_gemm_bound"] > 0
    assert ("pytorch" in shape["seconds"]) == (importlib.util.find_spec("torch") is not None)
    assert '"shapes"' in capsys.readouterr().out


class _Shifted(activations.ReLU):
    """A user's ReLU subclass that changes the math: the builtin ReLU kernel must not run for it."""

    name = "shifted_relu"

    def forward(self, z, xp):
        return xp.maximum(z, 0.0) + 1.0

    def backward(self, grad, z, a, xp):
        return grad * xp.astype(a > 1.0, grad.dtype)


def test_kernels_go_by_name_and_a_subclass_that_changes_the_math_gets_none():
    class Renamed(activations.ReLU):
        kernel = "relu"  # same math: may opt back in

    assert (activations.ReLU.kernel, activations.Softmax.kernel, activations.Tanh.kernel) == ("relu", "softmax", None)
    assert _Shifted.kernel is None and Renamed.kernel == "relu"


def test_a_subclass_of_a_builtin_activation_runs_its_own_math(device):
    _fast(device)
    model = pn.Model([pn.Dense(4, _Shifted())], device=device, seed=0, dtype="float64").build(3)
    x = np.random.default_rng(0).standard_normal((5, 3))
    params = {k: to_numpy(v) for k, v in model.parameters().items()}
    expected = np.maximum(x @ params["dense_0.kernel"] + params["dense_0.bias"], 0.0) + 1.0
    assert_close(model.predict(x), expected, device=device, rtol=1e-12, atol=1e-12)


class _NoMaximumReduce:
    """NumPy as CuPy 13/14 behaves: ``maximum.reduce`` is not implemented (only add and multiply reduce)."""

    class _Maximum:
        def __call__(self, *args, **kwargs):
            return np.maximum(*args, **kwargs)

        def reduce(self, *args, **kwargs):
            raise NotImplementedError("cupy.maximum.reduce")

    maximum = _Maximum()

    def __getattr__(self, name):
        return getattr(np, name)


@pytest.mark.parametrize("classes", [10, 100], ids=["narrow", "wide"])
def test_cupy_kernels_reduce_rows_without_ufunc_reduce(classes):
    from portanet.backends.cupy import CupyKernels
    from portanet.backends.numpy import Kernels

    kernels = CupyKernels.__new__(CupyKernels)  # its row reductions and softmax, on NumPy arrays (no GPU here)
    Kernels.__init__(kernels, _NoMaximumReduce())
    rng = np.random.default_rng(12)
    z = (rng.standard_normal((33, classes)) * 30.0).astype(np.float32)
    labels = rng.integers(0, classes, 33)
    expected = activations.Softmax().forward(z, np)
    probs = kernels.softmax_(z.copy())
    np.testing.assert_allclose(probs, expected, rtol=RTOL, atol=1e-7)
    per, grad = kernels.sparse_softmax_crossentropy(z, probs, labels)
    per_ref, grad_ref = pn.SparseCategoricalCrossentropy().per_sample_logits(z, labels, np)
    np.testing.assert_allclose(per, per_ref, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(grad, grad_ref, rtol=RTOL, atol=1e-6)
