"""Metrics computed on the device: each returns the batch *sum* as a 0-d array, averaged once per epoch.

Math only, through ``xp``. ``pred`` is always exactly what ``Model.predict`` returns for the batch (the activated
output), never internal logits. Metrics are unweighted (as Keras's ``metrics=``): sample and class weights change
the loss only.
"""

from __future__ import annotations

import array_api_compat

from ._registry import resolve

__all__ = ["Metric", "Accuracy", "BinaryAccuracy", "TopKAccuracy", "MeanSquaredError", "MeanAbsoluteError", "get",
           "METRICS"]


def _labels(y, n_outputs, xp):
    """Class labels (batch,) from integer labels or one-hot rows."""
    if y.ndim == 2 and y.shape[1] == n_outputs and n_outputs > 1:
        return xp.argmax(y, axis=1)
    return xp.astype(xp.reshape(y, (-1,)), xp.int64)


def _device(a):
    return array_api_compat.device(a)


def _column(y, xp):
    return xp.reshape(y, (-1, 1)) if y.ndim == 1 else y


class Metric:
    """Base class: ``batch_sum(pred, y, xp) -> 0-d array``; the epoch value is the sum over samples / n."""

    name = "metric"

    def batch_sum(self, pred, y, xp):
        raise NotImplementedError

    def get_config(self):
        return {"name": self.name}


class BinaryAccuracy(Metric):
    """Fraction of outputs on the right side of ``threshold`` (prediction > threshold vs target > 0.5), averaged
    over outputs (Keras's rule)."""

    name = "binary_accuracy"

    def __init__(self, threshold: float = 0.5):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold != threshold:
            raise ValueError(f"binary_accuracy threshold must be a number, got {threshold!r}")
        self.threshold = float(threshold)

    def batch_sum(self, pred, y, xp):
        hit = (pred > self.threshold) == (_column(y, xp) > 0.5)
        return xp.sum(xp.mean(xp.astype(hit, pred.dtype), axis=1))

    def get_config(self):
        return {"name": self.name, "threshold": self.threshold}


class Accuracy(Metric):
    """Classification accuracy: argmax for several outputs, a 0.5 threshold for one output."""

    name = "accuracy"

    def batch_sum(self, pred, y, xp):
        if pred.shape[1] == 1:
            return BinaryAccuracy().batch_sum(pred, y, xp)
        hit = xp.argmax(pred, axis=1) == _labels(y, pred.shape[1], xp)
        return xp.sum(xp.astype(hit, pred.dtype))


class TopKAccuracy(Metric):
    """True class among the ``k`` highest outputs. Ties are ranked as a stable sort by descending score would rank
    them (the lower class index first), so ``k=1`` agrees with ``accuracy``'s argmax exactly."""

    name = "top_k_accuracy"

    def __init__(self, k: int = 5):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"top_k_accuracy k must be a positive integer, got {k!r}")
        self.k = k

    def batch_sum(self, pred, y, xp):
        labels = xp.reshape(_labels(y, pred.shape[1], xp), (-1, 1))
        true_score = xp.take_along_axis(pred, labels, axis=1)
        index = xp.arange(pred.shape[1], dtype=labels.dtype, device=_device(labels))
        ahead = (pred > true_score) | ((pred == true_score) & (index < labels))  # ranked before the true class
        rank = xp.sum(xp.astype(ahead, xp.int64), axis=1)
        return xp.sum(xp.astype(rank < self.k, pred.dtype))

    def get_config(self):
        return {"name": self.name, "k": self.k}


class MeanSquaredError(Metric):
    name = "mse"

    def batch_sum(self, pred, y, xp):
        r = pred - _column(y, xp)
        return xp.sum(xp.mean(r * r, axis=1))


class MeanAbsoluteError(Metric):
    name = "mae"

    def batch_sum(self, pred, y, xp):
        return xp.sum(xp.mean(xp.abs(pred - _column(y, xp)), axis=1))


METRICS = {cls.name: cls for cls in (Accuracy, BinaryAccuracy, TopKAccuracy, MeanSquaredError, MeanAbsoluteError)}
_ALIASES = {"acc": "accuracy", "mean_squared_error": "mse", "mean_absolute_error": "mae"}


def get(metric) -> Metric:
    """A metric from a name, a config dict or an instance."""
    return resolve("metric", METRICS, metric, Metric, _ALIASES)
