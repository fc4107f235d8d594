"""Optimizers: SGD, Adam, AdamW, RMSprop over one flat parameter buffer, with learning-rate schedules, gradient
clipping and (coupled or decoupled) weight decay restricted by an optional mask.

State is created with ``zeros_like`` on the parameters' device and moves with them; math goes through ``xp`` only.
Every portable parameter write happens in :meth:`Optimizer._apply`, so an immutable backend needs one change
(the in-place fast kernels of ``Device.fast`` exist only for NumPy and CuPy).
"""

from __future__ import annotations

import math
import numbers

import array_api_compat

from . import schedules as _schedules
from ._owner import Owned
from ._registry import resolve
from .backends import to_numpy

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "get", "OPTIMIZERS", "CLIP_EPSILON"]

CLIP_EPSILON = 1e-6  # added to norms before dividing, as torch.nn.utils.clip_grad_norm_ does (Keras adds nothing)


def _positive(owner: str, arg: str, value):
    """``value`` as a float when it is a positive finite number; else ValueError naming ``arg``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{owner} {arg} must be a positive finite number, got {value!r}")
    return float(value)


class Optimizer(Owned):
    """Base class. ``step(params, grads)`` updates the flat ``params`` in place from the flat ``grads`` (both (n,)).

    Keyword arguments shared by every optimizer:

    - ``learning_rate``: a positive float, a :class:`~portanet.schedules.LearningRateSchedule` (or its config
      dict), or any callable ``step -> float``. Step ``t`` (0-based: the updates made before it, ``iterations``
      before the update, as in Keras) uses ``learning_rate(t)``, computed on the host: no device sync.
      ``lr`` is an alias (passing both raises). ``optimizer.learning_rate`` / ``optimizer.lr`` read the rate the
      next step will use; assigning a float (callbacks do) replaces a schedule with that constant rate.
    - ``weight_decay`` (>= 0): coupled L2 added to the gradient (``g + wd * p``, PyTorch's SGD/Adam/RMSprop) or,
      with ``decoupled_weight_decay=True`` (AdamW always), ``p -= lr * wd * p`` before the update (Keras 3, PyTorch
      AdamW). :meth:`set_decay_mask` limits it to some parameters.
    - ``clipnorm`` (each parameter tensor's L2 norm, tensors given by :meth:`set_segments`, else the whole buffer
      as one tensor), ``global_clipnorm`` (the norm of all gradients together) or ``clipvalue`` (each element to
      ``[-clipvalue, clipvalue]``): at most one, positive and finite (Keras). Gradients are scaled by
      ``min(1, c / (norm + 1e-6))`` (PyTorch's ``clip_grad_norm_``) with the norm and the scale kept on the device.
      Clipping rewrites ``grads`` **in place** before the update, as ``clip_grad_norm_`` rewrites ``.grad``.

    ``state_dict()`` / ``load_state_dict()`` export and restore the step count and the slot arrays (checkpoints).
    An optimizer object serves one model only (a second live model raises).
    """

    name = "optimizer"
    slots: tuple[str, ...] = ()
    default_learning_rate = 1e-3

    def __init__(self, learning_rate=None, weight_decay: float = 0.0, *, lr=None, decoupled_weight_decay: bool = False,
                 clipnorm: float | None = None, global_clipnorm: float | None = None, clipvalue: float | None = None):
        owner = type(self).__name__
        if learning_rate is not None and lr is not None:
            raise ValueError(f"{owner} got both learning_rate={learning_rate!r} and its alias lr={lr!r}; pass one")
        self.learning_rate = self.default_learning_rate if learning_rate is None and lr is None else (
            lr if learning_rate is None else learning_rate)
        if isinstance(weight_decay, bool) or not (isinstance(weight_decay, numbers.Real) and weight_decay >= 0
                                                  and math.isfinite(weight_decay)):
            raise ValueError(f"{owner} weight_decay must be a finite number >= 0, got {weight_decay!r}")
        if not isinstance(decoupled_weight_decay, bool):
            raise ValueError(f"{owner} decoupled_weight_decay must be True or False, got {decoupled_weight_decay!r}")
        clips = {"clipnorm": clipnorm, "global_clipnorm": global_clipnorm, "clipvalue": clipvalue}
        given = {k: v for k, v in clips.items() if v is not None}
        if len(given) > 1:
            raise ValueError(f"{owner} takes at most one of clipnorm, global_clipnorm and clipvalue, got {given}")
        clips = {k: None if v is None else _positive(owner, k, v) for k, v in clips.items()}
        self.clipnorm, self.global_clipnorm, self.clipvalue = clips.values()
        self.weight_decay = float(weight_decay)
        self.decoupled_weight_decay = decoupled_weight_decay
        self.iterations = 0
        self.state: dict = {}
        self._segments = None
        self._decay_mask = None
        self._decay_mask_cast = None  # the mask in the parameters' dtype, made at the first step that needs it
        self._describing = False

    # -- learning rate --------------------------------------------------------------
    @property
    def learning_rate(self) -> float:
        """The rate the next step uses: the constant, or ``schedule(iterations)``."""
        return self._learning_rate_at(self.iterations)

    @learning_rate.setter
    def learning_rate(self, value):
        owner = type(self).__name__
        if isinstance(value, dict):
            value = _schedules.get(value)
        if isinstance(value, type):
            raise ValueError(f"{owner} learning_rate must be a number, a schedule instance or a callable of the step, "
                             f"got the class {value.__name__}")
        if callable(value):
            self.schedule, self._lr = value, None
        else:
            self.schedule, self._lr = None, _positive(owner, "learning_rate", value)

    lr = learning_rate  # the alias: reads and writes the same thing

    def _learning_rate_at(self, step: int) -> float:
        if self.schedule is None:
            return self._lr
        value = self.schedule(step)
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if number or (hasattr(value, "__float__") and getattr(value, "shape", None) == ()):  # or a 0-d host array
            rate = float(value)
            if math.isfinite(rate) and rate >= 0:
                return rate
        raise ValueError(f"{type(self).__name__} learning_rate schedule {self.schedule!r} gave {value!r} at step "
                         f"{step}; expected a finite number >= 0")

    # -- what the model tells it ----------------------------------------------------------
    def set_segments(self, segments) -> None:
        """Tell ``clipnorm`` where each parameter tensor lies in the flat buffer: ``[(offset, size), ...]`` in
        order, back to back from offset 0 and covering the whole buffer (checked at each step). ``None``: the whole
        buffer is one tensor."""
        if segments is None:
            self._segments = None
            return
        checked, end = [], 0
        for i, seg in enumerate(segments):
            ok = isinstance(seg, (tuple, list)) and len(seg) == 2 and all(
                isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in seg)
            if not ok or seg[0] != end or seg[1] <= 0:
                raise ValueError(f"segments[{i}] must be (offset, size) with offset {end} (where the previous one "
                                 f"ends) and size > 0, got {seg!r}")
            checked.append((int(seg[0]), int(seg[1])))
            end += int(seg[1])
        if not checked:
            raise ValueError("segments must list at least one (offset, size), got none")
        self._segments = tuple(checked)

    def set_decay_mask(self, mask) -> None:
        """Apply weight decay only where ``mask`` (n,) is 1 (0 elsewhere), e.g. not to biases; ``None``: everywhere.

        ``mask`` is an array on the parameters' device (bool, integer or float; :meth:`to` moves it). Its values are
        checked once here, which reads one boolean back from the device.
        """
        if mask is None:
            self._decay_mask = self._decay_mask_cast = None
            return
        xp = array_api_compat.array_namespace(mask)
        if mask.ndim != 1:
            raise ValueError(f"decay mask must be 1-D (one entry per parameter), got shape {tuple(mask.shape)}")
        if not xp.isdtype(mask.dtype, "bool") and not bool(xp.all((mask == 0) | (mask == 1))):
            raise ValueError("decay mask must hold only 0 and 1 (or False and True)")
        self._decay_mask, self._decay_mask_cast = mask, None

    def _mask_like(self, params):
        mask = self._decay_mask_cast
        if mask is None or mask.dtype != params.dtype:
            if self._decay_mask.shape != params.shape:
                raise ValueError(f"decay mask has shape {tuple(self._decay_mask.shape)} but the parameters have "
                                 f"shape {tuple(params.shape)}")
            xp = array_api_compat.array_namespace(params)
            mask = self._decay_mask_cast = xp.astype(self._decay_mask, params.dtype)
        return mask

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
        """Take back a :meth:`state_dict`: the step count and the slots, or, from an optimizer that had not stepped
        yet (0 iterations, no slots), that fresh state."""
        if not state.get("slots") and state.get("iterations") == 0:
            self.iterations, self.state = 0, {}
            return
        missing = set(self.slots) - set(state.get("slots", {}))
        if missing:
            raise ValueError(f"optimizer state for {self.name} is missing slots {sorted(missing)}")
        self.iterations = int(state["iterations"])
        self.state = {name: state["slots"][name] for name in self.slots}

    def to(self, device) -> "Optimizer":
        """Move the slot arrays and the decay mask to ``device`` (a :class:`portanet.Device`); the moved arrays
        never alias the old ones."""
        with device.scope():
            self.state = {k: device.copy(device.asarray(v)) for k, v in self.state.items()}
            if self._decay_mask is not None:
                self._decay_mask, self._decay_mask_cast = device.copy(device.asarray(self._decay_mask)), None
        return self

    def __getstate__(self):
        """Slot arrays as host (NumPy) copies, so an optimizer pickles from any device; ``to()`` puts them back."""
        state = super().__getstate__()
        state["state"] = {k: to_numpy(v).copy() for k, v in self.state.items()}
        if self._decay_mask is not None:
            state["_decay_mask"], state["_decay_mask_cast"] = to_numpy(self._decay_mask).copy(), None
        state.pop("_scratch", None)
        return state

    def get_config(self) -> dict:
        """Constructor arguments; a schedule is recorded by its config. A plain callable learning rate has no config:
        saving then raises a ValueError saying so (use a LearningRateSchedule subclass with ``get_config``)."""
        if self.schedule is None:
            rate = self._lr
        elif self._describing:
            rate = self.schedule
        elif isinstance(self.schedule, _schedules.LearningRateSchedule):
            rate = self.schedule.get_config()
        else:
            raise ValueError(f"{type(self).__name__} cannot record its learning_rate {self.schedule!r}: a plain "
                             "callable has no config; subclass portanet.schedules.LearningRateSchedule (with "
                             "get_config, registered in schedules.SCHEDULES) to save it")
        return {"name": self.name, "learning_rate": rate, "weight_decay": self.weight_decay,
                "decoupled_weight_decay": self.decoupled_weight_decay, "clipnorm": self.clipnorm,
                "global_clipnorm": self.global_clipnorm, "clipvalue": self.clipvalue}

    def __repr__(self):
        self._describing = True  # get_config shows a schedule as itself, and never raises
        try:
            config = self.get_config()
        finally:
            self._describing = False
        args = ", ".join(f"{k}={v!r}" for k, v in config.items() if k != "name")
        return f"{type(self).__name__}({args})"

    # -- update -------------------------------------------------------------------
    def step(self, params, grads, fast=None) -> None:
        """Update ``params`` in place from ``grads`` (clipped in place first); ``fast``: the device's in-place
        kernels (``Device.fast``) or None."""
        self._ensure_state(params)
        lr = self._learning_rate_at(self.iterations)
        self.clip_gradients(grads)
        grads = self._weight_decay(params, grads, lr)
        self.iterations += 1
        if fast is None or not self._fast_step(params, grads, lr, fast):
            self._step(params, grads, lr)

    def clip_gradients(self, grads):
        """Apply this optimizer's clipping to the flat ``grads`` in place (no host sync); returns ``grads``."""
        if self.clipnorm is None and self.global_clipnorm is None and self.clipvalue is None:
            return grads
        xp = array_api_compat.array_namespace(grads)
        if self.clipvalue is not None:
            grads[...] = xp.clip(grads, -self.clipvalue, self.clipvalue)
        elif self.global_clipnorm is not None:
            grads *= _clip_scale(grads, self.global_clipnorm, xp)
        elif self._segments is None:
            grads *= _clip_scale(grads, self.clipnorm, xp)
        else:
            offset, size = self._segments[-1]
            if offset + size != grads.shape[0]:
                raise ValueError(f"segments cover {offset + size} gradient entries but the buffer has "
                                 f"{grads.shape[0]}; call set_segments again after the parameters change")
            for offset, size in self._segments:
                part = grads[offset:offset + size]
                grads[offset:offset + size] = part * _clip_scale(part, self.clipnorm, xp)
        return grads

    def _weight_decay(self, params, grads, lr):
        """Decoupled: shrink ``params`` now and return ``grads``; coupled: return ``grads + wd * params``."""
        if not self.weight_decay:
            return grads
        decayed = params if self._decay_mask is None else self._mask_like(params) * params
        if self.decoupled_weight_decay:
            self._apply(params, (lr * self.weight_decay) * decayed)
            return grads
        return grads + self.weight_decay * decayed

    def _step(self, params, grads, lr):
        raise NotImplementedError

    def _fast_step(self, params, grads, lr, fast) -> bool:
        """The same update through ``fast`` kernels; False where there are none (then ``_step`` runs)."""
        return False

    @staticmethod
    def _apply(params, delta):
        """The one place parameters are written: ``params -= delta``."""
        params -= delta


def _clip_scale(g, max_norm: float, xp):
    """``min(1, max_norm / (||g|| + 1e-6))`` as a 0-d array on ``g``'s device (PyTorch's ``clip_grad_norm_``)."""
    norm = xp.sqrt(xp.vecdot(g, g))
    return xp.clip(max_norm / (norm + CLIP_EPSILON), max=1.0)


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum (PyTorch semantics).

    ``learning_rate`` defaults to 0.01; ``weight_decay`` is coupled L2 unless ``decoupled_weight_decay=True``
    (Keras 3's SGD). Other keywords: see :class:`Optimizer`.
    """

    name = "sgd"
    default_learning_rate = 0.01

    def __init__(self, learning_rate=None, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 **options):
        super().__init__(learning_rate, weight_decay, **options)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.slots = ("velocity",) if momentum else ()

    def _step(self, params, grads, lr):
        g = grads
        if self.momentum:
            v = self.state["velocity"]
            v *= self.momentum
            v += g
            g = g + self.momentum * v if self.nesterov else v
        self._apply(params, lr * g)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "nesterov": self.nesterov}


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction; ``learning_rate`` defaults to 1e-3; ``weight_decay`` is coupled L2
    unless ``decoupled_weight_decay=True`` (then it is AdamW). Other keywords: see :class:`Optimizer`."""

    name = "adam"
    slots = ("m", "v")

    def __init__(self, learning_rate=None, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-8,
                 weight_decay: float = 0.0, **options):
        super().__init__(learning_rate, weight_decay, **options)
        for arg, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not 0 <= value < 1:
                raise ValueError(f"{arg} must be in [0, 1), got {value!r}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)
        self._scratch = None  # the fast kernels' work array, kept between steps

    def __setstate__(self, state):
        super().__setstate__(state)
        self._scratch = None

    def _step(self, params, grads, lr):
        g = grads
        m, v = self.state["m"], self.state["v"]
        b1, b2 = self.beta_1, self.beta_2
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        v += (1.0 - b2) * (g * g)
        step_size, inv_sqrt_bc2 = self._bias_corrections(lr)
        denom = self._sqrt(v) * inv_sqrt_bc2 + self.epsilon
        self._apply(params, step_size * m / denom)

    def _fast_step(self, params, grads, lr, fast):
        step_size, inv_sqrt_bc2 = self._bias_corrections(lr)
        self._scratch = fast.adam(params, grads, self.state["m"], self.state["v"], self.beta_1, self.beta_2,
                                  step_size, inv_sqrt_bc2, self.epsilon, self._scratch)
        return True

    def _bias_corrections(self, lr):
        """``(lr / (1 - beta_1**t), 1 / sqrt(1 - beta_2**t))`` at the current step t (1-based here)."""
        t = self.iterations
        return lr / (1.0 - self.beta_1**t), 1.0 / math.sqrt(1.0 - self.beta_2**t)

    @staticmethod
    def _sqrt(v):
        return array_api_compat.array_namespace(v).sqrt(v)

    def get_config(self):
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon}


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): ``params -= lr * weight_decay * params`` before each
    update (``weight_decay`` defaults to 0.01)."""

    name = "adamw"

    def __init__(self, learning_rate=None, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-8,
                 weight_decay: float = 0.01, decoupled_weight_decay: bool = True, **options):
        if decoupled_weight_decay is not True:
            raise ValueError("AdamW's weight decay is always decoupled (decoupled_weight_decay=True); use Adam for "
                             f"L2 added to the gradient, got decoupled_weight_decay={decoupled_weight_decay!r}")
        super().__init__(learning_rate, beta_1, beta_2, epsilon, weight_decay, decoupled_weight_decay=True, **options)


class RMSprop(Optimizer):
    """RMSprop: divide by a running RMS of gradients; optional momentum and centering (PyTorch semantics).
    ``learning_rate`` defaults to 1e-3. Other keywords: see :class:`Optimizer`."""

    name = "rmsprop"

    def __init__(self, learning_rate=None, rho: float = 0.9, epsilon: float = 1e-7, momentum: float = 0.0,
                 centered: bool = False, weight_decay: float = 0.0, **options):
        super().__init__(learning_rate, weight_decay, **options)
        if not 0 <= rho < 1:
            raise ValueError(f"rho must be in [0, 1), got {rho!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.rho, self.epsilon, self.momentum, self.centered = float(rho), float(epsilon), float(momentum), bool(centered)
        self.slots = ("square",) + (("velocity",) if momentum else ()) + (("mean",) if centered else ())

    def _step(self, params, grads, lr):
        xp = array_api_compat.array_namespace(params)
        g = grads
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
            self._apply(params, lr * v)
        else:
            self._apply(params, lr * g / denom)

    def get_config(self):
        return {**super().get_config(), "rho": self.rho, "epsilon": self.epsilon, "momentum": self.momentum,
                "centered": self.centered}


OPTIMIZERS = {cls.name: cls for cls in (SGD, Adam, AdamW, RMSprop)}


def get(optimizer) -> Optimizer:
    """An optimizer from a name (defaults), a config dict or an instance."""
    return resolve("optimizer", OPTIMIZERS, optimizer, Optimizer)
