"""LayerNormalization and BatchNormalization: forward and backward against torch.nn.LayerNorm / BatchNorm1d
(float64, every backend), finite differences, moving statistics (Keras's update rule, the biased variance),
training vs inference, non-trainable state (optimizer, weight decay, to(), files), and argument errors."""

import numpy as np
import pytest

import portanet as pn
from portanet import to_numpy
from portanet.testing import assert_close

torch = pytest.importorskip("torch")

RNG = np.random.default_rng(0)
X = RNG.standard_normal((16, 5)) * 3 + 1
G = RNG.standard_normal((16, 5))  # an upstream gradient dL/d(output)
TOL = {"rtol": 1e-10, "atol": 1e-12}
AFFINE = [(True, True), (False, True), (True, False), (False, False)]
AFFINE_IDS = ["center-scale", "scale-only", "center-only", "neither"]


def _layer_model(device, layer, width=5):
    """A float64 model holding ``layer`` alone, with random gamma and beta."""
    model = pn.Model([layer], device=device, dtype="float64", seed=0).build(width)
    rng = np.random.default_rng(1)
    model.set_parameters({name: rng.uniform(0.5, 1.5, v.shape) if name.endswith("gamma") else rng.standard_normal(
        v.shape) for name, v in model.parameters().items()})
    return model


def _weights(model, layer):
    """(gamma, beta) as torch tensors (None where the layer does not learn them)."""
    params = model.parameters()
    return tuple(torch.tensor(to_numpy(params[f"{layer.name}.{k}"]).copy(), requires_grad=True)
                 if f"{layer.name}.{k}" in params else None for k in ("gamma", "beta"))


def _forward_backward(device, model, layer, training):
    x = device.asarray(X, "float64")
    with device.scope():
        out, cache = layer.forward_with_cache(x, training)
        dx = layer.backward(device.asarray(G, "float64"), cache)
    return out, dx


def _assert_grads(device, model, layer, gamma, beta):
    grads = {k: v for k, v in model.parameter_buffer.gradients().items()}
    if gamma is not None:
        assert_close(grads[f"{layer.name}.gamma"], gamma.grad, device=device, **TOL)
    if beta is not None:
        assert_close(grads[f"{layer.name}.beta"], beta.grad, device=device, **TOL)


# -- LayerNormalization against torch ------------------------------------------------------------------------------
def test_layer_normalization_matches_torch_layer_norm_forward_and_backward(device):
    layer = pn.LayerNormalization()
    model = _layer_model(device, layer)
    out, dx = _forward_backward(device, model, layer, training=True)
    reference = torch.nn.LayerNorm(5, eps=1e-3, dtype=torch.float64)
    gamma, beta = _weights(model, layer)
    with torch.no_grad():
        reference.weight.copy_(gamma)
        reference.bias.copy_(beta)
    xt = torch.tensor(X, requires_grad=True)
    expected = reference(xt)
    expected.backward(torch.tensor(G))
    assert_close(out, expected.detach(), device=device, **TOL)
    assert_close(dx, xt.grad, device=device, **TOL)
    grads = model.parameter_buffer.gradients()
    assert_close(grads["layer_normalization_0.gamma"], reference.weight.grad, device=device, **TOL)
    assert_close(grads["layer_normalization_0.beta"], reference.bias.grad, device=device, **TOL)


@pytest.mark.parametrize("center,scale", AFFINE, ids=AFFINE_IDS)
def test_layer_normalization_without_gamma_or_beta_matches_torch(device, center, scale):
    layer = pn.LayerNormalization(center=center, scale=scale, epsilon=0.01)
    model = _layer_model(device, layer)
    assert list(model.parameters()) == [f"layer_normalization_0.{k}" for k, on in (("gamma", scale), ("beta", center))
                                        if on]
    out, dx = _forward_backward(device, model, layer, training=False)
    gamma, beta = _weights(model, layer)
    xt = torch.tensor(X, requires_grad=True)
    expected = torch.nn.functional.layer_norm(xt, (5,), gamma, beta, eps=0.01)
    expected.backward(torch.tensor(G))
    assert_close(out, expected.detach(), device=device, **TOL)
    assert_close(dx, xt.grad, device=device, **TOL)
    _assert_grads(device, model, layer, gamma, beta)


# -- BatchNormalization against torch ------------------------------------------------------------------------------
def _torch_batch_norm(model, layer, momentum):
    reference = torch.nn.BatchNorm1d(5, eps=layer.epsilon, momentum=1 - momentum, dtype=torch.float64)
    gamma, beta = _weights(model, layer)
    states = model.parameter_buffer.states()
    with torch.no_grad():
        reference.weight.copy_(gamma)
        reference.bias.copy_(beta)
        reference.running_mean.copy_(torch.tensor(to_numpy(states[f"{layer.name}.moving_mean"])))
        reference.running_var.copy_(torch.tensor(to_numpy(states[f"{layer.name}.moving_variance"])))
    return reference


def test_batch_normalization_training_forward_and_backward_match_torch_autograd(device):
    layer = pn.BatchNormalization()
    model = _layer_model(device, layer)
    out, dx = _forward_backward(device, model, layer, training=True)
    reference = _torch_batch_norm(model, layer, 0.99).train()
    xt = torch.tensor(X, requires_grad=True)
    expected = reference(xt)
    expected.backward(torch.tensor(G))
    assert_close(out, expected.detach(), device=device, **TOL)
    assert_close(dx, xt.grad, device=device, **TOL)
    grads = model.parameter_buffer.gradients()
    assert_close(grads["batch_normalization_0.gamma"], reference.weight.grad, device=device, **TOL)
    assert_close(grads["batch_normalization_0.beta"], reference.bias.grad, device=device, **TOL)


def test_batch_normalization_inference_uses_the_moving_statistics_like_torch_eval(device):
    layer = pn.BatchNormalization()
    model = _layer_model(device, layer)
    rng = np.random.default_rng(2)
    model.parameter_buffer.state[...] = device.asarray(np.concatenate([rng.standard_normal(5),
                                                                       rng.uniform(0.5, 4, 5)]), "float64")
    out, dx = _forward_backward(device, model, layer, training=False)
    reference = _torch_batch_norm(model, layer, 0.99).eval()
    xt = torch.tensor(X, requires_grad=True)
    expected = reference(xt)
    expected.backward(torch.tensor(G))
    assert_close(out, expected.detach(), device=device, **TOL)
    assert_close(dx, xt.grad, device=device, **TOL)
    assert_close(model.predict(X), expected.detach(), device=device, **TOL)


@pytest.mark.parametrize("center,scale", AFFINE, ids=AFFINE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_batch_normalization_without_gamma_or_beta_matches_torch(device, center, scale, training):
    layer = pn.BatchNormalization(center=center, scale=scale, epsilon=0.01)
    model = _layer_model(device, layer)
    out, dx = _forward_backward(device, model, layer, training=training)
    gamma, beta = _weights(model, layer)
    xt = torch.tensor(X, requires_grad=True)
    expected = torch.nn.functional.batch_norm(xt, torch.zeros(5, dtype=torch.float64),
                                              torch.ones(5, dtype=torch.float64), gamma, beta, training=training,
                                              eps=0.01)
    expected.backward(torch.tensor(G))
    assert_close(out, expected.detach(), device=device, **TOL)
    assert_close(dx, xt.grad, device=device, **TOL)
    _assert_grads(device, model, layer, gamma, beta)


def _pair(device, momentum=0.9):
    """A portanet MLP with BatchNormalization and the same network in torch, with the same weights."""
    model = pn.Model([pn.Dense(6, use_bias=False), pn.BatchNormalization(momentum=momentum), pn.Activation("tanh"),
                      pn.Dense(3)], device=device, dtype="float64", seed=4)
    model.compile("mse", pn.SGD(lr=0.1, momentum=0.5)).build(5)
    params = {k: torch.tensor(to_numpy(v).copy()) for k, v in model.parameters().items()}
    net = torch.nn.Sequential(torch.nn.Linear(5, 6, bias=False, dtype=torch.float64),
                              torch.nn.BatchNorm1d(6, eps=1e-3, momentum=1 - momentum, dtype=torch.float64),
                              torch.nn.Tanh(), torch.nn.Linear(6, 3, dtype=torch.float64))
    with torch.no_grad():
        net[0].weight.copy_(params["dense_0.kernel"].T)
        net[3].weight.copy_(params["dense_1.kernel"].T)
        net[3].bias.copy_(params["dense_1.bias"])
    return model, net


def test_training_steps_update_weights_and_moving_statistics_like_torch(device):
    """Keras's rule, moving = moving * momentum + batch * (1 - momentum), with the biased batch variance; torch's
    running_var uses the unbiased one, so the oracle carries the difference."""
    model, net = _pair(device, momentum=0.9)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.5)
    rng = np.random.default_rng(5)
    m, correction = 1 - 0.9, torch.zeros(6, dtype=torch.float64)
    for step in range(4):
        x, y = rng.standard_normal((8 + step, 5)) * 2, rng.standard_normal((8 + step, 3))
        loss = model.train_step(x, y)
        xt = torch.tensor(x)
        with torch.no_grad():  # the batch statistics this step normalizes with
            h = net[0](xt)
            correction = (1 - m) * correction + m * (h.var(0, unbiased=True) - h.var(0, unbiased=False))
        opt.zero_grad()
        expected = torch.nn.functional.mse_loss(net(xt), torch.tensor(y))
        expected.backward()
        opt.step()
        assert_close(loss, expected.detach(), device=device, **TOL)
    states = model.parameter_buffer.states()
    assert_close(states["batch_normalization_0.moving_mean"], net[1].running_mean, device=device, **TOL)
    assert_close(states["batch_normalization_0.moving_variance"], net[1].running_var - correction, device=device,
                 **TOL)
    params = model.parameters()
    assert_close(params["dense_0.kernel"], net[0].weight.detach().T, device=device, **TOL)
    assert_close(params["batch_normalization_0.gamma"], net[1].weight.detach(), device=device, **TOL)
    assert_close(params["batch_normalization_0.beta"], net[1].bias.detach(), device=device, **TOL)
    net.eval()
    with torch.no_grad():
        net[1].running_var -= correction  # inference with portanet's (biased) moving variance
    x = rng.standard_normal((7, 5))
    assert_close(model.predict(x), net(torch.tensor(x)).detach(), device=device, **TOL)


def test_fit_uses_batch_statistics_and_evaluate_and_predict_the_moving_ones(device):
    model, net = _pair(device)
    x, y = RNG.standard_normal((32, 5)), RNG.standard_normal((32, 3))
    model.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0)
    before = to_numpy(model.parameter_buffer.state).copy()
    net.eval()
    result = model.evaluate(x, y)
    model.predict(x)
    assert_close(model.parameter_buffer.state, before, device=device, rtol=0, atol=0)  # inference changes nothing
    # evaluate computes the loss with the moving statistics, at the trained weights
    with torch.no_grad():
        for name, module, key in (("dense_0.kernel", net[0], "weight"), ("dense_1.kernel", net[3], "weight"),
                                  ("batch_normalization_0.gamma", net[1], "weight"),
                                  ("batch_normalization_0.beta", net[1], "bias"), ("dense_1.bias", net[3], "bias")):
            value = torch.tensor(to_numpy(model.parameters()[name]).copy())
            getattr(module, key).copy_(value.T if value.ndim == 2 else value)
        net[1].running_mean.copy_(torch.tensor(before[:6]))
        net[1].running_var.copy_(torch.tensor(before[6:]))
        expected = torch.nn.functional.mse_loss(net(torch.tensor(x)), torch.tensor(y))
    assert result["loss"] == pytest.approx(float(expected), rel=1e-10)


def test_loss_and_grads_in_training_mode_changes_no_state(device):
    model, _ = _pair(device)
    before = to_numpy(model.parameter_buffer.state).copy()
    model.loss_and_grads(X, RNG.standard_normal((16, 3)), training=True)
    model.apply_gradients()  # a step without a training forward: the statistics stay where they were
    assert_close(model.parameter_buffer.state, before, device=device, rtol=0, atol=0)


# -- finite differences --------------------------------------------------------------------------------------------
def test_gradients_of_a_normalized_model_match_central_differences(device):
    model = pn.Model([pn.Dense(6, "tanh"), pn.BatchNormalization(), pn.Dense(4, "elu"), pn.LayerNormalization(),
                      pn.Dense(3, "softmax")], device=device, dtype="float64", seed=2)
    model.compile("sparse_categorical_crossentropy", pn.Adam(lr=0.05))
    x, y = RNG.standard_normal((20, 5)), RNG.integers(0, 3, 20)
    model.fit(x, y, epochs=3, batch_size=5, verbose=0)  # moving statistics away from 0 and 1, gamma and beta from 1, 0
    assert np.abs(to_numpy(model.parameter_buffer.state)[:6]).min() > 0
    errors = pn.check_gradients(model, x[:8], y[:8], max_per_param=None)  # BatchNormalization in inference mode
    assert set(errors) == set(model.parameters()) and len(errors) == 10
    assert max(errors.values()) < 1e-6, errors


# -- non-trainable state ---------------------------------------------------------------------------------------------
def test_moving_statistics_are_state_not_parameters_nor_decayed():
    model = pn.Model([pn.Dense(4), pn.BatchNormalization(), pn.LayerNormalization(), pn.Dense(2)], seed=0)
    model.compile("mse", pn.AdamW(lr=0.1, weight_decay=0.5)).build(3)
    assert list(model.parameters()) == ["dense_0.kernel", "dense_0.bias", "batch_normalization_0.gamma",
                                        "batch_normalization_0.beta", "layer_normalization_0.gamma",
                                        "layer_normalization_0.beta", "dense_1.kernel", "dense_1.bias"]
    assert list(model.parameter_buffer.states()) == ["batch_normalization_0.moving_mean",
                                                     "batch_normalization_0.moving_variance"]
    assert model.count_params() == 12 + 4 + 4 * 4 + 8 + 2
    mask = {name: to_numpy(model.optimizer._decay_mask[offset:offset + size])
            for name, offset, size, _ in model.parameter_buffer.segments()}
    assert [name for name, m in mask.items() if m.all()] == ["dense_0.kernel", "dense_1.kernel"]
    assert all(not m.any() for name, m in mask.items() if not name.endswith("kernel"))
    x = RNG.standard_normal((8, 3))
    params = {k: to_numpy(v).copy() for k, v in model.parameters().items()}
    h = x @ params["dense_0.kernel"] + params["dense_0.bias"]
    model.train_step(x, np.zeros((8, 2)))
    states = model.parameter_buffer.states()  # moved by the update rule alone: no optimizer step, no decay
    np.testing.assert_allclose(to_numpy(states["batch_normalization_0.moving_mean"]), 0.01 * h.mean(0), rtol=1e-5)
    np.testing.assert_allclose(to_numpy(states["batch_normalization_0.moving_variance"]), 0.99 + 0.01 * h.var(0),
                               rtol=1e-5)


def test_state_moves_with_the_model_and_back_bit_for_bit(device):
    model, _ = _pair("cpu")
    model.fit(X, RNG.standard_normal((16, 3)), epochs=2, batch_size=4, verbose=0)
    state, expected = to_numpy(model.parameter_buffer.state).copy(), to_numpy(model.predict(X))
    model.to(device)
    assert model.device == device and device.owns(model.parameter_buffer.state)
    assert_close(model.parameter_buffer.state, state, device=device, rtol=0, atol=0)
    assert_close(model.predict(X), expected, device=device, rtol=1e-12, atol=1e-12)
    model.fit(X, RNG.standard_normal((16, 3)), epochs=1, batch_size=4, verbose=0)  # trains there
    assert device.owns(model.parameter_buffer.state) and device.owns(model.optimizer._decay_mask)
    moved = to_numpy(model.parameter_buffer.state).copy()
    model.to("numpy")
    assert model.backend == "numpy"
    np.testing.assert_array_equal(to_numpy(model.parameter_buffer.state), moved)


def test_state_is_saved_in_model_files_and_loaded_on_any_backend(device, tmp_path):
    model, _ = _pair("cpu")
    model.fit(X, RNG.standard_normal((16, 3)), epochs=2, batch_size=4, verbose=0)
    model.save(tmp_path / "m.safetensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m.safetensors"), framework="numpy") as f:
        assert {"batch_normalization_0.moving_mean", "batch_normalization_0.moving_variance"} <= set(f.keys())
    loaded = pn.load(tmp_path / "m.safetensors", device=device)
    assert_close(loaded.parameter_buffer.state, model.parameter_buffer.state, device=device, rtol=0, atol=0)
    assert_close(loaded.predict(X), model.predict(X), device=device, rtol=1e-12, atol=1e-12)
    assert loaded.get_config() == model.get_config()


def test_layer_configs_round_trip():
    for layer in (pn.LayerNormalization(epsilon=1e-5, center=False, gamma_regularizer="l2"),
                  pn.BatchNormalization(momentum=0.9, scale=False, moving_variance_initializer={"name": "constant",
                                                                                                "value": 2.0})):
        twin = pn.layers.get(layer.get_config())
        assert type(twin) is type(layer) and twin.get_config() == layer.get_config()
    assert repr(pn.BatchNormalization(momentum=0.9)) == "BatchNormalization(momentum=0.9)"


def test_keras_defaults():
    ln, bn = pn.LayerNormalization(), pn.BatchNormalization()
    assert (ln.axis, ln.epsilon, ln.center, ln.scale) == (-1, 1e-3, True, True)
    assert (bn.axis, bn.momentum, bn.epsilon, bn.center, bn.scale) == (-1, 0.99, 1e-3, True, True)
    model = pn.Model([bn], seed=0).build(3)
    assert to_numpy(model.parameter_buffer.values).tolist() == [1, 1, 1, 0, 0, 0]
    assert to_numpy(model.parameter_buffer.state).tolist() == [0, 0, 0, 1, 1, 1]


# -- errors ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,message", [
    (lambda: pn.BatchNormalization(momentum=1.5), r"BatchNormalization momentum must be a number in \[0, 1\], got 1.5"),
    (lambda: pn.BatchNormalization(epsilon=0), r"BatchNormalization epsilon must be a positive finite number, got 0"),
    (lambda: pn.LayerNormalization(epsilon=-1e-3), r"LayerNormalization epsilon must be a positive finite number"),
    (lambda: pn.LayerNormalization(axis=0), r"LayerNormalization axis must be -1 .* got 0"),
    (lambda: pn.BatchNormalization(axis=2), r"BatchNormalization axis must be -1 .* got 2"),
    (lambda: pn.LayerNormalization(center="yes"), r"LayerNormalization center must be True or False, got 'yes'"),
    (lambda: pn.BatchNormalization(gamma_initializer="onez"), r"BatchNormalization gamma_initializer: unknown "
                                                              r"initializer 'onez'"),
    (lambda: pn.BatchNormalization(moving_variance_initializer="he_normal"),
     r"moving_variance_initializer must be a constant initializer \(zeros, ones or constant\), got HeNormal"),
    (lambda: pn.LayerNormalization(beta_regularizer="l3"), r"LayerNormalization beta_regularizer: unknown "
                                                           r"regularizer 'l3'"),
])
def test_bad_arguments_raise_naming_them(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def _host_state(model):
    return (to_numpy(model.parameter_buffer.values).copy(), to_numpy(model.parameter_buffer.state).copy(),
            model.optimizer.iterations)


def test_a_one_row_training_batch_raises_and_changes_nothing(device):
    model, _ = _pair(device)
    model.train_step(X[:4], np.zeros((4, 3)))
    before = _host_state(model)
    with pytest.raises(ValueError, match=r"BatchNormalization 'batch_normalization_0' needs at least 2 rows per "
                                         r"training batch .* got a batch of 1"):
        model.train_step(X[:1], np.zeros((1, 3)))
    after = _host_state(model)
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])
    assert after[2] == before[2]
    assert model.predict(X[:1]).shape == (1, 3)  # inference on one row is fine
    assert model.evaluate(X[:1], np.zeros((1, 3)))["loss"] >= 0


@pytest.mark.parametrize("rows,kwargs,train_rows", [
    (16, {"batch_size": 5}, 16),
    (33, {"batch_size": 32}, 33),
    (21, {"batch_size": 4, "validation_split": 0.2}, 17),  # 4 rows held out, 17 = 4 * 4 + 1 left for training
])
@pytest.mark.parametrize("built", [False, True], ids=["unbuilt", "trained"])
def test_fit_refuses_a_batch_size_that_leaves_one_row_before_anything_changes(rows, kwargs, train_rows, built):
    model, _ = _pair("cpu")
    if not built:
        model = pn.Model([pn.Dense(6), pn.BatchNormalization(), pn.Dense(3)], seed=0).compile("mse")
    else:
        model.train_step(X[:4], np.zeros((4, 3)))
        before = _host_state(model)
    x, y = RNG.standard_normal((rows, 5)), RNG.standard_normal((rows, 3))
    with pytest.raises(ValueError, match=rf"batch_size={kwargs['batch_size']} splits the {train_rows} training rows "
                                         r"into batches the last of which has 1 row\(s\), but layer "
                                         r"'batch_normalization_0' \(BatchNormalization\) needs at least 2 rows"):
        model.fit(x, y, epochs=1, verbose=0, **kwargs)
    if not built:
        assert not model.built
    else:
        after = _host_state(model)
        np.testing.assert_array_equal(after[0], before[0])
        np.testing.assert_array_equal(after[1], before[1])
        assert after[2] == before[2]


def test_fit_counts_the_rows_a_stratified_split_really_leaves_for_training():
    # 5 classes of 2 rows: validation_split=0.6 asks for 6 rows, but each class keeps one, so 5 are held out and 5
    # train: batches of 4 and 1 row, refused before anything changes (the check used to count 4 rows and let the
    # second step fail mid-epoch).
    model = pn.Model([pn.Dense(4), pn.BatchNormalization(), pn.Dense(5, "softmax")], seed=0)
    model.compile("sparse_categorical_crossentropy", "sgd")
    x, y = RNG.standard_normal((10, 3)), np.repeat(np.arange(5), 2)
    with pytest.raises(ValueError, match=r"batch_size=4 splits the 5 training rows into batches the last of which "
                                         r"has 1 row\(s\)"):
        model.fit(x, y, batch_size=4, validation_split=0.6, epochs=1, verbose=0)
    assert not model.built and model.optimizer.iterations == 0
    model.fit(x, y, batch_size=5, validation_split=0.6, epochs=1, verbose=0)
    assert model.optimizer.iterations == 1
