"""Weight initializers: ``initializer(shape, rng) -> float64 NumPy array`` drawn on the host from a NumPy Generator.

Values are drawn on the host (the array API has no random numbers) so one seed gives the same weights on every
backend; the caller casts and uploads them. Names, defaults and formulas follow Keras 3
(``keras/src/initializers/random_initializers.py``, ``constant_initializers.py``).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ._checks import real
from ._registry import Configurable, resolve

__all__ = [
    "Initializer", "Zeros", "Ones", "Constant", "Identity", "RandomNormal", "RandomUniform", "TruncatedNormal",
    "VarianceScaling", "GlorotUniform", "GlorotNormal", "HeUniform", "HeNormal", "LecunUniform", "LecunNormal",
    "Orthogonal", "compute_fans", "draw", "get", "INITIALIZERS",
]

TRUNCATED_STDDEV = 0.87962566103423978  # std of a standard normal truncated to [-2, 2] (Keras's constant)



def _shape(owner: str, shape) -> tuple:
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    ok = isinstance(shape, (tuple, list)) and all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 0 for d in shape)
    if not ok:
        raise ValueError(f"{owner} shape must be a tuple of integers >= 0, got {shape!r}")
    return tuple(int(d) for d in shape)


def _generator(owner: str, rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{owner} rng must be a numpy.random.Generator (numpy.random.default_rng(seed)), got "
                        f"{type(rng).__name__}")
    return rng


def compute_fans(shape) -> tuple[int, int]:
    """``(fan_in, fan_out)`` as Keras computes them: ``(in, units)`` for a 2-D kernel, ``(n, n)`` for a 1-D
    vector, the receptive field times the last two dimensions for higher ranks, ``(1, 1)`` for a scalar."""
    shape = tuple(shape)
    if not shape:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def _truncated_normal(rng, shape, mean: float, stddev: float) -> np.ndarray:
    """Normal(mean, stddev) with values more than 2 stddev from the mean drawn again (Keras ``truncated_normal``)."""
    z = rng.standard_normal(shape)
    bad = np.abs(z) > 2.0
    while bad.any():
        z[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(z) > 2.0
    return mean + stddev * z


class Initializer(Configurable):
    """Base class: ``__call__(shape, rng) -> numpy.ndarray`` of float64 values of ``shape`` drawn from the NumPy
    Generator ``rng``. Subclass it (override ``_draw(shape, rng)`` and ``get_config``) for your own."""

    name = "initializer"

    def __call__(self, shape, rng) -> np.ndarray:
        owner = type(self).__name__
        return np.asarray(self._draw(_shape(owner, shape), _generator(owner, rng)), dtype=np.float64)

    def _draw(self, shape, rng):
        raise NotImplementedError


class Zeros(Initializer):
    name = "zeros"

    def _draw(self, shape, rng):
        return np.zeros(shape)


class Ones(Initializer):
    name = "ones"

    def _draw(self, shape, rng):
        return np.ones(shape)


class Constant(Initializer):
    """Every entry equal to ``value`` (default 0.0)."""

    name = "constant"

    def __init__(self, value: float = 0.0):
        self.value = real("Constant", "value", value)

    def _draw(self, shape, rng):
        return np.full(shape, self.value)

    def get_config(self):
        return {"name": self.name, "value": self.value}


class Identity(Initializer):
    """``gain`` times the identity (a 2-D shape only; rectangular: ones on the main diagonal)."""

    name = "identity"

    def __init__(self, gain: float = 1.0):
        self.gain = real("Identity", "gain", gain)

    def _draw(self, shape, rng):
        if len(shape) != 2:
            raise ValueError(f"Identity needs a 2-D shape, got {shape}")
        return self.gain * np.eye(*shape)

    def get_config(self):
        return {"name": self.name, "gain": self.gain}


class RandomNormal(Initializer):
    """Normal(``mean``, ``stddev``); Keras defaults 0.0 and 0.05."""

    name = "random_normal"

    def __init__(self, mean: float = 0.0, stddev: float = 0.05):
        self.mean = real("RandomNormal", "mean", mean)
        self.stddev = real("RandomNormal", "stddev", stddev, 0.0)

    def _draw(self, shape, rng):
        return rng.normal(self.mean, self.stddev, shape)

    def get_config(self):
        return {"name": self.name, "mean": self.mean, "stddev": self.stddev}


class TruncatedNormal(Initializer):
    """Normal(``mean``, ``stddev``) with values beyond 2 ``stddev`` from the mean drawn again; defaults 0.0, 0.05.
    (``stddev`` is that of the normal before truncation: the values' own std is 0.8796 times it.)"""

    name = "truncated_normal"

    def __init__(self, mean: float = 0.0, stddev: float = 0.05):
        self.mean = real("TruncatedNormal", "mean", mean)
        self.stddev = real("TruncatedNormal", "stddev", stddev, 0.0)

    def _draw(self, shape, rng):
        return _truncated_normal(rng, shape, self.mean, self.stddev)

    def get_config(self):
        return {"name": self.name, "mean": self.mean, "stddev": self.stddev}


class RandomUniform(Initializer):
    """Uniform on [``minval``, ``maxval``); Keras defaults -0.05 and 0.05."""

    name = "random_uniform"

    def __init__(self, minval: float = -0.05, maxval: float = 0.05):
        self.minval = real("RandomUniform", "minval", minval)
        self.maxval = real("RandomUniform", "maxval", maxval)
        if self.maxval < self.minval:
            raise ValueError(f"RandomUniform maxval must be >= minval, got minval={minval!r}, maxval={maxval!r}")

    def _draw(self, shape, rng):
        return rng.uniform(self.minval, self.maxval, shape)

    def get_config(self):
        return {"name": self.name, "minval": self.minval, "maxval": self.maxval}


class VarianceScaling(Initializer):
    """Values of variance ``scale / n``, ``n`` = fan_in, fan_out or their mean (``mode``), from (Keras):

    - ``"truncated_normal"`` (``"normal"`` too): a normal of stddev ``sqrt(scale / n) / 0.87962566103423978``
      truncated at 2 of those stddevs, so that the values' std is ``sqrt(scale / n)``;
    - ``"untruncated_normal"``: a normal of stddev ``sqrt(scale / n)``;
    - ``"uniform"``: uniform on ``[-limit, limit]``, ``limit = sqrt(3 * scale / n)``.

    Fans are :func:`compute_fans`'s, each at least 1.
    """

    name = "variance_scaling"

    def __init__(self, scale: float = 1.0, mode: str = "fan_in", distribution: str = "truncated_normal"):
        owner = type(self).__name__
        self.scale = real(owner, "scale", scale, 0.0, low_open=True)
        if mode not in ("fan_in", "fan_out", "fan_avg"):
            raise ValueError(f"{owner} mode must be 'fan_in', 'fan_out' or 'fan_avg', got {mode!r}")
        dist = distribution.lower() if isinstance(distribution, str) else distribution
        dist = "truncated_normal" if dist == "normal" else dist
        if dist not in ("truncated_normal", "untruncated_normal", "uniform"):
            raise ValueError(f"{owner} distribution must be 'truncated_normal', 'untruncated_normal' or 'uniform', "
                             f"got {distribution!r}")
        self.mode, self.distribution = mode, dist

    def variance(self, shape) -> float:
        """``scale / n`` for ``shape``: the variance the drawn values have."""
        fan_in, fan_out = compute_fans(shape)
        n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}[self.mode]
        return self.scale / max(1.0, n)

    def _draw(self, shape, rng):
        variance = self.variance(shape)
        if self.distribution == "truncated_normal":
            return _truncated_normal(rng, shape, 0.0, math.sqrt(variance) / TRUNCATED_STDDEV)
        if self.distribution == "untruncated_normal":
            return rng.normal(0.0, math.sqrt(variance), shape)
        limit = math.sqrt(3.0 * variance)
        return rng.uniform(-limit, limit, shape)

    def get_config(self):
        return {"name": self.name, "scale": self.scale, "mode": self.mode, "distribution": self.distribution}


class _Preset(VarianceScaling):
    """A named VarianceScaling with fixed arguments (no constructor arguments of its own)."""

    preset: tuple = ()

    def __init__(self):
        super().__init__(*self.preset)

    def get_config(self):
        return {"name": self.name}


class GlorotUniform(_Preset):
    """Uniform on ``[-limit, limit]``, ``limit = sqrt(6 / (fan_in + fan_out))`` (Glorot & Bengio 2010)."""

    name, preset = "glorot_uniform", (1.0, "fan_avg", "uniform")


class GlorotNormal(_Preset):
    """Truncated normal with std ``sqrt(2 / (fan_in + fan_out))`` after truncation (Keras; see VarianceScaling)."""

    name, preset = "glorot_normal", (1.0, "fan_avg", "truncated_normal")


class HeUniform(_Preset):
    """Uniform on ``[-limit, limit]``, ``limit = sqrt(6 / fan_in)`` (He et al. 2015)."""

    name, preset = "he_uniform", (2.0, "fan_in", "uniform")


class HeNormal(_Preset):
    """Truncated normal with std ``sqrt(2 / fan_in)`` after truncation (Keras; see VarianceScaling)."""

    name, preset = "he_normal", (2.0, "fan_in", "truncated_normal")


class LecunUniform(_Preset):
    """Uniform on ``[-limit, limit]``, ``limit = sqrt(3 / fan_in)``."""

    name, preset = "lecun_uniform", (1.0, "fan_in", "uniform")


class LecunNormal(_Preset):
    """Truncated normal with std ``sqrt(1 / fan_in)`` after truncation (Keras; see VarianceScaling)."""

    name, preset = "lecun_normal", (1.0, "fan_in", "truncated_normal")


class Orthogonal(Initializer):
    """``gain`` times an orthogonal matrix (Saxe et al. 2014): Q of the QR factorisation of a standard normal
    matrix, columns signed by diag(R) (Keras). Shapes of rank >= 2 are flattened to (prod(shape[:-1]),
    shape[-1]); with fewer rows than columns the rows are orthonormal, else the columns."""

    name = "orthogonal"

    def __init__(self, gain: float = 1.0):
        self.gain = real("Orthogonal", "gain", gain)

    def _draw(self, shape, rng):
        if len(shape) < 2:
            raise ValueError(f"Orthogonal needs a shape of rank >= 2, got {shape}")
        rows, cols = math.prod(shape[:-1]), shape[-1]
        a = rng.standard_normal((max(rows, cols), min(rows, cols)))
        q, r = np.linalg.qr(a)
        q = q * np.sign(np.diag(r))
        if rows < cols:
            q = q.T
        return self.gain * q.reshape(shape)

    def get_config(self):
        return {"name": self.name, "gain": self.gain}


INITIALIZERS = {cls.name: cls for cls in (Zeros, Ones, Constant, Identity, RandomNormal, RandomUniform,
                                          TruncatedNormal, VarianceScaling, GlorotUniform, GlorotNormal, HeUniform,
                                          HeNormal, LecunUniform, LecunNormal, Orthogonal)}
_ALIASES = {cls.__name__.lower(): cls.name for cls in INITIALIZERS.values()}


def draw(initializer, shape, rng, what: str) -> np.ndarray:
    """``initializer(shape, rng)`` as a float64 array, checked: ValueError naming ``what`` (the layer and
    argument) when the values have another shape or hold NaN or inf (a custom initializer's mistake, which would
    otherwise be reshaped into the wrong weights or reach training as NaN)."""
    values = np.asarray(initializer(shape, rng), dtype=np.float64)
    if values.shape != tuple(shape):
        raise ValueError(f"{what} {initializer!r} gave values of shape {values.shape} for a parameter of shape "
                         f"{tuple(shape)}")
    if not np.isfinite(values).all():
        raise ValueError(f"{what} {initializer!r} gave NaN or inf values")
    return values


def get(initializer) -> Initializer | None:
    """An initializer from a name (``"he_normal"``; Keras class names such as ``"HeNormal"`` work too), a config
    dict or an instance; ``None`` gives ``None``. Unknown names and bad arguments raise ValueError."""
    if initializer is None:
        return None
    return resolve("initializer", INITIALIZERS, initializer, Initializer, _ALIASES)
