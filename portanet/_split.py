"""Holding out a validation split: which rows go where, shuffled and stratified by class, as host index arrays.

Index math only (NumPy on the host); the rows themselves are gathered where they live by ``_backend.take_rows``.
"""

from __future__ import annotations

import numpy as np

from .data import in_memory


def check_fraction(fraction, x, y, sample_weight) -> float:
    """``fit(validation_split=...)`` checked: a number in [0, 1), and in-memory data with rows to spare."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"validation_split must be a number in [0, 1), got {fraction!r}")
    if not fraction:
        return 0.0
    if not all(a is None or in_memory(a) for a in (x, y, sample_weight)):
        raise ValueError("validation_split needs in-memory arrays (a random split of a stream, memory map or "
                         f"sliceable would read it all); pass validation_data= instead (x is a {type(x).__name__})")
    n = x.shape[0]
    n_val = round(fraction * n)
    if not 1 <= n_val < n:
        raise ValueError(f"validation_split={fraction} of {n} rows leaves {n_val} for validation and {n - n_val} for "
                         "training; both need at least one")
    return float(fraction)


def split_rows(n: int, fraction: float, labels, seed: int):
    """``(train_rows, val_rows)``: sorted host int64 indices, about ``fraction`` of the ``n`` rows for validation.

    ``labels`` (host int array of class labels, or None): each class contributes its share (largest remainders
    get the rounding, a class never gives all its rows), so validation and training see the same class mix.
    """
    rng = np.random.default_rng(seed)
    n_val = round(fraction * n)
    val = rng.permutation(n)[:n_val]
    if labels is not None:
        classes, counts = np.unique(labels, return_counts=True)
        exact = counts * (n_val / n)
        take = np.minimum(np.floor(exact).astype(np.int64), np.maximum(counts - 1, 0))
        spare = n_val - int(take.sum())
        for i in np.lexsort((rng.random(len(classes)), take - exact)):  # largest remainder first, ties at random
            if spare > 0 and take[i] < counts[i] - 1:
                take[i] += 1
                spare -= 1
        if take.sum():  # else every class is a singleton: the plain random split above
            val = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)])
    is_val = np.zeros(n, bool)
    is_val[val] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)
