"""scikit-learn estimators: ``MLPClassifier`` and ``MLPRegressor`` with scikit-learn's parameters, rules and fitted
attributes, trained by portanet on any device (NumPy, CuPy, PyTorch, array-API namespaces), with dropout and
per-layer activations.

Built on portanet's public API (Model, Dense, Dropout, losses, optimizers, regularizers, io). Only imported as
``portanet.sklearn`` (``import portanet`` never loads it): scikit-learn and SciPy are the ``portanet[sklearn]`` extra.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
import warnings

import array_api_compat
import numpy as np

try:
    import scipy.optimize
    import scipy.sparse
    import sklearn
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import accuracy_score, r2_score
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import LabelBinarizer
    from sklearn.utils import check_array, check_random_state, column_or_1d
    from sklearn.utils.metaestimators import available_if
    from sklearn.utils.multiclass import type_of_target, unique_labels
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as exc:  # pragma: no cover - exercised by a test that hides scikit-learn
    raise ImportError('portanet.sklearn needs scikit-learn (>= 1.6) and SciPy: pip install "portanet[sklearn]" '
                      f"({exc})") from exc

from . import activations as _activations
from . import io as _io
from . import losses as _losses
from . import optimizers as _optimizers
from . import regularizers as _regularizers
from .backends import dtype_name, library_of, resolve_device, take_rows, to_numpy
from .layers import Dense, Dropout
from .model import Model

__all__ = ["MLPClassifier", "MLPRegressor"]

_STOCHASTIC = ("sgd", "adam")
_VALIDATED = ("n_features_in_", "feature_names_in_", "classes_", "_label_binarizer")  # what validation rewrites
_SKLEARN_ACTIVATIONS = {"identity": "linear", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu"}
_OUTPUT_ACTIVATIONS = {"identity": "linear", "logistic": "sigmoid", "softmax": "softmax"}  # "exp": _Exp


# -- the pieces scikit-learn's MLP computes differently from portanet's defaults ----------------------------------
class _Exp(_activations.ActivationFunction):
    """exp(z): the inverse of the Poisson regressor's log link; derivative exp(z) = a."""

    name = "exp"
    needs_input = False

    def forward(self, z, xp):
        return xp.exp(z)

    def backward(self, grad, z, a, xp):
        return grad * a


def _column(y, xp):
    return xp.reshape(y, (-1, 1)) if y.ndim == 1 else y


class _HalfSquaredError(_losses.Loss):
    """Per sample ``0.5 * sum over outputs of (pred - y)**2``; gradient ``pred - y`` (scikit-learn's gradient).

    scikit-learn's ``squared_loss`` takes the mean over outputs while its gradient is that of the sum (open bug
    scikit-learn#8349, fix proposed in #34830); the value here is the sum, so L-BFGS sees a loss and a gradient of one
    function. With one output both agree with scikit-learn.
    """

    name = "half_squared_error"

    def per_sample(self, pred, y, xp):
        r = pred - _column(y, xp)
        return 0.5 * xp.sum(r * r, axis=1), r


class _HalfPoissonDeviance(_losses.Loss):
    """Per sample ``sum over outputs of y log(y / mu) - y + mu`` with ``mu = exp(z)`` (half the Poisson deviance,
    scikit-learn's ``poisson_loss``), computed from the logits z; fused with the exp output: gradient ``mu - y``."""

    name = "half_poisson_deviance"
    fuses = "exp"

    def per_sample_logits(self, z, y, xp, probs=None, kernels=None):
        y = _column(y, xp)
        mu = xp.exp(z) if probs is None else probs
        positive = y > 0
        y_log_y = xp.where(positive, y * xp.log(xp.where(positive, y, 1.0)), 0.0)
        return xp.sum(y_log_y - y * z - y + mu, axis=1), mu - y


class _SummedBinaryCrossentropy(_losses.BinaryCrossentropy):
    """Binary cross-entropy summed over the outputs (scikit-learn's ``binary_log_loss`` for multilabel targets;
    portanet's BinaryCrossentropy averages them), from the logits: the same as BinaryCrossentropy for one output."""

    name = "summed_binary_crossentropy"

    def per_sample_logits(self, z, y, xp, probs=None, kernels=None):
        y = _column(y, xp)
        ez = xp.exp(-xp.abs(z))
        e = xp.maximum(z, 0.0) - z * y + xp.log1p(ez)
        p = xp.where(z >= 0, 1.0 / (1.0 + ez), ez / (1.0 + ez)) if probs is None else probs
        return xp.sum(e, axis=1), p - y


class _BatchL2(_regularizers.Regularizer):
    """scikit-learn's weight penalty ``0.5 * alpha * ||W||**2 / s``, where s is the current batch's sample-weight sum
    (its row count without weights); the estimator sets ``scale = 1 / s`` before each batch. Keras's L2 has a fixed
    factor, so a last short batch would be penalized as much as a full one."""

    name = "batch_l2"

    def __init__(self, alpha: float):
        self.alpha, self.scale = float(alpha), 1.0

    def __call__(self, w, xp):
        flat = xp.reshape(w, (-1,))
        return (0.5 * self.alpha * self.scale) * xp.vecdot(flat, flat)

    def gradient(self, w, xp):
        return (self.alpha * self.scale) * w

    def get_config(self):
        return {"name": self.name, "alpha": self.alpha}


class _SklearnSGD(_optimizers.Optimizer):
    """scikit-learn's SGD: ``v = momentum * v - lr * g``, then ``p += v`` (or, with Nesterov's momentum,
    ``p += momentum * v - lr * g``). The rate multiplies each gradient as it enters the velocity, so a rate that
    changes (invscaling, adaptive) leaves earlier steps as they were (PyTorch's SGD scales the whole velocity)."""

    name = "sgd"
    slots = ("velocity",)

    def __init__(self, learning_rate, momentum: float, nesterov: bool):
        super().__init__(learning_rate)
        self.momentum, self.nesterov = float(momentum), bool(nesterov)

    def _step(self, params, grads, lr):
        v = self.state["velocity"]
        v *= self.momentum
        v -= lr * grads
        update = self.momentum * v - lr * grads if self.nesterov else v
        self._apply(params, -update)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "nesterov": self.nesterov}


class _SklearnAdam(_optimizers.Adam):
    """Adam as scikit-learn writes it (Kingma & Ba, section 2, the "epsilon hat" form): ``p -= lr * sqrt(1 -
    beta_2**t) / (1 - beta_1**t) * m / (sqrt(v) + epsilon)``, i.e. portanet's Adam with ``epsilon / sqrt(1 -
    beta_2**t)`` at step t."""

    def __init__(self, learning_rate, beta_1, beta_2, epsilon):
        super().__init__(learning_rate, beta_1, beta_2, epsilon)
        self.epsilon_hat = float(epsilon)

    def step(self, params, grads, fast=None):
        self.epsilon = self.epsilon_hat / math.sqrt(1.0 - self.beta_2 ** (self.iterations + 1))
        super().step(params, grads, fast)


# -- input helpers -----------------------------------------------------------------------------------------------
def _dispatch() -> bool:
    return bool(sklearn.get_config().get("array_api_dispatch", False))


def _foreign(a) -> bool:
    """True for an array of a library other than NumPy (torch, CuPy, array-api-strict, ...)."""
    return array_api_compat.is_array_api_obj(a) and library_of(a) != "numpy" and not scipy.sparse.issparse(a)


def _host(a):
    """Targets and weights are read on the host: an array of another library is moved explicitly."""
    return to_numpy(a) if a is not None and _foreign(a) else a


def _float_dtypes(X):
    """The dtypes validate_data may keep: float64 and float32 of X's namespace (NumPy's without dispatch)."""
    if _dispatch() and _foreign(X):
        xp = array_api_compat.array_namespace(X)
        return xp.float64, xp.float32
    return np.float64, np.float32


def _home(X):
    """``(library, device)`` of X as the array-API dispatch convention compares them (NumPy for everything else)."""
    if _dispatch() and _foreign(X):
        return library_of(X), str(array_api_compat.device(X))
    return "numpy", "cpu"


class _Rows:
    """The training inputs on the model's device: dense arrays uploaded once and gathered there batch by batch;
    SciPy sparse matrices kept on the host and densified one batch at a time."""

    def __init__(self, X, device, dtype):
        self.device, self.dtype = device, dtype
        self.sparse = scipy.sparse.issparse(X)
        self.X = X.tocsr() if self.sparse else device.asarray(X, dtype)

    def take(self, rows):
        """Rows ``rows`` (host int64 array) as a (len(rows), features) array on the device."""
        if self.sparse:
            return self.device.from_host(self.X[rows].toarray(), self.dtype)
        return take_rows(self.X, rows)


def _int_param(owner, name, value, low, allow_inf=False):
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low
    if not ok and not (allow_inf and value == np.inf):
        extra = " or numpy.inf" if allow_inf else ""
        raise ValueError(f"{owner} {name} must be an integer >= {low}{extra}, got {value!r}")


def _real_param(owner, name, value, low, high=math.inf, closed=(True, False)):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value) and (
        value >= low if closed[0] else value > low) and (value <= high if closed[1] else value < high)
    if not ok:
        interval = f"{'[' if closed[0] else '('}{low}, {high}{']' if closed[1] else ')'}"
        raise ValueError(f"{owner} {name} must be a number in {interval}, got {value!r}")


def _choice(owner, name, value, choices):
    if not (isinstance(value, str) and value in choices):
        raise ValueError(f"{owner} {name} must be one of {sorted(choices)}, got {value!r}")


# -- the shared estimator ----------------------------------------------------------------------------------------
class _BaseMLP(BaseEstimator):
    """What MLPClassifier and MLPRegressor share: parameters, the model, the solvers and their stopping rules."""

    # -- parameters ------------------------------------------------------------------------------------------------
    def _check_params(self):
        """Every parameter checked before anything changes; ValueError names the parameter, expected and got."""
        owner = type(self).__name__
        hidden = self.hidden_layer_sizes
        if isinstance(hidden, numbers.Integral) and not isinstance(hidden, bool):
            hidden = [hidden]
        try:
            hidden = [int(h) if isinstance(h, numbers.Integral) and not isinstance(h, bool) else None
                      for h in hidden]
        except TypeError:
            hidden = [None]
        if any(h is None or h < 1 for h in hidden):
            raise ValueError(f"{owner} hidden_layer_sizes must be a positive integer or a sequence of them, got "
                             f"{self.hidden_layer_sizes!r}")
        names = set(_SKLEARN_ACTIVATIONS) | set(_activations.ACTIVATIONS)
        acts = self.activation
        if isinstance(acts, str):
            _choice(owner, "activation", acts, names)
            acts = [acts] * len(hidden)
        elif isinstance(acts, (list, tuple)) and len(acts) == len(hidden):
            for act in acts:
                _choice(owner, "activation", act, names)
        else:
            raise ValueError(f"{owner} activation must be one name or a list of {len(hidden)} (one per hidden layer), "
                             f"got {self.activation!r}")
        rates = self.dropout
        if isinstance(rates, numbers.Real) and not isinstance(rates, bool):
            rates = [rates] * len(hidden)
        elif not isinstance(rates, (list, tuple)) or len(rates) != len(hidden):
            raise ValueError(f"{owner} dropout must be a rate in [0, 1) or a list of {len(hidden)} (one per hidden "
                             f"layer), got {self.dropout!r}")
        for rate in rates:
            _real_param(owner, "dropout", rate, 0.0, 1.0)
        _choice(owner, "solver", self.solver, {"lbfgs", "sgd", "adam"})
        _real_param(owner, "alpha", self.alpha, 0.0)
        if self.batch_size != "auto":
            _int_param(owner, "batch_size", self.batch_size, 1)
        _choice(owner, "learning_rate", self.learning_rate, {"constant", "invscaling", "adaptive"})
        _real_param(owner, "learning_rate_init", self.learning_rate_init, 0.0, closed=(False, False))
        _real_param(owner, "power_t", self.power_t, 0.0)
        _int_param(owner, "max_iter", self.max_iter, 1)
        _real_param(owner, "tol", self.tol, 0.0)
        _real_param(owner, "momentum", self.momentum, 0.0, 1.0, closed=(True, True))
        _real_param(owner, "validation_fraction", self.validation_fraction, 0.0, 1.0)
        for name in ("beta_1", "beta_2"):
            _real_param(owner, name, getattr(self, name), 0.0, 1.0)
        _real_param(owner, "epsilon", self.epsilon, 0.0, closed=(False, False))
        _int_param(owner, "n_iter_no_change", self.n_iter_no_change, 1, allow_inf=True)
        _int_param(owner, "max_fun", self.max_fun, 1)
        for name in ("shuffle", "warm_start", "nesterovs_momentum", "early_stopping"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{owner} {name} must be True or False, got {getattr(self, name)!r}")
        if self.dtype is not None and dtype_name(self.dtype) not in ("float32", "float64"):
            raise ValueError(f"{owner} dtype must be None (follow X), 'float32' or 'float64', got {self.dtype!r}")
        if self.solver == "lbfgs" and any(rates):
            raise ValueError(f"{owner} dropout needs a stochastic solver ('adam' or 'sgd'); L-BFGS needs a "
                             f"deterministic objective, got solver='lbfgs' with dropout={self.dropout!r}")
        return hidden, [_SKLEARN_ACTIVATIONS.get(a, a) for a in acts], [float(r) for r in rates]

    # -- fitted attributes that live in the model ------------------------------------------------------------------
    def _dense_names(self):
        return [f"hidden_{i}" for i in range(self.n_layers_ - 2)] + ["output"]

    def _layer_params(self, key):
        params = self._model.parameters()
        return [to_numpy(params[f"{name}.{key}"]) for name in self._dense_names()]

    def _set_layer_params(self, key, values):
        check_is_fitted(self)
        values = list(values)
        names = self._dense_names()
        if len(values) != len(names):
            raise ValueError(f"{key} needs {len(names)} arrays (one per layer), got {len(values)}")
        self._model.set_parameters({f"{name}.{key}": np.asarray(v) for name, v in zip(names, values)})

    @property
    def coefs_(self) -> list:
        """The weight matrices, (fan_in, fan_out) per layer, as NumPy arrays: live views of the weights when the
        estimator runs on NumPy, copies elsewhere. Assigning a list of arrays writes them into the model."""
        check_is_fitted(self)
        return self._layer_params("kernel")

    @coefs_.setter
    def coefs_(self, values):
        self._set_layer_params("kernel", values)

    @property
    def intercepts_(self) -> list:
        """The bias vectors, (fan_out,) per layer, as NumPy arrays (live views on NumPy, copies elsewhere)."""
        check_is_fitted(self)
        return self._layer_params("bias")

    @intercepts_.setter
    def intercepts_(self, values):
        self._set_layer_params("bias", values)

    @property
    def model_(self) -> Model:
        """The fitted :class:`portanet.Model` itself: its device, ``summary()``, ``predict`` on device arrays."""
        check_is_fitted(self)
        return self._model

    def __sklearn_is_fitted__(self):
        return getattr(self, "_model", None) is not None

    # -- the model ---------------------------------------------------------------------------------------------------
    def _device_for(self, X):
        """Where to train: ``device`` / ``backend`` when given; else where X lives under scikit-learn's
        array_api_dispatch; else NumPy on the CPU."""
        if self.device is not None or self.backend is not None:
            return resolve_device(self.device, self.backend)
        if _dispatch() and _foreign(X):
            return resolve_device(array_api_compat.device(X), backend=array_api_compat.array_namespace(X))
        return resolve_device("cpu")

    def _network(self, hidden, acts, rates, device, dtype, seed=None):
        """The unbuilt model: Dense layers named hidden_0, hidden_1, ... (each followed by a Dropout when its rate is
        not 0) and "output"; every kernel carries scikit-learn's batch-scaled L2 penalty."""
        self._penalty = _BatchL2(self.alpha)
        out = _Exp() if self.out_activation_ == "exp" else _OUTPUT_ACTIVATIONS[self.out_activation_]
        layers = []
        for i, (units, act, rate) in enumerate(zip(hidden, acts, rates)):
            layers.append(Dense(units, activation=act, kernel_regularizer=self._penalty, name=f"hidden_{i}"))
            if rate:
                layers.append(Dropout(rate, name=f"dropout_{i}"))
        layers.append(Dense(self.n_outputs_, activation=out, kernel_regularizer=self._penalty, name="output"))
        return Model(layers, device=device, dtype=dtype, seed=seed)

    def _build(self, n_features, hidden, acts, rates, device, dtype, random_state):
        """A new, built model with scikit-learn's initialization: kernel and bias of each layer drawn in order from
        ``random_state``, uniform in +-sqrt(factor / (fan_in + fan_out)), factor 2 for a logistic layer, else 6 (the
        output layer takes the last hidden layer's factor)."""
        seed = int(random_state.randint(np.iinfo(np.int32).max)) if any(rates) else None
        model = self._network(hidden, acts, rates, device, dtype, seed)
        model.compile(self._loss_object(), _optimizers.SGD())
        model.build(n_features)
        units = [n_features, *hidden, self.n_outputs_]
        factors = [2.0 if a == "sigmoid" else 6.0 for a in acts]
        factors.append(factors[-1] if factors else (2.0 if self.activation == "logistic" else 6.0))
        values = {}
        for name, fan_in, fan_out, factor in zip(self._dense_names(), units, units[1:], factors):
            bound = math.sqrt(factor / (fan_in + fan_out))
            values[f"{name}.kernel"] = random_state.uniform(-bound, bound, (fan_in, fan_out))
            values[f"{name}.bias"] = random_state.uniform(-bound, bound, fan_out)
        model.set_parameters(values)
        return model

    def _loss_object(self):
        return {"softmax": _losses.SparseCategoricalCrossentropy(), "logistic": _SummedBinaryCrossentropy(),
                "identity": _HalfSquaredError(), "exp": _HalfPoissonDeviance()}[self.out_activation_]

    def _new_optimizer(self):
        if self.solver == "sgd":
            return _SklearnSGD(self.learning_rate_init, self.momentum, self.nesterovs_momentum)
        if self.solver == "adam":
            return _SklearnAdam(self.learning_rate_init, self.beta_1, self.beta_2, self.epsilon)
        return _optimizers.SGD()  # L-BFGS runs through SciPy; the model still needs one to be compiled

    # -- fit ---------------------------------------------------------------------------------------------------------
    def _fit(self, X, y, sample_weight=None, incremental=False):
        hidden, acts, rates = self._check_params()
        if incremental and self.early_stopping:
            raise ValueError("partial_fit does not support early_stopping=True")
        first_pass = not self.__sklearn_is_fitted__() or (not self.warm_start and not incremental)
        # validation rewrites n_features_in_, feature_names_in_ and the classes: put them back if anything before
        # training fails (bad X, y, sample_weight, random_state or device), so the fitted estimator stays whole
        validated = {k: self.__dict__[k] for k in _VALIDATED if k in self.__dict__}
        try:
            X, Y = self._validate_input(X, _host(y), incremental, reset=first_pass)
            n_samples = X.shape[0]
            weights = None if sample_weight is None else self._check_sample_weight(sample_weight, n_samples)
            random_state = check_random_state(self.random_state)
            if first_pass:
                device = self._device_for(X)  # an unknown or missing device
            elif Y.shape[1] != self.n_outputs_:
                raise ValueError(f"y has {Y.shape[1]} outputs but the estimator was fitted with {self.n_outputs_}; "
                                 "warm_start and partial_fit need the same outputs")
        except BaseException:
            for k in _VALIDATED:
                self.__dict__.pop(k, None)
            self.__dict__.update(validated)
            raise
        if first_pass:
            self._initialize(X, Y, hidden, acts, rates, device, random_state)
        model = self._model
        self._penalty.alpha = float(self.alpha)
        with model.device.scope():
            rows = _Rows(X, model.device, model.dtype)
            targets = self._targets_on(model, Y)
            if self.solver in _STOCHASTIC:
                self._fit_stochastic(rows, Y, targets, weights, n_samples, random_state, incremental)
            else:
                self._fit_lbfgs(rows, targets, weights, n_samples)
            finite = bool(to_numpy(model.parameter_buffer.all_finite()))
        if not finite:
            raise ValueError("Solver produced non-finite parameter weights. The input data may contain large values "
                             "and need to be preprocessed.")
        return self

    def _initialize(self, X, Y, hidden, acts, rates, device, random_state):
        """Everything a first fit starts from: scikit-learn's fitted attributes and a new model."""
        self.n_iter_, self.t_ = 0, 0
        self.n_outputs_ = Y.shape[1]
        self.n_layers_ = len(hidden) + 2
        self._architecture = (list(hidden), list(acts), list(rates))  # as fitted: set_params does not change it
        self.out_activation_ = self._output_activation_name()
        dtype = dtype_name(self.dtype) if self.dtype is not None else (
            "float32" if dtype_name(X.dtype) == "float32" else "float64")
        self._fit_home = _home(X)
        self._model = self._build(X.shape[1], hidden, acts, rates, device, dtype, random_state)
        self._optimizer = None
        self._best = self._model.snapshot()
        for name in ("loss_curve_", "best_loss_", "validation_scores_", "best_validation_score_"):
            self.__dict__.pop(name, None)
        if self.solver in _STOCHASTIC:
            self.loss_curve_ = []
            self._no_improvement_count = 0
            if self.early_stopping:
                self.validation_scores_, self.best_validation_score_, self.best_loss_ = [], -np.inf, None
            else:
                self.best_loss_, self.validation_scores_, self.best_validation_score_ = np.inf, None, None

    def _check_sample_weight(self, sample_weight, n_samples):
        """``sample_weight`` as a host float64 (samples,) array; a number weighs every row alike (scikit-learn's
        rule)."""
        sample_weight = _host(sample_weight)
        if isinstance(sample_weight, numbers.Number):
            sample_weight = np.full(n_samples, sample_weight, dtype=np.float64)
        w = check_array(sample_weight, ensure_2d=False, dtype=np.float64, input_name="sample_weight")
        if w.ndim != 1 or w.shape[0] != n_samples:
            raise ValueError(f"sample_weight.shape == {w.shape}, expected ({n_samples},)!")
        if not np.any(w != 0):
            raise ValueError("Sample weights must contain at least one non-zero number.")
        return w

    def _batch_weights(self, weights, rows, device, dtype):
        """``(weights on the device, scale)``: the batch's weights rescaled to average 1 (portanet's loss divides by
        the row count, scikit-learn by the weight sum) and ``1 / weight sum`` for the penalty."""
        if weights is None:
            return None, 1.0 / len(rows)
        w = weights[rows]
        total = float(w.sum())
        return device.from_host(w * (len(rows) / total), dtype), 1.0 / total

    def _fit_stochastic(self, rows, Y, targets, weights, n_samples, random_state, incremental):
        model = self._model
        dev = model.device
        if not incremental or self._optimizer is None:
            self._optimizer = self._new_optimizer()
        if model.optimizer is not self._optimizer:
            model.compile(model.loss, self._optimizer)
        train, val = np.arange(n_samples), None
        if self.early_stopping:
            stratify = Y.astype(bool) if self._stratify() else None  # as scikit-learn: its error messages too
            train, val = train_test_split(train, random_state=random_state, test_size=self.validation_fraction,
                                          stratify=stratify)
            if val.shape[0] < 2:
                raise ValueError("The validation set is too small. Increase 'validation_fraction' or the size of your "
                                 "dataset.")
            val = (rows.take(val), Y[val], None if weights is None else weights[val])
        n_train = train.shape[0]
        if self.batch_size == "auto":
            batch_size = min(200, n_train)
        else:
            if self.batch_size > n_train:
                warnings.warn("Got `batch_size` less than 1 or larger than sample size. It is going to be clipped")
            batch_size = int(np.clip(self.batch_size, 1, n_train))
        order = np.arange(n_train)
        try:
            self.n_iter_ = 0
            for _ in range(self.max_iter):
                if self.shuffle:  # sklearn.utils.shuffle's draw, without its per-call argument validation
                    permutation = np.arange(n_train)
                    random_state.shuffle(permutation)
                    order = order[permutation]
                total = dev.zeros((), model.dtype)
                for start in range(0, n_train, batch_size):
                    picked = train[order[start:start + batch_size]]
                    wb, self._penalty.scale = self._batch_weights(weights, picked, dev, model.dtype)
                    loss, _ = model.compute_gradients(rows.take(picked), take_rows(targets, picked), wb)
                    model.apply_gradients()
                    total = total + loss * float(len(picked))
                self.n_iter_ += 1
                self.loss_ = float(to_numpy(total)) / n_train
                self.t_ += n_train
                self.loss_curve_.append(self.loss_)
                if self.verbose:
                    print("Iteration %d, loss = %.8f" % (self.n_iter_, self.loss_))
                self._update_no_improvement_count(val)
                if self.solver == "sgd" and self.learning_rate == "invscaling":
                    self._optimizer.learning_rate = self.learning_rate_init / (self.t_ + 1) ** self.power_t
                if self._no_improvement_count > self.n_iter_no_change:
                    what = ("Validation score did not improve more than tol=%f for %d consecutive epochs." if val
                            is not None else "Training loss did not improve more than tol=%f for %d consecutive "
                            "epochs.") % (self.tol, self.n_iter_no_change)
                    if self._stop(what):
                        break
                    self._no_improvement_count = 0
                if incremental:
                    break
                if self.n_iter_ == self.max_iter:
                    warnings.warn("Stochastic Optimizer: Maximum iterations (%d) reached and the optimization hasn't "
                                  "converged yet." % self.max_iter, ConvergenceWarning, stacklevel=4)
        except KeyboardInterrupt:
            warnings.warn("Training interrupted by user.")
        if self.early_stopping:
            model.restore(self._best)

    def _stop(self, message) -> bool:
        """scikit-learn's rule when the loss (or validation score) stalls: stop, except that the adaptive SGD
        schedule divides the rate by 5 and goes on until the rate is 1e-6 or less."""
        if self.solver == "sgd" and self.learning_rate == "adaptive":
            if self._optimizer.learning_rate > 1e-6:
                self._optimizer.learning_rate = self._optimizer.learning_rate / 5.0
                if self.verbose:
                    print(message + " Setting learning rate to %f" % self._optimizer.learning_rate)
                return False
            message += " Learning rate too small."
        if self.verbose:
            print(message + " Stopping.")
        return True

    def _update_no_improvement_count(self, val):
        if val is not None:
            score = self._validation_score(*val)
            self.validation_scores_.append(score)
            if self.verbose:
                print("Validation score: %f" % score)
            if score < self.best_validation_score_ + self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if score > self.best_validation_score_:
                self.best_validation_score_ = score
                self._best = self._model.snapshot()
            return
        if self.loss_curve_[-1] > self.best_loss_ - self.tol:
            self._no_improvement_count += 1
        else:
            self._no_improvement_count = 0
        if self.loss_curve_[-1] < self.best_loss_:
            self.best_loss_ = self.loss_curve_[-1]

    def _fit_lbfgs(self, rows, targets, weights, n_samples):
        """SciPy's L-BFGS-B over the flat parameter vector (host float64), on the whole data set at once; the loss
        and gradient come from the model on its device."""
        model = self._model
        dev, buffer = model.device, model.parameter_buffer
        everything = np.arange(n_samples)
        x = rows.take(everything)
        w, self._penalty.scale = self._batch_weights(weights, everything, dev, model.dtype)

        def loss_and_gradient(flat):
            buffer.values[...] = dev.from_host(flat, model.dtype)
            loss, _ = model.compute_gradients(x, targets, w)
            return float(to_numpy(loss)), to_numpy(buffer.grads).astype(np.float64)

        start = to_numpy(buffer.values).astype(np.float64)
        result = scipy.optimize.minimize(loss_and_gradient, start, method="L-BFGS-B", jac=True,
                                         options={"maxfun": self.max_fun, "maxiter": self.max_iter, "gtol": self.tol})
        self.n_iter_ = min(result.nit, self.max_iter)
        if result.status != 0:
            message = (f"lbfgs failed to converge after {self.n_iter_} iteration(s) (status={result.status}):\n"
                       f"{result.message}\n")
            if self.n_iter_ == self.max_iter:
                message += f"\nIncrease the number of iterations to improve the convergence (max_iter={self.max_iter})."
            warnings.warn(message, ConvergenceWarning, stacklevel=4)
        self.loss_ = float(result.fun)
        buffer.values[...] = dev.from_host(result.x, model.dtype)
        if self.verbose:
            print("L-BFGS: %d iterations, %d loss evaluations, loss = %.8f" % (self.n_iter_, result.nfev, self.loss_))

    # -- predict ---------------------------------------------------------------------------------------------------
    def _outputs(self, X):
        """The network's outputs (samples, outputs) for validated X: a NumPy array, or under array_api_dispatch an
        array of X's namespace on X's device."""
        model = self._model
        if scipy.sparse.issparse(X):
            X = X.tocsr()
            parts = [model.predict(X[i:i + 1024].toarray(), to_numpy=True) for i in range(0, X.shape[0], 1024)]
            return np.concatenate(parts) if parts else np.zeros((0, self.n_outputs_), model.dtype)
        if not (_dispatch() and _foreign(X)):
            return model.predict(X, to_numpy=True)
        out = model.predict(X)
        target = resolve_device(array_api_compat.device(X), backend=array_api_compat.array_namespace(X))
        return out if target == model.device and target.backend == model.device.backend else target.asarray(out)

    def _validated(self, X, method):
        check_is_fitted(self)
        X = validate_data(self, X, accept_sparse=["csr", "csc"], dtype=_float_dtypes(X), reset=False)
        if _dispatch() and _home(X) != self._fit_home:
            (fit_lib, fit_device), (lib, device) = self._fit_home, _home(X)
            raise ValueError(f"Inputs passed to {type(self).__name__}.{method}() must use the same namespace and the "
                             f"same device as those passed to fit(): fit saw {fit_lib} on {fit_device}, {method} got "
                             f"{lib} on {device}.")
        return X

    # -- pickling ----------------------------------------------------------------------------------------------------
    def __getstate__(self):
        """The model travels as the bytes of a portanet safetensors file (weights and optimizer state; no pickled
        arrays) with its random generators' states (JSON-able: dropout masks go on as the original's would, as
        scikit-learn's pickled random state does for its shuffles); its device by name. Unpickling restores it
        there, or on the CPU (with a warning) where that device does not exist (a dropout generator of another kind
        then restarts from its seed)."""
        state = dict(super().__getstate__())  # object.__getstate__ hands out the live __dict__
        model = state.pop("_model", None)
        state.pop("_best", None)
        state.pop("_penalty", None)
        state.pop("_optimizer", None)
        if model is not None:
            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, "model.safetensors")
                _io.save(model, path, include_optimizer=True)
                with open(path, "rb") as f:
                    state["_model_file"] = f.read()
            state["_model_place"] = (model.device.backend, model.device.name, model.dtype, model.input_dim)
            state["_model_random"] = model.random_state()
            state["_optimizer_spec"] = _optimizer_spec(self._optimizer)
        return state

    def __setstate__(self, state):
        data, place = state.pop("_model_file", None), state.pop("_model_place", None)
        spec = state.pop("_optimizer_spec", None)
        random = state.pop("_model_random", None)  # absent from pickles written before it was kept
        super().__setstate__(state)
        self._model = self._optimizer = None
        if data is None:
            return
        backend, name, dtype, input_dim = place
        try:
            device = resolve_device(name.split(":", 1)[1] if name.startswith(f"{backend}:") else name, backend)
        except (ImportError, RuntimeError, ValueError) as exc:
            warnings.warn(f"the estimator was fitted on {name} ({backend}), which is not available here ({exc}); it is "
                          "restored on the CPU (NumPy)", RuntimeWarning, stacklevel=2)
            device = resolve_device("cpu")
        # the model as it was fitted, whatever set_params changed since (the parameters apply at the next fit)
        hidden, acts, rates = self._architecture
        optimizer = _optimizers.SGD() if spec is None else _optimizer_from_spec(spec)

        def factory(config):
            model = self._network(hidden, acts, rates, device, dtype)
            model.compile(self._loss_object(), optimizer)
            return model

        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "model.safetensors")
            with open(path, "wb") as f:
                f.write(data)
            self._model = _io.load(path, factory, check_config=False)
        if random is not None:
            self._model.set_random_state(random)
        if spec is not None:
            self._optimizer = optimizer
        self._best = self._model.snapshot()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        tags.array_api_support = True
        return tags


def _optimizer_spec(optimizer):
    """The fitted stochastic optimizer's kind and hyperparameters (its current rate included), or None."""
    if optimizer is None:
        return None
    if isinstance(optimizer, _SklearnSGD):
        return ("sgd", optimizer.learning_rate, optimizer.momentum, optimizer.nesterov)
    return ("adam", optimizer.learning_rate, optimizer.beta_1, optimizer.beta_2, optimizer.epsilon_hat)


def _optimizer_from_spec(spec):
    kind, *args = spec
    return (_SklearnSGD if kind == "sgd" else _SklearnAdam)(*args)


def _stochastic_solver(estimator) -> bool:
    if estimator.solver not in _STOCHASTIC:
        raise AttributeError(f"partial_fit is only available for stochastic optimizers. {estimator.solver} is not "
                             "stochastic.")
    return True


_PARAMETERS_DOC = """
    Parameters, named, defaulted and validated as in scikit-learn's MLP (1.9): ``hidden_layer_sizes``,
    ``activation`` ("identity", "logistic", "tanh", "relu", or any portanet activation name; here also a list with
    one name per hidden layer), ``solver`` ("adam", "sgd", "lbfgs": SciPy's L-BFGS-B on the flat parameter vector,
    with ``max_fun``), ``alpha`` (L2 penalty on the weights, not the intercepts, divided by each batch's
    sample-weight sum), ``batch_size``, ``learning_rate`` / ``learning_rate_init`` / ``power_t``, ``max_iter``,
    ``shuffle``, ``random_state``, ``tol``, ``verbose``, ``warm_start``, ``momentum``, ``nesterovs_momentum``,
    ``early_stopping``, ``validation_fraction``, ``beta_1``, ``beta_2``, ``epsilon``, ``n_iter_no_change``,
    ``max_fun``. portanet's own:

    - ``dropout``: 0.0 (default) or a rate in [0, 1), or one rate per hidden layer, applied after each hidden
      layer's activation while training with "adam" or "sgd" (lbfgs refuses it: its objective must be
      deterministic).
    - ``device`` / ``backend``: where to train and predict, as ``portanet.Model`` takes them ("cpu", "cuda",
      "cuda:1", ``backend="torch"``, ...). None (default): NumPy on the CPU, or, when scikit-learn's
      ``array_api_dispatch`` is on, the namespace and device of X.
    - ``dtype``: None (default: float32 when X is float32, else float64, as scikit-learn), "float32" (faster on
      GPUs) or "float64".

    Initialization, losses, updates, schedules and stopping rules are scikit-learn's; with ``random_state`` set,
    float64 data and no dropout, training follows scikit-learn's trajectory to rounding. Results are NumPy arrays;
    with ``sklearn.set_config(array_api_dispatch=True)`` they are arrays of X's namespace on X's device, and
    ``predict`` refuses inputs from another namespace or device than fit's (scikit-learn's convention).
    ``coefs_`` and ``intercepts_`` are NumPy arrays (live views of the weights on NumPy, copies elsewhere).
    Pickles carry the weights and optimizer state as a portanet safetensors file; they unpickle on the same device,
    or on the CPU (with a RuntimeWarning) where it does not exist, as the network was fitted (parameters changed
    by ``set_params`` since apply at the next fit that is not a warm start).
"""


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """Multi-layer perceptron classifier: scikit-learn's ``MLPClassifier``, trained by portanet.

    Minimizes the log-loss: softmax output with cross-entropy for multiclass targets, one logistic unit for binary
    targets, one logistic unit per label (binary cross-entropy summed over labels) for multilabel indicator
    targets; labels of any type (strings, integers). ``fit(X, y, sample_weight=None)``, ``partial_fit(X, y,
    sample_weight=None, classes=None)`` (``classes`` required on the first call; "adam" and "sgd" only),
    ``predict``, ``predict_proba``, ``predict_log_proba``, ``score``.
    """ + _PARAMETERS_DOC

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam", alpha=0.0001,
                 batch_size="auto", learning_rate="constant", learning_rate_init=0.001, power_t=0.5, max_iter=200,
                 shuffle=True, random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-8, n_iter_no_change=10, max_fun=15000, dropout=0.0, device=None, backend=None,
                 dtype=None):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.dropout = dropout
        self.device = device
        self.backend = backend
        self.dtype = dtype

    def fit(self, X, y, sample_weight=None):
        """Fit to X (samples, features), dense or SciPy sparse, and labels y (samples,) or a multilabel indicator
        matrix (samples, labels); ``sample_weight`` (samples,) or one number weighs each row's loss. Returns
        self."""
        return self._fit(X, y, sample_weight, incremental=False)

    @available_if(_stochastic_solver)
    def partial_fit(self, X, y, sample_weight=None, classes=None):
        """One epoch over (X, y); ``classes`` (every label the estimator will see) is required on the first call.
        Labels not in ``classes_`` raise ValueError. ``classes`` may be an array of any namespace (it is read on the
        host, like y). Returns self."""
        classes = _host(classes)
        known = getattr(self, "classes_", None)
        known = None if known is None else to_numpy(known)
        if known is None and classes is None:
            raise ValueError("classes must be passed on the first call to partial_fit.")
        if classes is not None and known is not None and not np.array_equal(known, unique_labels(classes)):
            raise ValueError(f"`classes={classes!r}` is not the same as on last call to partial_fit, was: {known!r}")
        if classes is not None and known is None:
            self.classes_ = unique_labels(classes)
            self._label_binarizer = LabelBinarizer()
            y_host = _host(y)
            self._label_binarizer.fit(y_host if type_of_target(y_host).startswith("multilabel") else classes)
        return self._fit(X, y, sample_weight, incremental=True)

    def _validate_input(self, X, y, incremental, reset):
        X, y = validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True, dtype=_float_dtypes(X),
                             reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if not hasattr(self, "classes_") or (not self.warm_start and not incremental):
            self._label_binarizer = LabelBinarizer()
            self._label_binarizer.fit(y)
            self.classes_ = self._label_binarizer.classes_
        else:
            classes, known = unique_labels(y), to_numpy(self.classes_)
            if self.warm_start:
                if set(classes) != set(known):
                    raise ValueError("warm_start can only be used where `y` has the same classes as in the previous "
                                     f"call to fit. Previously got {known}, `y` has {classes}")
            elif len(np.setdiff1d(classes, known, assume_unique=True)):
                raise ValueError(f"`y` has classes not in `self.classes_`. `self.classes_` has {known}. 'y' has "
                                 f"{classes}.")
        if _dispatch() and _foreign(X):  # scikit-learn's array-API convention: fitted arrays live where X does
            host = to_numpy(self.classes_)
            if host.dtype.kind in "iuf":  # string labels stay NumPy
                xp = array_api_compat.array_namespace(X)
                self.classes_ = xp.asarray(host, device=array_api_compat.device(X), copy=True)
        return X, self._label_binarizer.transform(y)

    def _output_activation_name(self):
        return "softmax" if self._label_binarizer.y_type_ == "multiclass" else "logistic"

    def _stratify(self) -> bool:
        return self.n_outputs_ == 1  # scikit-learn's rule: binary targets only (not multiclass, not multilabel)

    def _targets_on(self, model, Y):
        """Class indices (int64) for the softmax output, 0/1 floats for logistic units, on the model's device."""
        if self.out_activation_ == "softmax":
            return model.device.from_host(np.argmax(Y, axis=1).astype(np.int64))
        return model.device.from_host(Y, model.dtype)

    def _validation_score(self, X, Y, w):
        predicted = self._labels(self._model.predict(X, to_numpy=True))
        truth = self._label_binarizer.inverse_transform(Y.ravel() if self.n_outputs_ == 1 else Y)
        return float(accuracy_score(truth, predicted, sample_weight=w))

    def _labels(self, out):
        """Labels from outputs (samples, outputs): the most probable class, or each probability above 0.5."""
        if not _foreign(out):
            return self._label_binarizer.inverse_transform(out.ravel() if self.n_outputs_ == 1 else out)
        xp = array_api_compat.array_namespace(out)
        if self._label_binarizer.y_type_.startswith("multilabel"):
            return xp.astype(out > 0.5, xp.int64)
        classes = self._label_binarizer.classes_
        if classes.dtype.kind not in "iuf" or len(classes) < 2:
            return self._labels(to_numpy(out))
        index = xp.argmax(out, axis=1) if self.out_activation_ == "softmax" else xp.astype(out[:, 0] > 0.5, xp.int64)
        return xp.take(xp.asarray(classes, device=array_api_compat.device(out)), index, axis=0)

    def predict(self, X):
        """Predicted labels (samples,), or an indicator matrix (samples, labels) for multilabel targets."""
        return self._labels(self._outputs(self._validated(X, "predict")))

    def predict_proba(self, X):
        """Probabilities (samples, classes) in the order of ``classes_`` (for multilabel targets, each label's)."""
        return self._probabilities(X, "predict_proba")

    def _probabilities(self, X, method):
        out = self._outputs(self._validated(X, method))
        if self.n_outputs_ != 1:
            return out
        if not _foreign(out):
            return np.hstack([1.0 - out, out])
        return array_api_compat.array_namespace(out).concat([1.0 - out, out], axis=1)

    def predict_log_proba(self, X):
        """``log(predict_proba(X))``."""
        probs = self._probabilities(X, "predict_log_proba")
        return np.log(probs) if not _foreign(probs) else array_api_compat.array_namespace(probs).log(probs)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multi-layer perceptron regressor: scikit-learn's ``MLPRegressor``, trained by portanet.

    ``loss``: "squared_error" (half the squared error summed over outputs, identity output) or "poisson" (half the
    Poisson deviance with an exp output, the log link; y must be >= 0). Single or multiple outputs. ``fit(X, y,
    sample_weight=None)``, ``partial_fit(X, y, sample_weight=None)`` ("adam" and "sgd" only), ``predict``,
    ``score`` (R^2).
    """ + _PARAMETERS_DOC

    def __init__(self, loss="squared_error", hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant", learning_rate_init=0.001, power_t=0.5,
                 max_iter=200, shuffle=True, random_state=None, tol=1e-4, verbose=False, warm_start=False,
                 momentum=0.9, nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1, beta_1=0.9,
                 beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000, dropout=0.0, device=None,
                 backend=None, dtype=None):
        self.loss = loss
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.dropout = dropout
        self.device = device
        self.backend = backend
        self.dtype = dtype

    def fit(self, X, y, sample_weight=None):
        """Fit to X (samples, features), dense or SciPy sparse, and targets y (samples,) or (samples, outputs);
        ``sample_weight`` (samples,) or one number weighs each row's loss. Returns self."""
        return self._fit(X, y, sample_weight, incremental=False)

    @available_if(_stochastic_solver)
    def partial_fit(self, X, y, sample_weight=None):
        """One epoch over (X, y). Returns self."""
        return self._fit(X, y, sample_weight, incremental=True)

    def _check_params(self):
        _choice(type(self).__name__, "loss", self.loss, {"squared_error", "poisson"})
        return super()._check_params()

    def _validate_input(self, X, y, incremental, reset):
        X, y = validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True, y_numeric=True,
                             dtype=_float_dtypes(X), reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if self.loss == "poisson" and np.any(y < 0):
            raise ValueError(f"loss='poisson' needs targets y >= 0 (counts or rates), got a minimum of {np.min(y)}")
        return X, np.asarray(y, dtype=np.float64).reshape(y.shape[0], -1)

    def _output_activation_name(self):
        return "exp" if self.loss == "poisson" else "identity"

    def _stratify(self) -> bool:
        return False

    def _targets_on(self, model, Y):
        return model.device.from_host(Y, model.dtype)

    def _validation_score(self, X, Y, w):
        predicted = self._model.predict(X, to_numpy=True)
        if not np.isfinite(predicted).all():
            return np.nan
        return float(r2_score(Y.ravel() if Y.shape[1] == 1 else Y,
                              predicted.ravel() if predicted.shape[1] == 1 else predicted, sample_weight=w))

    def predict(self, X):
        """Predictions (samples,) for one output, else (samples, outputs)."""
        out = self._outputs(self._validated(X, "predict"))
        if out.shape[1] != 1:
            return out
        return out.reshape(-1) if not _foreign(out) else array_api_compat.array_namespace(out).reshape(out, (-1,))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags
