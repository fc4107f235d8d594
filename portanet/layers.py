"""Layers: Dense, Dropout, Activation. ``forward(x)`` caches what ``backward(grad_out)`` needs.

Parameters are views into the model's flat buffer, bound by the model; math goes through ``xp`` only.
"""

from __future__ import annotations

import copy
import math

from . import activations
from ._registry import resolve

__all__ = ["Layer", "Dense", "Dropout", "Activation", "INITIALIZERS", "get"]


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


class Layer:
    """Base class. A layer maps (batch, in) to (batch, out) and may own parameters.

    ``param_shapes(in_dim)`` names its parameters; the model allocates them and calls ``bind``.
    """

    kind = "layer"

    def __init__(self, name: str | None = None):
        self.name = name
        self.params: dict = {}
        self.grads: dict = {}
        self.input_dim: int | None = None
        self._xp = None
        self._fast = None

    def output_dim(self, in_dim: int) -> int:
        return in_dim

    def param_shapes(self, in_dim: int) -> dict:
        return {}

    def init_params(self, rng, in_dim: int) -> dict:
        """Initial values as host arrays drawn from the host generator ``rng``."""
        return {}

    def bind(self, xp, params: dict, grads: dict, random_source=None, fast=None) -> None:
        """Attach parameter and gradient views; ``fast``: the device's in-place kernels (``Device.kernels``) or None."""
        self._xp, self.params, self.grads, self._fast = xp, params, grads, fast

    def forward(self, x, training: bool = False):
        raise NotImplementedError

    def backward(self, grad_out, need_input_grad: bool = True):
        raise NotImplementedError

    def clear_cache(self) -> None:
        """Drop the activations kept for backward (to free memory or before moving devices)."""

    def unbound_copy(self) -> "Layer":
        """The same layer (custom activations included) without parameters, ready to bind to another model."""
        twin = copy.copy(self)
        twin.params, twin.grads, twin._xp, twin._fast = {}, {}, None, None
        twin.clear_cache()
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
        if kernel_initializer is not None and kernel_initializer not in INITIALIZERS:
            raise ValueError(f"unknown kernel_initializer {kernel_initializer!r}; expected one of {sorted(INITIALIZERS)}")
        self.units = units
        self.activation = activations.get(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = kernel_initializer
        self.input_dim = input_dim
        self._cache = None

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

    def forward(self, x, training=False):
        """x: (batch, in) -> (batch, units)."""
        z = self._affine(x)
        a = None if self._fast is None else self._fast.activate_(self.activation.kernel, z)  # over z, which is ours
        if a is None:
            a = self.activation.forward(z, self._xp)
        self._cache = (x, z if self.activation.needs_input else None, a)
        return a

    def forward_logits(self, x):
        """x: (batch, in) -> pre-activation (batch, units), cached for a fused backward."""
        z = self._affine(x)
        self._cache = (x, z, None)
        return z

    def _affine(self, x):
        z = x @ self.params["kernel"]
        if self.use_bias:
            z += self.params["bias"]
        return z

    def backward(self, grad_out, need_input_grad=True, fused=False):
        """grad_out: dL/da (or dL/dz when ``fused``) of shape (batch, units) -> dL/dx (batch, in).

        Writes dL/dkernel and dL/dbias into the bound gradient views.
        """
        xp, fast = self._xp, self._fast
        x, z, a = self._cache
        if fused:
            gz = grad_out
        else:
            gz = None if fast is None else fast.activation_grad(self.activation.kernel, grad_out, a)
            if gz is None:
                gz = self.activation.backward(grad_out, z, a, xp)
        if fast is not None:
            fast.dense_grads(x, gz, self.grads["kernel"], self.grads.get("bias"))
        else:
            self.grads["kernel"][...] = x.T @ gz
            if self.use_bias:
                self.grads["bias"][...] = xp.sum(gz, axis=0)
        return gz @ self.params["kernel"].T if need_input_grad else None

    def clear_cache(self):
        self._cache = None

    def get_config(self):
        return {"kind": self.kind, "name": self.name, "units": self.units, "activation": self.activation.get_config(),
                "use_bias": self.use_bias, "kernel_initializer": self.kernel_initializer, "input_dim": self.input_dim}


class Dropout(Layer):
    """Inverted dropout: in training, zero each unit with probability ``rate`` and scale the rest by 1/(1-rate)."""

    kind = "dropout"

    def __init__(self, rate: float, name: str | None = None):
        super().__init__(name)
        if not (isinstance(rate, (int, float)) and 0 <= rate < 1):
            raise ValueError(f"dropout rate must be in [0, 1), got {rate!r}")
        self.rate = float(rate)
        self._random = None
        self._mask = None

    def bind(self, xp, params, grads, random_source=None, fast=None):
        super().bind(xp, params, grads, fast=fast)
        self._random = random_source

    def forward(self, x, training=False):
        if not training or self.rate == 0:
            self._mask = None
            return x
        u = self._random.uniform(x.shape, x.dtype)
        self._mask = self._xp.astype(u >= self.rate, x.dtype) * (1.0 / (1.0 - self.rate))
        return x * self._mask

    def backward(self, grad_out, need_input_grad=True):
        return grad_out if self._mask is None else grad_out * self._mask

    def clear_cache(self):
        self._mask = None

    def get_config(self):
        return {"kind": self.kind, "name": self.name, "rate": self.rate}


class Activation(Layer):
    """An activation function as a layer of its own (no parameters)."""

    kind = "activation"

    def __init__(self, activation, name: str | None = None):
        super().__init__(name)
        self.activation = activations.get(activation)
        self._cache = None

    def forward(self, x, training=False):
        a = self.activation.forward(x, self._xp)
        self._cache = (x if self.activation.needs_input else None, a)
        return a

    def backward(self, grad_out, need_input_grad=True):
        z, a = self._cache
        return self.activation.backward(grad_out, z, a, self._xp)

    def clear_cache(self):
        self._cache = None

    def get_config(self):
        return {"kind": self.kind, "name": self.name, "activation": self.activation.get_config()}


LAYERS = {cls.kind: cls for cls in (Dense, Dropout, Activation)}


def get(config: dict) -> Layer:
    """Rebuild a layer from its ``get_config()`` dict; unknown kinds or arguments raise ValueError."""
    if not isinstance(config, dict):
        raise ValueError(f"layer config must be a dict, got {type(config).__name__}")
    return resolve("layer kind", LAYERS, config, Layer, key="kind")
