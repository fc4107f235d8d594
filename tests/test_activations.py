"""Each activation's forward against a NumPy reference and its derivative against central differences."""

import math

import numpy as np
import pytest

from portanet import activations, to_numpy
from portanet.testing import assert_close

_C = math.sqrt(2 / math.pi)

REFERENCE = {
    "linear": lambda z: z,
    "relu": lambda z: np.maximum(z, 0),
    "leaky_relu": lambda z: np.where(z > 0, z, 0.01 * z),
    "elu": lambda z: np.where(z > 0, z, np.expm1(np.minimum(z, 0))),
    "gelu": lambda z: 0.5 * z * (1 + np.tanh(_C * (z + 0.044715 * z**3))),
    "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
    "tanh": np.tanh,
    "softplus": lambda z: np.logaddexp(0, z),
    "softmax": lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True),
}
NAMES = sorted(activations.ACTIVATIONS)


def test_reference_covers_every_activation():
    assert sorted(REFERENCE) == NAMES


def _z(seed=0, shape=(6, 5)):
    z = np.random.default_rng(seed).standard_normal(shape) * 2
    return np.where(np.abs(z) < 1e-3, 0.5, z)  # keep away from the kinks of relu-like functions


@pytest.mark.parametrize("name", NAMES)
def test_forward_matches_numpy_reference(device, name):
    act = activations.get(name)
    z = _z()
    out = act.forward(device.asarray(z, "float64"), device.xp)
    assert_close(out, REFERENCE[name](z), device=device)


@pytest.mark.parametrize("name", NAMES)
def test_backward_matches_central_differences(device, name):
    act, xp, eps = activations.get(name), device.xp, 1e-6
    z, g = _z(1), np.random.default_rng(2).standard_normal((6, 5))
    zd = device.asarray(z, "float64")
    analytic = act.backward(device.asarray(g, "float64"), zd, act.forward(zd, xp), xp)
    numeric = np.zeros_like(z)
    f = REFERENCE[name]
    for idx in np.ndindex(*z.shape):  # d/dz_i of sum(g * f(z)): covers softmax's full Jacobian too
        zp, zm = z.copy(), z.copy()
        zp[idx] += eps
        zm[idx] -= eps
        numeric[idx] = ((g * f(zp)).sum() - (g * f(zm)).sum()) / (2 * eps)
    assert_close(analytic, numeric, device=device, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_backward_are_finite_for_huge_inputs(device, name):
    act, xp = activations.get(name), device.xp
    z = device.asarray(np.array([[-1e4, -50.0, 0.0, 50.0, 1e4]]), "float32")
    with np.errstate(over="raise", invalid="raise"):
        out = act.forward(z, xp)
        grad = act.backward(xp.ones_like(z), z, out, xp)
    assert np.isfinite(to_numpy(out)).all() and np.isfinite(to_numpy(grad)).all()


@pytest.mark.parametrize("name", NAMES)
def test_float32_stays_float32(device, name):
    act, xp = activations.get(name), device.xp
    z = device.asarray(_z(), "float32")
    out = act.forward(z, xp)
    assert out.dtype == z.dtype
    assert act.backward(xp.ones_like(z), z, out, xp).dtype == z.dtype


def test_activation_lookup_by_name_object_and_config():
    assert isinstance(activations.get(None), activations.Linear)
    assert activations.get("leaky_relu").alpha == 0.01
    assert activations.get({"name": "elu", "alpha": 0.5}).alpha == 0.5
    leaky = activations.LeakyReLU(0.2)
    assert activations.get(leaky) is leaky


def test_unknown_activation_names_the_choices():
    with pytest.raises(ValueError, match="unknown activation 'swish'.*relu"):
        activations.get("swish")


def test_activation_arguments_are_validated():
    with pytest.raises(ValueError, match="alpha"):
        activations.LeakyReLU(-1)
    with pytest.raises(ValueError, match="bad arguments"):
        activations.get({"name": "relu", "beta": 2})
