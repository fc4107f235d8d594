"""Learning-rate schedules: ``schedule(step) -> float`` for an optimizer step count, evaluated on the host.

Pure Python arithmetic on a step number; no arrays, no device. Names, arguments, defaults and formulas follow Keras 3
(``keras/src/optimizers/schedules/learning_rate_schedule.py``); :class:`OneCycle` follows PyTorch's ``OneCycleLR``.
"""

from __future__ import annotations

import bisect
import math
import numbers

from ._checks import real
from ._registry import Configurable, resolve

__all__ = [
    "LearningRateSchedule", "ExponentialDecay", "PiecewiseConstantDecay", "PolynomialDecay", "InverseTimeDecay",
    "CosineDecay", "CosineDecayRestarts", "OneCycle", "get", "SCHEDULES",
]



def _flag(owner: str, arg: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{owner} {arg} must be True or False, got {value!r}")
    return value


def _step(owner: str, step) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"{owner} step must be an integer >= 0, got {step!r}")
    return int(step)


class LearningRateSchedule(Configurable):
    """Base class: ``__call__(step) -> float``, the learning rate of the optimizer step ``step`` (0-based: the
    number of updates already made), a host float.

    Subclass it for your own schedule; ``get_config()`` must return the constructor arguments plus ``"name"`` (the
    key it is registered under in :data:`SCHEDULES`, so that saved models can rebuild it).
    """

    name = "schedule"

    def __call__(self, step: int) -> float:
        raise NotImplementedError(f"learning rate schedule {type(self).__name__} must override __call__(step)")

    def get_config(self) -> dict:
        raise NotImplementedError(f"learning rate schedule {type(self).__name__} must override get_config() to be "
                                  "saved")

    @classmethod
    def from_config(cls, config: dict) -> "LearningRateSchedule":
        """Rebuild from ``get_config()`` (the ``"name"`` key is ignored)."""
        return cls(**{k: v for k, v in config.items() if k != "name"})


class ExponentialDecay(LearningRateSchedule):
    """``initial_learning_rate * decay_rate ** (step / decay_steps)``; with ``staircase`` the exponent is floored."""

    name = "exponential_decay"

    def __init__(self, initial_learning_rate: float, decay_steps: float, decay_rate: float, staircase: bool = False):
        owner = "ExponentialDecay"
        self.initial_learning_rate = real(owner, "initial_learning_rate", initial_learning_rate, 0.0)
        self.decay_steps = real(owner, "decay_steps", decay_steps, 0.0, low_open=True)
        self.decay_rate = real(owner, "decay_rate", decay_rate, 0.0, low_open=True)
        self.staircase = _flag(owner, "staircase", staircase)

    def __call__(self, step):
        p = _step("ExponentialDecay", step) / self.decay_steps
        return self.initial_learning_rate * self.decay_rate ** (math.floor(p) if self.staircase else p)

    def get_config(self):
        return {"name": self.name, "initial_learning_rate": self.initial_learning_rate,
                "decay_steps": self.decay_steps, "decay_rate": self.decay_rate, "staircase": self.staircase}


class PiecewiseConstantDecay(LearningRateSchedule):
    """``values[0]`` while ``step <= boundaries[0]``, ``values[i]`` while ``boundaries[i-1] < step <= boundaries[i]``,
    ``values[-1]`` after ``boundaries[-1]`` (Keras: the change happens at step ``boundary + 1``)."""

    name = "piecewise_constant_decay"

    def __init__(self, boundaries, values):
        owner = "PiecewiseConstantDecay"
        if not isinstance(boundaries, (list, tuple)) or not isinstance(values, (list, tuple)):
            raise ValueError(f"{owner} boundaries and values must be lists, got {type(boundaries).__name__} and "
                             f"{type(values).__name__}")
        if len(boundaries) != len(values) - 1:
            raise ValueError(f"{owner} needs one more value than boundaries, got {len(boundaries)} boundaries and "
                             f"{len(values)} values")
        self.boundaries = [real(owner, f"boundaries[{i}]", b) for i, b in enumerate(boundaries)]
        self.values = [real(owner, f"values[{i}]", v, 0.0) for i, v in enumerate(values)]
        if any(b >= c for b, c in zip(self.boundaries, self.boundaries[1:])):
            raise ValueError(f"{owner} boundaries must increase strictly, got {list(boundaries)!r}")

    def __call__(self, step):
        return self.values[bisect.bisect_left(self.boundaries, _step("PiecewiseConstantDecay", step))]

    def get_config(self):
        return {"name": self.name, "boundaries": list(self.boundaries), "values": list(self.values)}


class PolynomialDecay(LearningRateSchedule):
    """``(initial - end) * (1 - s / decay_steps) ** power + end`` with ``s = min(step, decay_steps)``; with
    ``cycle``, ``decay_steps`` is stretched to the first multiple of it that is >= ``step`` (1 multiple at step 0)."""

    name = "polynomial_decay"

    def __init__(self, initial_learning_rate: float, decay_steps: float, end_learning_rate: float = 0.0001,
                 power: float = 1.0, cycle: bool = False):
        owner = "PolynomialDecay"
        self.initial_learning_rate = real(owner, "initial_learning_rate", initial_learning_rate, 0.0)
        self.decay_steps = real(owner, "decay_steps", decay_steps, 0.0, low_open=True)
        self.end_learning_rate = real(owner, "end_learning_rate", end_learning_rate, 0.0)
        self.power = real(owner, "power", power, 0.0, low_open=True)
        self.cycle = _flag(owner, "cycle", cycle)

    def __call__(self, step):
        step, decay_steps = _step("PolynomialDecay", step), self.decay_steps
        if self.cycle:
            decay_steps *= math.ceil(step / decay_steps) if step else 1.0
        else:
            step = min(step, decay_steps)
        p = step / decay_steps
        return (self.initial_learning_rate - self.end_learning_rate) * (1.0 - p) ** self.power + self.end_learning_rate

    def get_config(self):
        return {"name": self.name, "initial_learning_rate": self.initial_learning_rate,
                "decay_steps": self.decay_steps, "end_learning_rate": self.end_learning_rate, "power": self.power,
                "cycle": self.cycle}


class InverseTimeDecay(LearningRateSchedule):
    """``initial_learning_rate / (1 + decay_rate * step / decay_steps)``; with ``staircase`` the ratio is floored."""

    name = "inverse_time_decay"

    def __init__(self, initial_learning_rate: float, decay_steps: float, decay_rate: float, staircase: bool = False):
        owner = "InverseTimeDecay"
        self.initial_learning_rate = real(owner, "initial_learning_rate", initial_learning_rate, 0.0)
        self.decay_steps = real(owner, "decay_steps", decay_steps, 0.0, low_open=True)
        self.decay_rate = real(owner, "decay_rate", decay_rate, 0.0)
        self.staircase = _flag(owner, "staircase", staircase)

    def __call__(self, step):
        p = _step("InverseTimeDecay", step) / self.decay_steps
        return self.initial_learning_rate / (1.0 + self.decay_rate * (math.floor(p) if self.staircase else p))

    def get_config(self):
        return {"name": self.name, "initial_learning_rate": self.initial_learning_rate,
                "decay_steps": self.decay_steps, "decay_rate": self.decay_rate, "staircase": self.staircase}


def _cosine(start: float, alpha: float, fraction: float) -> float:
    """``start * ((1 - alpha) * 0.5 * (1 + cos(pi * fraction)) + alpha)``: from ``start`` to ``alpha * start``."""
    return start * ((1.0 - alpha) * 0.5 * (1.0 + math.cos(math.pi * fraction)) + alpha)


class CosineDecay(LearningRateSchedule):
    """Cosine decay (Loshchilov & Hutter, SGDR) with an optional linear warmup (Goyal et al.).

    Without ``warmup_target``: ``initial * ((1 - alpha) * 0.5 * (1 + cos(pi * s / decay_steps)) + alpha)``,
    ``s = min(step, decay_steps)``. With it: a linear ramp from ``initial_learning_rate`` to ``warmup_target`` over
    ``warmup_steps`` steps, then the same decay from ``warmup_target`` over ``decay_steps`` steps.
    """

    name = "cosine_decay"

    def __init__(self, initial_learning_rate: float, decay_steps: float, alpha: float = 0.0,
                 warmup_target: float | None = None, warmup_steps: int = 0):
        owner = "CosineDecay"
        self.initial_learning_rate = real(owner, "initial_learning_rate", initial_learning_rate, 0.0)
        self.decay_steps = real(owner, "decay_steps", decay_steps, 0.0, low_open=True)
        self.alpha = real(owner, "alpha", alpha, 0.0)
        self.warmup_target = None if warmup_target is None else real(owner, "warmup_target", warmup_target, 0.0)
        self.warmup_steps = real(owner, "warmup_steps", warmup_steps, 0.0)

    def __call__(self, step):
        step = _step("CosineDecay", step)
        if self.warmup_target is None:
            return _cosine(self.initial_learning_rate, self.alpha, min(step, self.decay_steps) / self.decay_steps)
        step = min(step, self.decay_steps + self.warmup_steps)
        if step < self.warmup_steps:
            fraction = step / self.warmup_steps
            return (self.warmup_target - self.initial_learning_rate) * fraction + self.initial_learning_rate
        return _cosine(self.warmup_target, self.alpha, (step - self.warmup_steps) / self.decay_steps)

    def get_config(self):
        return {"name": self.name, "initial_learning_rate": self.initial_learning_rate,
                "decay_steps": self.decay_steps, "alpha": self.alpha, "warmup_target": self.warmup_target,
                "warmup_steps": self.warmup_steps}


class CosineDecayRestarts(LearningRateSchedule):
    """Cosine decay with warm restarts (SGDR): period ``i`` lasts ``first_decay_steps * t_mul**i`` steps, over which
    the rate is ``initial * ((1 - alpha) * m_mul**i * 0.5 * (1 + cos(pi * f)) + alpha)``, ``f`` going from 0 to 1
    (Keras: the floor ``alpha * initial`` is not scaled by ``m_mul**i``).

    Keras locates the period with ``floor(log(1 - f * (1 - t_mul)) / log(t_mul))``, which rounding can put one
    period off at a restart (``first_decay_steps=1, t_mul=3``: step 121 gets the end of the previous period, not
    the restart); here that estimate is corrected against the period's bounds, snapped to integers within 1e-9, so
    a restart step gets the restarted rate. ``t_mul`` must be >= 1 (Keras returns NaN once shrinking periods run
    out).
    """

    name = "cosine_decay_restarts"

    def __init__(self, initial_learning_rate: float, first_decay_steps: float, t_mul: float = 2.0,
                 m_mul: float = 1.0, alpha: float = 0.0):
        owner = "CosineDecayRestarts"
        self.initial_learning_rate = real(owner, "initial_learning_rate", initial_learning_rate, 0.0)
        self.first_decay_steps = real(owner, "first_decay_steps", first_decay_steps, 0.0, low_open=True)
        self.t_mul = real(owner, "t_mul", t_mul, 1.0)
        self.m_mul = real(owner, "m_mul", m_mul, 0.0)
        self.alpha = real(owner, "alpha", alpha, 0.0)

    def _period_start(self, i: int) -> float:
        """The step at which period ``i`` starts, ``first * (t_mul**i - 1) / (t_mul - 1)``, snapped to the nearest
        integer when within 1e-9 of it (``t_mul=1.2`` puts the second restart at step 11, not 11.000000000000002)."""
        if self.t_mul == 1.0:
            start = self.first_decay_steps * i
        else:
            start = self.first_decay_steps * (self.t_mul**i - 1.0) / (self.t_mul - 1.0)
        nearest = round(start)
        return float(nearest) if abs(start - nearest) <= 1e-9 * max(1.0, start) else start

    def __call__(self, step):
        step = _step("CosineDecayRestarts", step)
        fraction = step / self.first_decay_steps
        if self.t_mul == 1.0:
            i = math.floor(fraction)
        else:
            i = math.floor(math.log1p(fraction * (self.t_mul - 1.0)) / math.log(self.t_mul))
        while i > 0 and step < self._period_start(i):
            i -= 1
        while step >= self._period_start(i + 1):
            i += 1
        start = self._period_start(i)
        fraction = (step - start) / (self._period_start(i + 1) - start)
        cosine = 0.5 * self.m_mul**i * (1.0 + math.cos(math.pi * fraction))
        return self.initial_learning_rate * ((1.0 - self.alpha) * cosine + self.alpha)

    def get_config(self):
        return {"name": self.name, "initial_learning_rate": self.initial_learning_rate,
                "first_decay_steps": self.first_decay_steps, "t_mul": self.t_mul, "m_mul": self.m_mul,
                "alpha": self.alpha}


class OneCycle(LearningRateSchedule):
    """The 1cycle policy with PyTorch ``OneCycleLR``'s formulas (learning rate only, no momentum cycling).

    From ``max_learning_rate / div_factor`` up to ``max_learning_rate`` over the first ``pct_start * total_steps``
    steps, then down to ``max_learning_rate / div_factor / final_div_factor`` at step ``total_steps - 1``, annealed by
    ``"cos"`` or ``"linear"``; ``three_phase`` goes back down to the initial rate first (symmetric), then to the
    minimum. Steps from ``total_steps`` on keep the final rate (PyTorch raises there).
    """

    name = "one_cycle"

    def __init__(self, max_learning_rate: float, total_steps: int, pct_start: float = 0.3,
                 anneal_strategy: str = "cos", div_factor: float = 25.0, final_div_factor: float = 1e4,
                 three_phase: bool = False):
        owner = "OneCycle"
        self.max_learning_rate = real(owner, "max_learning_rate", max_learning_rate, 0.0, low_open=True)
        if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps <= 0:
            raise ValueError(f"{owner} total_steps must be an integer > 0, got {total_steps!r}")
        self.total_steps = int(total_steps)
        self.pct_start = real(owner, "pct_start", pct_start, 0.0)
        if self.pct_start > 1:
            raise ValueError(f"{owner} pct_start must be in [0, 1], got {pct_start!r}")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"{owner} anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
        self.anneal_strategy = anneal_strategy
        self.div_factor = real(owner, "div_factor", div_factor, 0.0, low_open=True)
        self.final_div_factor = real(owner, "final_div_factor", final_div_factor, 0.0, low_open=True)
        self.three_phase = _flag(owner, "three_phase", three_phase)
        initial = self.max_learning_rate / self.div_factor
        low = initial / self.final_div_factor
        up_end = self.pct_start * self.total_steps - 1.0
        if self.three_phase:  # (end step, start rate, end rate), as in torch.optim.lr_scheduler.OneCycleLR
            phases = [(up_end, initial, self.max_learning_rate),
                      (2.0 * self.pct_start * self.total_steps - 2.0, self.max_learning_rate, initial),
                      (self.total_steps - 1.0, initial, low)]
        else:
            phases = [(up_end, initial, self.max_learning_rate), (self.total_steps - 1.0, self.max_learning_rate, low)]
        starts = [0.0] + [end for end, _, _ in phases[:-1]]
        if any(end == start for (end, _, _), start in zip(phases, starts)):
            raise ValueError(f"OneCycle phases must each last more than one step (PyTorch divides by zero there); got "
                             f"total_steps={self.total_steps}, pct_start={self.pct_start}")
        self._phases = [(start, end, a, b) for start, (end, a, b) in zip(starts, phases)]

    def __call__(self, step):
        step = min(_step("OneCycle", step), self.total_steps - 1)
        for i, (start, end, a, b) in enumerate(self._phases):
            if step <= end or i == len(self._phases) - 1:
                pct = (step - start) / (end - start)
                if self.anneal_strategy == "cos":
                    return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1.0)
                return (b - a) * pct + a
        raise AssertionError("unreachable: the last phase takes every remaining step")

    def get_config(self):
        return {"name": self.name, "max_learning_rate": self.max_learning_rate, "total_steps": self.total_steps,
                "pct_start": self.pct_start, "anneal_strategy": self.anneal_strategy, "div_factor": self.div_factor,
                "final_div_factor": self.final_div_factor, "three_phase": self.three_phase}


SCHEDULES = {cls.name: cls for cls in (ExponentialDecay, PiecewiseConstantDecay, PolynomialDecay, InverseTimeDecay,
                                       CosineDecay, CosineDecayRestarts, OneCycle)}
_ALIASES = {cls.__name__.lower(): cls.name for cls in SCHEDULES.values()}


def get(schedule) -> LearningRateSchedule:
    """A schedule from a config dict (``{"name": "cosine_decay", "initial_learning_rate": 0.1, ...}``; Keras class
    names such as ``"CosineDecay"`` work too) or an instance. Unknown names and bad arguments raise ValueError."""
    return resolve("learning rate schedule", SCHEDULES, schedule, LearningRateSchedule, _ALIASES)
