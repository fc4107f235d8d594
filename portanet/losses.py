"""Losses: each gives per-sample values and their gradient; cross-entropies fuse with softmax/sigmoid.

Math only, through the namespace ``xp`` passed in. The batch mean (and sample weights) are applied by :func:`reduce`.
"""

from __future__ import annotations

import array_api_compat

from ._checks import flag, real
from ._registry import resolve

__all__ = [
    "Loss", "MeanSquaredError", "MeanAbsoluteError", "Huber", "BinaryCrossentropy",
    "CategoricalCrossentropy", "SparseCategoricalCrossentropy", "get", "reduce", "LOSSES",
]

_EPS = 1e-7  # probability clip for cross-entropies computed from probabilities (not logits)


class Loss:
    """Base class.

    ``per_sample(pred, y, xp) -> (l, g)``: ``l`` of shape (batch,), ``g = dl/dpred`` of shape (batch, out).
    A loss that can absorb an output activation names it in ``fuses`` and implements
    ``per_sample_logits(z, y, xp, probs=None, kernels=None) -> (l, g)`` with ``g = dl/dz``: the value from the
    logits ``z`` (log-sum-exp, stable), the gradient from ``probs`` = activation(z) when the caller has it (the
    output predict returns), else computed here. ``sparse`` losses take integer labels; the others take float
    targets shaped like the output.
    """

    name = "custom"
    fuses: str | None = None
    sparse = False

    def __init__(self, from_logits: bool = False):
        self.from_logits = flag(type(self).__name__, "from_logits", from_logits)

    def per_sample(self, pred, y, xp):
        raise NotImplementedError

    def per_sample_logits(self, z, y, xp, probs=None, kernels=None):
        raise NotImplementedError(f"{self.name} cannot take logits")

    def get_config(self) -> dict:
        config = {"name": self.name}
        if self.fuses:
            config["from_logits"] = self.from_logits
        return config

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "name")
        return f"{type(self).__name__}({args})"

    def check_targets(self, y, n_outputs: int, name: str = "y", values: bool = True):
        """Validate targets ``y`` (any namespace) against a model with ``n_outputs`` outputs; raise ValueError.

        ``values=False`` checks shapes and dtypes only (no device-to-host read of label ranges).
        """
        xp = array_api_compat.array_namespace(y)
        if self.sparse:
            _check_labels(y, n_outputs, xp, name, values)
            return
        if not (y.ndim == 1 and n_outputs == 1) and (y.ndim != 2 or y.shape[1] != n_outputs):
            hint = self._shape_hint(y, n_outputs, xp)
            raise ValueError(f"{name} must have shape (samples, {n_outputs}) to match the model's output, got "
                             f"{tuple(y.shape)}{hint}")
        if values:
            self._check_values(y, xp, name)

    def _shape_hint(self, y, n_outputs, xp) -> str:
        """A hint for targets of the wrong shape: one integer label per sample for a model with several outputs."""
        if n_outputs > 1 and (y.ndim == 1 or y.shape[1] == 1) and not xp.isdtype(y.dtype, "real floating"):
            return ("; y looks like integer class labels: use loss='sparse_categorical_crossentropy' with a softmax "
                    "output of one unit per class")
        return ""

    def _check_values(self, y, xp, name) -> None:
        """Raise ValueError for target values this loss cannot mean (read only where values are read anyway)."""

    def target_kind(self) -> str:
        return "int" if self.sparse else "float"

    def classes(self, n_outputs: int) -> int | None:
        """Number of classes this loss sees in a model with ``n_outputs`` outputs (2 for binary cross-entropy with
        one output), or None for a regression loss."""
        return None

    def class_labels(self, y, n_outputs: int, xp):
        """Integer class labels (batch,) of targets ``y`` (namespace ``xp``) for a classification loss."""
        raise ValueError(f"{self.name} is not a classification loss")


def _check_labels(y, n_classes, xp, name, values=True):
    if y.ndim == 2 and y.shape[1] == 1:
        y = xp.reshape(y, (-1,))
    if y.ndim != 1:
        raise ValueError(f"{name} must hold integer class labels of shape (samples,), got shape {tuple(y.shape)}; "
                         "use categorical_crossentropy for one-hot targets")
    if n_classes < 2:
        raise ValueError(f"sparse_categorical_crossentropy needs an output of at least 2 units, got {n_classes}")
    if not values:
        if not xp.isdtype(y.dtype, ("integral", "real floating")):
            raise ValueError(f"{name} must hold integer class labels, got dtype {y.dtype}")
        return
    if xp.isdtype(y.dtype, "real floating"):
        if not bool(xp.all(y == xp.round(y))):
            raise ValueError(f"{name} must hold integer class labels, got non-integer values")
    elif not xp.isdtype(y.dtype, "integral"):
        raise ValueError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    lo, hi = xp.min(y), xp.max(y)
    if bool(lo < 0) or bool(hi >= n_classes):
        raise ValueError(f"{name} labels must be in [0, {n_classes}), got values in [{int(lo)}, {int(hi)}]")


def _range(y, xp):
    """``(min, max)`` of ``y`` as Python floats (two device reads)."""
    if xp.isdtype(y.dtype, "bool"):
        y = xp.astype(y, xp.int8)
    return float(xp.min(y)), float(xp.max(y))


def _unclipped(p, grad, high, xp):
    """``grad`` where ``p`` lies inside the clip range [_EPS, high], 0 where the clip is active (flat loss)."""
    return xp.where((p >= _EPS) & (p <= high), grad, 0.0)


def _as_column(y, xp):
    return xp.reshape(y, (-1, 1)) if y.ndim == 1 else y


def _mean_over_outputs(e, xp):
    return xp.mean(e, axis=1)


class MeanSquaredError(Loss):
    name = "mse"

    def per_sample(self, pred, y, xp):
        r = pred - _as_column(y, xp)
        return _mean_over_outputs(r * r, xp), (2.0 / pred.shape[1]) * r


class MeanAbsoluteError(Loss):
    name = "mae"

    def per_sample(self, pred, y, xp):
        r = pred - _as_column(y, xp)
        return _mean_over_outputs(xp.abs(r), xp), xp.sign(r) / pred.shape[1]


class Huber(Loss):
    """Quadratic within ``delta`` of the target, linear beyond it."""

    name = "huber"

    def __init__(self, delta: float = 1.0):
        super().__init__()
        self.delta = real("huber", "delta", delta, 0, low_open=True)

    def per_sample(self, pred, y, xp):
        r = pred - _as_column(y, xp)
        a = xp.abs(r)
        d = self.delta
        e = xp.where(a <= d, 0.5 * r * r, d * (a - 0.5 * d))
        return _mean_over_outputs(e, xp), xp.clip(r, -d, d) / pred.shape[1]

    def get_config(self):
        return {"name": self.name, "delta": self.delta}


class BinaryCrossentropy(Loss):
    """Mean binary cross-entropy over outputs; fused with a sigmoid output (or ``from_logits=True``)."""

    name = "binary_crossentropy"
    fuses = "sigmoid"

    def per_sample(self, p, y, xp):
        y = _as_column(y, xp)
        pc = xp.clip(p, _EPS, 1.0 - _EPS)
        e = -(y * xp.log(pc) + (1.0 - y) * xp.log(1.0 - pc))
        return _mean_over_outputs(e, xp), _unclipped(p, (pc - y) / (pc * (1.0 - pc)) / p.shape[1], 1.0 - _EPS, xp)

    def per_sample_logits(self, z, y, xp, probs=None, kernels=None):
        y = _as_column(y, xp)
        ez = xp.exp(-xp.abs(z))
        e = xp.maximum(z, 0.0) - z * y + xp.log1p(ez)
        p = xp.where(z >= 0, 1.0 / (1.0 + ez), ez / (1.0 + ez)) if probs is None else probs
        return _mean_over_outputs(e, xp), (p - y) / z.shape[1]

    def _check_values(self, y, xp, name):
        lo, hi = _range(y, xp)
        if lo < 0 or hi > 1:
            if lo == -1 and hi == 1:
                fix = "map -1/1 labels to 0/1 with (y + 1) / 2"
            elif hi > 1 and bool(xp.all(y == xp.round(y))):
                fix = ("for integer class labels use loss='sparse_categorical_crossentropy' with a softmax output of "
                       "one unit per class")
            else:
                fix = "rescale them into [0, 1]"
            raise ValueError(f"binary_crossentropy targets must be probabilities or 0/1 labels in [0, 1], but {name} "
                             f"holds values in [{lo:g}, {hi:g}] (the loss would go below 0 and reward confident "
                             f"wrong answers): {fix}")

    def classes(self, n_outputs):
        return 2 if n_outputs == 1 else None

    def class_labels(self, y, n_outputs, xp):
        return xp.astype(xp.reshape(y, (-1,)) > 0.5, xp.int64)


def _log_softmax(z, xp):
    s = z - xp.max(z, axis=1, keepdims=True)
    return s - xp.log(xp.sum(xp.exp(s), axis=1, keepdims=True))


class CategoricalCrossentropy(Loss):
    """Cross-entropy against one-hot (or soft) targets of shape (batch, classes); fused with softmax."""

    name = "categorical_crossentropy"
    fuses = "softmax"

    def per_sample(self, p, y, xp):
        pc = xp.clip(p, _EPS, 1.0)
        return -xp.sum(y * xp.log(pc), axis=1), _unclipped(p, -y / pc, 1.0, xp)

    def per_sample_logits(self, z, y, xp, probs=None, kernels=None):
        logp = _log_softmax(z, xp)
        p = xp.exp(logp) if probs is None else probs
        return -xp.sum(y * logp, axis=1), p * xp.sum(y, axis=1, keepdims=True) - y

    def _check_values(self, y, xp, name):
        lo, hi = _range(y, xp)
        if lo < 0 or hi > 1:
            raise ValueError(f"categorical_crossentropy targets must be one-hot rows or probabilities in [0, 1], but "
                             f"{name} holds values in [{lo:g}, {hi:g}] (negative targets make the loss unbounded "
                             "below)")

    def classes(self, n_outputs):
        return n_outputs

    def class_labels(self, y, n_outputs, xp):
        return xp.argmax(y, axis=1)


class SparseCategoricalCrossentropy(Loss):
    """Cross-entropy against integer labels of shape (batch,); fused with softmax."""

    name = "sparse_categorical_crossentropy"
    fuses = "softmax"
    sparse = True

    @staticmethod
    def _one_hot(y, k, dtype, xp):
        y = xp.reshape(y, (-1,))
        return xp.astype(y[:, None] == xp.arange(k, dtype=y.dtype, device=array_api_compat.device(y)), dtype)

    def per_sample(self, p, y, xp):
        labels = xp.reshape(y, (-1, 1))
        picked = xp.take_along_axis(p, labels, axis=1)[:, 0]
        onehot = self._one_hot(y, p.shape[1], p.dtype, xp)
        return -xp.log(xp.clip(picked, _EPS, 1.0)), _unclipped(p, -onehot / xp.clip(p, _EPS, 1.0), 1.0, xp)

    def per_sample_logits(self, z, y, xp, probs=None, kernels=None):
        if kernels is not None and probs is not None:
            return kernels.sparse_softmax_crossentropy(z, probs, y)
        logp = _log_softmax(z, xp)
        picked = xp.take_along_axis(logp, xp.reshape(y, (-1, 1)), axis=1)[:, 0]
        p = xp.exp(logp) if probs is None else probs
        return -picked, p - self._one_hot(y, z.shape[1], z.dtype, xp)

    def classes(self, n_outputs):
        return n_outputs

    def class_labels(self, y, n_outputs, xp):
        return xp.astype(xp.reshape(y, (-1,)), xp.int64)


LOSSES = {cls.name: cls for cls in (
    MeanSquaredError, MeanAbsoluteError, Huber, BinaryCrossentropy, CategoricalCrossentropy, SparseCategoricalCrossentropy,
)}
_ALIASES = {"mean_squared_error": "mse", "mean_absolute_error": "mae", "bce": "binary_crossentropy",
            "crossentropy": "categorical_crossentropy"}


def get(loss) -> Loss:
    """A loss from a name, a config dict or an instance."""
    return resolve("loss", LOSSES, loss, Loss, _ALIASES)


def reduce(per_sample_loss, per_sample_grad, xp, sample_weight=None):
    """Batch mean of the loss and the matching gradient; ``sample_weight`` (batch,) weights each row."""
    n = per_sample_loss.shape[0]
    if sample_weight is None:
        return xp.sum(per_sample_loss) / n, per_sample_grad * (1.0 / n)
    return xp.sum(per_sample_loss * sample_weight) / n, per_sample_grad * (xp.reshape(sample_weight, (-1, 1)) / n)
