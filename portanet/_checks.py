"""Checks of constructor arguments shared by layers, activations, losses, optimizers, metrics and callbacks.

A model file's config reaches the same constructors, so these checks are also what keeps a hostile file's values
out (io turns their ValueError into ModelFileError). Plain Python values only; no arrays.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["real", "flag", "integer"]


def real(owner: str, arg: str, value, low: float | None = None, high: float | None = None, *,
         low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float when it is a finite real number (not a bool) within the bounds given; else ValueError
    naming ``owner``, ``arg``, the range and the value: "elu alpha must be a finite number > 0, got inf"."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        what = "be" if low is not None and high is not None else "be a finite number"
        raise ValueError(f"{owner} {arg} must {what}{_range(low, high, low_open, high_open)}, got {value!r:.80}")
    return float(value)


def _range(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ""


def flag(owner: str, arg: str, value) -> bool:
    """``value`` when it is True or False; else ValueError (1, "yes" or a list are not flags)."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner} {arg} must be True or False, got {value!r:.80}")
    return value


def integer(owner: str, arg: str, value, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int when it is an integer (not a bool) in ``[low, high]``; else ValueError."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and ((low is not None and value < low) or (high is not None and value > high)):
        ok = False
    if not ok:
        bounds = f" in [{low}, {high}]" if low is not None and high is not None else (
            f" >= {low}" if low is not None else f" <= {high}" if high is not None else "")
        raise ValueError(f"{owner} {arg} must be an integer{bounds}, got {value!r:.80}")
    return int(value)
