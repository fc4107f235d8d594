"""Model: the architecture (layers, build), the training step (forward, loss, backward, apply_gradients), predict,
placement (``to()``), config, summary and persistence entry points.

The fit/evaluate loops live in :mod:`portanet.training`, parameter storage in :mod:`portanet.params`, the file
format in :mod:`portanet.io`. Math goes through the device's namespace ``xp``.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

from . import checks as _checks
from . import _interrupts
from . import data as _data
from . import export as _export
from . import io as _io
from . import layers as _layers
from . import losses as _losses
from . import metrics as _metrics
from . import optimizers as _optimizers
from . import summary as _summary
from . import training as _training
from .backends import dtype_name, host_rng, move_target, resolve_device
from .params import ParameterBuffer

__all__ = ["Model", "load"]

_FLOATS = ("float32", "float64")
_DERIVED = ("_random", "_need_input_grad", "_regularized", "_stateful", "_state_updates", "_bound_rules")


def _on_device(method):
    """Run a Model method inside its device's scope: allocations land on that device (CuPy, multi-GPU) and no
    autograd graph is recorded (torch)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._device.scope():
            return method(self, *args, **kwargs)

    return wrapper


class Model:
    """A feed-forward network of :class:`~portanet.layers.Layer` objects with one flat parameter buffer.

    ``layers``: a list of layers. ``device``: "cpu" (NumPy), "cuda" / "cuda:N" (CuPy), or a namespace's own device
    with ``backend=`` (``Model(backend=array_api_strict, device=array_api_strict.Device("device1"))``,
    ``backend="torch"``). ``dtype``: "float32" (default) or "float64". ``seed``: one seed gives the same initial
    weights, shuffles and validation splits on every backend.
    """

    def __init__(self, layers=None, device="cpu", dtype="float32", seed=None, backend=None):
        if isinstance(layers, _layers.Layer):
            raise TypeError(f"layers must be a list of layers, got a single {type(layers).__name__}: write "
                            f"Model([{type(layers).__name__}(...)])")
        if layers is not None and not isinstance(layers, (list, tuple)):
            raise TypeError(f"layers must be a list of portanet layers, got {type(layers).__name__}")
        if dtype_name_or_none(dtype) not in _FLOATS:
            raise ValueError(f"dtype must be one of {_FLOATS}, got {dtype!r}")
        self._device = resolve_device(device, backend)
        self.dtype = dtype_name(dtype)
        self.seed = seed
        self.rng = host_rng(seed)
        self.layers: list = []
        self._layer_names: set = set()  # names in use and layers per kind: add() in O(1), loading in linear time
        self._kind_counts: dict = {}
        self.input_dim = None
        self.loss = None
        self.optimizer = None
        self.metrics: list = []
        self.stop_training = False
        self.history = None
        self._params: ParameterBuffer | None = None
        self._random = None
        self._random_seed = None
        self._state_updates: list = []  # computed by compute_gradients, written by apply_gradients
        self._bound_rules = None  # the optimizer's decay rules the current decay mask was built from
        added = []
        try:
            for layer in layers or []:
                name = getattr(layer, "name", None)
                self.add(layer)
                added.append((layer, name))
        except BaseException:  # a model that failed to construct owns nothing: its layers can serve another one
            for layer, name in added:
                layer.detach()
                layer.name = name
            raise

    # -- structure ------------------------------------------------------------------------
    @property
    def device(self):
        """Where the model lives (compares equal to its name, e.g. ``model.device == "cpu"``)."""
        return self._device

    @property
    def backend(self) -> str:
        """Name of the array library underneath: "numpy", "cupy", "torch", "array_api_strict", ..."""
        return self._device.backend

    @property
    def xp(self):
        """The array namespace every computation of this model goes through."""
        return self._device.xp

    @property
    def built(self) -> bool:
        return self._params is not None

    @property
    def parameter_buffer(self) -> ParameterBuffer:
        """The flat parameter, gradient and state buffers (:class:`~portanet.params.ParameterBuffer`)."""
        self._require_built("parameter_buffer")
        return self._params

    def add(self, layer) -> "Model":
        """Append ``layer``; a layer belongs to one model only (ValueError otherwise)."""
        if not isinstance(layer, _layers.Layer):
            raise TypeError("layer must be a portanet Layer (Dense, Dropout, Activation, LayerNormalization, "
                            f"BatchNormalization), got {type(layer).__name__}")
        if self.built:
            raise RuntimeError("cannot add layers to a model that is already built (it has trained or seen data)")
        name = layer.name
        if name is None:
            name = f"{layer.kind}_{self._kind_counts.get(layer.kind, 0)}"
        if name in self._layer_names:
            raise ValueError(f"layer name {name!r} is already used in this model")
        layer.attach(self, f"layer {name!r}")
        layer.name = name
        self.layers.append(layer)
        self._layer_names.add(name)
        self._kind_counts[layer.kind] = self._kind_counts.get(layer.kind, 0) + 1
        return self

    @property
    def output_dim(self) -> int | None:
        """Width of the model's output (None until the input width is known)."""
        return None if self.input_dim is None else self.output_width(self.input_dim)

    def output_width(self, input_dim: int) -> int:
        """Width of the output for inputs of width ``input_dim`` (computed without building)."""
        for layer in self.layers:
            input_dim = layer.output_dim(input_dim)
        return input_dim

    def check_input_dim(self, input_dim: int, name: str = "x") -> None:
        """Raise ValueError when inputs of width ``input_dim`` cannot feed this model (nothing changes)."""
        if not self.layers:
            raise RuntimeError("the model has no layers: add at least one Dense layer")
        if input_dim < 1:
            raise ValueError(f"{name} has 0 features (shape (samples, 0)): there is nothing to learn from")
        expected = self.input_dim if self.built else self.layers[0].input_dim
        if expected is not None and input_dim != expected:
            what = "the model expects" if self.built else "the first layer was declared with input_dim="
            raise ValueError(f"{name} has {input_dim} features but {what}{' ' if self.built else ''}{expected}")

    @_on_device
    def build(self, input_dim: int) -> "Model":
        """Allocate and initialize parameters for inputs of width ``input_dim`` (done by ``fit`` when first needed)."""
        self.check_input_dim(input_dim)
        if self.built:
            return self
        _checks.check_setup(self.layers, self.loss, self.metrics, input_dim, warn_likely=False)
        layout, values, states, dim = [], [], [], input_dim
        for layer in self.layers:
            shapes, state_shapes = layer.param_shapes(dim), layer.state_shapes(dim)
            init, init_state = layer.init_params(self.rng, dim), layer.init_state(dim)
            layout.append((layer.name, shapes, state_shapes))
            values += [init[k] for k in shapes]
            states += [init_state[k] for k in state_shapes]
            dim = layer.output_dim(dim)
        dev = self._device
        params = ParameterBuffer.from_host(dev, self.dtype, layout, values, states)
        self.input_dim = input_dim
        self._random_seed = int(self.rng.integers(2**62))
        self._install(params, dev.random_source(self._random_seed))
        return self

    def _install(self, params: ParameterBuffer, random_source) -> None:
        """Make ``params`` the model's buffer and bind every layer to its views."""
        self._params, self._random = params, random_source
        views, kernels = params.views(), self._device.kernels
        for layer in self.layers:
            p, g, s = views[layer.name]
            layer.bind(self.xp, p, g, s, random_source, kernels)
        need, self._need_input_grad = False, []
        for layer in self.layers:  # a layer needs its input gradient when some layer before it has parameters
            self._need_input_grad.append(need)
            need = need or bool(layer.param_shapes(1))
        self._regularized = [layer for layer in self.layers if layer.penalties()]
        self._stateful = [(i, layer) for i, layer in enumerate(self.layers) if layer.state]
        self._state_updates = []
        self._bind_optimizer()

    def _bind_optimizer(self) -> None:
        """Tell the optimizer where each parameter tensor lies (``clipnorm``) and which entries weight decay
        applies to (each layer's default, kernels only, overridden by the optimizer's include / exclude rules).
        Runs whenever the optimizer is compiled in or the buffer is built or moved, and before a step after the
        optimizer's rules changed."""
        opt, params = self.optimizer, self._params
        if opt is None or params is None:
            return
        segments = [(offset, size) for _, offset, size, _ in params.segments()]
        opt.set_segments(segments or None)
        defaults = {f"{layer.name}.{key}": layer.decays_by_default(key)
                    for layer in self.layers for key in layer.params}
        opt.set_decay_mask(params.mask(lambda name: opt.uses_weight_decay(name, defaults[name])) if segments else None)
        self._bound_rules = opt.decay_rules
        unknown = [name for kind in ("exclude", "include") for name in opt.decay_rules[kind][0] if name not in defaults]
        if unknown:  # exact names are for parameters this model has: one that matches none is a typo
            warnings.warn(f"the optimizer's weight decay rules (var_list) name {unknown}, which this model has no "
                          f"parameter called; its parameters are {list(defaults)} (var_names takes patterns)",
                          UserWarning, stacklevel=3)

    @property
    def min_training_rows(self) -> int:
        """The fewest rows a training batch may have (2 with a BatchNormalization layer, else 1)."""
        return max((layer.min_training_rows for layer in self.layers), default=1)

    def _require_built(self, what):
        if not self.built:
            raise RuntimeError(f"{what} needs a built model: call fit() or build(input_dim) first")

    def parameters(self) -> dict:
        """Ordered ``{"dense_0.kernel": array, ...}``: live views on the model's device."""
        self._require_built("parameters()")
        return self._params.parameters()

    @_on_device
    def set_parameters(self, values: dict) -> None:
        """Overwrite parameters from ``{name: array}`` (any library/device); names, shapes and finiteness (no NaN or
        inf) are checked first: on error nothing changes (:meth:`ParameterBuffer.assign`)."""
        self._require_built("set_parameters()")
        self._params.assign(values)

    def count_params(self) -> int:
        self._require_built("count_params()")
        return int(self._params.values.shape[0])

    # -- compile ---------------------------------------------------------------------------
    def compile(self, loss, optimizer="adam", metrics=None) -> "Model":
        """Choose the loss (required), optimizer and metrics. Calling it again keeps the trained weights (a new
        optimizer state unless the same optimizer object is passed). An optimizer object serves one model only.

        The output layer is checked against the loss and metrics (:func:`portanet.checks.check_setup`): a setup that
        cannot learn raises ValueError, a likely mistake warns (:class:`~portanet.checks.SetupWarning`). On error
        the previous loss, optimizer and metrics stay in place."""
        if loss is None:
            raise TypeError("compile() needs a loss: a name such as 'sparse_categorical_crossentropy' or 'mse', a "
                            "config dict or a Loss, got None")
        loss_obj = _losses.get(loss)
        opt = _optimizers.get(optimizer)
        if metrics is not None and not isinstance(metrics, (list, tuple)):
            raise TypeError(f"metrics must be a list, got {type(metrics).__name__}: write metrics=[{metrics!r}]")
        mets = [_metrics.get(m) for m in (metrics or [])]
        _metrics.check_names(mets)
        _checks.check_setup(self.layers, loss_obj, mets, self.input_dim)
        opt.attach(self, f"optimizer {type(opt).__name__}")
        if self.optimizer is not None and self.optimizer is not opt:
            self.optimizer.detach()
        self.loss, self.optimizer, self.metrics = loss_obj, opt, mets
        self._bind_optimizer()
        return self

    @property
    def _fusion(self) -> str:
        """How the loss meets the output, decided here only: "layer" (a cross-entropy fused with the last Dense's
        softmax/sigmoid: loss from the logits, gradient p - y), "logits" (``from_logits=True``: the output is the
        logits) or "plain"."""
        last = self.layers[-1]
        if self.loss.from_logits:
            return "logits"
        if self.loss.fuses and isinstance(last, _layers.Dense) and last.activation.name == self.loss.fuses:
            return "layer"
        return "plain"

    def _require_compiled(self, what):
        if self.loss is None:
            raise RuntimeError(f"{what} needs a compiled model: call compile(loss=..., optimizer=...) first")

    # -- the step: device batches in, device arrays out --------------------------------------
    def _forward(self, x, training, keep_caches):
        """``(output, logits, caches)``; ``output`` is exactly what predict returns, ``logits`` the last Dense's
        pre-activation when the loss is fused with it (else None)."""
        layers, caches, h = self.layers, [], x
        fused = self._fusion == "layer"
        for layer in layers[:-1] if fused else layers:
            h, cache = layer.forward_with_cache(h, training)
            caches.append(cache if keep_caches else None)
        if not fused:
            return h, None, caches
        last = layers[-1]
        z = last.logits(h)
        out = last.activate(self._device.copy(z))  # the activation may overwrite its input: the loss needs z
        caches.append((h, None, out) if keep_caches else None)
        return out, z, caches

    def _loss(self, out, logits, y, sample_weight):
        """``(loss, gradient)``: the 0-d weighted batch mean and dL/d(out), or dL/d(logits) when fused."""
        xp, loss = self.xp, self.loss
        if logits is not None:
            per, grad = loss.per_sample_logits(logits, y, xp, probs=out, kernels=self._device.kernels)
        elif self._fusion == "logits":
            per, grad = loss.per_sample_logits(out, y, xp)
        else:
            per, grad = loss.per_sample(out, y, xp)
        return _losses.reduce(per, grad, xp, sample_weight)

    def _penalty(self, loss, accumulate_grads):
        """``loss`` plus the layers' regularization penalties (their gradients added to the gradient buffer with
        ``accumulate_grads``), all on the device."""
        for layer in self._regularized:
            loss = loss + layer.regularization(accumulate_grads)
        return loss

    @_on_device
    def compute_gradients(self, x, y, sample_weight=None, training=True):
        """Forward, loss and backward for one device batch; fills the gradient buffer.

        x: (batch, in) and y on the model's device. Returns ``(loss, output)``: the 0-d batch loss (the layers'
        regularization penalties included) and the output (batch, out), exactly what predict returns for x
        (dropout on and batch statistics for BatchNormalization when ``training``). The non-trainable state a
        training forward moves to (BatchNormalization's moving statistics) is kept for :meth:`apply_gradients` to
        write: nothing in the model changes here.
        """
        out, logits, caches = self._forward(x, training, keep_caches=True)
        loss, grad = self._loss(out, logits, y, sample_weight)
        last = len(self.layers) - 1
        for i in range(last, -1, -1):
            fused = {"fused": True} if logits is not None and i == last else {}
            grad = self.layers[i].backward(grad, caches[i], self._need_input_grad[i], **fused)
            if not self._need_input_grad[i]:  # no layer below has parameters (input dropout, an activation or a
                break                         # bare normalization first): nothing is left to backpropagate
        loss = self._penalty(loss, accumulate_grads=True)
        self._state_updates = [(layer, layer.updated_state(caches[i])) for i, layer in self._stateful] \
            if training else []
        return loss, out

    @_on_device
    def apply_gradients(self) -> None:
        """One optimizer step from the gradient buffer (filled by :meth:`compute_gradients`), then the
        non-trainable state of that training forward is written (BatchNormalization's moving statistics); whole or
        not at all: Ctrl-C waits until it is complete."""
        if self.optimizer.decay_rules is not self._bound_rules:
            self._bind_optimizer()
        with _interrupts.update():
            self.optimizer.step(self._params.values, self._params.grads, fast=self._device.kernels)
            updates, self._state_updates = self._state_updates, []
            for layer, values in updates:
                for key, value in values.items():
                    layer.state[key][...] = value

    @_on_device
    def test_step(self, x, y, sample_weight=None):
        """``(loss, output)`` for one device batch in inference mode (regularization penalties included in the
        loss, as in Keras); nothing changes."""
        out, logits, _ = self._forward(x, False, keep_caches=False)
        return self._penalty(self._loss(out, logits, y, sample_weight)[0], accumulate_grads=False), out

    @_on_device
    def predict_step(self, x):
        """Output (batch, out) for one device batch in inference mode; nothing changes."""
        for layer in self.layers:
            x = layer.forward(x, False)
        return x

    def prepare_batch(self, x, y=None, sample_weight=None):
        """Validate one custom-loop batch and send host data to the device (data on another device raises);
        builds the model on first use. Returns ``(x, y, sample_weight)`` on the model's device
        (:func:`portanet.data.device_batch`)."""
        return _data.device_batch(self, x, y, sample_weight)

    def check_targets(self, y, input_dim=None, name="y", values=True) -> None:
        """Raise ValueError when targets ``y`` do not fit the loss and the output width (nothing changes)."""
        self.loss.check_targets(y, self.output_width(input_dim or self.input_dim), name, values=values)

    @_on_device
    def train_step(self, x, y, sample_weight=None):
        """One optimizer step on one batch; returns the batch loss as a 0-d array on the device (no host sync)."""
        self._require_compiled("train_step()")
        _training.check_not_training(self, "train_step()")
        xb, yb, wb = self.prepare_batch(x, y, sample_weight)
        loss, _ = self.compute_gradients(xb, yb, wb)
        self.apply_gradients()
        return loss

    @_on_device
    def loss_and_grads(self, x, y, sample_weight=None, training=False):
        """``(loss: float, {name: gradient})`` for one batch, without updating anything.

        ``training=False`` (default) disables dropout and makes BatchNormalization use its moving statistics, so the
        result is deterministic; ``training=True`` uses dropout and batch statistics (the moving ones still do not
        change). The loss and gradients include the layers' regularization penalties.
        """
        self._require_compiled("loss_and_grads()")
        _training.check_not_training(self, "loss_and_grads()")
        xb, yb, wb = self.prepare_batch(x, y, sample_weight)
        loss, _ = self.compute_gradients(xb, yb, wb, training=training)
        self._state_updates = []
        return float(loss), {name: self._device.copy(g) for name, g in self._params.gradients().items()}

    # -- fit / evaluate / predict ----------------------------------------------------------
    @_on_device
    def fit(self, x, y=None, **kwargs):
        """Train; see :func:`portanet.training.fit` for the arguments. Returns a :class:`~portanet.History`.

        When the data fails while it is read (:class:`~portanet.data.StreamError`), a model that was not built
        before the call is not built after it."""
        with self._unbuilt_on(_data.StreamError):
            return _training.fit(self, x, y, **kwargs)

    @_on_device
    def evaluate(self, x, y=None, **kwargs) -> dict:
        """Mean loss and metrics; see :func:`portanet.training.evaluate`. Builds an unbuilt model (its initial
        weights, the same a later ``fit`` would draw); when it raises, the model is as it was, unbuilt included."""
        with self._unbuilt_on(BaseException):
            return _training.evaluate(self, x, y, **kwargs)

    @contextlib.contextmanager
    def _unbuilt_on(self, errors):
        """An unbuilt model that a call builds is unbuilt again, with its host generator as before the call, when
        the call raises one of ``errors``."""
        if self.built:
            yield
            return
        rng = self.rng.bit_generator.state
        try:
            yield
        except errors:
            if self.built:
                self._params = self._random = self._random_seed = self.input_dim = None
                self.rng.bit_generator.state = rng
            raise

    @_on_device
    def predict(self, x, *, batch_size=1024, to_numpy=False):
        """Outputs (samples, outputs) for x, computed batch by batch; nothing in the model changes.

        x: an array of any library/device, a memory map or a sliceable. Returns an array of the model's namespace
        on its device, or with ``to_numpy=True`` a NumPy array filled batch by batch on the host (the device then
        holds one batch of outputs at a time).
        """
        self._require_built("predict()")
        source = _data.adapt(x, streams=False)
        self.check_input_dim(source.width)
        n, width = source.n, self.output_dim
        result = _data.host_empty((n, width), self.dtype) if to_numpy else self._device.zeros((n, width), self.dtype)
        start = 0
        for xb, _, _ in _data.Batches(source, batch_size=batch_size, device=self._device, dtype=self.dtype):
            out = self.predict_step(xb)
            stop = start + out.shape[0]
            result[start:stop, ...] = self._device.to_host(out) if to_numpy else out
            start = stop
        return result

    # -- state: snapshots, random generators ---------------------------------------------
    def snapshot(self, training: bool = False):
        """Copies of the weights and non-trainable state; with ``training`` also the optimizer state and the random
        generators' states (everything a training step changes). :meth:`restore` puts them back."""
        self._require_built("snapshot()")
        if not training:
            return self._params.snapshot()
        return self._params.snapshot(self.optimizer, self.random_state())

    def restore(self, snapshot) -> None:
        """Put a :meth:`snapshot` back in place (parameter views stay valid); Ctrl-C waits until it is complete."""
        with _interrupts.update():
            self._params.restore(snapshot, self.optimizer)
            if snapshot.random is not None:
                self.set_random_state(snapshot.random)

    def random_state(self) -> dict:
        """JSON-able states of the host generator (initial weights, shuffles, splits) and of the dropout
        generator (None where the backend cannot export it)."""
        return {"rng": self.rng.bit_generator.state, "dropout": None if self._random is None else self._random.get_state()}

    def set_random_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        if self._random is not None and state.get("dropout") is not None:
            self._random.set_state(state["dropout"])

    def seed_dropout(self, seed: int) -> None:
        """Restart the dropout generator from ``seed`` on every backend (data-parallel training gives each rank its
        own masks, reproducibly); the host generator is left as it is."""
        self._require_built("seed_dropout()")
        self._random_seed = int(seed)
        self._install(self._params, self._device.random_source(self._random_seed))

    # -- placement -------------------------------------------------------------------------
    def to(self, device=None, backend=None) -> "Model":
        """Move parameters, gradients, state, optimizer state and the dropout generator to another device or
        library, in place; returns the model. Moving and moving back gives bit-identical parameters, and the moved
        buffers never alias the old ones.

        ``device``: "cpu", "cuda:1", a namespace's device object, read in the model's current library when it has
        that device (a torch model stays torch); or a backend ("torch", "numpy", ``array_api_strict``) for its
        default device. ``backend=`` switches library explicitly. On error (no CuPy, no such device) nothing moves.
        """
        target = move_target(self._device, device, backend)
        if target == self._device and target.backend == self._device.backend:
            return self
        params = random = None
        if self.built:  # everything is prepared on the target first; the model changes only when all of it worked
            params = self._params.to(target)
            random_state = self._random.get_state()
            random = target.random_source(self._random_seed)
            if random_state is not None:
                random.set_state(random_state)  # continues its stream where the library can export it
        if self.optimizer is not None:
            self.optimizer.to(target)
        self._device = target
        if params is not None:
            self._install(params, random)
        return self

    # -- copies and pickling -----------------------------------------------------------------
    def copy(self, dtype=None) -> "Model":
        """A new model with the same architecture, weights, state, loss and metrics on the same device (optionally
        another dtype); the optimizer is not copied."""
        twin = Model([layer.unbound_copy() for layer in self.layers], device=self._device, dtype=dtype or self.dtype,
                     seed=self.seed)
        twin.loss, twin.metrics = self.loss, list(self.metrics)
        if self.built:
            twin.input_dim, twin._random_seed = self.input_dim, self._random_seed
            with self._device.scope():
                twin._install(self._params.astype(twin.dtype), self._device.random_source(self._random_seed))
        return twin

    def __getstate__(self):
        """Everything in host copies (the parameter buffer and optimizer pickle their arrays from the device) and the
        device by name, so ``pickle`` and ``copy.deepcopy`` work; unpickled on the same device, or on the CPU with a
        warning where it is missing."""
        state = {k: v for k, v in self.__dict__.items() if k not in _DERIVED}
        state["layers"] = [layer.unbound_copy() for layer in self.layers]  # bound views hold modules and arrays
        state["random_state"] = self.random_state() if self.built else None
        return state

    def __setstate__(self, state):
        random_state = state.pop("random_state")
        self.__dict__.update(state)
        self._random, self._bound_rules, self._state_updates = None, None, []
        for layer in self.layers:
            layer.attach(self, f"layer {layer.name!r}")
        if self.optimizer is not None:
            self.optimizer.attach(self, "optimizer")
            self.optimizer.to(self._device)
        if self._params is not None:
            with self._device.scope():
                self._install(self._params, self._device.random_source(self._random_seed))
            self.set_random_state(random_state)

    def __repr__(self):
        inner = ", ".join(repr(layer) for layer in self.layers)
        return f"Model([{inner}], device={self._device.name!r}, dtype={self.dtype!r})"

    # -- summary ---------------------------------------------------------------------------
    def summary(self) -> None:
        """Print a table of the layers (name and type, output shape, activation, parameters) and the total."""
        print(_summary.text(self))

    def _repr_html_(self) -> str:
        """The summary as an HTML table (Jupyter shows it when a model is the last expression of a cell)."""
        return _summary.html_table(self)

    # -- persistence -----------------------------------------------------------------------
    def save(self, path, include_optimizer: bool = True) -> None:
        """Write the model to one safetensors file: weights, state, optimizer state (with ``include_optimizer``),
        and the architecture and training configuration as JSON metadata; written atomically. :func:`portanet.load`
        reads it."""
        self._require_built("save()")
        _io.save(self, path, include_optimizer)

    def save_weights(self, path) -> None:
        """Write the weights (no optimizer state) to one safetensors file; :meth:`load_weights` reads it back."""
        self._require_built("save_weights()")
        _io.save_weights(self, path)

    def export_onnx(self, path, opset=None) -> str:
        """Write the model to one ONNX file for serving without portanet (ONNX Runtime on a server, a phone, in a
        browser); returns the path. Same as :func:`portanet.export_onnx`: input "input" (batch, input_dim) and
        output "output" (batch, output_dim) in the model's dtype, any batch size, dropout off; ``opset`` from 13 to
        28 (default 21). Needs ``pip install "portanet[onnx]"``."""
        return _export.export_onnx(self, path, opset)

    @_on_device
    def load_weights(self, path) -> "Model":
        """Copy the weights of a portanet file (or a safetensors file with matching names) into this model; names
        and shapes are checked first (ModelFileError). Returns the model."""
        _io.load_weights(self, path)
        return self

    @staticmethod
    def load(path, device="cpu", backend=None) -> "Model":
        """Same as :func:`portanet.load`: rebuild a saved model on ``device`` / ``backend``."""
        return load(path, device=device, backend=backend)

    def get_config(self, include_optimizer: bool = True) -> dict:
        """Architecture and training configuration as plain JSON-able data. An optimizer whose learning rate is a
        plain callable has no config (ValueError); ``include_optimizer=False`` records ``"optimizer": None``
        instead (what ``save_weights`` and ``export_onnx`` fall back to: neither needs the optimizer)."""
        optimizer = self.optimizer if include_optimizer else None
        return {
            "layers": [layer.get_config() for layer in self.layers],
            "input_dim": self.input_dim,
            "dtype": self.dtype,
            "loss": None if self.loss is None else self.loss.get_config(),
            "optimizer": None if optimizer is None else optimizer.get_config(),
            "metrics": [m.get_config() for m in self.metrics],
        }

    @classmethod
    def from_config(cls, config: dict, device="cpu", backend=None) -> "Model":
        """An unbuilt model from :meth:`get_config` data, compiled when it names a loss; build it with
        ``build(config["input_dim"])``. Bad configs raise ValueError or TypeError."""
        model = cls([_layers.get(layer) for layer in config["layers"]], device=device, backend=backend,
                    dtype=config["dtype"])
        if config.get("loss") is not None:
            with warnings.catch_warnings():  # advice is for the person who compiled it, not everyone who loads it
                warnings.simplefilter("ignore", _checks.SetupWarning)
                model.compile(config["loss"], config.get("optimizer") or "adam", config.get("metrics") or [])
        return model


def load(path, device="cpu", backend=None) -> Model:
    """Rebuild a model saved by :meth:`Model.save` (or a checkpoint) on ``device`` / ``backend`` (as ``Model``
    takes them), compiled with its saved loss, optimizer (and its state, when saved) and metrics.

    Raises :class:`~portanet.ModelFileError` for anything wrong with the file, ``OSError`` when it cannot be opened.
    """
    dev = resolve_device(device, backend)  # the caller's mistakes are not the file's
    return _io.load(path, lambda config: Model.from_config(config, device=dev))


def dtype_name_or_none(dtype):
    try:
        return dtype_name(dtype)
    except ValueError:
        return None
