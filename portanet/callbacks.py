"""Training callbacks: the hook interface, History, and progress reporting.

Callbacks see the model and per-epoch logs (plain floats); they never touch layer math.
"""

from __future__ import annotations

import sys

__all__ = ["Callback", "CallbackList", "History"]


class Callback:
    """Base class: override any of ``on_train_begin/end``, ``on_epoch_begin/end``, ``on_batch_end``.

    ``self.model`` is set before ``on_train_begin``. ``logs`` are dicts of floats; ``on_batch_end`` receives the
    batch loss as a 0-d device array (reading it with ``float()`` syncs the device).
    """

    model = None

    def set_model(self, model):
        self.model = model

    def on_train_begin(self, logs=None):
        pass

    def on_train_end(self, logs=None):
        pass

    def on_epoch_begin(self, epoch, logs=None):
        pass

    def on_epoch_end(self, epoch, logs=None):
        pass

    def on_batch_end(self, step, loss=None):
        pass


class History(Callback):
    """Per-epoch logs: ``history.history["loss"]``, ``["val_loss"]``, ``["accuracy"]``... and ``history.epoch``."""

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


class _Progress(Callback):
    """verbose=1: a tqdm bar per epoch; verbose=2: one line per epoch."""

    def __init__(self, verbose, epochs, steps):
        self.verbose, self.epochs, self.steps = verbose, epochs, steps
        self._bar = None

    def on_epoch_begin(self, epoch, logs=None):
        if self.verbose == 1:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.steps, desc=f"epoch {epoch + 1}/{self.epochs}", unit="batch", leave=True,
                             file=sys.stderr, dynamic_ncols=True)

    def on_batch_end(self, step, loss=None):
        if self._bar is not None:
            self._bar.update(1)

    def on_epoch_end(self, epoch, logs=None):
        text = " - ".join(f"{k}: {v:.4f}" for k, v in (logs or {}).items())
        if self._bar is not None:
            self._bar.set_postfix_str(text)
            self._bar.close()
            self._bar = None
        elif self.verbose == 2:
            print(f"epoch {epoch + 1}/{self.epochs} - {text}", flush=True)


class CallbackList:
    """Dispatches each hook to every callback in order."""

    def __init__(self, callbacks, model, verbose=0, epochs=1, steps=None):
        if verbose not in (0, 1, 2):
            raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}")
        self.callbacks = list(callbacks)
        if verbose:
            self.callbacks.append(_Progress(verbose, epochs, steps))
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be portanet Callback objects, got {type(cb).__name__}")
            cb.set_model(model)

    def __getattr__(self, hook):
        if not hook.startswith("on_"):
            raise AttributeError(hook)

        def dispatch(*args, **kwargs):
            for cb in self.callbacks:
                getattr(cb, hook)(*args, **kwargs)

        return dispatch
