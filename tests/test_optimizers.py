"""Optimizer updates against torch.optim, state placement and export, argument validation."""

import numpy as np
import pytest

import portanet as pn
from portanet import optimizers, to_numpy
from portanet.testing import assert_close

CONFIGS = [
    ("sgd", {"lr": 0.1}, "SGD", {"lr": 0.1}),
    ("sgd", {"lr": 0.1, "momentum": 0.9}, "SGD", {"lr": 0.1, "momentum": 0.9}),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}, "SGD",
     {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("adam", {"lr": 0.01}, "Adam", {"lr": 0.01}),
    ("adam", {"lr": 0.01, "weight_decay": 0.1}, "Adam", {"lr": 0.01, "weight_decay": 0.1}),
    ("adamw", {"lr": 0.01, "weight_decay": 0.1}, "AdamW", {"lr": 0.01, "weight_decay": 0.1}),
    ("rmsprop", {"lr": 0.01, "epsilon": 1e-8}, "RMSprop", {"lr": 0.01, "alpha": 0.9, "eps": 1e-8}),
    ("rmsprop", {"lr": 0.01, "epsilon": 1e-8, "momentum": 0.5, "centered": True}, "RMSprop",
     {"lr": 0.01, "alpha": 0.9, "eps": 1e-8, "momentum": 0.5, "centered": True}),
]


@pytest.mark.parametrize("name,kwargs,torch_name,torch_kwargs", CONFIGS,
                         ids=[f"{c[0]}-{'-'.join(c[1])}" for c in CONFIGS])
def test_updates_match_torch_optim(device, name, kwargs, torch_name, torch_kwargs):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(10)
    grads = [rng.standard_normal(10) for _ in range(5)]

    opt = optimizers.get({"name": name, **kwargs})
    params = device.asarray(p0, "float64")
    tp = torch.tensor(p0, requires_grad=True)
    topt = getattr(torch.optim, torch_name)([tp], **torch_kwargs)
    for g in grads:
        opt.step(params, device.asarray(g, "float64"))
        tp.grad = torch.tensor(g)
        topt.step()
    assert opt.iterations == 5
    assert_close(params, tp.detach(), device=device, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(optimizers.OPTIMIZERS))
def test_state_lives_on_the_parameters_device(device, name):
    opt = optimizers.get({"name": name, "lr": 0.01, **({"momentum": 0.9} if name in ("sgd", "rmsprop") else {})})
    params = device.asarray(np.ones(4), "float32")
    opt.step(params, device.asarray(np.ones(4), "float32"))
    assert opt.state, "a stateful optimizer keeps slots"
    for slot in opt.state.values():
        assert device.owns(slot) and slot.dtype == params.dtype


@pytest.mark.parametrize("name", sorted(optimizers.OPTIMIZERS))
def test_state_dict_round_trip_continues_identically(device, name):
    rng = np.random.default_rng(1)
    grads = [device.asarray(rng.standard_normal(6), "float64") for _ in range(4)]
    kwargs = {"momentum": 0.9} if name in ("sgd", "rmsprop") else {}
    a, b = optimizers.get({"name": name, **kwargs}), optimizers.get({"name": name, **kwargs})
    pa, pb = device.asarray(np.ones(6), "float64"), device.asarray(np.ones(6), "float64")
    for g in grads[:2]:
        a.step(pa, g)
        b.step(pb, g)
    restored = optimizers.get({"name": name, **kwargs})
    restored.load_state_dict({"iterations": b.iterations, "slots": {k: device.xp.asarray(v, copy=True)
                                                                      for k, v in b.state_dict()["slots"].items()}})
    for g in grads[2:]:
        a.step(pa, g)
        restored.step(pb, g)
    assert_close(pb, pa, device=device, rtol=0, atol=0)


def test_model_optimizer_state_is_on_the_model_device(device):
    x = np.random.default_rng(0).standard_normal((16, 3))
    model = pn.Model([pn.Dense(2)], device=device, seed=0).compile("mse", pn.Adam())
    model.fit(x, x[:, :2], epochs=1, verbose=0)
    for slot in model.optimizer.state.values():
        assert device.owns(slot)


@pytest.mark.parametrize("bad", [{"lr": -1}, {"lr": 0}, {"lr": float("nan")}, {"momentum": 1.5},
                                 {"nesterov": True}, {"weight_decay": -0.1}])
def test_sgd_arguments_are_validated(bad):
    with pytest.raises(ValueError):
        pn.SGD(**bad)


def test_adam_arguments_are_validated():
    with pytest.raises(ValueError, match="beta_1"):
        pn.Adam(beta_1=1.0)
    with pytest.raises(ValueError, match="epsilon"):
        pn.Adam(epsilon=0)


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ValueError, match="unknown optimizer 'adagrad'.*adam"):
        optimizers.get("adagrad")


def test_missing_state_slots_are_reported():
    with pytest.raises(ValueError, match="missing slots"):
        pn.Adam().load_state_dict({"iterations": 1, "slots": {"m": np.zeros(2)}})


def test_learning_rate_can_change_between_steps():
    opt = pn.SGD(lr=1.0)
    p = np.zeros(2)
    opt.step(p, np.ones(2))
    opt.lr = 0.5
    opt.step(p, np.ones(2))
    np.testing.assert_array_equal(to_numpy(p), [-1.5, -1.5])
