"""Optimizers: SGD, Adam, AdamW, RMSprop over one flat parameter buffer.

State is created with ``zeros_like`` on the parameters' device and moves with them; math goes through ``xp`` only.
Every portable parameter write happens in :meth:`Optimizer._apply`, so an immutable backend needs one change
(the in-place kernels of ``Device.kernels`` exist only for NumPy, and CuPy when enabled).
"""

from __future__ import annotations

import math

import array_api_compat
from ._registry import resolve

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "get", "OPTIMIZERS"]


class Optimizer:
    """Base class. ``step(params, grads)`` updates the flat ``params`` in place from the flat ``grads``.

    ``lr`` may be changed between steps (schedulers do). ``state_dict()`` / ``load_state_dict()`` export and
    restore the step count and the slot arrays (for checkpoints).
    """

    name = "optimizer"
    slots: tuple[str, ...] = ()

    def __init__(self, lr: float, weight_decay: float = 0.0):
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.iterations = 0
        self.state: dict = {}

    # -- state --------------------------------------------------------------------
    def _ensure_state(self, params):
        ok = set(self.state) == set(self.slots) and all(
            s.shape == params.shape and s.dtype == params.dtype for s in self.state.values())
        if not ok:
            xp = array_api_compat.array_namespace(params)
            self.state = {name: xp.zeros_like(params) for name in self.slots}
            self.iterations = 0

    def state_dict(self) -> dict:
        """``{"iterations": int, "slots": {name: array}}`` (arrays on the parameters' device)."""
        return {"iterations": self.iterations, "slots": dict(self.state)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.slots) - set(state.get("slots", {}))
        if missing:
            raise ValueError(f"optimizer state for {self.name} is missing slots {sorted(missing)}")
        self.iterations = int(state["iterations"])
        self.state = {name: state["slots"][name] for name in self.slots}

    def to(self, device) -> "Optimizer":
        """Move the slot arrays to ``device`` (a :class:`portanet.Device`); the moved ones never alias the old."""
        self.state = {k: device.copy(v) for k, v in self.state.items()}
        return self

    def get_config(self) -> dict:
        return {"name": self.name, "lr": self.lr, "weight_decay": self.weight_decay}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "name")
        return f"{type(self).__name__}({args})"

    # -- update -------------------------------------------------------------------
    def step(self, params, grads, fast=None) -> None:
        """Update ``params`` in place from ``grads``; ``fast``: the device's kernels (``Device.kernels``) or None."""
        self._ensure_state(params)
        self.iterations += 1
        if fast is None or not self._fast_step(params, grads, fast):
            self._step(params, grads)

    def _step(self, params, grads):
        raise NotImplementedError

    def _fast_step(self, params, grads, fast) -> bool:
        """The same update through ``fast`` kernels; False where there are none (then ``_step`` runs)."""
        return False

    @staticmethod
    def _apply(params, delta):
        """The one place parameters are written: ``params -= delta``."""
        params -= delta


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay (PyTorch semantics)."""

    name = "sgd"

    def __init__(self, lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__(lr, weight_decay)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.slots = ("velocity",) if momentum else ()

    def _step(self, params, grads):
        g = grads + self.weight_decay * params if self.weight_decay else grads
        if self.momentum:
            v = self.state["velocity"]
            v *= self.momentum
            v += g
            g = g + self.momentum * v if self.nesterov else v
        self._apply(params, self.lr * g)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "nesterov": self.nesterov}


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction; ``weight_decay`` is L2 added to the gradient (see AdamW)."""

    name = "adam"
    slots = ("m", "v")

    def __init__(self, lr: float = 1e-3, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(lr, weight_decay)
        for arg, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not 0 <= value < 1:
                raise ValueError(f"{arg} must be in [0, 1), got {value!r}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)
        self._scratch = None  # the fast kernels' work array, kept between steps

    def _decay(self, params, grads):
        return grads + self.weight_decay * params if self.weight_decay else grads

    def _step(self, params, grads):
        g = self._decay(params, grads)
        m, v = self.state["m"], self.state["v"]
        b1, b2 = self.beta_1, self.beta_2
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        v += (1.0 - b2) * (g * g)
        step_size, inv_sqrt_bc2 = self._bias_corrections()
        denom = self._sqrt(v) * inv_sqrt_bc2 + self.epsilon
        self._apply(params, step_size * m / denom)

    def _fast_step(self, params, grads, fast):
        step_size, inv_sqrt_bc2 = self._bias_corrections()
        self._scratch = fast.adam(params, self._decay(params, grads), self.state["m"], self.state["v"], self.beta_1,
                                  self.beta_2, step_size, inv_sqrt_bc2, self.epsilon, self._scratch)
        return True

    def _bias_corrections(self):
        """``(lr / (1 - beta_1**t), 1 / sqrt(1 - beta_2**t))`` at the current step t."""
        t = self.iterations
        return self.lr / (1.0 - self.beta_1**t), 1.0 / math.sqrt(1.0 - self.beta_2**t)

    @staticmethod
    def _sqrt(v):
        return array_api_compat.array_namespace(v).sqrt(v)

    def get_config(self):
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon}


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): ``params *= 1 - lr * weight_decay`` each step."""

    name = "adamw"

    def __init__(self, lr: float = 1e-3, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(lr, beta_1, beta_2, epsilon, weight_decay)

    def _decay(self, params, grads):
        if self.weight_decay:
            self._apply(params, (self.lr * self.weight_decay) * params)
        return grads


class RMSprop(Optimizer):
    """RMSprop: divide by a running RMS of gradients; optional momentum and centering (PyTorch semantics)."""

    name = "rmsprop"

    def __init__(self, lr: float = 1e-3, rho: float = 0.9, epsilon: float = 1e-7, momentum: float = 0.0,
                 centered: bool = False, weight_decay: float = 0.0):
        super().__init__(lr, weight_decay)
        if not 0 <= rho < 1:
            raise ValueError(f"rho must be in [0, 1), got {rho!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.rho, self.epsilon, self.momentum, self.centered = float(rho), float(epsilon), float(momentum), bool(centered)
        self.slots = ("square",) + (("velocity",) if momentum else ()) + (("mean",) if centered else ())

    def _step(self, params, grads):
        xp = array_api_compat.array_namespace(params)
        g = grads + self.weight_decay * params if self.weight_decay else grads
        sq = self.state["square"]
        sq *= self.rho
        sq += (1.0 - self.rho) * (g * g)
        if self.centered:
            mean = self.state["mean"]
            mean *= self.rho
            mean += (1.0 - self.rho) * g
            denom = xp.sqrt(sq - mean * mean) + self.epsilon
        else:
            denom = xp.sqrt(sq) + self.epsilon
        if self.momentum:
            v = self.state["velocity"]
            v *= self.momentum
            v += g / denom
            self._apply(params, self.lr * v)
        else:
            self._apply(params, self.lr * g / denom)

    def get_config(self):
        return {**super().get_config(), "rho": self.rho, "epsilon": self.epsilon, "momentum": self.momentum,
                "centered": self.centered}


OPTIMIZERS = {cls.name: cls for cls in (SGD, Adam, AdamW, RMSprop)}


def get(optimizer) -> Optimizer:
    """An optimizer from a name (defaults), a config dict or an instance."""
    return resolve("optimizer", OPTIMIZERS, optimizer, Optimizer)
