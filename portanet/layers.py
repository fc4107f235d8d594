"""Layers: Dense, Dropout, Activation. ``forward_with_cache(x)`` returns what ``backward(grad_out, cache)`` needs.

Parameters are views into the model's flat buffer (:mod:`portanet.params`), bound by the model; math goes through
``xp`` only. A layer keeps no per-call state: caches travel with the training step, so inference in one thread
never disturbs a training step in another.
"""

from __future__ import annotations

import copy
import math
import re

from . import activations
from ._checks import flag, real
from ._owner import Owned
from ._registry import resolve

__all__ = ["Layer", "Dense", "Dropout", "Activation", "INITIALIZERS", "get", "check_name"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
RESERVED_NAMES = ("optimizer", "callback")  # sections of a model file: "optimizer.m", "callback.EarlyStopping.0..."


def check_name(name) -> str:
    """``name`` when it can name a layer: an ASCII identifier (letters, digits, underscores, not starting with a
    digit) of at most 64 characters, other than "optimizer" and "callback". Parameters are named "<layer>.<key>" in
    files, so a name with a dot, or a reserved one, could collide with another tensor. Else ValueError."""
    if not (isinstance(name, str) and _NAME.fullmatch(name)) or name in RESERVED_NAMES:
        raise ValueError(f"a layer name must be an identifier of letters, digits and underscores (at most 64, not "
                         f"starting with a digit) other than {' and '.join(RESERVED_NAMES)}, got {name!r:.80}")
    return name


def _fans(shape):
    return shape[0], shape[1]


def _he_normal(rng, shape):
    return rng.standard_normal(shape) * math.sqrt(2.0 / _fans(shape)[0])


def _he_uniform(rng, shape):
    limit = math.sqrt(6.0 / _fans(shape)[0])
    return rng.uniform(-limit, limit, shape)


def _glorot_uniform(rng, shape):
    limit = math.sqrt(6.0 / sum(_fans(shape)))
    return rng.uniform(-limit, limit, shape)


def _glorot_normal(rng, shape):
    return rng.standard_normal(shape) * math.sqrt(2.0 / sum(_fans(shape)))


def _lecun_normal(rng, shape):
    return rng.standard_normal(shape) * math.sqrt(1.0 / _fans(shape)[0])


INITIALIZERS = {
    "he_normal": _he_normal, "he_uniform": _he_uniform, "glorot_uniform": _glorot_uniform,
    "glorot_normal": _glorot_normal, "lecun_normal": _lecun_normal,
}
_DEFAULT_INIT = {"he": "he_normal", "glorot": "glorot_uniform"}


class Layer(Owned):
    """Base class. A layer maps (batch, in) to (batch, out) and may own parameters and non-trainable state.

    ``param_shapes(in_dim)`` / ``state_shapes(in_dim)`` name them; the model allocates them in its
    :class:`~portanet.params.ParameterBuffer` and calls ``bind``. Subclasses implement ``forward_with_cache`` and
    ``backward``.
    """

    kind = "layer"

    def __init__(self, name: str | None = None):
        self.name = name  # checked by check_name (None: the model names it "<kind>_<n>")
        self.params: dict = {}
        self.grads: dict = {}
        self.state: dict = {}
        self.input_dim: int | None = None
        self._xp = None
        self._kernels = None

    @property
    def name(self) -> str | None:
        return self._name

    @name.setter
    def name(self, value):
        self._name = None if value is None else check_name(value)

    def output_dim(self, in_dim: int) -> int:
        return in_dim

    def param_shapes(self, in_dim: int) -> dict:
        return {}

    def state_shapes(self, in_dim: int) -> dict:
        return {}

    def init_params(self, rng, in_dim: int) -> dict:
        """Initial parameter values as host arrays drawn from the host generator ``rng``."""
        return {}

    def init_state(self, in_dim: int) -> dict:
        """Initial non-trainable state as host arrays (or lists)."""
        return {}

    def bind(self, xp, params: dict, grads: dict, state: dict | None = None, random_source=None, kernels=None) -> None:
        """Attach parameter, gradient and state views; ``kernels``: the device's in-place kernels or None."""
        self._xp, self.params, self.grads, self.state, self._kernels = xp, params, grads, state or {}, kernels

    def forward(self, x, training: bool = False):
        """x: (batch, in) -> (batch, out). Inference (``training=False``) changes nothing."""
        return self.forward_with_cache(x, training)[0]

    def forward_with_cache(self, x, training: bool = False):
        """``(output, cache)``: the output and what :meth:`backward` needs."""
        raise NotImplementedError

    def backward(self, grad_out, cache, need_input_grad: bool = True):
        """dL/d(output) (batch, out) -> dL/d(input) (batch, in), or None when ``need_input_grad`` is False; writes
        parameter gradients into the bound gradient views."""
        raise NotImplementedError

    def unbound_copy(self) -> "Layer":
        """The same layer (custom activations included) without parameters or owner, ready for another model."""
        twin = copy.copy(self)
        twin.params, twin.grads, twin.state = {}, {}, {}
        twin.bind(None, {}, {}, {}, None, None)
        twin.detach()
        return twin

    def get_config(self) -> dict:
        return {"kind": self.kind, "name": self.name}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k not in ("kind", "name") and v is not None)
        return f"{type(self).__name__}({args})"


class Dense(Layer):
    """Fully connected layer: ``a = activation(x @ kernel + bias)``, kernel of shape (in, units).

    ``kernel_initializer`` defaults to He normal for the ReLU family and Glorot uniform otherwise; biases start at 0.
    """

    kind = "dense"

    def __init__(self, units: int, activation=None, use_bias: bool = True, kernel_initializer: str | None = None,
                 input_dim: int | None = None, name: str | None = None):
        super().__init__(name)
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise ValueError(f"units must be a positive integer, got {units!r}")
        if input_dim is not None and (isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1):
            raise ValueError(f"input_dim must be a positive integer, got {input_dim!r}")
        if kernel_initializer is not None and (not isinstance(kernel_initializer, str)
                                               or kernel_initializer not in INITIALIZERS):
            raise ValueError(f"unknown kernel_initializer {kernel_initializer!r}; expected one of {sorted(INITIALIZERS)}")
        self.units = units
        self.activation = activations.get(activation)
        self.use_bias = flag("Dense", "use_bias", use_bias)
        self.kernel_initializer = kernel_initializer
        self.input_dim = input_dim

    def output_dim(self, in_dim):
        return self.units

    def param_shapes(self, in_dim):
        shapes = {"kernel": (in_dim, self.units)}
        if self.use_bias:
            shapes["bias"] = (self.units,)
        return shapes

    def init_params(self, rng, in_dim):
        init = INITIALIZERS[self.kernel_initializer or _DEFAULT_INIT[self.activation.init]]
        values = {"kernel": init(rng, (in_dim, self.units))}
        if self.use_bias:
            values["bias"] = [0.0] * self.units
        return values

    def forward_with_cache(self, x, training=False):
        """x: (batch, in) -> a (batch, units); the cache holds x, z (when the activation's derivative needs it), a."""
        z = self.logits(x)
        a = self.activate(z)  # may overwrite z, which is ours
        return a, (x, z if self.activation.needs_input else None, a)

    def logits(self, x):
        """x: (batch, in) -> pre-activation z = x @ kernel + bias (batch, units), a new array."""
        z = x @ self.params["kernel"]
        if self.use_bias:
            z += self.params["bias"]
        return z

    def activate(self, z):
        """The activation of z (batch, units), through the backend's in-place kernel when it has one (z is then
        overwritten). The one place a Dense output is computed: predict, evaluate and the training step share it."""
        kernels, name = self._kernels, self.activation.kernel
        a = None if kernels is None or name is None else kernels.activate_(name, z)
        return self.activation.forward(z, self._xp) if a is None else a

    def backward(self, grad_out, cache, need_input_grad=True, fused=False):
        """grad_out: dL/da (or dL/dz when ``fused``: the loss already differentiated through the activation), of
        shape (batch, units) -> dL/dx (batch, in). Writes dL/dkernel and dL/dbias into the bound gradient views."""
        xp, kernels = self._xp, self._kernels
        x, z, a = cache
        if fused:
            gz = grad_out
        else:
            name = self.activation.kernel
            gz = None if kernels is None or name is None else kernels.activation_grad(name, grad_out, a)
            if gz is None:
                gz = self.activation.backward(grad_out, z, a, xp)
        if kernels is not None:
            kernels.dense_grads(x, gz, self.grads["kernel"], self.grads.get("bias"))
        else:
            self.grads["kernel"][...] = x.T @ gz
            if self.use_bias:
                self.grads["bias"][...] = xp.sum(gz, axis=0)
        return gz @ self.params["kernel"].T if need_input_grad else None

    def get_config(self):
        return {"kind": self.kind, "name": self.name, "units": self.units, "activation": self.activation.get_config(),
                "use_bias": self.use_bias, "kernel_initializer": self.kernel_initializer, "input_dim": self.input_dim}


class Dropout(Layer):
    """Inverted dropout: in training, zero each unit with probability ``rate`` and scale the rest by 1/(1-rate)."""

    kind = "dropout"

    def __init__(self, rate: float, name: str | None = None):
        super().__init__(name)
        self.rate = real("dropout", "rate", rate, 0, 1, high_open=True)
        self._random = None

    def bind(self, xp, params, grads, state=None, random_source=None, kernels=None):
        super().bind(xp, params, grads, state, kernels=kernels)
        self._random = random_source

    def forward_with_cache(self, x, training=False):
        if not training or self.rate == 0:
            return x, None
        u = self._random.uniform(x.shape, x.dtype)
        mask = self._xp.astype(u >= self.rate, x.dtype) * (1.0 / (1.0 - self.rate))
        return x * mask, mask

    def backward(self, grad_out, cache, need_input_grad=True):
        return grad_out if cache is None else grad_out * cache

    def get_config(self):
        return {"kind": self.kind, "name": self.name, "rate": self.rate}


class Activation(Layer):
    """An activation function as a layer of its own (no parameters)."""

    kind = "activation"

    def __init__(self, activation, name: str | None = None):
        super().__init__(name)
        self.activation = activations.get(activation)

    def forward_with_cache(self, x, training=False):
        a = self.activation.forward(x, self._xp)
        return a, (x if self.activation.needs_input else None, a)

    def backward(self, grad_out, cache, need_input_grad=True):
        z, a = cache
        return self.activation.backward(grad_out, z, a, self._xp)

    def get_config(self):
        return {"kind": self.kind, "name": self.name, "activation": self.activation.get_config()}


LAYERS = {cls.kind: cls for cls in (Dense, Dropout, Activation)}


def get(config: dict) -> Layer:
    """Rebuild a layer from its ``get_config()`` dict; unknown kinds or arguments raise ValueError."""
    if not isinstance(config, dict):
        raise ValueError(f"layer config must be a dict, got {type(config).__name__}")
    return resolve("layer kind", LAYERS, config, Layer, key="kind")
