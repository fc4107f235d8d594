"""Layers: Dense, Dropout, Activation, LayerNormalization, BatchNormalization. ``forward_with_cache(x)`` returns what
``backward(grad_out, cache)`` needs.

Parameters are views into the model's flat buffer (:mod:`portanet.params`), bound by the model; math goes through
``xp`` only. A layer keeps no per-call state: caches travel with the training step, so inference in one thread
never disturbs a training step in another; non-trainable state (BatchNormalization's moving statistics) changes
only when the model writes :meth:`Layer.updated_state` back after a completed training step.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import re

from . import activations
from . import initializers as _initializers
from . import regularizers as _regularizers
from ._checks import flag, real
from ._owner import Owned
from ._registry import resolve
from .backends import host_rng

__all__ = ["Layer", "Dense", "Dropout", "Activation", "LayerNormalization", "BatchNormalization", "LAYERS", "get", "check_name",
           "RESERVED_NAMES"]

_DEFAULT_KERNEL_INIT = {"he": _initializers.HeNormal, "glorot": _initializers.GlorotUniform}

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


def _initializer(owner: str, arg: str, spec):
    """``spec`` (a name, config dict or Initializer) as an Initializer; errors name the argument."""
    try:
        return _initializers.get(spec)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{owner} {arg}: {exc}") from exc


def _regularizer(owner: str, arg: str, spec):
    """``spec`` (None, a name, config dict or Regularizer) as a Regularizer or None; errors name the argument."""
    try:
        return _regularizers.get(spec)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{owner} {arg}: {exc}") from exc


def _config(obj):
    return None if obj is None else obj.get_config()


def _flag(owner: str, arg: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{owner} {arg} must be True or False, got {value!r}")
    return value


class Layer(Owned):
    """Base class. A layer maps (batch, in) to (batch, out) and may own parameters and non-trainable state.

    ``param_shapes(in_dim)`` / ``state_shapes(in_dim)`` name them; the model allocates them in its
    :class:`~portanet.params.ParameterBuffer` and calls ``bind``. Subclasses implement ``forward_with_cache`` and
    ``backward``; a layer with state also implements ``updated_state``. ``min_training_rows``: the fewest rows a
    training batch may have (BatchNormalization: 2).
    """

    kind = "layer"
    min_training_rows = 1

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
        parameter gradients into the bound gradient views. A model calls it for the layers from the output down to
        the first layer with parameters only (``grad_out`` is never None)."""
        raise NotImplementedError

    def updated_state(self, cache) -> dict:
        """``{state key: new value}`` after a training step whose forward returned ``cache`` (device arrays,
        computed, not written: the model writes them in ``apply_gradients``, so a step that is not applied leaves
        the state as it was); ``{}`` for layers without state."""
        return {}

    # -- regularization and weight decay --------------------------------------------------------------------------
    def penalties(self) -> dict:
        """``{parameter key: Regularizer}`` for the parameters this layer penalizes (none by default)."""
        return {}

    def regularization(self, accumulate_grads: bool = False):
        """The sum of this layer's penalties as a 0-d device array (None when it has none); with
        ``accumulate_grads``, each penalty's gradient is added to its parameter's bound gradient view."""
        xp, total = self._xp, None
        for key, regularizer in self.penalties().items():
            w = self.params[key]
            penalty = regularizer(w, xp)
            total = penalty if total is None else total + penalty
            if accumulate_grads:
                self.grads[key] += regularizer.gradient(w, xp)
        return total

    def decays_by_default(self, key: str) -> bool:
        """Whether optimizer weight decay applies to parameter ``key`` unless the optimizer is told otherwise
        (``exclude_from_weight_decay`` / ``include_in_weight_decay``): kernels yes; biases, normalization scales
        and offsets no."""
        return False

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
        """The constructor call with the arguments that differ from their defaults."""
        defaults = {k: p.default for k, p in inspect.signature(type(self).__init__).parameters.items()}

        def shown(key, value):
            default = defaults.get(key, inspect.Parameter.empty)
            named_default = isinstance(default, str) and value == {"name": default}
            return key not in ("kind", "name") and value is not None and value != default and not named_default

        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if shown(k, v))
        return f"{type(self).__name__}({args})"


class Dense(Layer):
    """Fully connected layer: ``a = activation(x @ kernel + bias)``, kernel of shape (in, units), bias (units,).

    ``kernel_initializer`` / ``bias_initializer``: a name (``"he_normal"``, ``"glorot_uniform"``, ``"zeros"``, ...), a
    config dict or a :mod:`portanet.initializers` object; the kernel defaults to He normal (truncated, as in Keras)
    for the ReLU family and Glorot uniform otherwise, the bias to zeros. Values are drawn on the host from the
    model's seeded generator, so they are the same on every backend.
    ``kernel_regularizer`` / ``bias_regularizer``: None (default), ``"l1"``, ``"l2"`` (Keras defaults, 0.01),
    ``"l1_l2"`` (Keras 3's ``L1L2()`` defaults, 0.0 and 0.0: no penalty; give ``L1L2(l1=..., l2=...)``) or a
    :mod:`portanet.regularizers` object; the penalty is added to the loss that ``fit``, ``evaluate``
    and ``train_step`` report, and its gradient to the parameter's. Weight decay of the optimizer applies to the
    kernel, not the bias, unless the optimizer is told otherwise. Unknown names and bad arguments raise ValueError
    naming the argument.
    """

    kind = "dense"

    def __init__(self, units: int, activation=None, use_bias: bool = True, kernel_initializer=None,
                 bias_initializer="zeros", kernel_regularizer=None, bias_regularizer=None,
                 input_dim: int | None = None, name: str | None = None):
        super().__init__(name)
        if isinstance(units, bool) or not isinstance(units, numbers.Integral) or units < 1:
            raise ValueError(f"units must be a positive integer, got {units!r}")
        if input_dim is not None and (isinstance(input_dim, bool) or not isinstance(input_dim, numbers.Integral)
                                      or input_dim < 1):
            raise ValueError(f"input_dim must be a positive integer, got {input_dim!r}")
        self.units = int(units)  # NumPy integers (n_classes = y.max() + 1) become plain ints: configs are JSON
        self.activation = activations.get(activation)
        self.use_bias = flag("Dense", "use_bias", use_bias)
        self.kernel_initializer = None if kernel_initializer is None else _initializer(
            "Dense", "kernel_initializer", kernel_initializer)
        self.bias_initializer = _initializer("Dense", "bias_initializer", bias_initializer)
        self.kernel_regularizer = _regularizer("Dense", "kernel_regularizer", kernel_regularizer)
        self.bias_regularizer = _regularizer("Dense", "bias_regularizer", bias_regularizer)
        self.input_dim = None if input_dim is None else int(input_dim)

    def output_dim(self, in_dim):
        return self.units

    def param_shapes(self, in_dim):
        shapes = {"kernel": (in_dim, self.units)}
        if self.use_bias:
            shapes["bias"] = (self.units,)
        return shapes

    def init_params(self, rng, in_dim):
        init = self.kernel_initializer or _DEFAULT_KERNEL_INIT[self.activation.init]()
        values = {"kernel": _initializers.draw(init, (in_dim, self.units), rng, f"Dense {self.name!r} "
                                               "kernel_initializer")}
        if self.use_bias:
            values["bias"] = _initializers.draw(self.bias_initializer, (self.units,), rng,
                                                f"Dense {self.name!r} bias_initializer")
        return values

    def penalties(self):
        out = {}
        if self.kernel_regularizer is not None:
            out["kernel"] = self.kernel_regularizer
        if self.use_bias and self.bias_regularizer is not None:
            out["bias"] = self.bias_regularizer
        return out

    def decays_by_default(self, key):
        return key == "kernel"

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
                "use_bias": self.use_bias, "kernel_initializer": _config(self.kernel_initializer),
                "bias_initializer": _config(self.bias_initializer),
                "kernel_regularizer": _config(self.kernel_regularizer),
                "bias_regularizer": _config(self.bias_regularizer), "input_dim": self.input_dim}


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


class _Normalization(Layer):
    """What LayerNormalization and BatchNormalization share: the arguments, ``gamma`` (scale) and ``beta`` (offset)
    of shape (features,), the affine output ``xhat * gamma + beta`` and its parameter gradients. ``_axis`` is the
    axis the statistics are taken over (1: each row; 0: the batch)."""

    _axis = 1

    def __init__(self, axis, epsilon, center, scale, beta_initializer, gamma_initializer, beta_regularizer,
                 gamma_regularizer, name):
        super().__init__(name)
        owner = type(self).__name__
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or axis not in (-1, 1):
            raise ValueError(f"{owner} axis must be -1 (the features axis; 1 is the same axis): portanet layers take "
                             f"(batch, features) inputs, got {axis!r}")
        if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not (
                epsilon > 0 and math.isfinite(epsilon)):
            raise ValueError(f"{owner} epsilon must be a positive finite number, got {epsilon!r}")
        self.axis, self.epsilon = int(axis), float(epsilon)
        self.center, self.scale = _flag(owner, "center", center), _flag(owner, "scale", scale)
        self.beta_initializer = _initializer(owner, "beta_initializer", beta_initializer)
        self.gamma_initializer = _initializer(owner, "gamma_initializer", gamma_initializer)
        self.beta_regularizer = _regularizer(owner, "beta_regularizer", beta_regularizer)
        self.gamma_regularizer = _regularizer(owner, "gamma_regularizer", gamma_regularizer)

    def param_shapes(self, in_dim):
        shapes = {}
        if self.scale:
            shapes["gamma"] = (in_dim,)
        if self.center:
            shapes["beta"] = (in_dim,)
        return shapes

    def init_params(self, rng, in_dim):
        values, owner = {}, f"{type(self).__name__} {self.name!r}"
        if self.scale:
            values["gamma"] = _initializers.draw(self.gamma_initializer, (in_dim,), rng, f"{owner} gamma_initializer")
        if self.center:
            values["beta"] = _initializers.draw(self.beta_initializer, (in_dim,), rng, f"{owner} beta_initializer")
        return values

    def penalties(self):
        out = {}
        if self.scale and self.gamma_regularizer is not None:
            out["gamma"] = self.gamma_regularizer
        if self.center and self.beta_regularizer is not None:
            out["beta"] = self.beta_regularizer
        return out

    def _standardize(self, d, var):
        """``(xhat, inv)`` from the centred input d = x - mean: ``d / sqrt(var + epsilon)`` and ``1 / sqrt(var +
        epsilon)``."""
        inv = 1.0 / self._xp.sqrt(var + self.epsilon)
        return d * inv, inv

    def _moments(self, x):
        """``(x - mean, mean, var)`` over ``_axis``: the biased variance in two passes (no cancellation as in
        E[x^2] - E[x]^2)."""
        xp, keep = self._xp, self._axis == 1
        mean = xp.mean(x, axis=self._axis, keepdims=keep)
        d = x - mean
        return d, mean, xp.mean(d * d, axis=self._axis, keepdims=keep)

    def _affine(self, xhat):
        out = xhat
        if self.scale:
            out = out * self.params["gamma"]
        if self.center:
            out = out + self.params["beta"]
        return out

    def get_config(self):
        return {"kind": self.kind, "name": self.name, "axis": self.axis, "epsilon": self.epsilon,
                "center": self.center, "scale": self.scale, "beta_initializer": _config(self.beta_initializer),
                "gamma_initializer": _config(self.gamma_initializer),
                "beta_regularizer": _config(self.beta_regularizer),
                "gamma_regularizer": _config(self.gamma_regularizer)}


class LayerNormalization(_Normalization):
    """Layer normalization (Ba et al. 2016), Keras 3's arguments and defaults: each row x of (batch, features) becomes
    ``gamma * (x - mean(x)) / sqrt(var(x) + epsilon) + beta``, mean and (biased) variance over the row's features.

    ``axis=-1`` (the features axis; the only one a (batch, features) input has), ``epsilon=1e-3``, ``center=True``
    (learn ``beta``, shape (features,), initialized by ``beta_initializer="zeros"``), ``scale=True`` (learn
    ``gamma``, ``gamma_initializer="ones"``), ``beta_regularizer`` / ``gamma_regularizer`` (None). The same in
    training and inference. Weight decay skips gamma and beta unless the optimizer is told otherwise. Keras's
    constraints and ``rms_scaling`` are not supported.
    """

    kind = "layer_normalization"
    _axis = 1

    def __init__(self, axis: int = -1, epsilon: float = 1e-3, center: bool = True, scale: bool = True,
                 beta_initializer="zeros", gamma_initializer="ones", beta_regularizer=None, gamma_regularizer=None,
                 name: str | None = None):
        super().__init__(axis, epsilon, center, scale, beta_initializer, gamma_initializer, beta_regularizer,
                         gamma_regularizer, name)

    def forward_with_cache(self, x, training=False):
        """x: (batch, features) -> same shape; the cache holds xhat (batch, features) and 1/std (batch, 1)."""
        d, _, var = self._moments(x)
        xhat, inv = self._standardize(d, var)
        return self._affine(xhat), (xhat, inv)

    def backward(self, grad_out, cache, need_input_grad=True):
        """dL/dx = inv * (g - mean(g) - xhat * mean(g * xhat)) with g = dL/dxhat = grad_out * gamma, means over
        each row's features (which its mean and variance depend on); writes dL/dgamma and dL/dbeta."""
        xp, (xhat, inv) = self._xp, cache
        if self.center:
            self.grads["beta"][...] = xp.sum(grad_out, axis=0)
        g = grad_out
        if self.scale:
            self.grads["gamma"][...] = xp.sum(grad_out * xhat, axis=0)
            g = grad_out * self.params["gamma"]
        if not need_input_grad:
            return None
        mean_g = xp.mean(g, axis=1, keepdims=True)
        mean_gx = xp.mean(g * xhat, axis=1, keepdims=True)
        return inv * (g - mean_g - xhat * mean_gx)


class BatchNormalization(_Normalization):
    """Batch normalization (Ioffe & Szegedy 2015), Keras 3's arguments, defaults and update rule, for (batch,
    features) inputs: ``gamma * (x - mean) / sqrt(var + epsilon) + beta`` per feature.

    In training (``fit``, ``train_step``) mean and var are the batch's (the variance biased: divided by the batch
    size) and the moving statistics move towards them after each applied step:
    ``moving_mean = moving_mean * momentum + mean * (1 - momentum)``, the same for ``moving_variance`` with the
    biased batch variance (PyTorch's ``BatchNorm1d`` uses ``momentum_torch = 1 - momentum`` and the unbiased
    variance there). In inference (``predict``, ``evaluate``, validation) the moving statistics are used and nothing
    changes. A training batch needs at least 2 rows (ValueError otherwise, before anything changes).

    ``axis=-1``, ``momentum=0.99``, ``epsilon=1e-3``, ``center=True`` / ``scale=True`` (learn ``beta`` / ``gamma``,
    shape (features,), ``beta_initializer="zeros"``, ``gamma_initializer="ones"``), ``moving_mean_initializer=
    "zeros"``, ``moving_variance_initializer="ones"`` (constant initializers: zeros, ones, constant),
    ``beta_regularizer`` / ``gamma_regularizer`` (None). ``moving_mean`` and ``moving_variance`` (features,) are
    non-trainable state: never seen by the optimizer or weight decay, moved by ``to()``, saved in model files and
    checkpoints. Keras's constraints and ``synchronized`` are not supported.
    """

    kind = "batch_normalization"
    _axis = 0
    min_training_rows = 2

    def __init__(self, axis: int = -1, momentum: float = 0.99, epsilon: float = 1e-3, center: bool = True,
                 scale: bool = True, beta_initializer="zeros", gamma_initializer="ones",
                 moving_mean_initializer="zeros", moving_variance_initializer="ones", beta_regularizer=None,
                 gamma_regularizer=None, name: str | None = None):
        super().__init__(axis, epsilon, center, scale, beta_initializer, gamma_initializer, beta_regularizer,
                         gamma_regularizer, name)
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0 <= momentum <= 1:
            raise ValueError(f"BatchNormalization momentum must be a number in [0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self.moving_mean_initializer = self._constant("moving_mean_initializer", moving_mean_initializer)
        self.moving_variance_initializer = self._constant("moving_variance_initializer", moving_variance_initializer)

    @staticmethod
    def _constant(arg, spec):
        init = _initializer("BatchNormalization", arg, spec)
        if not isinstance(init, (_initializers.Zeros, _initializers.Ones, _initializers.Constant)):
            raise ValueError(f"BatchNormalization {arg} must be a constant initializer (zeros, ones or constant), "
                             f"got {init!r}")
        return init

    def state_shapes(self, in_dim):
        return {"moving_mean": (in_dim,), "moving_variance": (in_dim,)}

    def init_state(self, in_dim):
        rng = host_rng(0)  # constant initializers draw nothing
        return {"moving_mean": self.moving_mean_initializer((in_dim,), rng),
                "moving_variance": self.moving_variance_initializer((in_dim,), rng)}

    def forward_with_cache(self, x, training=False):
        """x: (batch, features) -> same shape. Training: batch statistics, cached with xhat and 1/std for backward
        and :meth:`updated_state`; inference: the moving statistics."""
        if not training:
            xhat, inv = self._standardize(x - self.state["moving_mean"], self.state["moving_variance"])
            return self._affine(xhat), (xhat, inv, None, None)
        if x.shape[0] < 2:
            raise ValueError(f"BatchNormalization {self.name!r} needs at least 2 rows per training batch (the "
                             f"variance of one row is 0), got a batch of {x.shape[0]}: use a batch_size that leaves "
                             "no batch of 1 row; nothing was updated")
        d, mean, var = self._moments(x)
        xhat, inv = self._standardize(d, var)
        return self._affine(xhat), (xhat, inv, mean, var)

    def backward(self, grad_out, cache, need_input_grad=True):
        """Training: dL/dx = gamma * inv * (grad_out - (sum(grad_out) + xhat * sum(grad_out * xhat)) / batch), the
        sums over the batch being dL/dbeta and dL/dgamma themselves (Ioffe & Szegedy's backward); inference:
        gamma * inv * grad_out (the moving statistics do not depend on x)."""
        xp, (xhat, inv, mean, _) = self._xp, cache
        sum_g, sum_gx = xp.sum(grad_out, axis=0), xp.sum(grad_out * xhat, axis=0)
        if self.center:
            self.grads["beta"][...] = sum_g
        if self.scale:
            self.grads["gamma"][...] = sum_gx
        if not need_input_grad:
            return None
        scale = inv * self.params["gamma"] if self.scale else inv
        if mean is None:
            return grad_out * scale
        return scale * (grad_out - (sum_g + xhat * sum_gx) * (1.0 / grad_out.shape[0]))

    def updated_state(self, cache):
        _, _, mean, var = cache
        if mean is None:
            return {}
        m = self.momentum
        return {"moving_mean": self.state["moving_mean"] * m + mean * (1.0 - m),
                "moving_variance": self.state["moving_variance"] * m + var * (1.0 - m)}

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum,
                "moving_mean_initializer": _config(self.moving_mean_initializer),
                "moving_variance_initializer": _config(self.moving_variance_initializer)}


LAYERS = {cls.kind: cls for cls in (Dense, Dropout, Activation, LayerNormalization, BatchNormalization)}


def get(config: dict) -> Layer:
    """Rebuild a layer from its ``get_config()`` dict; unknown kinds or arguments raise ValueError."""
    if not isinstance(config, dict):
        raise ValueError(f"layer config must be a dict, got {type(config).__name__}")
    return resolve("layer kind", LAYERS, config, Layer, key="kind")
