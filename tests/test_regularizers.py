"""L1, L2 and L1L2 penalties and gradients against PyTorch autograd on every backend; names, defaults, errors."""

import numpy as np
import pytest

from portanet import regularizers
from portanet.testing import assert_close

torch = pytest.importorskip("torch")

CASES = [regularizers.L1(0.03), regularizers.L2(0.07), regularizers.L1L2(l1=0.02, l2=0.05), regularizers.L1L2()]


def _weights():
    """A (4, 3) kernel with exact zeros, where |w| has no derivative and both torch and portanet take 0."""
    w = np.random.default_rng(0).standard_normal((4, 3))
    w[0, 0] = w[2, 1] = 0.0
    return w


def _torch_penalty(reg, w):
    l1, l2 = getattr(reg, "l1", 0.0), getattr(reg, "l2", 0.0)
    return l1 * torch.sum(torch.abs(w)) + l2 * torch.sum(w * w)


@pytest.mark.parametrize("reg", CASES, ids=repr)
def test_penalty_and_gradient_match_torch_autograd(device, reg):
    w0 = _weights()
    w = device.asarray(w0, "float64")
    tw = torch.tensor(w0, requires_grad=True)
    penalty = _torch_penalty(reg, tw)
    penalty.backward()
    value = reg(w, device.xp)
    assert value.shape == ()
    assert_close(value, penalty.detach(), device=device, rtol=1e-14, atol=1e-15)
    assert_close(reg.gradient(w, device.xp), tw.grad, device=device, rtol=1e-14, atol=1e-15)


def test_gradient_matches_central_differences_away_from_zero():
    w = np.random.default_rng(1).standard_normal(7) + 3.0  # no zeros: |w| is differentiable
    reg, h = regularizers.L1L2(l1=0.1, l2=0.2), 1e-6
    xp = __import__("array_api_compat").array_namespace(w)
    numeric = [(float(reg(w + h * e, xp)) - float(reg(w - h * e, xp))) / (2 * h) for e in np.eye(7)]
    np.testing.assert_allclose(reg.gradient(w, xp), numeric, rtol=1e-8)


def test_float32_stays_float32(device):
    w = device.asarray(_weights(), "float32")
    reg = regularizers.L1L2(0.01, 0.01)
    assert reg(w, device.xp).dtype == w.dtype and reg.gradient(w, device.xp).dtype == w.dtype


def test_keras_names_and_defaults():
    assert regularizers.get("l1") == regularizers.L1(0.01)
    assert regularizers.get("l2") == regularizers.L2(0.01)
    assert regularizers.get("l1_l2") == regularizers.L1L2(0.0, 0.0)
    assert regularizers.get("L1L2") == regularizers.L1L2()
    assert regularizers.get(None) is None


@pytest.mark.parametrize("reg", CASES, ids=repr)
def test_config_round_trip(reg):
    config = reg.get_config()
    assert regularizers.get(config) == reg and regularizers.get(config) is not reg


@pytest.mark.parametrize("make,match", [
    (lambda: regularizers.L1(-0.1), "L1 l1 must be a finite number >= 0, got -0.1"),
    (lambda: regularizers.L2(float("nan")), "L2 l2 must be a finite number >= 0"),
    (lambda: regularizers.L1L2(l2="0.1"), "L1L2 l2"),
    (lambda: regularizers.get("l3"), r"unknown regularizer 'l3'; expected one of \['l1', 'l1_l2', 'l2'\]"),
    (lambda: regularizers.get({"name": "l1", "l2": 0.1}), "bad arguments for regularizer 'l1'"),
])
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# -- in a model: Dense's kernel_regularizer / bias_regularizer ---------------------------------------------------------
def _regularized(device, **kwargs):
    """Dense(4, tanh) with L1L2 on its kernel and L2 on its bias, then Dense(3, softmax) with "l2" on its kernel;
    float64, random non-zero biases (|w| is differentiable everywhere they are checked)."""
    import portanet as pn

    layers = [pn.Dense(4, "tanh", kernel_regularizer=regularizers.L1L2(l1=0.01, l2=0.02),
                       bias_regularizer=regularizers.L2(0.03)),
              pn.Dense(3, "softmax", kernel_regularizer="l2")]
    model = pn.Model(layers, device=device, dtype="float64", seed=0).build(5)
    rng = np.random.default_rng(3)
    model.set_parameters({k: rng.uniform(0.2, 0.6, v.shape) * rng.choice([-1, 1], v.shape)
                          for k, v in model.parameters().items() if k.endswith("bias")})
    return model.compile("sparse_categorical_crossentropy", kwargs.get("optimizer", "sgd"))


def _torch_loss(model, x, y):
    """The same model in torch: cross-entropy plus the penalties, on leaf tensors holding the model's weights."""
    from portanet import to_numpy

    w = {k: torch.tensor(to_numpy(v).copy(), requires_grad=True) for k, v in model.parameters().items()}
    h = torch.tanh(torch.tensor(x) @ w["dense_0.kernel"] + w["dense_0.bias"])
    logits = h @ w["dense_1.kernel"] + w["dense_1.bias"]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(y))
    penalty = (0.01 * w["dense_0.kernel"].abs().sum() + 0.02 * (w["dense_0.kernel"] ** 2).sum()
               + 0.03 * (w["dense_0.bias"] ** 2).sum() + 0.01 * (w["dense_1.kernel"] ** 2).sum())
    return loss + penalty, w


X = np.random.default_rng(4).standard_normal((12, 5))
Y = np.random.default_rng(5).integers(0, 3, 12)


def test_penalties_are_in_the_loss_and_their_gradients_in_the_parameter_gradients(device):
    model = _regularized(device)
    loss, grads = model.loss_and_grads(X, Y)
    expected, w = _torch_loss(model, X, Y)
    expected.backward()
    expected = expected.detach()
    assert loss == pytest.approx(expected.item(), rel=1e-12)
    for name, g in grads.items():
        assert_close(g, w[name].grad, device=device, rtol=1e-12, atol=1e-14, err_msg=name)
    assert model.evaluate(X, Y)["loss"] == pytest.approx(expected.item(), rel=1e-12)  # as Keras reports it


def test_fit_reports_the_regularized_loss_and_steps_with_its_gradient(device):
    model = _regularized(device)
    expected, w = _torch_loss(model, X, Y)
    expected.backward()
    expected = expected.detach()
    history = model.fit(X, Y, epochs=1, batch_size=12, shuffle=False, verbose=0)
    assert history.history["loss"][0] == pytest.approx(expected.item(), rel=1e-12)
    for name, value in model.parameters().items():  # one SGD step (lr 0.01) on loss + penalty
        assert_close(value, w[name].detach() - 0.01 * w[name].grad, device=device, rtol=1e-12, atol=1e-14,
                     err_msg=name)


def test_regularized_gradients_match_central_differences(device):
    import portanet as pn

    errors = pn.check_gradients(_regularized(device), X, Y, max_per_param=None)
    assert max(errors.values()) < 1e-6, errors


def test_regularizers_by_name_are_keras_defaults_and_survive_saving(tmp_path):
    import portanet as pn

    model = pn.Model([pn.Dense(3, kernel_regularizer="l1_l2", bias_regularizer={"name": "l1", "l1": 0.5})]).build(2)
    layer = model.layers[0]
    assert layer.kernel_regularizer == regularizers.L1L2(0.0, 0.0) and layer.bias_regularizer == regularizers.L1(0.5)
    model.compile("mse").save(tmp_path / "m.safetensors")
    loaded = pn.load(tmp_path / "m.safetensors").layers[0]
    assert loaded.kernel_regularizer == layer.kernel_regularizer and loaded.bias_regularizer == layer.bias_regularizer


def test_a_bad_regularizer_names_the_argument():
    import portanet as pn

    with pytest.raises(ValueError, match=r"Dense kernel_regularizer: unknown regularizer 'l3'; expected one of"):
        pn.Dense(3, kernel_regularizer="l3")
    with pytest.raises(ValueError, match=r"Dense bias_regularizer: .*L2 l2 must be a finite number >= 0, got -1"):
        pn.Dense(3, bias_regularizer={"name": "l2", "l2": -1})
    with pytest.raises(TypeError, match=r"Dense kernel_regularizer: regularizer must be a name"):
        pn.Dense(3, kernel_regularizer=0.01)
