"""Activation functions, each owning its forward and its derivative side by side.

Math only, through the namespace ``xp`` passed in; no array library is imported here.
"""

from __future__ import annotations

import math

from ._checks import real
from ._registry import Configurable, resolve

__all__ = [
    "ActivationFunction", "Linear", "ReLU", "LeakyReLU", "ELU", "GELU", "Sigmoid", "Tanh", "Softplus", "Softmax",
    "get", "ACTIVATIONS",
]


class ActivationFunction(Configurable):
    """Base class: ``forward(z, xp) -> a`` and ``backward(grad_a, z, a, xp) -> grad_z``.

    Subclass it for a custom activation; set ``needs_input = False`` when ``backward`` only reads ``a``
    (so layers need not keep ``z``), and ``init`` to ``"he"`` or ``"glorot"`` for the default initializer.
    ``kernel`` names a backend's in-place kernel computing exactly this math ("relu", "softmax"; see
    ``Device.kernels``) or is None. It is not inherited: a subclass that changes the math never runs a builtin
    kernel, and one that keeps it may say so with ``kernel = "relu"``.
    """

    name = "custom"
    needs_input = True
    init = "glorot"
    kernel: str | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kernel" not in cls.__dict__:
            cls.kernel = None

    def forward(self, z, xp):
        raise NotImplementedError

    def backward(self, grad, z, a, xp):
        raise NotImplementedError


class Linear(ActivationFunction):
    name = "linear"
    needs_input = False

    def forward(self, z, xp):
        return z

    def backward(self, grad, z, a, xp):
        return grad


class ReLU(ActivationFunction):
    """max(z, 0); the derivative is read from the sign of the output."""

    name = "relu"
    needs_input = False
    init = "he"
    kernel = "relu"

    def forward(self, z, xp):
        return xp.maximum(z, 0.0)

    def backward(self, grad, z, a, xp):
        # A multiply by the 0/1 mask, not where(): NumPy's where() is ~15x slower on a random mask.
        return grad * xp.astype(a > 0, grad.dtype)


class LeakyReLU(ActivationFunction):
    name = "leaky_relu"
    needs_input = False
    init = "he"

    def __init__(self, alpha: float = 0.01):
        self.alpha = real("leaky_relu", "alpha", alpha, 0, 1, high_open=True)

    def forward(self, z, xp):
        return xp.where(z > 0, z, self.alpha * z)

    def backward(self, grad, z, a, xp):
        return xp.where(a > 0, grad, self.alpha * grad)

    def get_config(self):
        return {"name": self.name, "alpha": self.alpha}


class ELU(ActivationFunction):
    """z for z > 0, alpha * (exp(z) - 1) otherwise; derivative a + alpha on the negative side."""

    name = "elu"
    needs_input = False
    init = "he"

    def __init__(self, alpha: float = 1.0):
        self.alpha = real("elu", "alpha", alpha, 0, low_open=True)

    def forward(self, z, xp):
        return xp.where(z > 0, z, self.alpha * xp.expm1(xp.minimum(z, 0.0)))

    def backward(self, grad, z, a, xp):
        return xp.where(a > 0, grad, grad * (a + self.alpha))

    def get_config(self):
        return {"name": self.name, "alpha": self.alpha}


class GELU(ActivationFunction):
    """GELU in its standard tanh form (the array API has no erf): 0.5 z (1 + tanh(c (z + 0.044715 z^3)))."""

    name = "gelu"
    init = "he"
    _c = math.sqrt(2.0 / math.pi)

    def forward(self, z, xp):
        return 0.5 * z * (1.0 + xp.tanh(self._c * (z + 0.044715 * z * z * z)))

    def backward(self, grad, z, a, xp):
        t = xp.tanh(self._c * (z + 0.044715 * z * z * z))
        return grad * (0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * self._c * (1.0 + 3 * 0.044715 * z * z))


class Sigmoid(ActivationFunction):
    """1 / (1 + exp(-z)), computed without overflow for large |z|."""

    name = "sigmoid"
    needs_input = False

    def forward(self, z, xp):
        e = xp.exp(-xp.abs(z))
        return xp.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))

    def backward(self, grad, z, a, xp):
        return grad * a * (1.0 - a)


class Tanh(ActivationFunction):
    name = "tanh"
    needs_input = False

    def forward(self, z, xp):
        return xp.tanh(z)

    def backward(self, grad, z, a, xp):
        return grad * (1.0 - a * a)


class Softplus(ActivationFunction):
    """log(1 + exp(z)), stable; its derivative sigmoid(z) equals 1 - exp(-a)."""

    name = "softplus"
    needs_input = False

    def forward(self, z, xp):
        return xp.maximum(z, 0.0) + xp.log1p(xp.exp(-xp.abs(z)))

    def backward(self, grad, z, a, xp):
        return -grad * xp.expm1(-a)


class Softmax(ActivationFunction):
    """Softmax over the last axis. With a cross-entropy loss the model skips ``backward`` and uses p - y."""

    name = "softmax"
    needs_input = False
    kernel = "softmax"

    def forward(self, z, xp):
        e = xp.exp(z - xp.max(z, axis=-1, keepdims=True))
        return e / xp.sum(e, axis=-1, keepdims=True)

    def backward(self, grad, z, a, xp):
        return a * (grad - xp.sum(grad * a, axis=-1, keepdims=True))


ACTIVATIONS = {cls.name: cls for cls in (Linear, ReLU, LeakyReLU, ELU, GELU, Sigmoid, Tanh, Softplus, Softmax)}


def get(activation) -> ActivationFunction:
    """An activation from a name, a config dict, an instance, or None (linear)."""
    return Linear() if activation is None else resolve("activation", ACTIVATIONS, activation, ActivationFunction)
