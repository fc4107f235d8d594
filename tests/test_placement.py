"""Placement: model.to() round trips, optimizer state that follows the parameters, inputs from any library."""

import numpy as np
import pytest

import portanet as pn
from portanet import resolve_device, to_numpy
from portanet.testing import assert_close

X = np.random.default_rng(1).standard_normal((48, 5))
LABELS = np.arange(48) % 3


def _model(device="cpu", dtype="float32", dropout=0.0):
    model = pn.Model([pn.Dense(6, "relu"), pn.Dropout(dropout), pn.Dense(3, "softmax")], device=device, seed=0,
                     dtype=dtype)
    return model.compile("sparse_categorical_crossentropy", pn.Adam(lr=0.01), ["accuracy"])


def _host_state(model):
    params = {k: to_numpy(v).copy() for k, v in model.parameters().items()}
    slots = {k: to_numpy(v).copy() for k, v in model.optimizer.state.items()}
    return params, slots, model.optimizer.iterations


def _assert_bit_identical(a, b):
    for part_a, part_b in zip(a[:2], b[:2]):
        assert part_a.keys() == part_b.keys()
        for name in part_a:
            np.testing.assert_array_equal(part_a[name], part_b[name], err_msg=name)
    assert a[2] == b[2]


def test_moving_to_a_device_and_back_is_bit_identical(device):
    model = _model()
    model.fit(X, LABELS, epochs=1, batch_size=16, verbose=0)
    before = _host_state(model)
    assert model.to(device) is model
    assert model.device == device and model.backend == device.backend
    assert all(device.owns(v) for v in model.parameters().values())
    assert all(device.owns(v) for v in model.optimizer.state.values())
    _assert_bit_identical(_host_state(model), before)
    model.to("numpy")
    assert model.device == "cpu"
    _assert_bit_identical(_host_state(model), before)


def test_moving_between_array_api_strict_devices_is_bit_identical():
    aas = pytest.importorskip("array_api_strict")
    model = _model(resolve_device("device1", backend=aas))
    model.fit(X, LABELS, epochs=1, batch_size=16, verbose=0)
    before = _host_state(model)
    model.to("device2")
    assert model.backend == "array_api_strict" and model.device.device == aas.Device("device2")
    assert all(v.device == aas.Device("device2") for v in model.optimizer.state.values())
    model.to(aas.Device("device1"), backend=aas)
    _assert_bit_identical(_host_state(model), before)


def test_moved_parameters_do_not_alias_the_old_buffer(device):
    model = _model().build(5)
    if model.device == device:
        pytest.skip("the model is already on this device: to() is a no-op")
    old = model.parameters()["dense_0.kernel"]
    kept = to_numpy(old).copy()
    model.to(device)
    model.fit(X, LABELS, epochs=1, batch_size=16, verbose=0)
    np.testing.assert_array_equal(to_numpy(old), kept)


def test_optimizer_created_before_to_follows_the_parameters(device):
    moved = _model(dtype="float64")
    moved.fit(X, LABELS, epochs=1, batch_size=16, shuffle=False, verbose=0)  # Adam state created on the host
    moved.to(device)
    moved.fit(X, LABELS, epochs=1, batch_size=16, shuffle=False, verbose=0)
    assert all(device.owns(v) for v in moved.optimizer.state.values())
    in_place = _model(dtype="float64")
    in_place.fit(X, LABELS, epochs=2, batch_size=16, shuffle=False, verbose=0)
    for name, value in moved.parameters().items():
        assert_close(value, in_place.parameters()[name], device=device, rtol=1e-10, atol=1e-12, err_msg=name)


def test_optimizer_compiled_before_the_model_was_built_or_moved_lives_on_the_new_device(device):
    model = _model()
    model.to(device)
    model.fit(X, LABELS, epochs=1, batch_size=16, verbose=0)
    assert model.optimizer.state and all(device.owns(v) for v in model.optimizer.state.values())


def test_dropout_stream_continues_across_a_move_between_host_generators():
    pytest.importorskip("array_api_strict")
    moved, stayed = _model(dtype="float64", dropout=0.3), _model(dtype="float64", dropout=0.3)
    for model in (moved, stayed):
        model.fit(X, LABELS, epochs=1, batch_size=16, shuffle=False, verbose=0)
    moved.to("array_api_strict").to("device1")
    for model in (moved, stayed):
        model.fit(X, LABELS, epochs=1, batch_size=16, shuffle=False, verbose=0)
    for name, value in stayed.parameters().items():
        assert_close(moved.parameters()[name], value, rtol=1e-12, atol=1e-12, err_msg=name)


def test_device_strings_stay_in_the_model_library_and_backend_names_switch_it():
    torch = pytest.importorskip("torch")
    model = _model(resolve_device("cpu", backend="torch")).build(5)
    assert model.to("cpu").backend == "torch"  # a torch model stays torch
    assert model.to("numpy").backend == "numpy"
    assert model.to("torch").device.device == torch.device("cpu")
    aas = pytest.importorskip("array_api_strict")
    assert model.to(aas).device.device == aas.Device("CPU_DEVICE")
    assert model.to("device2").device.device == aas.Device("device2")
    assert model.to("cpu", backend="numpy").backend == "numpy"


def test_a_failed_move_leaves_the_model_where_it_was():
    model = _model()
    model.fit(X, LABELS, epochs=1, verbose=0)
    before = _host_state(model)
    with pytest.raises(ValueError, match="unknown array_api_strict device"):
        model.to("device9", backend="array_api_strict")
    with pytest.raises(ValueError, match="accepted devices"):
        model.to("gpu")
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r'pip install "portanet\[cuda12\]"'):
            model.to("cuda:1")
    with pytest.raises(ValueError, match="needs a device or a backend"):
        model.to()
    assert model.device == "cpu"
    _assert_bit_identical(_host_state(model), before)


def _other_libraries():
    """The same data as arrays of other libraries and devices (whatever is installed)."""
    yield "numpy-float64", lambda a: a
    try:
        import torch

        yield "torch", torch.asarray
    except ImportError:
        pass
    try:
        import array_api_strict as aas

        yield "array_api_strict-device2", lambda a: aas.asarray(a, device=aas.Device("device2"))
    except ImportError:
        pass


def test_fit_evaluate_and_predict_accept_inputs_from_any_library(device):
    reference = _model(device, "float64")
    history = reference.fit(X, LABELS, epochs=2, batch_size=16, verbose=0).history
    for label, convert in _other_libraries():
        model = _model(device, "float64")
        got = model.fit(convert(X), convert(LABELS), epochs=2, batch_size=16, verbose=0).history
        assert got["loss"] == pytest.approx(history["loss"], rel=1e-12), label
        assert model.evaluate(convert(X), convert(LABELS)) == pytest.approx(reference.evaluate(X, LABELS), rel=1e-12)
        assert_close(model.predict(convert(X), batch_size=7), reference.predict(X), device=device, err_msg=label)
        np.testing.assert_allclose(model.predict(convert(X), to_numpy=True), to_numpy(reference.predict(X)))


def test_predict_to_numpy_returns_host_arrays_from_a_memory_map(device, tmp_path):
    model = _model(device).build(5)
    np.save(tmp_path / "x.npy", X.astype("float32"))
    x_map = np.load(tmp_path / "x.npy", mmap_mode="r")
    out = model.predict(x_map, batch_size=10, to_numpy=True)
    assert type(out) is np.ndarray and out.shape == (48, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, to_numpy(model.predict(X)), rtol=1e-6)


def test_the_loss_is_read_back_once_per_epoch_or_every_log_every_steps(device, monkeypatch):
    from portanet import training

    reads = []
    real = training.to_numpy
    monkeypatch.setattr(training, "to_numpy", lambda a: (device.owns(a) and reads.append(a.shape)) or real(a))

    class Logged(pn.Callback):
        steps = []

        def on_log(self, step, logs=None):
            self.steps.append((step, sorted(logs)))

    model = _model(device)
    model.fit(X, LABELS, epochs=2, batch_size=4, verbose=0)  # 12 steps per epoch
    assert len(reads) == 2
    reads.clear()
    model.fit(X, LABELS, epochs=2, batch_size=4, verbose=0, log_every=5, callbacks=[Logged()])
    assert len(reads) == 2 * (1 + 2)
    assert Logged.steps == [(4, ["accuracy", "loss"]), (9, ["accuracy", "loss"])] * 2


@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_log_every_must_be_a_positive_integer(value):
    model = _model()
    with pytest.raises(ValueError, match=f"log_every must be a positive integer or None, got {value!r}"):
        model.fit(X, LABELS, verbose=0, log_every=value)
    assert not model.built


def _host_views(model):
    """Every buffer a move must not share with its destination: the flat parameters, each parameter, each slot."""
    return [model.parameter_buffer.values, *model.parameters().values(), *model.optimizer.state.values()]


def test_moving_between_numpy_and_torch_cpu_never_shares_memory():
    torch = pytest.importorskip("torch")
    model = _model()
    model.fit(X, LABELS, epochs=1, batch_size=16, verbose=0)
    old = _host_views(model)
    kept = [a.copy() for a in old]
    model.to("torch")
    new = _host_views(model)
    assert all(isinstance(t, torch.Tensor) for t in new)
    assert not any(np.shares_memory(a, t.numpy()) for a in old for t in new)
    model.fit(X, LABELS, epochs=1, batch_size=16, verbose=0)
    for a, k in zip(old, kept):
        np.testing.assert_array_equal(a, k)
    tensors, kept = new, [t.clone() for t in new]
    model.to("numpy")
    back = _host_views(model)
    assert not any(np.shares_memory(a, t.numpy()) for a in back for t in tensors)
    model.fit(X, LABELS, epochs=1, batch_size=16, verbose=0)
    for t, k in zip(tensors, kept):
        assert torch.equal(t, k)


def _torch_inputs(torch):
    return (torch.tensor(X, requires_grad=True), torch.tensor(LABELS),
            torch.ones(len(X), dtype=torch.float64, requires_grad=True))


def test_torch_tensors_that_require_grad_train_evaluate_and_predict_like_plain_data():
    torch = pytest.importorskip("torch")
    x, y, w = _torch_inputs(torch)
    model, reference = _model(resolve_device("cpu", backend="torch"), "float64"), _model("cpu", "float64")
    got = model.fit(x, y, sample_weight=w, epochs=2, batch_size=16, verbose=0).history
    want = reference.fit(X, LABELS, epochs=2, batch_size=16, verbose=0).history
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-12)
    assert model.evaluate(x, y, sample_weight=w) == pytest.approx(reference.evaluate(X, LABELS), rel=1e-12)
    out = model.predict(x)
    assert not out.requires_grad and out.grad_fn is None
    assert_close(out, reference.predict(X), rtol=1e-12, atol=1e-12)
    loss = model.train_step(x[:16], y[:16])
    reference.train_step(X[:16], LABELS[:16])
    assert not loss.requires_grad and loss.grad_fn is None
    assert x.grad is None and not model.parameter_buffer.values.requires_grad
    for name, value in model.parameters().items():
        assert not value.requires_grad
        assert_close(value, reference.parameters()[name], rtol=1e-12, atol=1e-12, err_msg=name)
    np.testing.assert_array_equal(x.detach().numpy(), X)  # the caller's tensor is untouched


def test_set_parameters_with_tensors_that_require_grad_keeps_the_model_trainable():
    torch = pytest.importorskip("torch")
    model = _model(resolve_device("cpu", backend="torch"), "float64").build(5)
    values = {name: torch.zeros(tuple(v.shape), dtype=torch.float64, requires_grad=True)
              for name, v in model.parameters().items()}
    model.set_parameters(values)
    assert not model.parameter_buffer.values.requires_grad and model.parameter_buffer.values.grad_fn is None
    assert float(model.parameter_buffer.values.abs().sum()) == 0.0
    model.fit(*_torch_inputs(torch)[:2], epochs=2, batch_size=16, verbose=0)  # in-place updates still allowed
    model.fit(X, LABELS, epochs=1, batch_size=16, verbose=0)
    assert float(model.parameter_buffer.values.abs().sum()) > 0 and not model.parameter_buffer.values.requires_grad
    assert all(v.grad is None for v in values.values())


def test_fit_on_torch_cuda_does_not_synchronise_per_batch(device):
    """GPU only (the torch-cuda case; ci/gpu-check runs it): torch's sync debug mode counts the host waits of a
    shuffled epoch with a validation set; the loss is read once per epoch, so far fewer waits than batches."""
    if device.backend != "torch" or not device.name.startswith("cuda"):
        pytest.skip("counts CUDA synchronisations: torch on a GPU only")
    import warnings

    import torch

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2048, 16)).astype(np.float32), rng.integers(0, 3, 2048)
    model = pn.Model([pn.Dense(32, "relu"), pn.Dense(3, "softmax")], device=device, seed=0)
    model.compile("sparse_categorical_crossentropy", "adam", ["accuracy"])
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)  # warm-up: build, allocator, kernels
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(x, y, epochs=1, batch_size=32, validation_data=(x[:256], y[:256]), verbose=0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 8, f"{len(syncs)} synchronisations for 64 batches: {syncs[:5]}"
