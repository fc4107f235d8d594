"""Metrics computed on the device: each returns the batch *sum* as a 0-d array, averaged once per epoch.

Math only, through ``xp``. ``pred`` is always exactly what ``Model.predict`` returns for the batch (the activated
output), never internal logits. Metrics are unweighted (as Keras's ``metrics=``): sample and class weights change
the loss only.
"""

from __future__ import annotations

import numbers

import array_api_compat

from ._checks import real
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


def _column(y, xp, dtype):
    """Targets as a (batch, k) array of the predictions' dtype (integer labels included)."""
    y = xp.reshape(y, (-1, 1)) if y.ndim == 1 else y
    return y if y.dtype == dtype else xp.astype(y, dtype)


class Metric:
    """Base class: ``batch_sum(pred, y, xp) -> 0-d array``; the epoch value is the sum over samples / n.

    ``name``: the log key (default: the metric's standard name); metrics of one model need distinct names.
    """

    name = "metric"

    def __init__(self, name: str | None = None):
        if name is not None:
            if not isinstance(name, str) or not name or name.startswith("val_") or name in ("loss", "lr"):
                raise ValueError(f"metric name must be a non-empty string other than 'loss' and 'lr', not starting "
                                 f"with 'val_', got {name!r}")
            self.name = name

    def batch_sum(self, pred, y, xp):
        raise NotImplementedError

    def get_config(self):
        config = {"name": type(self).name}
        if self.name != type(self).name:
            config["metric_name"] = self.name
        return config


class BinaryAccuracy(Metric):
    """Fraction of outputs on the right side of ``threshold`` (prediction > threshold vs target > 0.5), averaged
    over outputs (Keras's rule)."""

    name = "binary_accuracy"

    def __init__(self, threshold: float = 0.5, name: str | None = None):
        super().__init__(name)
        self.threshold = real("binary_accuracy", "threshold", threshold)

    def batch_sum(self, pred, y, xp):
        hit = (pred > self.threshold) == (_column(y, xp, pred.dtype) > 0.5)
        return xp.sum(xp.mean(xp.astype(hit, pred.dtype), axis=1))

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold}


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

    def __init__(self, k: int = 5, name: str | None = None):
        super().__init__(name)
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"top_k_accuracy k must be a positive integer, got {k!r}")
        self.k = int(k)

    def batch_sum(self, pred, y, xp):
        labels = xp.reshape(_labels(y, pred.shape[1], xp), (-1, 1))
        true_score = xp.take_along_axis(pred, labels, axis=1)
        index = xp.arange(pred.shape[1], dtype=labels.dtype, device=_device(labels))
        ahead = (pred > true_score) | ((pred == true_score) & (index < labels))  # ranked before the true class
        rank = xp.sum(xp.astype(ahead, xp.int64), axis=1)
        return xp.sum(xp.astype(rank < self.k, pred.dtype))

    def get_config(self):
        return {**super().get_config(), "k": self.k}


class MeanSquaredError(Metric):
    name = "mse"

    def batch_sum(self, pred, y, xp):
        r = pred - _column(y, xp, pred.dtype)
        return xp.sum(xp.mean(r * r, axis=1))


class MeanAbsoluteError(Metric):
    name = "mae"

    def batch_sum(self, pred, y, xp):
        return xp.sum(xp.mean(xp.abs(pred - _column(y, xp, pred.dtype)), axis=1))


METRICS = {cls.name: cls for cls in (Accuracy, BinaryAccuracy, TopKAccuracy, MeanSquaredError, MeanAbsoluteError)}
_ALIASES = {"acc": "accuracy", "mean_squared_error": "mse", "mean_absolute_error": "mae"}


def get(metric) -> Metric:
    """A metric from a name, a config dict (``metric_name`` restores a custom name) or an instance."""
    if isinstance(metric, dict) and "metric_name" in metric:
        config = dict(metric)
        name = config.pop("metric_name")
        found = resolve("metric", METRICS, config, Metric, _ALIASES)
        Metric.__init__(found, name)
        return found
    return resolve("metric", METRICS, metric, Metric, _ALIASES)


def check_names(metrics) -> None:
    """Distinct log keys for the metrics of one model (ValueError naming the duplicate otherwise)."""
    seen = set()
    for metric in metrics:
        if metric.name in seen:
            raise ValueError(f"two metrics are named {metric.name!r}; give one another name, e.g. "
                             f"{type(metric).__name__}(..., name='{metric.name}_2')")
        seen.add(metric.name)
