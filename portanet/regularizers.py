"""Weight penalties: L1, L2 and L1L2, each with its value and its gradient side by side.

Math only, through the namespace ``xp`` passed in; no array library is imported here. Formulas, names and defaults
follow Keras 3 (``keras/src/regularizers/regularizers.py``): no 1/2 in the L2 penalty.
"""

from __future__ import annotations

import math
import numbers

import array_api_compat

from ._registry import Configurable, resolve

__all__ = ["Regularizer", "L1", "L2", "L1L2", "get", "REGULARIZERS"]


def _factor(owner: str, arg: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{owner} {arg} must be a finite number >= 0, got {value!r}")
    return float(value)


class Regularizer(Configurable):
    """Base class: ``__call__(w, xp)`` -> the penalty (0-d array on ``w``'s device), ``gradient(w, xp)`` -> its
    derivative with respect to ``w`` (same shape as ``w``), to be added to the loss and to ``w``'s gradient."""

    name = "regularizer"

    def __call__(self, w, xp):
        raise NotImplementedError

    def gradient(self, w, xp):
        raise NotImplementedError


class L1L2(Regularizer):
    """``l1 * sum(|w|) + l2 * sum(w**2)``; gradient ``l1 * sign(w) + 2 * l2 * w`` (sign(0) = 0, as torch's
    autograd gives for ``abs`` at 0). Keras 3 defaults: ``l1=0.0, l2=0.0``."""

    name = "l1_l2"

    def __init__(self, l1: float = 0.0, l2: float = 0.0):
        self.l1 = _factor(type(self).__name__, "l1", l1)
        self.l2 = _factor(type(self).__name__, "l2", l2)

    def __call__(self, w, xp):
        penalty = xp.zeros((), dtype=w.dtype, device=array_api_compat.device(w))
        if self.l1:
            penalty = penalty + self.l1 * xp.sum(xp.abs(w))
        if self.l2:
            flat = xp.reshape(w, (-1,))
            penalty = penalty + self.l2 * xp.vecdot(flat, flat)
        return penalty

    def gradient(self, w, xp):
        grad = xp.zeros_like(w)
        if self.l1:
            grad = grad + self.l1 * xp.sign(w)
        if self.l2:
            grad = grad + (2.0 * self.l2) * w
        return grad

    def get_config(self):
        return {"name": self.name, "l1": self.l1, "l2": self.l2}


class L1(L1L2):
    """``l1 * sum(|w|)`` (default ``l1=0.01``); gradient ``l1 * sign(w)`` with sign(0) = 0."""

    name = "l1"

    def __init__(self, l1: float = 0.01):
        super().__init__(l1=l1)

    def get_config(self):
        return {"name": self.name, "l1": self.l1}


class L2(L1L2):
    """``l2 * sum(w**2)`` (default ``l2=0.01``; Keras has no 1/2 here); gradient ``2 * l2 * w``."""

    name = "l2"

    def __init__(self, l2: float = 0.01):
        super().__init__(l2=l2)

    def get_config(self):
        return {"name": self.name, "l2": self.l2}


REGULARIZERS = {cls.name: cls for cls in (L1, L2, L1L2)}
_ALIASES = {"l1l2": "l1_l2"}


def get(regularizer) -> Regularizer | None:
    """A regularizer from a name (``"l1"``, ``"l2"``, ``"l1_l2"``: Keras 3's defaults, so ``"l1_l2"`` has both
    factors 0.0 and penalizes nothing), a config dict or an instance; ``None`` gives ``None``. Unknown names and bad
    arguments raise ValueError."""
    if regularizer is None:
        return None
    return resolve("regularizer", REGULARIZERS, regularizer, Regularizer, _ALIASES)
