"""Optimizer updates against torch.optim, state placement and export, argument validation."""

import warnings

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


def test_the_state_of_an_optimizer_that_never_stepped_resets_it(device):
    """A snapshot taken before the first step (fit's rollback on a fresh model) has no slots yet: restoring it must
    give an optimizer that steps like a new one, not raise."""
    params = device.asarray(np.ones(3), "float64")
    fresh, used = pn.Adam(learning_rate=0.1), pn.Adam(learning_rate=0.1)
    used.step(params, device.asarray(np.ones(3), "float64"))
    used.load_state_dict(fresh.state_dict())
    assert used.iterations == 0 and used.state == {}
    a, b = device.copy(params), device.copy(params)
    for opt, p in ((fresh, a), (used, b)):
        opt.step(p, device.asarray(np.arange(3.0), "float64"))
    np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def test_learning_rate_can_change_between_steps():
    opt = pn.SGD(lr=1.0)
    p = np.zeros(2)
    opt.step(p, np.ones(2))
    opt.lr = 0.5
    opt.step(p, np.ones(2))
    np.testing.assert_array_equal(to_numpy(p), [-1.5, -1.5])


# -- learning-rate schedules ---------------------------------------------------------------------------------------

SEGMENTS = [(0, 6), (6, 3), (9, 4)]  # three parameter tensors in one flat buffer of 13


def _on(device, host):
    """A float64 copy of ``host`` on ``device`` (clipping rewrites gradients in place; NumPy would share memory)."""
    return device.asarray(np.array(host, dtype=np.float64), "float64")


def _torch_params(torch, p0):
    """The flat ``p0`` as three torch leaf tensors (the SEGMENTS), float64."""
    return [torch.tensor(p0[o:o + n], requires_grad=True) for o, n in SEGMENTS]


def _set_grads(tparams, g):
    for t, (o, n) in zip(tparams, SEGMENTS):
        t.grad = __import__("torch").tensor(g[o:o + n])


def _flat(tparams):
    return np.concatenate([t.detach().numpy() for t in tparams])


SCHEDULED = [
    ("sgd-momentum-exponential", lambda: pn.SGD(pn.ExponentialDecay(0.1, 5, 0.5), momentum=0.9),
     lambda torch, ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
     lambda torch, o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.5 ** (1 / 5))),
    ("adam-cosine-warmup", lambda: pn.Adam(pn.CosineDecay(0.001, 20, warmup_target=0.01, warmup_steps=10)),
     lambda torch, ps: torch.optim.Adam(ps, lr=0.01),
     lambda torch, o: torch.optim.lr_scheduler.SequentialLR(o, [
         torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=10),
         torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20)], milestones=[10])),
    ("adamw-one-cycle", lambda: pn.AdamW(pn.OneCycle(0.05, 30), weight_decay=0.1),
     lambda torch, ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
     lambda torch, o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=30, cycle_momentum=False)),
    ("rmsprop-staircase", lambda: pn.RMSprop(pn.ExponentialDecay(0.01, 4, 0.7, staircase=True), epsilon=1e-8),
     lambda torch, ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.9, eps=1e-8),
     lambda torch, o: torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.7)),
    ("sgd-callable", lambda: pn.SGD(lambda step: 0.1 / (1 + step)),
     lambda torch, ps: torch.optim.SGD(ps, lr=0.1),
     lambda torch, o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1 / (1 + step))),
]


@pytest.mark.parametrize("make,make_torch,make_scheduler", [c[1:] for c in SCHEDULED], ids=[c[0] for c in SCHEDULED])
def test_scheduled_trajectories_match_torch_optim_with_its_scheduler(device, make, make_torch, make_scheduler):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    p0, grads = rng.standard_normal(13), [rng.standard_normal(13) for _ in range(30)]
    opt, params = make(), device.asarray(p0, "float64")
    tparams = _torch_params(torch, p0)
    topt = make_torch(torch, tparams)
    sched = make_scheduler(torch, topt)
    for step, g in enumerate(grads):
        assert opt.learning_rate == pytest.approx(topt.param_groups[0]["lr"], rel=1e-12), f"step {step}"
        opt.step(params, _on(device, g))
        _set_grads(tparams, g)
        topt.step()
        sched.step()
    assert opt.iterations == 30
    assert_close(params, _flat(tparams), device=device, rtol=1e-12, atol=1e-12)


def test_learning_rate_reads_the_schedule_at_the_updates_made_so_far():
    schedule = pn.ExponentialDecay(1.0, 1, 0.5)
    opt = pn.SGD(learning_rate=schedule)
    p = np.zeros(1)
    for t in range(4):
        assert opt.learning_rate == opt.lr == schedule(t) == 0.5**t
        opt.step(p, np.ones(1))
    np.testing.assert_allclose(p, [-(1 + 0.5 + 0.25 + 0.125)], rtol=1e-15)  # step t used schedule(t), t from 0


def test_assigning_a_float_replaces_the_schedule():
    opt = pn.Adam(pn.CosineDecay(0.1, 10))
    opt.lr = 0.5
    assert opt.schedule is None and opt.learning_rate == 0.5
    assert opt.get_config()["learning_rate"] == 0.5
    opt.learning_rate = pn.InverseTimeDecay(0.2, 1, 1.0)
    opt.step(np.zeros(2), np.ones(2))
    assert opt.lr == 0.1  # 0.2 / (1 + 1)


def test_schedule_config_round_trips_through_get():
    opt = pn.SGD(learning_rate=pn.OneCycle(0.1, 100), momentum=0.9, global_clipnorm=1.0)
    config = opt.get_config()
    assert config["learning_rate"] == {"name": "one_cycle", **{k: v for k, v in pn.OneCycle(0.1, 100).get_config()
                                                               .items() if k != "name"}}
    rebuilt = optimizers.get(config)
    assert rebuilt.schedule == opt.schedule and rebuilt.global_clipnorm == 1.0 and rebuilt.get_config() == config


def test_configs_written_with_lr_still_load():
    opt = optimizers.get({"name": "adam", "lr": 0.02, "weight_decay": 0.0})
    assert opt.learning_rate == 0.02


def test_a_plain_callable_trains_but_cannot_be_saved():
    opt = pn.SGD(lambda step: 0.1)
    assert "learning_rate=<function" in repr(opt)
    with pytest.raises(ValueError, match="plain callable has no config"):
        opt.get_config()


def test_a_plain_callable_leaves_save_weights_working_and_only_save_refusing(tmp_path):
    x = np.random.default_rng(0).standard_normal((16, 3))
    model = pn.Model([pn.Dense(2)], seed=0).compile("mse", pn.SGD(lambda step: 0.1 / (1 + step)))
    model.fit(x, x[:, :2], epochs=1, batch_size=4, verbose=0)
    with pytest.raises(ValueError, match="plain callable has no config"):
        model.save(tmp_path / "m.safetensors")
    assert model.get_config(include_optimizer=False)["optimizer"] is None
    model.save_weights(tmp_path / "w.safetensors")  # weights need no optimizer
    twin = pn.Model([pn.Dense(2)]).load_weights(tmp_path / "w.safetensors")
    assert_close(twin.predict(x), model.predict(x), rtol=0, atol=0)


def test_a_model_saves_and_loads_its_schedule(tmp_path):
    x = np.random.default_rng(0).standard_normal((16, 3))
    model = pn.Model([pn.Dense(2)], seed=0).compile("mse", pn.SGD(pn.PolynomialDecay(0.1, 10), clipvalue=0.5))
    model.fit(x, x[:, :2], epochs=2, batch_size=4, verbose=0)
    model.save(tmp_path / "m.safetensors")
    loaded = pn.load(tmp_path / "m.safetensors")
    assert loaded.optimizer.schedule == pn.PolynomialDecay(0.1, 10) and loaded.optimizer.clipvalue == 0.5
    assert loaded.optimizer.learning_rate == model.optimizer.learning_rate == pn.PolynomialDecay(0.1, 10)(8)


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), "0.1", True])
def test_a_schedule_giving_a_bad_rate_raises_before_updating(value):
    opt = pn.SGD(lambda step: value)
    p, g = np.ones(2), np.ones(2)
    with pytest.raises(ValueError, match=r"gave .* at step 0; expected a finite number >= 0"):
        opt.step(p, g)
    np.testing.assert_array_equal(p, [1.0, 1.0])


def test_learning_rate_and_lr_together_raise():
    with pytest.raises(ValueError, match="both learning_rate=0.1 and its alias lr=0.2"):
        pn.SGD(learning_rate=0.1, lr=0.2)


def test_defaults_are_unchanged():
    assert (pn.SGD().lr, pn.Adam().lr, pn.AdamW().lr, pn.RMSprop().lr) == (0.01, 1e-3, 1e-3, 1e-3)
    assert pn.AdamW().weight_decay == 0.01 and pn.AdamW().decoupled_weight_decay
    assert not pn.SGD(weight_decay=0.1).decoupled_weight_decay


# -- gradient clipping ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_norm", [0.5, 100.0], ids=["clips", "leaves"])
def test_global_clipnorm_matches_clip_grad_norm(device, max_norm):
    torch = pytest.importorskip("torch")
    g = np.random.default_rng(6).standard_normal(13)
    grads = _on(device, g)
    pn.SGD(global_clipnorm=max_norm).clip_gradients(grads)
    tparams = _torch_params(torch, np.zeros(13))
    _set_grads(tparams, g)
    torch.nn.utils.clip_grad_norm_(tparams, max_norm)
    assert_close(grads, np.concatenate([t.grad.numpy() for t in tparams]), device=device, rtol=1e-13, atol=1e-15)


def test_clipnorm_clips_each_segment_like_clip_grad_norm_per_tensor(device):
    torch = pytest.importorskip("torch")
    g = np.random.default_rng(7).standard_normal(13) * np.repeat([3.0, 0.1, 1.0], [6, 3, 4])
    grads = _on(device, g)
    opt = pn.Adam(clipnorm=1.0)
    opt.set_segments(SEGMENTS)
    opt.clip_gradients(grads)
    tparams = _torch_params(torch, np.zeros(13))
    _set_grads(tparams, g)
    for t in tparams:  # one tensor at a time: its own norm
        torch.nn.utils.clip_grad_norm_([t], 1.0)
    expected = np.concatenate([t.grad.numpy() for t in tparams])
    assert_close(grads, expected, device=device, rtol=1e-13, atol=1e-15)
    assert not np.allclose(expected[6:9], g[6:9] / np.linalg.norm(g) * 1.0)  # a small tensor keeps its size


def test_clipnorm_without_segments_treats_the_buffer_as_one_tensor(device):
    g = np.random.default_rng(8).standard_normal(13)
    a, b = _on(device, g), _on(device, g)
    pn.SGD(clipnorm=0.5).clip_gradients(a)
    pn.SGD(global_clipnorm=0.5).clip_gradients(b)
    assert_close(a, b, device=device, rtol=0, atol=0)


def test_clipvalue_matches_clip_grad_value(device):
    torch = pytest.importorskip("torch")
    g = np.random.default_rng(9).standard_normal(13) * 2
    grads = _on(device, g)
    pn.RMSprop(clipvalue=0.7).clip_gradients(grads)
    t = torch.tensor(g, requires_grad=True)
    t.grad = torch.tensor(g)
    torch.nn.utils.clip_grad_value_([t], 0.7)
    assert_close(grads, t.grad, device=device, rtol=0, atol=0)


CLIPPED = [
    ("adam-global", {"global_clipnorm": 1.0}, "global"),
    ("sgd-momentum-per-tensor", {"clipnorm": 0.8}, "tensor"),
    ("adamw-value", {"clipvalue": 0.3}, "value"),
]


@pytest.mark.parametrize("kwargs,kind", [c[1:] for c in CLIPPED], ids=[c[0] for c in CLIPPED])
def test_clipped_trajectories_match_torch(device, kwargs, kind):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(10)
    p0, grads = rng.standard_normal(13), [rng.standard_normal(13) * 2 for _ in range(8)]
    name = {"global": "adam", "tensor": "sgd", "value": "adamw"}[kind]
    extra = {"sgd": {"momentum": 0.9}, "adamw": {"weight_decay": 0.1}}.get(name, {})
    opt = optimizers.get({"name": name, "learning_rate": 0.05, **extra, **kwargs})
    opt.set_segments(SEGMENTS)
    params = device.asarray(p0, "float64")
    tparams = _torch_params(torch, p0)
    topt = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name](tparams, lr=0.05, **extra)
    for g in grads:
        opt.step(params, _on(device, g))
        _set_grads(tparams, g)
        if kind == "global":
            torch.nn.utils.clip_grad_norm_(tparams, kwargs["global_clipnorm"])
        elif kind == "tensor":
            for t in tparams:
                torch.nn.utils.clip_grad_norm_([t], kwargs["clipnorm"])
        else:
            torch.nn.utils.clip_grad_value_(tparams, kwargs["clipvalue"])
        topt.step()
    assert_close(params, _flat(tparams), device=device, rtol=1e-12, atol=1e-12)


def test_clipping_rewrites_the_gradient_buffer_in_place(device):
    grads = device.asarray(np.array([3.0, 4.0]), "float64")
    pn.SGD(global_clipnorm=1.0).step(device.asarray(np.zeros(2), "float64"), grads)
    assert_close(grads, np.array([3.0, 4.0]) / (5.0 + optimizers.CLIP_EPSILON), device=device, rtol=1e-15, atol=0)


def test_clipping_a_zero_gradient_gives_zero():
    grads = np.zeros(4)
    pn.SGD(global_clipnorm=1.0).clip_gradients(grads)
    np.testing.assert_array_equal(grads, np.zeros(4))


@pytest.mark.parametrize("arg", ["clipnorm", "global_clipnorm", "clipvalue"])
@pytest.mark.parametrize("value", [-1.0, 0.0, float("inf"), float("nan"), True])
def test_clip_values_must_be_positive_and_finite(arg, value):
    with pytest.raises(ValueError, match=f"SGD {arg} must be a positive finite number, got {value!r}"):
        pn.SGD(**{arg: value})


@pytest.mark.parametrize("pair", [("clipnorm", "global_clipnorm"), ("clipnorm", "clipvalue"),
                                  ("global_clipnorm", "clipvalue")])
def test_at_most_one_clipping_option(pair):
    with pytest.raises(ValueError, match="at most one of clipnorm, global_clipnorm and clipvalue"):
        pn.Adam(**{pair[0]: 1.0, pair[1]: 1.0})


@pytest.mark.parametrize("segments,match", [
    ([(0, 6), (7, 3)], r"segments\[1\] must be \(offset, size\) with offset 6"),
    ([(1, 6)], r"segments\[0\] must be \(offset, size\) with offset 0"),
    ([(0, 0)], "size > 0"),
    ([(0, 2.5)], r"segments\[0\]"),
    ([], "at least one"),
])
def test_bad_segments_are_reported(segments, match):
    with pytest.raises(ValueError, match=match):
        pn.SGD(clipnorm=1.0).set_segments(segments)


def test_segments_must_cover_the_gradient_buffer():
    opt = pn.SGD(clipnorm=1.0)
    opt.set_segments([(0, 4), (4, 4)])
    with pytest.raises(ValueError, match="segments cover 8 gradient entries but the buffer has 10"):
        opt.step(np.zeros(10), np.ones(10))


# -- weight decay and its mask --------------------------------------------------------------------------------------

MASK = np.repeat([1.0, 0.0, 1.0], [6, 3, 4])  # the middle tensor (a "bias") is not decayed


def _torch_groups(tparams, wd):
    return [{"params": [tparams[0], tparams[2]], "weight_decay": wd}, {"params": [tparams[1]], "weight_decay": 0.0}]


MASKED = [
    ("adamw", lambda mask: pn.AdamW(0.01, weight_decay=0.2),
     lambda torch, ps: torch.optim.AdamW(_torch_groups(ps, 0.2), lr=0.01), False),
    ("adam-decoupled", lambda mask: pn.Adam(0.01, weight_decay=0.2, decoupled_weight_decay=True),
     lambda torch, ps: torch.optim.Adam(_torch_groups(ps, 0.2), lr=0.01, decoupled_weight_decay=True), False),
    ("adam-coupled", lambda mask: pn.Adam(0.01, weight_decay=0.2),
     lambda torch, ps: torch.optim.Adam(_torch_groups(ps, 0.2), lr=0.01), False),
    ("sgd-coupled", lambda mask: pn.SGD(0.05, momentum=0.9, weight_decay=0.2),
     lambda torch, ps: torch.optim.SGD(_torch_groups(ps, 0.2), lr=0.05, momentum=0.9), False),
    ("rmsprop-coupled", lambda mask: pn.RMSprop(0.01, epsilon=1e-8, weight_decay=0.2),
     lambda torch, ps: torch.optim.RMSprop(_torch_groups(ps, 0.2), lr=0.01, alpha=0.9, eps=1e-8), False),
    # torch's SGD has no decoupled decay: shrink the decayed tensors by (1 - lr * wd) before each step (as AdamW does)
    ("sgd-decoupled", lambda mask: pn.SGD(0.05, momentum=0.9, weight_decay=0.2, decoupled_weight_decay=True),
     lambda torch, ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), True),
]


@pytest.mark.parametrize("make,make_torch,shrink", [c[1:] for c in MASKED], ids=[c[0] for c in MASKED])
def test_masked_weight_decay_matches_torch_param_groups(device, make, make_torch, shrink):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    p0, grads = rng.standard_normal(13), [rng.standard_normal(13) for _ in range(10)]
    opt, params = make(MASK), device.asarray(p0, "float64")
    opt.set_decay_mask(device.asarray(MASK, "float64"))
    tparams = _torch_params(torch, p0)
    topt = make_torch(torch, tparams)
    for g in grads:
        opt.step(params, _on(device, g))
        _set_grads(tparams, g)
        if shrink:
            with torch.no_grad():
                for t in (tparams[0], tparams[2]):
                    t.mul_(1 - 0.05 * 0.2)
        topt.step()
    assert_close(params, _flat(tparams), device=device, rtol=1e-12, atol=1e-12)


def test_decoupled_decay_uses_the_scheduled_rate(device):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    p0, grads = rng.standard_normal(13), [rng.standard_normal(13) for _ in range(10)]
    opt = pn.AdamW(pn.ExponentialDecay(0.01, 2, 0.5), weight_decay=0.5)
    opt.set_decay_mask(device.asarray(MASK > 0, "bool"))
    params, tparams = device.asarray(p0, "float64"), _torch_params(torch, p0)
    topt = torch.optim.AdamW(_torch_groups(tparams, 0.5), lr=0.01)
    sched = torch.optim.lr_scheduler.ExponentialLR(topt, gamma=0.5**0.5)
    for g in grads:
        opt.step(params, _on(device, g))
        _set_grads(tparams, g)
        topt.step()
        sched.step()
    assert_close(params, _flat(tparams), device=device, rtol=1e-12, atol=1e-12)


def test_without_a_mask_everything_decays_as_before(device):
    rng = np.random.default_rng(13)
    p0, g = rng.standard_normal(13), rng.standard_normal(13)
    a, b = pn.AdamW(weight_decay=0.3), pn.AdamW(weight_decay=0.3)
    b.set_decay_mask(device.asarray(np.ones(13), "float64"))
    pa, pb = device.asarray(p0, "float64"), device.asarray(p0, "float64")
    a.step(pa, _on(device, g))
    b.step(pb, _on(device, g))
    assert_close(pb, pa, device=device, rtol=0, atol=0)


def test_decay_mask_moves_with_the_optimizer(device):
    opt = pn.AdamW(weight_decay=0.1)
    opt.set_decay_mask(np.ones(4))
    opt.to(device)
    params = device.asarray(np.ones(4), "float32")
    opt.step(params, device.asarray(np.zeros(4), "float32"))
    assert_close(params, np.full(4, 1 - 1e-3 * 0.1, dtype=np.float32), device=device)


def test_decay_mask_errors():
    opt = pn.AdamW()
    with pytest.raises(ValueError, match="only 0 and 1"):
        opt.set_decay_mask(np.array([0.0, 0.5]))
    with pytest.raises(ValueError, match=r"1-D .* got shape \(2, 2\)"):
        opt.set_decay_mask(np.ones((2, 2)))
    opt.set_decay_mask(np.ones(3))
    with pytest.raises(ValueError, match=r"decay mask has shape \(3,\) but the parameters have shape \(5,\)"):
        opt.step(np.ones(5), np.ones(5))


def test_adamw_decay_cannot_be_coupled():
    with pytest.raises(ValueError, match="AdamW's weight decay is always decoupled"):
        pn.AdamW(decoupled_weight_decay=False)


# -- the fast path keeps up --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    {"name": "adam", "learning_rate": {"name": "cosine_decay", "initial_learning_rate": 0.01, "decay_steps": 5},
     "global_clipnorm": 1.0, "weight_decay": 0.1},
    {"name": "adamw", "learning_rate": 0.01, "clipnorm": 0.5, "weight_decay": 0.1},
    {"name": "adam", "learning_rate": 0.01, "clipvalue": 0.2, "weight_decay": 0.1, "decoupled_weight_decay": True},
], ids=["schedule-global-coupled", "per-tensor-decoupled", "value-decoupled"])
def test_fast_kernels_match_the_portable_path_with_every_option(device, config):
    if device.kernels is None:
        pytest.skip(f"{device.backend} has no fast kernels: the portable path is the only one")
    rng = np.random.default_rng(14)
    p0, grads = rng.standard_normal(13), [rng.standard_normal(13) for _ in range(6)]
    portable, quick = optimizers.get(dict(config)), optimizers.get(dict(config))
    pp, pq = device.asarray(p0, "float64"), device.asarray(p0, "float64")
    for opt in (portable, quick):
        opt.set_segments(SEGMENTS)
        opt.set_decay_mask(device.asarray(MASK, "float64"))
    for g in grads:
        portable.step(pp, _on(device, g))
        quick.step(pq, _on(device, g), fast=device.kernels)
    assert_close(pq, pp, device=device, rtol=1e-12, atol=1e-14)


# -- through a model: segments and the decay mask come from the parameter buffer --------------------------------------

def _model_and_twin(device, optimizer):
    """Dense(6, tanh) -> BatchNormalization -> Dense(3) with MSE in float64, and the same network in torch; returns
    (model, net, {portanet name: torch parameter})."""
    torch = pytest.importorskip("torch")
    model = pn.Model([pn.Dense(6, "tanh"), pn.BatchNormalization(momentum=0.9), pn.Dense(3)], device=device,
                     dtype="float64", seed=6).compile("mse", optimizer).build(5)
    rng = np.random.default_rng(6)
    model.set_parameters({k: rng.uniform(0.5, 1.5, v.shape) if k.endswith("gamma") else rng.standard_normal(v.shape)
                          for k, v in model.parameters().items()})
    net = torch.nn.Sequential(torch.nn.Linear(5, 6, dtype=torch.float64), torch.nn.Tanh(),
                              torch.nn.BatchNorm1d(6, eps=1e-3, momentum=0.1, dtype=torch.float64),
                              torch.nn.Linear(6, 3, dtype=torch.float64))
    twin = {"dense_0.kernel": net[0].weight, "dense_0.bias": net[0].bias, "batch_normalization_0.gamma": net[2].weight,
            "batch_normalization_0.beta": net[2].bias, "dense_1.kernel": net[3].weight, "dense_1.bias": net[3].bias}
    with torch.no_grad():
        for name, value in model.parameters().items():
            value = torch.tensor(to_numpy(value).copy())
            twin[name].copy_(value.T if value.ndim == 2 else value)
    return model, net, twin


def _trajectory(device, model, net, step_torch, steps=6):
    """Train both on the same batches: ``step_torch(loss)`` runs torch's backward and update."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    for _ in range(steps):
        x, y = rng.standard_normal((10, 5)), rng.standard_normal((10, 3)) * 5
        model.train_step(x, y)
        step_torch(torch.nn.functional.mse_loss(net(torch.tensor(x)), torch.tensor(y)))


def _assert_same(device, model, twin):
    for name, value in model.parameters().items():
        expected = twin[name].detach()
        assert_close(value, expected.T if expected.ndim == 2 else expected, device=device, rtol=1e-11, atol=1e-12,
                     err_msg=name)


@pytest.mark.parametrize("kind", ["adamw", "sgd-decoupled", "adam-coupled"])
def test_weight_decay_of_a_whole_model_matches_torch_with_decay_on_kernels_only(device, kind):
    torch = pytest.importorskip("torch")
    make = {"adamw": lambda: pn.AdamW(0.01, weight_decay=0.3),
            "sgd-decoupled": lambda: pn.SGD(0.05, momentum=0.9, weight_decay=0.3, decoupled_weight_decay=True),
            "adam-coupled": lambda: pn.Adam(0.01, weight_decay=0.3)}[kind]
    model, net, twin = _model_and_twin(device, make())
    kernels = [twin["dense_0.kernel"], twin["dense_1.kernel"]]
    groups = [{"params": kernels, "weight_decay": 0.3},
              {"params": [p for n, p in twin.items() if not n.endswith("kernel")], "weight_decay": 0.0}]
    topt = {"adamw": lambda: torch.optim.AdamW(groups, lr=0.01),
            "sgd-decoupled": lambda: torch.optim.SGD(groups[0]["params"] + groups[1]["params"], lr=0.05, momentum=0.9),
            "adam-coupled": lambda: torch.optim.Adam(groups, lr=0.01)}[kind]()

    def step(loss):
        topt.zero_grad()
        loss.backward()
        if kind == "sgd-decoupled":  # torch's SGD has no decoupled decay: shrink the kernels first, as AdamW does
            with torch.no_grad():
                for p in kernels:
                    p.mul_(1 - 0.05 * 0.3)
        topt.step()

    _trajectory(device, model, net, step)
    _assert_same(device, model, twin)
    states = model.parameter_buffer.states()
    assert_close(states["batch_normalization_0.moving_mean"], net[2].running_mean, device=device, rtol=1e-11,
                 atol=1e-12)


@pytest.mark.parametrize("clip", ["clipnorm", "global_clipnorm"])
def test_clipping_in_a_model_matches_torch_clip_grad_norm(device, clip):
    torch = pytest.importorskip("torch")
    model, net, twin = _model_and_twin(device, pn.SGD(0.05, momentum=0.5, **{clip: 0.3}))
    offsets = [(offset, size) for _, offset, size, _ in model.parameter_buffer.segments()]
    assert model.optimizer._segments == tuple(offsets) and len(offsets) == 6
    topt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.5)

    def step(loss):
        topt.zero_grad()
        loss.backward()
        if clip == "clipnorm":  # each parameter tensor on its own
            for p in twin.values():
                torch.nn.utils.clip_grad_norm_([p], 0.3)
        else:
            torch.nn.utils.clip_grad_norm_(list(twin.values()), 0.3)
        topt.step()

    _trajectory(device, model, net, step)
    _assert_same(device, model, twin)


def _mask(model):
    """``{parameter name: decayed}`` from the optimizer's mask (each parameter all ones or all zeros)."""
    mask, out = to_numpy(model.optimizer._decay_mask), {}
    for name, offset, size, _ in model.parameter_buffer.segments():
        part = mask[offset:offset + size]
        assert part.all() or not part.any(), name
        out[name] = bool(part.all())
    return out


def test_the_model_decays_kernels_only_by_default_and_the_optimizer_rules_override_it():
    opt = pn.AdamW(weight_decay=0.1)
    model = pn.Model([pn.Dense(4), pn.LayerNormalization(), pn.Dense(2)], seed=0).compile("mse", opt).build(3)
    assert _mask(model) == {"dense_0.kernel": True, "dense_0.bias": False, "layer_normalization_0.gamma": False,
                            "layer_normalization_0.beta": False, "dense_1.kernel": True, "dense_1.bias": False}
    opt.include_in_weight_decay(var_names=["bias$"])
    opt.exclude_from_weight_decay(var_list=["dense_1.kernel", "dense_0.bias"])  # exclusion wins
    model.train_step(np.ones((2, 3)), np.ones((2, 2)))  # the next step rebuilds the mask
    assert _mask(model) == {"dense_0.kernel": True, "dense_0.bias": False, "layer_normalization_0.gamma": False,
                            "layer_normalization_0.beta": False, "dense_1.kernel": False, "dense_1.bias": True}
    assert opt.get_config()["exclude_from_weight_decay"] == {"var_list": ["dense_1.kernel", "dense_0.bias"],
                                                             "var_names": []}
    assert opt.get_config()["include_in_weight_decay"] == {"var_list": [], "var_names": ["bias$"]}
    assert "exclude_from_weight_decay" not in pn.AdamW().get_config()  # configs without rules are as before
    twin = optimizers.get(opt.get_config())
    assert twin.decay_rules == opt.decay_rules


def test_decay_rules_set_before_compile_travel_through_save_and_load(tmp_path):
    opt = pn.AdamW(weight_decay=0.1)
    opt.exclude_from_weight_decay(var_names=[r"^dense_0\."])
    model = pn.Model([pn.Dense(4), pn.Dense(2)], seed=0).compile("mse", opt)
    model.fit(np.ones((4, 3)), np.ones((4, 2)), epochs=1, verbose=0)
    assert _mask(model) == {"dense_0.kernel": False, "dense_0.bias": False, "dense_1.kernel": True,
                            "dense_1.bias": False}
    model.save(tmp_path / "m.safetensors")
    assert _mask(pn.load(tmp_path / "m.safetensors")) == _mask(model)


def test_segments_and_mask_follow_the_buffer_when_the_model_moves(device):
    model = pn.Model([pn.Dense(4), pn.BatchNormalization(), pn.Dense(2)], seed=0)
    model.compile("mse", pn.AdamW(weight_decay=0.1, clipnorm=1.0)).build(3)
    segments, mask = model.optimizer._segments, to_numpy(model.optimizer._decay_mask).copy()
    model.to(device)
    assert model.optimizer._segments == segments and device.owns(model.optimizer._decay_mask)
    np.testing.assert_array_equal(to_numpy(model.optimizer._decay_mask), mask)
    model.train_step(np.ones((2, 3)), np.ones((2, 2)))
    assert device.owns(model.parameter_buffer.values)


@pytest.mark.parametrize("call,error,match", [
    (lambda o: o.exclude_from_weight_decay(var_names="bias"), TypeError, r"var_names must be a list of strings"),
    (lambda o: o.include_in_weight_decay(var_list=[3]), TypeError, r"var_list must be a list of strings"),
    (lambda o: o.exclude_from_weight_decay(var_names=["(bias"]), ValueError, r"'\(bias', which is not a regular"),
    (lambda o: pn.AdamW(exclude_from_weight_decay={"names": ["x"]}), ValueError,
     r"exclude_from_weight_decay must be a dict with keys var_list and/or var_names"),
])
def test_bad_decay_rules_raise_and_change_nothing(call, error, match):
    opt = pn.AdamW()
    before = opt.decay_rules
    with pytest.raises(error, match=match):
        call(opt)
    assert opt.decay_rules is before


def test_negative_clip_norms_raise_before_any_model_changes():
    model = pn.Model([pn.Dense(2)], seed=0).compile("mse", pn.SGD(0.1)).build(3)
    before = to_numpy(model.parameter_buffer.values).copy()
    for arg in ("clipnorm", "global_clipnorm", "clipvalue"):
        with pytest.raises(ValueError, match=rf"SGD {arg} must be a positive finite number, got -1.0"):
            model.compile("mse", pn.SGD(0.1, **{arg: -1.0}))
    assert model.optimizer.clipnorm is None
    np.testing.assert_array_equal(to_numpy(model.parameter_buffer.values), before)


def test_a_decay_rule_naming_a_parameter_the_model_does_not_have_warns():
    opt = pn.AdamW(weight_decay=0.1)
    opt.include_in_weight_decay(var_list=["dense_0.bais"])  # a typo: nothing would be included
    model = pn.Model([pn.Dense(4), pn.Dense(2)], seed=0).compile("mse", opt)
    with pytest.warns(UserWarning, match=r"rules \(var_list\) name \['dense_0.bais'\], which this model has no "
                                         r"parameter called; its parameters are \['dense_0.kernel', 'dense_0.bias'"):
        model.build(3)
    opt.exclude_from_weight_decay(var_names=["nothing_matches_this"])  # patterns may match nothing: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pn.Model([pn.Dense(2)], seed=0).compile("mse", pn.AdamW(exclude_from_weight_decay={
            "var_list": ["dense_0.bias"], "var_names": ["nothing"]})).build(3)
