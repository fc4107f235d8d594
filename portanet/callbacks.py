"""Training callbacks: the hook interface, History (and its plot), progress display, early stopping, checkpoints,
learning-rate schedules and stopping on NaN.

Callbacks see the model and per-epoch logs (plain floats); they never touch layer math.
"""

from __future__ import annotations

import math
import numbers
import os
import shutil
import sys
import time

from . import io as _io
from ._checks import integer, real
from ._owner import Owned
from .params import Snapshot

__all__ = ["Callback", "CallbackList", "check_callbacks", "History", "EarlyStopping", "ModelCheckpoint", "LearningRateScheduler",
           "ReduceLROnPlateau", "TerminateOnNaN"]


class Callback(Owned):
    """Base class: override any of ``on_train_begin/end``, ``on_epoch_begin/end``, ``on_epoch_complete``,
    ``on_batch_end``, ``on_log``, ``on_nonfinite_loss``.

    ``self.model`` is set before ``on_train_begin``, and ``self.params`` (a dict: ``epochs``, ``steps``,
    ``verbose``, ``fit`` (the training configuration), ``history`` (the run's History), ``callbacks`` (all callbacks
    of the run), ``rank`` and ``ranks`` (this process and the number of processes: 0 and 1 but in data-parallel
    training)). ``logs`` are dicts of floats; ``on_batch_end`` receives the batch loss as a 0-d device array
    (reading it with ``float()`` syncs the device; in data-parallel training, the mean loss of this rank's share of
    the batch, 0 for an empty share: the logs of ``on_log`` and ``on_epoch_end`` are over all ranks). Setting
    ``self.model.stop_training = True`` ends training after the current epoch. A callback with state that should
    survive ``fit(resume_from=...)`` returns it from
    ``state_dict()`` (JSON-able values, or a weights snapshot from ``model.snapshot()``) and takes it back in
    ``load_state_dict()``, called after ``on_train_begin``; ``check_state_dict()`` says beforehand whether a state
    read from a checkpoint can be loaded. ``check_logs(keys)`` raises when the callback would read
    a log key the run will never log, so ``fit`` rejects it before training starts. A callback serves one model at
    a time (a second live model raises).

    In data-parallel training every rank runs every callback with the same logs, so their decisions agree; only rank
    0 shows progress and writes checkpoints: a callback that prints or writes files checks ``self.params["rank"]``.
    """

    model = None
    params: dict = {}
    _order = 0  # run after callbacks of lower order: user callbacks, then History, ModelCheckpoint, the display

    def set_model(self, model):
        self.attach(model, f"callback {type(self).__name__}")
        self.model = model

    def set_params(self, params: dict):
        self.params = params

    def check_logs(self, keys) -> None:
        """Raise ValueError when ``on_epoch_end`` would read a key missing from ``keys``, the epoch logs this run
        will have (checked by ``fit`` before training)."""

    def on_train_begin(self, logs=None):
        pass

    def on_train_end(self, logs=None):
        pass

    def on_epoch_begin(self, epoch, logs=None):
        pass

    def on_epoch_end(self, epoch, logs=None):
        pass

    def on_epoch_complete(self, epoch, logs=None):
        """After every callback's ``on_epoch_end``: the epoch's state is final (checkpoints are written here)."""

    def on_batch_end(self, step, loss=None):
        pass

    def on_log(self, step, logs=None):
        """Every ``fit(log_every=N)`` steps: running means of loss and metrics this epoch (one device read)."""

    def on_nonfinite_loss(self, epoch, step):
        """The loss became NaN or inf at ``step`` of ``epoch`` (0-based); the model already holds its last finite
        weights. ``fit`` raises FloatingPointError unless a callback sets ``model.stop_training``."""

    def state_dict(self) -> dict:
        return {}

    def check_state_dict(self, state: dict) -> None:
        """Raise ValueError when ``state`` (a :meth:`state_dict` read back from a checkpoint: JSON values, weights
        snapshots as :class:`~portanet.params.Snapshot`) cannot be loaded by :meth:`load_state_dict`, changing
        nothing. ``fit(resume_from=...)`` calls it for every callback before the model changes; a hostile file's
        values stop here. The default accepts anything."""

    def load_state_dict(self, state: dict) -> None:
        pass


class History(Callback):
    """Per-epoch logs: ``history.history["loss"]``, ``["val_loss"]``, ``["accuracy"]``... and ``history.epoch``."""

    _order = 1

    def __init__(self):
        self.history: dict = {}
        self.epoch: list = []

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(value)

    def __getitem__(self, key):
        return self.history[key]

    def __repr__(self):
        return f"History(epochs={len(self.epoch)}, keys={list(self.history)})"

    def plot(self, path=None):
        """Loss and each metric per epoch, training and validation curves side by side; returns the matplotlib
        ``Figure`` (shown inline in notebooks) and also writes it to ``path`` (png, pdf, svg...) when given.

        Needs matplotlib: ``pip install "portanet[plot]"``.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError('History.plot() needs matplotlib, which is not installed: pip install "portanet[plot]" '
                              "(or pip install matplotlib)") from exc
        if not self.epoch:
            raise ValueError("History.plot(): the history is empty; train at least one epoch first")
        names = [k for k in self.history if not (k.startswith("val_") and k[4:] in self.history)]
        fig = Figure(figsize=(4.2 * len(names), 3.2), layout="constrained")
        epochs = [e + 1 for e in self.epoch]
        for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
            ax.plot(epochs, self.history[name], marker=".", label="training" if name != "lr" else name)
            if f"val_{name}" in self.history:
                ax.plot(epochs, self.history[f"val_{name}"], marker=".", label="validation")
            ax.set_title(name)
            ax.set_xlabel("epoch")
            ax.legend()
        if path is not None:
            fig.savefig(path)
        return fig


class _Monitor:
    """The best value so far of one log key: ``mode`` "min", "max" or "auto" (max for accuracies), ``min_delta``."""

    def __init__(self, owner: str, monitor: str, mode: str, min_delta: float):
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"{owner} mode must be 'auto', 'min' or 'max', got {mode!r}")
        if not isinstance(monitor, str):
            raise ValueError(f"{owner} monitor must be a log key (a string), got {monitor!r}")
        self.owner, self.monitor, self.min_delta = owner, monitor, real(owner, "min_delta", min_delta, 0)
        self.mode = mode if mode != "auto" else ("max" if monitor.endswith(("accuracy", "acc")) else "min")
        self.reset()

    def reset(self):
        self.best = math.inf if self.mode == "min" else -math.inf

    def value(self, logs) -> float:
        if self.monitor not in (logs or {}):
            hint = "; pass validation_data or validation_split to fit()" if self.monitor.startswith("val_") else ""
            raise ValueError(f"{self.owner} monitors {self.monitor!r} but the epoch logs hold {sorted(logs or {})}{hint}")
        return logs[self.monitor]

    def improved(self, value) -> bool:
        """True (and ``value`` becomes the best) when ``value`` beats the best by more than ``min_delta``."""
        better = value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        if better:
            self.best = value
        return better

    def state(self) -> dict:
        return {"best": self.best}

    def check(self, state):
        best = state.get("best")
        if isinstance(best, bool) or not isinstance(best, numbers.Real) or math.isnan(best):
            raise ValueError(f"{self.owner} best must be a number (or +-inf before any epoch), got {best!r:.80}")

    def load(self, state):
        self.best = float(state["best"])


def _non_negative_int(owner, name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{owner} {name} must be a non-negative integer, got {value!r}")
    return int(value)


_MAX_COUNT = 2**53  # epochs and waits read from a checkpoint: exact as floats, and far beyond any run


def _count(owner, name, value) -> int:
    return integer(owner, name, value, 0, _MAX_COUNT)


class EarlyStopping(Callback):
    """Stop training when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs.

    ``mode``: "min", "max" or "auto" (max for accuracies, min otherwise). ``restore_best_weights``: when training
    ends, stopped early or not, put back the weights of the best epoch (a copy of them is kept on the device).
    ``stopped_epoch`` and ``best_epoch`` (0-based) say what happened.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 0, min_delta: float = 0.0, mode: str = "auto",
                 restore_best_weights: bool = False):
        self._monitor = _Monitor("EarlyStopping", monitor, mode, min_delta)
        self.patience = _non_negative_int("EarlyStopping", "patience", patience)
        self.restore_best_weights = bool(restore_best_weights)
        self.on_train_begin()

    def check_logs(self, keys):
        self._monitor.value(dict.fromkeys(keys, 0.0))

    def on_train_begin(self, logs=None):
        self._monitor.reset()
        self.wait, self.best_epoch, self.stopped_epoch, self.best_weights = 0, None, None, None

    def on_epoch_end(self, epoch, logs=None):
        if self._monitor.improved(self._monitor.value(logs)):
            self.wait, self.best_epoch = 0, epoch
            if self.restore_best_weights:
                self.best_weights = self.model.snapshot()
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.model.restore(self.best_weights)

    def state_dict(self):
        state = {**self._monitor.state(), "wait": self.wait, "best_epoch": self.best_epoch}
        if self.best_weights is not None:
            state["best_weights"] = self.best_weights
        return state

    def check_state_dict(self, state):
        self._monitor.check(state)
        _count("EarlyStopping", "wait", state.get("wait"))
        if state.get("best_epoch") is not None:
            _count("EarlyStopping", "best_epoch", state["best_epoch"])
        if "best_weights" in state and not isinstance(state["best_weights"], Snapshot):
            raise ValueError(f"EarlyStopping best_weights must be a weights snapshot, got "
                             f"{type(state['best_weights']).__name__}")

    def load_state_dict(self, state):
        self.check_state_dict(state)
        self._monitor.load(state)
        self.wait, self.best_epoch = int(state["wait"]), state.get("best_epoch")
        if "best_weights" in state and self.restore_best_weights:
            self.best_weights = state["best_weights"]


class ModelCheckpoint(Callback):
    """Write a checkpoint at the end of each epoch: weights, optimizer state, epoch and step counters, the host RNG
    state, the history, the training configuration and other callbacks' state. ``fit(..., resume_from=path)``
    continues from it; ``portanet.load(path)`` reads it as a model.

    ``path`` may hold fields filled from the 1-based epoch and the logs: ``"ckpt-{epoch:03d}-{val_loss:.3f}.safetensors"``;
    without fields the same file is replaced each time (atomically: a crash mid-write leaves the previous one).
    ``save_best_only``: write only when ``monitor`` improved (``mode`` and ``min_delta`` as in EarlyStopping).
    It decides in ``on_epoch_end``, after the user's callbacks and History (so ``monitor`` may be a key another
    callback adds), and writes in ``on_epoch_complete``, after every callback's ``on_epoch_end``: the file holds every
    callback's state at the end of the epoch (other checkpoints' best values included) whatever the list's order.
    In data-parallel training rank 0 alone writes (the other ranks hold the same state); to resume, every rank must
    be able to read the file.
    """

    _order = 2

    def __init__(self, path, monitor: str = "val_loss", save_best_only: bool = False, mode: str = "auto",
                 min_delta: float = 0.0):
        self.path = os.fspath(path)
        self.save_best_only = bool(save_best_only)
        self._monitor = _Monitor("ModelCheckpoint", monitor, mode, min_delta)
        self.last_path = self._pending = None

    def check_logs(self, keys):
        logs = dict.fromkeys(keys, 0.0)
        if self.save_best_only:
            self._monitor.value(logs)
        self._check_folder(self._path(0, logs))

    def on_train_begin(self, logs=None):
        self._monitor.reset()
        self._pending = None
        try:
            path = self._path(0, {})
        except ValueError:  # fields from the logs: the folder is checked when the path is known
            return
        self._check_folder(path)

    def _check_folder(self, path):
        """Before the first epoch: a folder that does not exist would fail only after an epoch of training."""
        folder = os.path.dirname(path) or "."
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"ModelCheckpoint cannot write {path}: the folder {folder} does not exist "
                                    "(create it before fit)")

    def on_epoch_end(self, epoch, logs=None):
        self._pending = None
        if self.save_best_only and not self._monitor.improved(self._monitor.value(logs)):
            return
        self._pending = self._path(epoch, logs)

    def _path(self, epoch, logs):
        try:
            return self.path.format(epoch=epoch + 1, **(logs or {}))
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"ModelCheckpoint path {self.path!r} has a field that is not 'epoch' or a log key "
                             f"({sorted(logs or {})}): {exc}") from exc

    def on_epoch_complete(self, epoch, logs=None):
        if self._pending is not None:
            if _root(self):  # data-parallel training: the other ranks hold the same state
                _io.save_checkpoint(self.model, self._pending, epoch + 1, self.params)
            self.last_path, self._pending = self._pending, None

    def state_dict(self):
        return self._monitor.state()

    def check_state_dict(self, state):
        self._monitor.check(state)

    def load_state_dict(self, state):
        self.check_state_dict(state)
        self._monitor.load(state)


def _root(callback) -> bool:
    """True unless this process is a rank other than 0 in data-parallel training (only rank 0 prints and writes)."""
    return callback.params.get("rank", 0) == 0


def _learning_rate(owner, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{owner} must give a positive finite learning rate, got {value!r}")
    return float(value)


class LearningRateScheduler(Callback):
    """Set the optimizer's learning rate at the start of each epoch to ``schedule(epoch, lr)`` (0-based epoch, the
    current rate); the rate used is logged as ``"lr"``. Example: ``LearningRateScheduler(lambda e, lr: lr * 0.9)``.
    """

    def __init__(self, schedule, verbose: int = 0):
        if not callable(schedule):
            raise TypeError(f"LearningRateScheduler schedule must be callable as schedule(epoch, lr), got {schedule!r}")
        self.schedule, self.verbose = schedule, verbose

    def on_epoch_begin(self, epoch, logs=None):
        optimizer = self.model.optimizer
        lr = _learning_rate(f"LearningRateScheduler schedule({epoch}, {optimizer.lr})",
                            self.schedule(epoch, optimizer.lr))
        if self.verbose and lr != optimizer.lr and _root(self):
            print(f"epoch {epoch + 1}: LearningRateScheduler sets the learning rate to {lr:.4g}", flush=True)
        optimizer.lr = lr

    def on_epoch_end(self, epoch, logs=None):
        logs.setdefault("lr", self.model.optimizer.lr)  # fit logs it already: the rate of the epoch's last step


class ReduceLROnPlateau(Callback):
    """Multiply the learning rate by ``factor`` when ``monitor`` has not improved by more than ``min_delta`` for
    ``patience`` epochs, then wait ``cooldown`` epochs before counting again; never below ``min_lr``. The rate used
    in each epoch is logged as ``"lr"``.
    """

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10, min_delta: float = 1e-4,
                 cooldown: int = 0, min_lr: float = 0.0, mode: str = "auto", verbose: int = 0):
        self.factor = real("ReduceLROnPlateau", "factor", factor, 0, 1, low_open=True, high_open=True)
        self.min_lr = real("ReduceLROnPlateau", "min_lr", min_lr, 0)
        self._monitor = _Monitor("ReduceLROnPlateau", monitor, mode, min_delta)
        self.verbose = verbose
        self.patience = _non_negative_int("ReduceLROnPlateau", "patience", patience)
        self.cooldown = _non_negative_int("ReduceLROnPlateau", "cooldown", cooldown)
        self.on_train_begin()

    def check_logs(self, keys):
        self._monitor.value(dict.fromkeys(keys, 0.0))

    def on_train_begin(self, logs=None):
        self._monitor.reset()
        self.wait, self.cooldown_left = 0, 0

    def on_epoch_end(self, epoch, logs=None):
        optimizer = self.model.optimizer
        logs.setdefault("lr", optimizer.lr)  # fit logs it already: the rate of the epoch's last step
        improved = self._monitor.improved(self._monitor.value(logs))
        if self.cooldown_left > 0:  # a cooldown epoch never counts towards patience
            self.cooldown_left -= 1
            self.wait = 0
        elif improved:
            self.wait = 0
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.cooldown_left, self.wait = self.cooldown, 0
                if optimizer.lr > self.min_lr:
                    optimizer.lr = max(optimizer.lr * self.factor, self.min_lr)
                    if self.verbose and _root(self):
                        print(f"epoch {epoch + 1}: ReduceLROnPlateau lowers the learning rate to {optimizer.lr:.4g}",
                              flush=True)

    def state_dict(self):
        return {**self._monitor.state(), "wait": self.wait, "cooldown_left": self.cooldown_left}

    def check_state_dict(self, state):
        self._monitor.check(state)
        _count("ReduceLROnPlateau", "wait", state.get("wait"))
        _count("ReduceLROnPlateau", "cooldown_left", state.get("cooldown_left"))

    def load_state_dict(self, state):
        self.check_state_dict(state)
        self._monitor.load(state)
        self.wait, self.cooldown_left = int(state["wait"]), int(state["cooldown_left"])


class TerminateOnNaN(Callback):
    """When the loss becomes NaN or inf, stop training quietly (a RuntimeWarning says where) instead of raising
    FloatingPointError; either way the model keeps its last finite weights."""

    def on_nonfinite_loss(self, epoch, step):
        self.model.stop_training = True


class _Progress(Callback):
    """verbose=1: a tqdm bar per epoch (terminal or notebook) with the running loss and metrics, replaced at the end
    of the epoch by one line with every log; verbose=2: that line only.

    The bar is drawn for the terminal's width, read at each epoch (80 columns where the terminal reports none or
    0); the epoch's line is printed in full (a narrow terminal wraps it, never cuts it), to stdout.
    """

    _order = 3

    def __init__(self, verbose, epochs, steps):
        self.verbose, self.epochs, self.steps = verbose, epochs, steps
        self._bar = None
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        if self.verbose == 1:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.steps, desc=f"epoch {epoch + 1}/{self.epochs}", unit="batch", leave=False,
                             file=sys.stderr, ncols=terminal_columns(),
                             bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}] {bar}")

    def on_batch_end(self, step, loss=None):
        if self._bar is not None:
            self._bar.update(1)

    def on_log(self, step, logs=None):
        if self._bar is not None:
            self._bar.set_postfix_str(_format(logs, short=True), refresh=False)

    def on_epoch_end(self, epoch, logs=None):
        self._close()
        seconds = time.perf_counter() - self._start
        print(f"epoch {epoch + 1}/{self.epochs} - {seconds:.3g}s - {_format(logs)}", flush=True)

    def on_train_end(self, logs=None):
        self._close()  # training stopped mid-epoch (TerminateOnNaN)

    def _close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def terminal_columns() -> int:
    """Width of the terminal in columns; 80 where it reports none or 0 (pipes, some IDE consoles and CI logs)."""
    columns = shutil.get_terminal_size((80, 24)).columns
    return columns if columns > 0 else 80


_SHORT = {"accuracy": "acc", "binary_accuracy": "bin_acc", "top_k_accuracy": "top_k"}


def _format(logs, short=False) -> str:
    """``loss: 0.2345 - accuracy: 0.9312 - ...`` (4 significant digits); ``short``: ``loss 0.2345 acc 0.9312``."""
    if short:
        return " ".join(f"{_SHORT.get(k, k)} {v:.4g}" for k, v in (logs or {}).items())
    return " - ".join(f"{k}: {v:.4g}" for k, v in (logs or {}).items())


class CallbackList:
    """Dispatches each hook to every callback: user callbacks in the order given, then History, ModelCheckpoint and
    the progress display. ``params`` is given to every callback (``Callback.params``)."""

    def __init__(self, callbacks, model, params: dict):
        callbacks = list(callbacks)
        verbose = params.get("verbose", 0)
        if verbose:
            callbacks.append(_Progress(verbose, params.get("epochs"), params.get("steps")))
        self.callbacks = sorted(callbacks, key=lambda cb: cb._order)
        params["callbacks"] = self.callbacks
        for cb in self.callbacks:
            cb.set_model(model)
            cb.set_params(params)

    def __getattr__(self, hook):
        if not hook.startswith("on_"):
            raise AttributeError(hook)

        def dispatch(*args, **kwargs):
            for cb in self.callbacks:
                getattr(cb, hook)(*args, **kwargs)

        return dispatch


def check_callbacks(callbacks) -> list:
    """``fit(callbacks=...)`` checked: a list (or tuple) of Callback objects; returns it as a list."""
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback):
        raise TypeError(f"callbacks must be a list of Callback objects, got a single {type(callbacks).__name__}: "
                        f"write callbacks=[{type(callbacks).__name__}(...)]")
    if not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"callbacks must be a list of Callback objects, got {type(callbacks).__name__}")
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise TypeError(f"callbacks must be portanet Callback objects, got {type(cb).__name__}")
    return list(callbacks)
