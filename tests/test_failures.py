"""No failed call leaves a model unusable, and a call that fails its checks changes nothing.

After a call raises (a callback failing mid-epoch, a KeyboardInterrupt from a callback, data failing while it is
read, bad inputs to train_step, evaluate, predict, set_parameters, to(), compile, load_weights, save, Model(...)),
the model trains on exactly as a fresh model given its weights, optimizer state and random state would: bit for
bit, on every backend.
"""

import copy
import os
import signal

import numpy as np
import pytest

import portanet as pn
from portanet import to_numpy
from portanet.data import StreamError

RNG = np.random.default_rng(7)
X = RNG.standard_normal((96, 5)).astype(np.float32)
Y = (np.argmax(X[:, :3], axis=1)).astype(np.int64)


def _model(device, seed=0):
    model = pn.Model([pn.Dense(8, "relu"), pn.Dropout(0.2), pn.Dense(3, "softmax")], device=device, seed=seed)
    return model.compile("sparse_categorical_crossentropy", pn.Adam(learning_rate=0.01), ["accuracy"])


def _trained(device):
    model = _model(device)
    model.fit(X, Y, epochs=1, batch_size=16, verbose=0)
    return model


def _state(model):
    """Everything that decides how training continues, as host copies."""
    slots = {k: to_numpy(v).copy() for k, v in model.optimizer.state_dict()["slots"].items()}
    return ({k: to_numpy(v).copy() for k, v in model.parameters().items()}, model.optimizer.iterations, slots,
            copy.deepcopy(model.random_state()))


def _fresh_from(device, state):
    """A model that never failed, put in ``state`` through the public API."""
    weights, iterations, slots, random = state
    model = _model(device, seed=123).build(X.shape[1])
    model.set_parameters(weights)
    model.optimizer.load_state_dict({"iterations": iterations,
                                     "slots": {k: model.device.asarray(v) for k, v in slots.items()}})
    model.set_random_state(random)
    return model


def _assert_trains_like_a_fresh_model(device, model):
    """``model`` (after a failure) and a fresh model in its state train, evaluate and predict identically."""
    fresh = _fresh_from(device, _state(model))
    for m in (model, fresh):
        m.fit(X, Y, epochs=2, batch_size=16, validation_split=0.25, verbose=0)
    np.testing.assert_array_equal(to_numpy(model.parameter_buffer.values), to_numpy(fresh.parameter_buffer.values))
    assert model.optimizer.iterations == fresh.optimizer.iterations
    assert model.evaluate(X, Y) == fresh.evaluate(X, Y)
    np.testing.assert_array_equal(to_numpy(model.predict(X)), to_numpy(fresh.predict(X)))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if device.backend == "torch":
        import torch

        assert torch.is_grad_enabled()  # the no_grad scope was left on the way out


class RaiseAt(pn.Callback):
    def __init__(self, hook, epoch=1, step=2, error=RuntimeError):
        self.hook, self.at, self.error = hook, (epoch, step), error
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        if self.hook == "on_epoch_begin" and epoch == self.at[0]:
            raise self.error("from on_epoch_begin")

    def on_batch_end(self, step, loss=None):
        if self.hook == "on_batch_end" and (self.epoch, step) == self.at:
            raise self.error("from on_batch_end")

    def on_log(self, step, logs=None):
        if self.hook == "on_log" and self.epoch == self.at[0]:
            raise self.error("from on_log")

    def on_epoch_end(self, epoch, logs=None):
        if self.hook == "on_epoch_end" and epoch == self.at[0]:
            raise self.error("from on_epoch_end")

    def on_train_begin(self, logs=None):
        if self.hook == "on_train_begin":
            raise self.error("from on_train_begin")


@pytest.mark.parametrize("hook", ["on_train_begin", "on_epoch_begin", "on_batch_end", "on_log", "on_epoch_end"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_callback_raising_mid_training_leaves_a_model_that_trains_like_a_fresh_one(device, hook, error):
    model = _trained(device)
    with pytest.raises(error, match=f"from {hook}"):
        model.fit(X, Y, epochs=3, batch_size=16, verbose=0, log_every=2, callbacks=[RaiseAt(hook, error=error)])
    _assert_trains_like_a_fresh_model(device, model)


def test_a_callback_that_raised_can_serve_the_same_model_again(device):
    model = _trained(device)
    failing = RaiseAt("on_batch_end")
    with pytest.raises(RuntimeError):
        model.fit(X, Y, epochs=2, batch_size=16, verbose=0, callbacks=[failing])
    failing.hook = None
    model.fit(X, Y, epochs=2, batch_size=16, verbose=0, callbacks=[failing])


def _failing_stream(fail_at, steps=6):
    def batches():
        for i in range(steps):
            if i == fail_at:
                raise OSError("the disk went away")
            rows = slice(16 * i, 16 * i + 16)
            yield X[rows], Y[rows]
    return batches()


def test_a_stream_failing_mid_epoch_puts_the_model_back_and_it_trains_on(device):
    model = _trained(device)
    before = _state(model)
    with pytest.raises(StreamError, match="the disk went away"):
        model.fit(_failing_stream(4), steps_per_epoch=6, epochs=1, verbose=0)
    after = _state(model)
    for name in before[0]:
        np.testing.assert_array_equal(after[0][name], before[0][name])
    assert after[1] == before[1] and after[3] == before[3]
    _assert_trains_like_a_fresh_model(device, model)


def test_a_stream_failing_in_evaluate_changes_nothing(device):
    model = _trained(device)
    before = _state(model)
    with pytest.raises(StreamError, match="the disk went away"):
        model.evaluate(_failing_stream(3), steps=6)
    np.testing.assert_array_equal(_state(model)[0]["dense_0.kernel"], before[0]["dense_0.kernel"])
    _assert_trains_like_a_fresh_model(device, model)


class Flaky:
    """A sliceable whose reads fail from row ``fail_from`` on (a network file system, a corrupt HDF5 chunk)."""

    def __init__(self, a, fail_from):
        self.a, self.fail_from = a, fail_from
        self.shape, self.dtype = a.shape, a.dtype

    def __len__(self):
        return len(self.a)

    def __getitem__(self, index):
        if index.stop is not None and index.stop > self.fail_from:
            raise OSError("read error")
        return self.a[index]


def test_predict_failing_to_read_changes_nothing(device):
    model = _trained(device)
    before = _state(model)
    with pytest.raises(StreamError, match="read error"):
        model.predict(Flaky(X, 40), batch_size=16)
    assert _state(model)[3] == before[3]
    _assert_trains_like_a_fresh_model(device, model)


@pytest.mark.parametrize("x,y,error,message", [
    (X[:, :4], Y, ValueError, "x has 4 features but the model expects 5"),
    (X, Y + 3, ValueError, r"labels must be in \[0, 3\)"),
    (X, Y[:10], ValueError, "y has 10 rows but x has 96"),
    (X, np.full(96, 0.5), ValueError, "integer class labels, got non-integer values"),
    (X[:, :0], Y, ValueError, "x has 0 features"),
])
def test_train_step_and_loss_and_grads_with_bad_inputs_change_nothing(device, x, y, error, message):
    model = _trained(device)
    before = _state(model)
    for call in (model.train_step, model.loss_and_grads):
        with pytest.raises(error, match=message):
            call(x, y)
    after = _state(model)
    np.testing.assert_array_equal(after[0]["dense_0.kernel"], before[0]["dense_0.kernel"])
    assert after[1] == before[1] and after[3] == before[3]
    _assert_trains_like_a_fresh_model(device, model)


def test_labels_out_of_range_on_the_models_own_host_device_are_refused(device):
    """torch's take_along_dim reads 0 for an index out of range: labels are checked wherever reading is free."""
    model = _trained(device)
    if not device.host_memory:
        pytest.skip("on a device, labels are not read back per custom-loop step")
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), got values in \[3, 5\]"):
        model.train_step(device.asarray(X), device.asarray(Y + 3))


# -- every public call that changes state checks everything first ---------------------------------------------------
def test_invalid_evaluate_calls_on_an_unbuilt_model_leave_it_unbuilt(device):
    reference = _model(device)
    expected = reference.evaluate(X, Y)
    model = _model(device)
    for call, error in [(lambda: model.evaluate(X, Y[:10]), ValueError),
                        (lambda: model.evaluate(X, Y + 3), ValueError),
                        (lambda: model.evaluate(X, Y, batch_size=0), ValueError),
                        (lambda: model.evaluate(_failing_stream(2), steps=6), StreamError)]:
        with pytest.raises(error):
            call()
        assert not model.built
    assert model.evaluate(X, Y) == expected  # builds it, with the weights a fit would draw
    model.fit(X, Y, epochs=1, verbose=0)
    reference.fit(X, Y, epochs=1, verbose=0)
    np.testing.assert_array_equal(to_numpy(model.parameter_buffer.values), to_numpy(reference.parameter_buffer.values))


def test_a_stream_failing_in_the_first_fit_leaves_the_model_unbuilt(device):
    model = _model(device)
    with pytest.raises(StreamError):
        model.fit(_failing_stream(3), steps_per_epoch=6, verbose=0)
    assert not model.built
    reference = _model(device)
    for m in (model, reference):
        m.fit(X, Y, epochs=1, verbose=0)
    np.testing.assert_array_equal(to_numpy(model.parameter_buffer.values), to_numpy(reference.parameter_buffer.values))


def test_invalid_train_step_calls_on_an_unbuilt_model_leave_it_unbuilt(device):
    model = _model(device)
    for x, y in [(X, Y + 3), (X, Y[:3]), (X[:, :4].T, Y), (X[:, :0], Y)]:
        with pytest.raises(ValueError):
            model.train_step(x, y)
        assert not model.built
    if device.backend == "array_api_strict" and "device1" in device.name:
        import array_api_strict as xps

        with pytest.raises(ValueError, match="lives on"):
            model.train_step(xps.asarray(X, device=xps.Device("device2")), Y)
        assert not model.built
    reference = _model(device)
    model.train_step(X, Y)
    reference.train_step(X, Y)
    np.testing.assert_array_equal(to_numpy(model.parameter_buffer.values), to_numpy(reference.parameter_buffer.values))


@pytest.mark.parametrize("bad", ["unknown loss", "unknown metric", "duplicate metrics", "owned optimizer",
                                 "softmax over one unit", "from_logits on softmax"])
def test_a_failed_compile_keeps_the_previous_loss_optimizer_and_metrics(device, bad):
    model = _trained(device)
    kept = (model.loss, model.optimizer, model.metrics)
    owner = _model(device, seed=5)
    args = {"unknown loss": ("hinge",), "unknown metric": ("mse", "adam", ["acuracy"]),
            "duplicate metrics": ("sparse_categorical_crossentropy", "adam", ["accuracy", "acc"]),
            "owned optimizer": ("sparse_categorical_crossentropy", owner.optimizer),
            "softmax over one unit": ("binary_crossentropy",),
            "from_logits on softmax": (pn.SparseCategoricalCrossentropy(from_logits=True),)}[bad]
    if bad == "softmax over one unit":
        model = pn.Model([pn.Dense(8, "relu"), pn.Dense(1, "softmax")], device=device)
        kept = (model.loss, model.optimizer, model.metrics)
        with pytest.raises(ValueError, match="applies softmax to 1 unit"):
            model.compile(*args)
        assert (model.loss, model.optimizer, model.metrics) == kept
        return
    with pytest.raises((ValueError, TypeError)):
        model.compile(*args)
    assert model.loss is kept[0] and model.optimizer is kept[1] and model.metrics == kept[2]
    assert owner.optimizer._owner_ref() is owner
    _assert_trains_like_a_fresh_model(device, model)


@pytest.mark.parametrize("values,error,message", [
    ({"dense_0.kernel": np.zeros((5, 8)), "dense_1.kernel": np.zeros((8, 2))}, ValueError, r"must have shape \(8, 3\)"),
    ({"dense_0.bias": np.zeros(8), "dense_9.kernel": np.zeros(3)}, KeyError, "unknown parameter names"),
    ({"dense_0.bias": np.zeros(8), "dense_1.bias": np.array([0.0, np.nan, 0.0])}, ValueError, "NaN or inf"),
    ([np.zeros(8)], TypeError, "values must be a dict"),
])
def test_a_failed_set_parameters_changes_no_parameter(device, values, error, message):
    model = _trained(device)
    before = _state(model)
    with pytest.raises(error, match=message):
        model.set_parameters(values)
    for name, value in _state(model)[0].items():
        np.testing.assert_array_equal(value, before[0][name])
    _assert_trains_like_a_fresh_model(device, model)


def test_a_failed_move_leaves_the_model_where_it_was(device, monkeypatch):
    """The target's dropout generator fails after the parameters were copied: nothing may have moved."""
    model = _trained(device)
    before = _state(model)
    target = "array_api_strict" if device.backend != "array_api_strict" else "numpy"
    target_class = type(pn.resolve_device("cpu", backend=target))

    def broken(self, seed):
        raise MemoryError("out of device memory")

    monkeypatch.setattr(target_class, "random_source", broken)
    with pytest.raises(MemoryError):
        model.to(target)
    monkeypatch.undo()
    assert model.device == device and model.backend == device.backend
    assert all(device.owns(v) for v in model.optimizer.state.values())
    np.testing.assert_array_equal(_state(model)[0]["dense_0.kernel"], before[0]["dense_0.kernel"])
    _assert_trains_like_a_fresh_model(device, model)


def test_a_failed_load_weights_leaves_an_unbuilt_model_unbuilt(tmp_path):
    other = pn.Model([pn.Dense(4, "relu"), pn.Dense(3, "softmax")]).build(5)
    other.save_weights(tmp_path / "other.safetensors")
    model = _model("cpu")
    with pytest.raises(pn.ModelFileError):
        model.load_weights(tmp_path / "other.safetensors")
    assert not model.built


def test_a_failed_save_leaves_the_previous_file(tmp_path):
    path = tmp_path / "m.safetensors"
    model = _trained("cpu")
    model.save(path)
    saved = path.read_bytes()
    model.compile("sparse_categorical_crossentropy", pn.SGD(learning_rate=lambda step: 0.01))
    with pytest.raises(ValueError, match="cannot be recorded|callable"):
        model.save(path)
    assert path.read_bytes() == saved and os.listdir(tmp_path) == ["m.safetensors"]
    model.compile("sparse_categorical_crossentropy", "sgd")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        model.save(tmp_path / "missing" / "m.safetensors")


def test_a_failed_model_constructor_leaves_its_layers_free():
    dense = pn.Dense(3)
    try:
        pn.Model([dense, "relu"])
    except TypeError as error:
        kept = error  # an interactive session keeps the traceback, and with it the half-built model
    assert kept.__traceback__ is not None
    model = pn.Model([pn.Dense(2), dense])
    assert [layer.name for layer in model.layers] == ["dense_0", "dense_1"]


def test_a_failed_add_changes_nothing():
    model = pn.Model([pn.Dense(3, name="hidden")])
    with pytest.raises(ValueError, match="'hidden' is already used"):
        model.add(pn.Dense(2, name="hidden"))
    taken = pn.Dense(2)
    pn.Model([taken])
    keep = pn.Model([taken])  # the first model is gone: the layer is free again
    with pytest.raises(ValueError, match="already belongs to another model"):
        model.add(taken)
    assert [layer.name for layer in model.layers] == ["hidden"] and keep.layers == [taken]
    model.build(4)
    with pytest.raises(RuntimeError, match="already built"):
        model.add(pn.Dense(2))
    assert len(model.layers) == 1
