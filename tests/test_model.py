"""Model behaviour: agreement across backends, device strictness, compile/fit/evaluate/predict contracts."""

import numpy as np
import pytest

import portanet as pn
from portanet import to_numpy
from portanet.testing import assert_close

RNG = np.random.default_rng(0)
X = RNG.standard_normal((40, 6))
LABELS = (X[:, 0] + X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1).astype(np.int64)


def _classifier(device, dtype="float32", seed=0):
    model = pn.Model([pn.Dense(8, "relu"), pn.Dropout(0.2), pn.Dense(5, "tanh"), pn.Dense(3, "softmax")],
                     device=device, dtype=dtype, seed=seed)
    return model.compile("sparse_categorical_crossentropy", pn.Adam(lr=0.01), metrics=["accuracy"])


def _host(model):
    return {k: to_numpy(v).copy() for k, v in model.parameters().items()}


def test_forward_agrees_across_backends_in_float64(device):
    reference = _classifier("cpu", "float64").build(6).predict(X)
    result = _classifier(device, "float64").build(6).predict(X)
    assert_close(result, reference, device=device, rtol=1e-10, atol=1e-10)


def test_training_agrees_across_backends_without_dropout(device):
    def trained(dev):
        model = pn.Model([pn.Dense(8, "elu"), pn.Dense(3, "softmax")], device=dev, dtype="float64", seed=1)
        model.compile("sparse_categorical_crossentropy", pn.Adam(lr=0.01))
        model.fit(X, LABELS, epochs=3, batch_size=8, verbose=0)
        return model

    reference = _host(trained("cpu"))
    for name, value in trained(device).parameters().items():
        assert_close(value, reference[name], device=device, rtol=1e-9, atol=1e-12, err_msg=name)


def test_parameters_optimizer_state_and_activations_stay_on_the_model_device(device):
    seen = []

    class Recording(pn.Dense):
        def forward_with_cache(self, x, training=False):
            out, cache = super().forward_with_cache(x, training)
            seen.append(device.owns(x) and device.owns(out))
            return out, cache

        def logits(self, x):
            z = super().logits(x)
            seen.append(device.owns(x) and device.owns(z))
            return z

        def backward(self, grad_out, cache, need_input_grad=True, fused=False):
            seen.append(device.owns(grad_out))
            return super().backward(grad_out, cache, need_input_grad, fused)

    model = pn.Model([Recording(4, "relu"), pn.Dropout(0.5), Recording(3, "softmax")], device=device, seed=0)
    model.compile("sparse_categorical_crossentropy", "adam", ["accuracy"])
    model.fit(X, LABELS, epochs=1, batch_size=16, verbose=0)
    assert seen and all(seen)
    assert all(device.owns(v) for v in model.parameters().values())
    assert all(device.owns(v) for v in model.optimizer.state.values())
    assert device.owns(model.predict(X))


def test_data_on_another_device_raises_in_custom_loops_and_is_moved_by_fit():
    aas = pytest.importorskip("array_api_strict")
    model = _classifier(pn.resolve_device("device1", backend=aas))
    other = pn.resolve_device("device2", backend=aas)
    x2, y2 = other.asarray(X, "float32"), other.asarray(LABELS, "int64")
    with pytest.raises(ValueError, match=r"x lives on .*device2.* but the model is on array_api_strict:device1"):
        model.train_step(x2, y2)
    assert not model.built or all(model.parameters())
    model.fit(x2, y2, epochs=1, verbose=0)
    assert model.predict(x2).device == aas.Device("device1")


def test_train_step_returns_the_loss_on_the_device(device):
    model = _classifier(device)
    loss = model.train_step(X[:8], LABELS[:8])
    assert device.owns(loss) and loss.shape == ()
    assert np.isfinite(float(loss))


def test_loss_and_grads_updates_nothing(device):
    model = _classifier(device).build(6)
    before = _host(model)
    loss, grads = model.loss_and_grads(X, LABELS)
    assert isinstance(loss, float) and list(grads) == list(model.parameters())
    assert model.optimizer.iterations == 0
    for name, value in _host(model).items():
        np.testing.assert_array_equal(value, before[name])
    for name, g in grads.items():
        assert device.owns(g) and g.shape == model.parameters()[name].shape


def test_float32_stays_float32_end_to_end(device):
    model = _classifier(device, "float32")
    model.fit(X.astype(np.float64), LABELS, epochs=1, verbose=0)
    f32 = device.dtype("float32")
    assert all(v.dtype == f32 for v in model.parameters().values())
    assert all(v.dtype == f32 for v in model.optimizer.state.values())
    assert model.predict(X).dtype == f32
    assert all(g.dtype == f32 for g in model.loss_and_grads(X, LABELS)[1].values())


def test_biases_are_trained(device):
    model = _classifier(device).build(6)
    model.fit(X, LABELS, epochs=2, verbose=0)
    for name, value in model.parameters().items():
        if name.endswith("bias"):
            assert np.abs(to_numpy(value)).max() > 0, name


def test_compile_again_keeps_the_trained_weights(device):
    model = _classifier(device)
    model.fit(X, LABELS, epochs=2, verbose=0)
    trained = _host(model)
    model.compile("sparse_categorical_crossentropy", pn.Adam(lr=1e-4), metrics=["accuracy"])
    for name, value in _host(model).items():
        np.testing.assert_array_equal(value, trained[name])
    assert model.optimizer.lr == 1e-4
    model.fit(X, LABELS, epochs=1, verbose=0)


def test_fit_returns_history_and_evaluate_returns_a_dict(device):
    model = _classifier(device)
    history = model.fit(X, LABELS, epochs=3, batch_size=10, validation_data=(X, LABELS), verbose=0)
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy", "lr"}
    assert all(len(v) == 3 for v in history.history.values())
    result = model.evaluate(X, LABELS)
    assert set(result) == {"loss", "accuracy"} and 0 <= result["accuracy"] <= 1
    assert result["loss"] == pytest.approx(history.history["val_loss"][-1], rel=1e-5)


def test_evaluate_loss_matches_loss_and_grads(device):
    model = _classifier(device, "float64").build(6)
    assert model.evaluate(X, LABELS)["loss"] == pytest.approx(model.loss_and_grads(X, LABELS)[0], rel=1e-12)


def test_predict_returns_host_arrays_on_request(device):
    model = _classifier(device).build(6)
    out = model.predict(X, batch_size=7, to_numpy=True)
    assert isinstance(out, np.ndarray) and out.shape == (40, 3)
    np.testing.assert_allclose(out.sum(axis=1), 1, rtol=1e-5)
    assert_close(model.predict(X, batch_size=7), out, device=device)


def test_parameter_names_follow_layer_order():
    model = _classifier("cpu").build(6)
    assert list(model.parameters()) == ["dense_0.kernel", "dense_0.bias", "dense_1.kernel", "dense_1.bias",
                                        "dense_2.kernel", "dense_2.bias"]
    assert model.count_params() == 6 * 8 + 8 + 8 * 5 + 5 + 5 * 3 + 3


def test_default_initialization_matches_the_activation():
    model = pn.Model([pn.Dense(400, "relu"), pn.Dense(400, "tanh")], seed=0).build(1000)
    params = _host(model)
    assert params["dense_0.kernel"].std() == pytest.approx(np.sqrt(2 / 1000), rel=0.02)          # He normal
    assert np.abs(params["dense_1.kernel"]).max() <= np.sqrt(6 / 800)                          # Glorot uniform
    assert params["dense_1.kernel"].std() == pytest.approx(np.sqrt(6 / 800) / np.sqrt(3), rel=0.02)
    assert not params["dense_0.bias"].any()


def test_dropout_is_off_at_inference(device):
    model = pn.Model([pn.Dropout(0.5)], device=device).compile("mse").build(3)
    x = np.ones((4, 3))
    assert_close(model.predict(x), x, device=device)


def test_set_parameters_checks_names_and_shapes():
    model = _classifier("cpu").build(6)
    before = _host(model)
    with pytest.raises(ValueError, match=r"dense_0.kernel must have shape \(6, 8\), got \(8, 6\)"):
        model.set_parameters({"dense_0.bias": np.ones(8), "dense_0.kernel": np.ones((8, 6))})
    with pytest.raises(KeyError, match="unknown parameter names"):
        model.set_parameters({"nope": np.ones(1)})
    for name, value in _host(model).items():
        np.testing.assert_array_equal(value, before[name])


def test_seed_makes_training_reproducible():
    a, b = _classifier("cpu", seed=3), _classifier("cpu", seed=3)
    a.fit(X, LABELS, epochs=2, verbose=0)
    b.fit(X, LABELS, epochs=2, verbose=0)
    for name, value in _host(a).items():
        np.testing.assert_array_equal(value, _host(b)[name])


_LEADING = {  # a first layer without parameters, and what it computes in training on a whole batch (float64)
    "dropout": (lambda: pn.Dropout(1e-12), lambda x: x * (1.0 / (1.0 - 1e-12))),  # keeps every row, scaled
    "activation": (lambda: pn.Activation("tanh"), np.tanh),
    "batch_normalization": (lambda: pn.BatchNormalization(center=False, scale=False),
                            lambda x: (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-3)),
    "layer_normalization": (lambda: pn.LayerNormalization(center=False, scale=False),
                            lambda x: (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-3)),
}


@pytest.mark.parametrize("lead", list(_LEADING))
def test_a_first_layer_without_parameters_trains_like_its_output_fed_to_the_rest(device, lead):
    """Input dropout (Keras's Dropout on the inputs), an activation or a bare normalization first: no layer before
    the first Dense needs a gradient, and backprop stopped there. It used to go on and hand None to the first layer
    (a TypeError from fit, train_step and loss_and_grads(training=True) for all but LayerNormalization)."""
    make, transform = _LEADING[lead]
    model = pn.Model([make(), pn.Dense(3, "softmax")], device=device, dtype="float64", seed=0)
    model.compile("sparse_categorical_crossentropy", pn.SGD(lr=0.1)).build(6)
    twin = pn.Model([pn.Dense(3, "softmax")], device=device, dtype="float64", seed=1)
    twin.compile("sparse_categorical_crossentropy", pn.SGD(lr=0.1)).build(6)
    twin.set_parameters({k: to_numpy(v) for k, v in model.parameters().items()})
    loss, grads = model.loss_and_grads(X, LABELS, training=True)
    twin_loss, twin_grads = twin.loss_and_grads(transform(X), LABELS, training=True)
    assert loss == pytest.approx(twin_loss, rel=1e-12)
    for name, grad in grads.items():
        assert_close(grad, twin_grads[name], device=device, rtol=1e-10, atol=1e-12)
    model.fit(X, LABELS, epochs=3, batch_size=40, shuffle=False, verbose=0)
    twin.fit(transform(X), LABELS, epochs=3, batch_size=40, shuffle=False, verbose=0)
    for name, value in _host(model).items():
        np.testing.assert_allclose(value, _host(twin)[name], rtol=1e-10, atol=1e-12)
