"""Checks for setups that train without an error but cannot be right (ValueError) or are likely wrong (a
:class:`SetupWarning` with the fix): the output layer against the loss and metrics, and training data against both.

Reads layer kinds, activation names and a few reductions of the data; changes nothing and does no layer math.
"""

from __future__ import annotations

import os
import sys
import warnings

import array_api_compat
import numpy as np

from . import losses as _losses
from . import metrics as _metrics
from .activations import ACTIVATIONS
from .backends import dtype_name
from .data import in_memory
from .layers import Activation, Dense, Dropout

__all__ = ["SetupWarning", "check_setup", "check_training_data", "LARGE_INPUT"]

LARGE_INPUT = 100.0  # inputs larger than this in size are almost surely not scaled (raw pixels, counts, money)

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_PROBABILITIES = {"sigmoid", "softmax"}
_RANGES = {"sigmoid": (0.0, 1.0), "softmax": (0.0, 1.0), "tanh": (-1.0, 1.0), "relu": (0.0, None),
           "softplus": (0.0, None)}
_CLASSES = (_losses.CategoricalCrossentropy, _losses.SparseCategoricalCrossentropy)
_REGRESSION = (_losses.MeanSquaredError, _losses.MeanAbsoluteError, _losses.Huber)


class SetupWarning(UserWarning):
    """A model, loss, metric or data that is likely (not surely) a mistake; the message says how to fix it.
    Silence it with ``warnings.filterwarnings("ignore", category=portanet.SetupWarning)``."""


def warn(message: str, category: type = None) -> None:
    """Issue a warning (a SetupWarning unless ``category`` says otherwise) attributed to the user's line that called
    into portanet, so Python's default filter shows it once per line of the user's code (not once per batch or
    epoch) and the message points at that line, not at portanet's internals."""
    frame, level = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category or SetupWarning, stacklevel=level)


# -- the architecture against the loss and metrics -------------------------------------------------------------------
def _builtin(activation) -> str | None:
    """The name of a builtin activation (exactly a builtin class: a subclass may change the math), else None."""
    return activation.name if type(activation) is ACTIVATIONS.get(activation.name) else None


def _output(layers):
    """``(layer, dropout_last)``: the Dense or Activation layer whose activation makes the output, or None when a
    layer of another kind (its range unknown here) comes after it; ``dropout_last``: Dropout follows it."""
    dropout_last = False
    for layer in reversed(layers):
        if type(layer) is Dropout:
            dropout_last = True
            continue
        return (layer if type(layer) in (Dense, Activation) else None), dropout_last
    return None, dropout_last


def _widths(layers, input_dim):
    """Output width of each layer (None where it depends on an input width not known yet)."""
    widths, width = [], input_dim
    for layer in layers:
        if type(layer) is Dense:
            width = layer.units
        elif type(layer) not in (Dropout, Activation):
            width = None if width is None else layer.output_dim(width)
        widths.append(width)
    return widths


def check_setup(layers, loss=None, metrics=(), input_dim=None, warn_likely: bool = True) -> None:
    """Raise ValueError for an architecture, loss and metrics that cannot train to anything useful; with
    ``warn_likely``, a :class:`SetupWarning` for combinations that are likely mistakes. Changes nothing.

    ``layers``: the model's layers (named); ``loss``/``metrics``: as ``compile`` resolved them (loss None: the
    architecture alone); ``input_dim``: the input width when known.
    """
    widths = _widths(layers, input_dim)
    for layer, width in zip(layers, widths):
        if type(layer) in (Dense, Activation) and _builtin(layer.activation) == "softmax" and width == 1:
            raise ValueError(
                f"layer {layer.name!r} applies softmax to 1 unit: its output is always 1.0 and nothing can be learned. "
                "For two classes use Dense(1, activation='sigmoid') with loss='binary_crossentropy' (or "
                "Dense(2, activation='softmax') with loss='sparse_categorical_crossentropy')")
    if loss is None:
        return
    out, dropout_last = _output(layers)
    act = None if out is None else _builtin(out.activation)
    width = widths[-1] if widths else None
    what = None if out is None else f"layer {out.name!r} ({type(out).__name__} with activation {act!r})"
    if isinstance(loss, _CLASSES) and width == 1:
        raise ValueError(f"{loss.name} needs one output per class (at least 2), but the model has 1 output: for two "
                         "classes use Dense(1, activation='sigmoid') with loss='binary_crossentropy', or Dense(2, "
                         "activation='softmax')")
    if act is not None and loss.fuses:
        _check_probability_loss(loss, act, what, width, warn_likely)
    if not warn_likely:
        return
    if act == "softmax" and isinstance(loss, _REGRESSION):
        warn(f"loss {loss.name!r} on the softmax output of {what} learns slowly and poorly calibrated (its gradient "
             "vanishes where the model is confidently wrong): for one class per sample use "
             "loss='sparse_categorical_crossentropy' (integer labels) or 'categorical_crossentropy' (one-hot rows)")
    if dropout_last and out is not None:
        warn("the model ends with Dropout: in training it zeroes outputs the loss then compares with the targets; "
             "put Dropout before the last Dense layer")
    if loss.from_logits and act is not None and act not in _PROBABILITIES:
        for metric in metrics:
            if _thresholds_at_half(metric, width):
                warn(f"metric {metric.name!r} compares what predict returns with 0.5, but with from_logits=True the "
                     f"output of {what} holds logits (p = 0.5 is logit 0): use "
                     f"portanet.metrics.BinaryAccuracy(threshold=0.0, name={metric.name!r})")


def _check_probability_loss(loss, act, what, width, warn_likely):
    """Cross-entropies against the output activation: probabilities in, unless ``from_logits``."""
    if loss.from_logits:
        if act in _PROBABILITIES:
            raise ValueError(
                f"{loss.name} with from_logits=True expects logits, but {what} outputs probabilities (the loss would "
                f"apply {act} a second time, and can never reach confident predictions). Drop from_logits: portanet "
                f"already computes the loss from the logits of a {act} output, stably; or make the last layer linear")
        return
    wanted = "sigmoid" if isinstance(loss, _losses.BinaryCrossentropy) else "softmax"
    if act == wanted:
        return
    if wanted == "sigmoid" and act == "softmax":
        if warn_likely:
            warn(f"binary_crossentropy on the softmax output of {what} treats each of its {width or 'several'} "
                 "outputs as a separate yes/no question: for one class per sample use "
                 "loss='sparse_categorical_crossentropy' (integer labels) or 'categorical_crossentropy' (one-hot "
                 "rows); for several labels per sample use activation='sigmoid'")
        return
    if act == "sigmoid":
        raise ValueError(
            f"{loss.name} needs probabilities that sum to 1 over the classes, but {what} gives each output its own "
            "sigmoid: the loss only pushes the true class up and every output drifts to 1. Use activation='softmax' "
            "(or, for several labels per sample, loss='binary_crossentropy')")
    raise ValueError(
        f"{loss.name} needs probabilities, but {what} outputs values that are not (anything outside [1e-7, 1] is "
        f"clipped, and stops learning there). Use activation={wanted!r} on the last layer, or keep it linear and pass "
        f"loss=portanet.{type(loss).__name__}(from_logits=True)")


def _thresholds_at_half(metric, width) -> bool:
    if type(metric) is _metrics.BinaryAccuracy:
        return metric.threshold == 0.5
    return type(metric) is _metrics.Accuracy and width == 1


# -- training data against the model ---------------------------------------------------------------------------------
def _first_rows(source):
    """``(x, y)`` to look at: all of in-memory arrays, the first rows of a sliceable, a stream's first batch."""
    if hasattr(source, "first"):
        return source.first[0], source.first[1]
    stop = min(source.n, 1024)
    return tuple(None if a is None else a if in_memory(a) else _rows(a, stop) for a in (source.x, source.y))


def _rows(a, stop):
    return np.asarray(a[0:stop])  # memory maps and sliceables are host data, read through NumPy


def _range(a):
    xp = array_api_compat.array_namespace(a)
    return float(xp.min(a)), float(xp.max(a))


def _size(x) -> float:
    """The largest ``|x|`` (two reductions; 1 for booleans)."""
    if array_api_compat.array_namespace(x).isdtype(x.dtype, "bool"):
        return 1.0
    lo, hi = _range(x)
    return max(abs(lo), abs(hi))


def check_training_data(model, source, shuffle, validation=None) -> None:
    """Warn (:class:`SetupWarning`) about training data the model will likely learn badly from: inputs that are
    not scaled, validation inputs on another scale than the training inputs, regression targets the output
    activation cannot reach, categorical targets that are not one-hot or probabilities, labels sorted by class
    without shuffling. A few reductions of in-memory data (the first rows of a sliceable, the first batch of a
    stream); nothing is changed."""
    x, y = _first_rows(source)
    if x is not None:
        size = _size(x)
        if validation is not None:
            val_size = _size(_first_rows(validation)[0])
            if max(size, val_size) > 2 and max(size, val_size) >= 10 * min(size, val_size):
                warn(f"validation x holds values up to {val_size:.4g} in size but x up to {size:.4g}: the two are "
                     "scaled differently, so the validation metrics say little; scale both the same way (with the "
                     "training rows' statistics)")
        if size > LARGE_INPUT:
            raw = "raw pixel values? " if array_api_compat.array_namespace(x).isdtype(x.dtype, "integral") else ""
            warn(f"x holds values up to {size:.4g} in size ({raw}dtype {dtype_name(x.dtype)}): unscaled inputs "
                 "saturate the first layer and the loss starts far too high. Scale them: x / 255 for images "
                 "(load_mnist(normalize=True) does it), else standardize each feature: (x - mean) / std with the "
                 "training rows' mean and std")
    if y is None:
        return
    loss = model.loss
    width = model.output_width(source.width)
    xp = array_api_compat.array_namespace(y)
    if isinstance(loss, _REGRESSION):
        out, _ = _output(model.layers)
        act = None if out is None else _builtin(out.activation)
        if act in _RANGES:
            low, high = _RANGES[act]
            lo, hi = _range(y)
            if lo < low or (high is not None and hi > high):
                reach = f"[{low:g}, {high:g}]" if high is not None else f"[{low:g}, inf)"
                warn(f"y holds values in [{lo:.4g}, {hi:.4g}] but layer {out.name!r} ({act}) outputs values in {reach} "
                     f"only, so {loss.name} can never reach them: use a linear output (activation=None) for "
                     "unbounded targets, or rescale y into that range")
    if isinstance(loss, _losses.CategoricalCrossentropy) and len(y.shape) == 2 and \
            xp.isdtype(y.dtype, "real floating"):
        off = float(xp.max(xp.abs(xp.sum(y, axis=1) - 1.0)))
        if off > 1e-3:
            warn("some rows of y do not sum to 1: categorical_crossentropy expects one-hot rows or probabilities; for "
                 "several labels per sample use activation='sigmoid' with loss='binary_crossentropy'")
    if not shuffle and not source.reads_lazily and loss.classes(width) is not None and y.shape[0] > 1:
        labels = loss.class_labels(y, width, xp)
        if bool(xp.all(labels[1:] >= labels[:-1])) and bool(labels[0] != labels[-1]):
            warn("y is sorted by class and shuffle=False: every epoch trains on one class after another, and the "
                 "model forgets the earlier ones; keep shuffle=True (the default) or shuffle the rows once")
