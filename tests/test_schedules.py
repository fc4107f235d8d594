"""Learning-rate schedules step by step against torch.optim.lr_scheduler, and against transcriptions of Keras 3's
formulas where PyTorch has no equivalent; configs round-trip; bad arguments raise naming the argument."""

import math
from fractions import Fraction

import pytest

import portanet as pn
from portanet import schedules

torch = pytest.importorskip("torch")
lr_scheduler = torch.optim.lr_scheduler

STEPS = 300


def torch_rates(base_lr, make_scheduler, steps=STEPS):
    """The learning rate torch uses at each of ``steps`` optimizer steps (read before each ``scheduler.step()``)."""
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=base_lr)
    sched = make_scheduler(opt)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


def ours(schedule, steps=STEPS):
    return [schedule(t) for t in range(steps)]


def assert_rates(actual, expected, rtol=1e-12, atol=1e-15):
    assert len(actual) == len(expected)
    for t, (a, e) in enumerate(zip(actual, expected)):
        assert isinstance(a, float), f"step {t}: {type(a).__name__} is not a host float"
        assert a == pytest.approx(e, rel=rtol, abs=atol), f"step {t}: {a!r} != {e!r}"


# -- against PyTorch ---------------------------------------------------------------------------------------------

def test_exponential_decay_matches_exponential_lr():
    expected = torch_rates(0.1, lambda o: lr_scheduler.ExponentialLR(o, gamma=0.5 ** (1 / 7)))
    assert_rates(ours(pn.ExponentialDecay(0.1, decay_steps=7, decay_rate=0.5)), expected, rtol=1e-11)


def test_staircase_exponential_decay_matches_step_lr():
    expected = torch_rates(0.1, lambda o: lr_scheduler.StepLR(o, step_size=7, gamma=0.5))
    assert_rates(ours(pn.ExponentialDecay(0.1, decay_steps=7, decay_rate=0.5, staircase=True)), expected)


def test_piecewise_constant_decay_changes_one_step_after_each_boundary_like_multistep_lr():
    expected = torch_rates(0.1, lambda o: lr_scheduler.MultiStepLR(o, milestones=[51, 121, 201], gamma=0.5))
    schedule = pn.PiecewiseConstantDecay([50, 120, 200], [0.1, 0.05, 0.025, 0.0125])
    assert_rates(ours(schedule), expected)


@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
def test_polynomial_decay_to_zero_matches_polynomial_lr(power):
    expected = torch_rates(0.1, lambda o: lr_scheduler.PolynomialLR(o, total_iters=100, power=power))
    assert_rates(ours(pn.PolynomialDecay(0.1, 100, end_learning_rate=0.0, power=power)), expected, atol=1e-14)


@pytest.mark.parametrize("staircase", [False, True])
def test_inverse_time_decay_matches_lambda_lr(staircase):
    factor = (lambda s: 1 / (1 + 0.5 * (s // 10))) if staircase else (lambda s: 1 / (1 + 0.5 * s / 10))
    expected = torch_rates(0.1, lambda o: lr_scheduler.LambdaLR(o, factor))
    assert_rates(ours(pn.InverseTimeDecay(0.1, decay_steps=10, decay_rate=0.5, staircase=staircase)), expected)


def test_cosine_decay_matches_cosine_annealing_lr_then_stays_at_alpha():
    expected = torch_rates(0.1, lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=100, eta_min=0.01), steps=101)
    rates = ours(pn.CosineDecay(0.1, decay_steps=100, alpha=0.1))
    assert_rates(rates[:101], expected, atol=1e-14)
    assert_rates(rates[101:], [0.01] * (STEPS - 101))  # torch's cosine goes back up; Keras holds the minimum


def test_cosine_decay_with_warmup_matches_linear_lr_then_cosine_annealing():
    def make(o):
        warmup = lr_scheduler.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=20)
        cosine = lr_scheduler.CosineAnnealingLR(o, T_max=100, eta_min=0.0)
        return lr_scheduler.SequentialLR(o, [warmup, cosine], milestones=[20])

    expected = torch_rates(0.1, make, steps=121)
    rates = ours(pn.CosineDecay(0.01, decay_steps=100, warmup_target=0.1, warmup_steps=20))
    assert_rates(rates[:121], expected, atol=1e-14)
    assert_rates(rates[121:], [0.0] * (STEPS - 121))


@pytest.mark.parametrize("t_mul", [1, 2])
def test_cosine_decay_restarts_matches_cosine_annealing_warm_restarts(t_mul):
    expected = torch_rates(0.1, lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=10, T_mult=t_mul,
                                                                                   eta_min=0.005))
    rates = ours(pn.CosineDecayRestarts(0.1, first_decay_steps=10, t_mul=float(t_mul), alpha=0.05))
    assert_rates(rates, expected, atol=1e-14)


@pytest.mark.parametrize("kwargs", [
    {},
    {"anneal_strategy": "linear"},
    {"pct_start": 0.25, "div_factor": 10.0, "final_div_factor": 100.0},
    {"three_phase": True},
    {"three_phase": True, "anneal_strategy": "linear", "pct_start": 0.4},
], ids=["cos", "linear", "custom-factors", "three-phase", "three-phase-linear"])
def test_one_cycle_matches_one_cycle_lr(kwargs):
    expected = torch_rates(0.1, lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=STEPS,
                                                                  cycle_momentum=False, **kwargs))
    schedule = pn.OneCycle(0.1, total_steps=STEPS, **kwargs)
    assert_rates(ours(schedule), expected)
    assert schedule(STEPS) == schedule(STEPS + 50) == expected[-1]  # past total_steps: the final rate (torch raises)


# -- against Keras 3's formulas where PyTorch has none ----------------------------------------------------------------

def keras_polynomial(step, initial, decay_steps, end, power, cycle):
    """A line-by-line transcription of Keras 3's PolynomialDecay.__call__."""
    if cycle:
        multiplier = 1.0 if step == 0 else math.ceil(step / decay_steps)
        decay_steps = decay_steps * multiplier
    else:
        step = min(step, decay_steps)
    p = step / decay_steps
    return (initial - end) * math.pow(1 - p, power) + end


@pytest.mark.parametrize("cycle", [False, True])
def test_polynomial_decay_with_an_end_rate_follows_keras(cycle):
    schedule = pn.PolynomialDecay(0.1, 40, end_learning_rate=0.01, power=1.5, cycle=cycle)
    assert_rates(ours(schedule), [keras_polynomial(t, 0.1, 40, 0.01, 1.5, cycle) for t in range(STEPS)])


def test_piecewise_constant_decay_with_any_values_follows_keras():
    boundaries, values = [10, 25, 26, 90], [0.3, 0.01, 0.2, 0.05, 0.001]

    def keras(step):  # Keras sums indicator(step in range) * value
        total = (step <= boundaries[0]) * values[0] + (step > boundaries[-1]) * values[-1]
        for low, high, v in zip(boundaries[:-1], boundaries[1:], values[1:-1]):
            total += (low < step <= high) * v
        return float(total)

    assert_rates(ours(pn.PiecewiseConstantDecay(boundaries, values)), [keras(t) for t in range(STEPS)])


def keras_restarts(step, initial, first, t_mul, m_mul, alpha):
    """A transcription of Keras 3's CosineDecayRestarts.__call__ (closed form with a log)."""
    fraction = step / first
    if t_mul == 1.0:
        i = math.floor(fraction)
        fraction -= i
    else:
        i = math.floor(math.log(1.0 - fraction * (1.0 - t_mul)) / math.log(t_mul))
        sum_r = (1.0 - t_mul**i) / (1.0 - t_mul)
        fraction = (fraction - sum_r) / t_mul**i
    decayed = (1 - alpha) * 0.5 * m_mul**i * (1.0 + math.cos(math.pi * fraction)) + alpha
    return initial * decayed


def walk_restarts(step, initial, first, t_mul, m_mul, alpha):
    """The same schedule by walking the periods in exact rational arithmetic (``t_mul`` as the decimal it is
    written as): period i lasts first * t_mul**i steps. Returns the rate and whether ``step`` starts a period."""
    t_mul = Fraction(str(t_mul))
    start, length, i = Fraction(0), Fraction(first), 0
    while step >= start + length:
        start, length, i = start + length, length * t_mul, i + 1
    cosine = 0.5 * m_mul**i * (1.0 + math.cos(math.pi * float((step - start) / length)))
    return initial * ((1 - alpha) * cosine + alpha), step == start


RESTARTS = [(8, 1.5, 0.5), (8, 2.0, 0.8), (8, 1.0, 0.9), (8, 3.0, 1.0), (1, 3.0, 1.0), (5, 1.2, 0.7), (3, 10.0, 1.0),
            (7, 1.1, 1.0), (10, 1.25, 0.9)]


@pytest.mark.parametrize("first,t_mul,m_mul", RESTARTS)
def test_cosine_decay_restarts_follows_keras_and_restarts_exactly_at_period_ends(first, t_mul, m_mul):
    args = (0.1, first, t_mul, m_mul, 0.1)
    rates = ours(pn.CosineDecayRestarts(*args), 1500)
    exact = [walk_restarts(t, *args) for t in range(1500)]
    assert_rates(rates, [rate for rate, _ in exact], atol=1e-14)
    # Keras's log formula agrees except, at times, at a restart step (where its rounding may pick the period before)
    for t, (rate, restart) in enumerate(exact):
        if not restart:
            assert rates[t] == pytest.approx(keras_restarts(t, *args), rel=1e-9, abs=1e-12), f"step {t}"


def test_cosine_decay_restarts_restarts_with_m_mul_times_the_last_start():
    schedule = pn.CosineDecayRestarts(1.0, first_decay_steps=10, t_mul=1.5, m_mul=0.5)
    assert schedule(0) == 1.0
    assert schedule(10) == pytest.approx(0.5, rel=1e-15)  # period 1 starts at step 10
    assert schedule(25) == pytest.approx(0.25, rel=1e-15)  # period 2 starts at 10 + 15


def test_cosine_decay_warmup_ramps_linearly_from_the_initial_rate():
    schedule = pn.CosineDecay(0.0, decay_steps=50, warmup_target=1.0, warmup_steps=10)
    assert [schedule(t) for t in range(11)] == pytest.approx([t / 10 for t in range(11)], abs=1e-15)


# -- API: configs, names, errors -----------------------------------------------------------------------------------

ALL = [
    pn.ExponentialDecay(0.1, 10, 0.9, staircase=True),
    pn.PiecewiseConstantDecay([5, 10], [0.1, 0.01, 0.001]),
    pn.PolynomialDecay(0.1, 50, cycle=True),
    pn.InverseTimeDecay(0.1, 1.0, 0.5),
    pn.CosineDecay(0.0, 100, alpha=0.1, warmup_target=0.1, warmup_steps=10),
    pn.CosineDecayRestarts(0.1, 20, t_mul=1.0, m_mul=0.9),
    pn.OneCycle(0.1, 200, three_phase=True),
]


@pytest.mark.parametrize("schedule", ALL, ids=[type(s).__name__ for s in ALL])
def test_config_round_trip_gives_the_same_schedule(schedule):
    config = schedule.get_config()
    assert config["name"] in schedules.SCHEDULES
    rebuilt = schedules.get(config)
    assert rebuilt == schedule and rebuilt is not schedule
    assert type(schedule).from_config(config) == schedule
    assert ours(rebuilt, 250) == ours(schedule, 250)


def test_keras_defaults():
    assert pn.PolynomialDecay(0.1, 10).get_config() == {
        "name": "polynomial_decay", "initial_learning_rate": 0.1, "decay_steps": 10.0, "end_learning_rate": 0.0001,
        "power": 1.0, "cycle": False}
    cosine = pn.CosineDecay(0.1, 10)
    assert (cosine.alpha, cosine.warmup_target, cosine.warmup_steps) == (0.0, None, 0.0)
    restarts = pn.CosineDecayRestarts(0.1, 10)
    assert (restarts.t_mul, restarts.m_mul, restarts.alpha) == (2.0, 1.0, 0.0)
    one = pn.OneCycle(0.1, 100)
    assert (one.pct_start, one.anneal_strategy, one.div_factor, one.final_div_factor, one.three_phase) == (
        0.3, "cos", 25.0, 1e4, False)


def test_keras_class_names_resolve():
    schedule = schedules.get({"name": "CosineDecay", "initial_learning_rate": 0.1, "decay_steps": 10})
    assert isinstance(schedule, pn.CosineDecay)


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="unknown learning rate schedule 'warmup'.*cosine_decay"):
        schedules.get({"name": "warmup"})


@pytest.mark.parametrize("make,match", [
    (lambda: pn.ExponentialDecay(0.1, 0, 0.9), "decay_steps must be a finite number > 0, got 0"),
    (lambda: pn.ExponentialDecay(-0.1, 10, 0.9), "initial_learning_rate must be a finite number >= 0"),
    (lambda: pn.ExponentialDecay(0.1, 10, 0.9, staircase="yes"), "staircase must be True or False"),
    (lambda: pn.InverseTimeDecay(0.1, float("nan"), 0.5), "decay_steps"),
    (lambda: pn.PolynomialDecay(0.1, -5), "decay_steps"),
    (lambda: pn.PiecewiseConstantDecay([10, 20], [0.1, 0.01]), "one more value than boundaries, got 2 boundaries"),
    (lambda: pn.PiecewiseConstantDecay([20, 10], [0.1, 0.01, 0.001]), "boundaries must increase strictly"),
    (lambda: pn.PiecewiseConstantDecay([10], [0.1, -0.01]), r"values\[1\] must be a finite number >= 0"),
    (lambda: pn.CosineDecay(0.1, 0), "decay_steps"),
    (lambda: pn.CosineDecay(0.1, 10, warmup_target=float("inf")), "warmup_target"),
    (lambda: pn.CosineDecayRestarts(0.1, 10, t_mul=0.5), "t_mul must be a finite number >= 1"),
    (lambda: pn.OneCycle(0.1, 0), "total_steps must be an integer > 0, got 0"),
    (lambda: pn.OneCycle(0.1, 10.5), "total_steps"),
    (lambda: pn.OneCycle(0.1, 100, pct_start=1.5), r"pct_start must be in \[0, 1\]"),
    (lambda: pn.OneCycle(0.1, 100, anneal_strategy="exp"), "anneal_strategy must be 'cos' or 'linear'"),
    (lambda: pn.OneCycle(0.1, 10, pct_start=0.1), "phases must each last more than one step"),
    (lambda: pn.OneCycle(0.0, 100), "max_learning_rate must be a finite number > 0"),
])
def test_bad_arguments_raise_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("step", [-1, 1.5, True, "3"])
def test_steps_must_be_non_negative_integers(step):
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        pn.ExponentialDecay(0.1, 10, 0.9)(step)


def test_the_base_class_says_what_to_override():
    with pytest.raises(NotImplementedError, match="__call__"):
        pn.LearningRateSchedule()(0)
    with pytest.raises(NotImplementedError, match="get_config"):
        pn.LearningRateSchedule().get_config()


# -- in fit: a per-step schedule, and the rate logged in the History ------------------------------------------------
def _fit(device, optimizer, epochs=3, **kwargs):
    import numpy as np

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 4)), rng.integers(0, 2, 40)
    model = pn.Model([pn.Dense(5, "relu"), pn.Dense(2, "softmax")], device=device, seed=0)
    model.compile("sparse_categorical_crossentropy", optimizer)
    return model, model.fit(x, y, epochs=epochs, batch_size=8, verbose=0, **kwargs)  # 5 steps per epoch


def test_fit_steps_the_schedule_every_batch_and_logs_the_rate_of_each_epochs_last_step(device):
    schedule = pn.CosineDecay(0.01, decay_steps=10, warmup_target=0.1, warmup_steps=5)
    model, history = _fit(device, pn.SGD(schedule))
    assert model.optimizer.iterations == 15
    assert history.history["lr"] == [schedule(4), schedule(9), schedule(14)]
    assert history.history["lr"][0] == pytest.approx(0.01 + 0.09 * 4 / 5)  # still warming up at the end of epoch 1
    assert model.optimizer.learning_rate == schedule(15)  # the next step's rate


def test_a_constant_rate_is_logged_too(device):
    _, history = _fit(device, pn.Adam(0.003), epochs=2)
    assert history.history["lr"] == [0.003, 0.003]


def test_lr_callbacks_log_the_rate_their_epoch_used():
    _, history = _fit("cpu", pn.SGD(0.1), epochs=3, callbacks=[pn.LearningRateScheduler(lambda e, lr: 0.1 / (e + 1))])
    assert history.history["lr"] == [0.1, 0.05, 0.1 / 3]
    schedule = pn.ExponentialDecay(0.1, decay_steps=5, decay_rate=0.5)
    _, history = _fit("cpu", pn.SGD(schedule), epochs=2,
                      callbacks=[pn.ReduceLROnPlateau(monitor="loss", patience=100)])
    assert history.history["lr"] == [schedule(4), schedule(9)]  # not the next step's rate
