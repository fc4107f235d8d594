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
