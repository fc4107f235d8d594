"""Backprop gradients against central differences (float64) and PyTorch autograd, on every backend."""

import numpy as np
import pytest

import portanet as pn
from portanet import activations, losses, to_numpy
from portanet.testing import assert_close

# Every activation meets every loss here, likely mistakes included (binary cross-entropy on a softmax): their
# gradients must be right all the same; the SetupWarning they give is tested in test_mistakes.py.
pytestmark = pytest.mark.filterwarnings("ignore::portanet.SetupWarning")

ACTIVATIONS = sorted(activations.ACTIVATIONS)
LOSSES = sorted(losses.LOSSES)
HIDDEN_WIDTHS = [4, 3, 5]  # depth d uses the first d - 1 as hidden widths


def _data(loss_name, n_out, n=5, n_in=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, n_in))
    if loss_name == "sparse_categorical_crossentropy":
        y = rng.integers(0, n_out, n)
    elif loss_name == "categorical_crossentropy":
        y = np.eye(n_out)[rng.integers(0, n_out, n)]
    elif loss_name == "binary_crossentropy":
        y = rng.integers(0, 2, (n, n_out)).astype(np.float64)
    else:
        y = rng.standard_normal((n, n_out))
    return x, y


def _model(device, depth, hidden, output, loss, n_out, seed=0, n_in=3):
    """A float64 MLP with small random biases, so no unit sits exactly on a ReLU kink."""
    layers = [pn.Dense(w, activation=hidden) for w in HIDDEN_WIDTHS[: depth - 1]] + [pn.Dense(n_out, activation=output)]
    model = pn.Model(layers, device=device, dtype="float64", seed=seed).build(n_in)
    rng = np.random.default_rng(seed)
    model.set_parameters({k: rng.uniform(-0.5, 0.5, v.shape) for k, v in model.parameters().items() if k.endswith("bias")})
    return model.compile(loss=loss, optimizer="sgd")


OUTPUT_FOR = {"mse": None, "mae": None, "huber": None, "binary_crossentropy": "sigmoid",
              "categorical_crossentropy": "softmax", "sparse_categorical_crossentropy": "softmax"}


def _output(activation, loss):
    """The activation itself on the output too, unless a cross-entropy needs probabilities it cannot produce
    (sigmoid outputs do not sum to 1 over the classes: portanet refuses them for the categorical cross-entropies)."""
    wanted = OUTPUT_FOR[loss]
    if wanted is None or activation == wanted or (activation == "softmax" and wanted == "sigmoid"):
        return activation
    return wanted


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backprop_matches_central_differences(device, activation, loss, depth):
    """Every activation x every loss x depths 1-4 (widths 4, 3, 5), fused and unfused output paths."""
    n_out = 3 if "categorical" in loss else 2
    x, y = _data(loss, n_out, seed=depth)
    model = _model(device, depth, activation, _output(activation, loss), loss, n_out, seed=depth)
    errors = pn.check_gradients(model, x, y, eps=1e-6)
    assert len(errors) == 2 * depth
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("loss", ["binary_crossentropy", "categorical_crossentropy", "sparse_categorical_crossentropy"])
def test_from_logits_gradients_match_central_differences(device, loss):
    n_out = 3
    x, y = _data(loss, n_out)
    model = _model(device, 3, "tanh", None, losses.get({"name": loss, "from_logits": True}), n_out)
    assert max(pn.check_gradients(model, x, y).values()) < 1e-6


@pytest.mark.parametrize("loss", ["binary_crossentropy", "categorical_crossentropy", "sparse_categorical_crossentropy"])
def test_unfused_crossentropy_gradients_match_central_differences(device, loss):
    """Probabilities from a separate Activation layer take the unfused -y/p path."""
    x, y = _data(loss, 3)
    model = pn.Model([pn.Dense(4, "elu"), pn.Dense(3), pn.Activation(OUTPUT_FOR[loss])], device=device,
                     dtype="float64", seed=2).compile(loss)
    assert model._fusion == "plain"
    assert max(pn.check_gradients(model, x, y).values()) < 1e-6


def test_gradients_with_dropout_and_activation_layers_match_central_differences(device):
    x, y = _data("mse", 2)
    model = pn.Model([pn.Dense(4), pn.Activation("gelu"), pn.Dropout(0.5), pn.Dense(2, "softplus")], device=device,
                     dtype="float64", seed=1).compile("mse")
    assert max(pn.check_gradients(model, x, y).values()) < 1e-6


def test_check_gradients_catches_a_wrong_derivative(device):
    class BrokenTanh(activations.Tanh):
        def backward(self, grad, z, a, xp):
            return grad * (1.0 - a)  # should be 1 - a**2

    x, y = _data("mse", 2)
    model = pn.Model([pn.Dense(4, BrokenTanh()), pn.Dense(2)], device=device, dtype="float64", seed=0).compile("mse")
    errors = pn.check_gradients(model, x, y)
    assert errors["dense_0.kernel"] > 1e-3
    assert errors["dense_1.kernel"] < 1e-6


def test_check_gradients_leaves_a_float32_model_untouched(device):
    x, y = _data("mse", 2)
    model = pn.Model([pn.Dense(3, "tanh"), pn.Dense(2)], device=device, seed=0).compile("mse")
    model.build(3)
    before = {k: to_numpy(v).copy() for k, v in model.parameters().items()}
    assert max(pn.check_gradients(model, x, y).values()) < 1e-6
    for k, v in model.parameters().items():
        assert str(v.dtype).endswith("float32")
        np.testing.assert_array_equal(to_numpy(v), before[k])


# -- PyTorch autograd as a second oracle -------------------------------------------------------------------

def _torch_activation(name, F):
    return {
        "linear": lambda z: z, "relu": F.relu, "leaky_relu": lambda z: F.leaky_relu(z, 0.01), "elu": F.elu,
        "gelu": lambda z: F.gelu(z, approximate="tanh"), "sigmoid": F.sigmoid, "tanh": F.tanh,
        "softplus": F.softplus, "softmax": lambda z: F.softmax(z, dim=1),
    }[name]


def _torch_loss(name, F, torch):
    return {
        "mse": F.mse_loss, "mae": F.l1_loss, "huber": lambda p, y: F.huber_loss(p, y, delta=1.0),
        "binary_crossentropy": F.binary_cross_entropy,
        "categorical_crossentropy": lambda p, y: -(y * torch.log(p)).sum(1).mean(),
        "sparse_categorical_crossentropy": lambda p, y: F.nll_loss(torch.log(p), y),
    }[name]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backprop_matches_torch_autograd(device, activation, loss):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    n_out = 3
    x, y = _data(loss, n_out, n=7, seed=3)
    model = _model(device, 3, activation, OUTPUT_FOR[loss], loss, n_out, seed=3)
    value, grads = model.loss_and_grads(x, y)

    params = {k: torch.tensor(to_numpy(v), requires_grad=True) for k, v in model.parameters().items()}
    h = torch.tensor(x)
    for i, layer in enumerate(model.layers):
        h = h @ params[f"dense_{i}.kernel"] + params[f"dense_{i}.bias"]
        h = _torch_activation(layer.activation.name, F)(h)
    target = torch.tensor(y) if loss != "sparse_categorical_crossentropy" else torch.tensor(y, dtype=torch.int64)
    expected = _torch_loss(loss, F, torch)(h, target)
    expected.backward()

    assert abs(value - expected.item()) < 1e-10 * max(1.0, abs(expected.item()))
    for name, grad in grads.items():
        assert_close(grad, params[name].grad, device=device, rtol=1e-9, atol=1e-12, err_msg=name)
