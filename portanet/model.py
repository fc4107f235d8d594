"""Model: the architecture (layers, build), the training step (forward, loss, backward, apply_gradients), predict,
placement (``to()``), config, summary and persistence entry points.

The fit/evaluate loops live in :mod:`portanet.training`, parameter storage in :mod:`portanet.params`, the file
format in :mod:`portanet.io`. Math goes through the device's namespace ``xp``.
"""

from __future__ import annotations

import functools
import html
import math
import warnings

from . import data as _data
from . import export as _export
from . import io as _io
from . import layers as _layers
from . import losses as _losses
from . import metrics as _metrics
from . import optimizers as _optimizers
from . import training as _training
from .backends import dtype_name, host_rng, library_of, move_target, resolve_device, to_numpy
from .params import ParameterBuffer

__all__ = ["Model", "load"]

_FLOATS = ("float32", "float64")


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
        self.input_dim = None
        self.loss = None
        self.optimizer = None
        self.metrics: list = []
        self.stop_training = False
        self.history = None
        self._params: ParameterBuffer | None = None
        self._random = None
        self._random_seed = None
        for layer in layers or []:
            self.add(layer)

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
            raise TypeError(f"layer must be a portanet Layer (Dense, Dropout, Activation), got {type(layer).__name__}")
        if self.built:
            raise RuntimeError("cannot add layers to a model that is already built (it has trained or seen data)")
        name = layer.name
        if name is None:
            name = f"{layer.kind}_{sum(1 for other in self.layers if other.kind == layer.kind)}"
        if any(other.name == name for other in self.layers):
            raise ValueError(f"layer name {name!r} is already used in this model")
        layer.attach(self, f"layer {name!r}")
        layer.name = name
        self.layers.append(layer)
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
        layout, values, states, dim = [], [], [], input_dim
        for layer in self.layers:
            shapes, state_shapes = layer.param_shapes(dim), layer.state_shapes(dim)
            init, init_state = layer.init_params(self.rng, dim), layer.init_state(dim)
            layout.append((layer.name, shapes, state_shapes))
            values += [init[k] for k in shapes]
            states += [init_state[k] for k in state_shapes]
            dim = layer.output_dim(dim)
        dev = self._device
        values = _flat(dev, values, self.dtype)
        state = _flat(dev, states, self.dtype)
        self.input_dim = input_dim
        self._random_seed = int(self.rng.integers(2**62))
        self._install(ParameterBuffer(dev, self.dtype, layout, values, state), dev.random_source(self._random_seed))
        return self

    def _install(self, params: ParameterBuffer, random_source) -> None:
        """Make ``params`` the model's buffer and bind every layer to its views."""
        self._params, self._random = params, random_source
        views, kernels = params.views(), self._device.kernels
        for layer in self.layers:
            p, g, s = views[layer.name]
            layer.bind(self.xp, p, g, s, random_source, kernels)
        self._need_input_grad = [any(l.param_shapes(1) for l in self.layers[:i]) for i in range(len(self.layers))]

    def _require_built(self, what):
        if not self.built:
            raise RuntimeError(f"{what} needs a built model: call fit() or build(input_dim) first")

    def parameters(self) -> dict:
        """Ordered ``{"dense_0.kernel": array, ...}``: live views on the model's device."""
        self._require_built("parameters()")
        return self._params.parameters()

    @_on_device
    def set_parameters(self, values: dict) -> None:
        """Overwrite parameters from ``{name: array}`` (any library/device); names and shapes are checked first."""
        current = self.parameters()
        if not isinstance(values, dict):
            raise TypeError(f"values must be a dict {{name: array}}, got {type(values).__name__}")
        unknown = set(values) - set(current)
        if unknown:
            raise KeyError(f"unknown parameter names {sorted(unknown)}; expected some of {list(current)}")
        moved = {}
        for name, value in values.items():
            arr = self._device.asarray(value, self.dtype)
            if tuple(arr.shape) != tuple(current[name].shape):
                raise ValueError(f"parameter {name} must have shape {tuple(current[name].shape)}, got {tuple(arr.shape)}")
            moved[name] = arr
        for name, arr in moved.items():
            current[name][...] = arr

    def count_params(self) -> int:
        self._require_built("count_params()")
        return int(self._params.values.shape[0])

    # -- compile ---------------------------------------------------------------------------
    def compile(self, loss, optimizer="adam", metrics=None) -> "Model":
        """Choose the loss (required), optimizer and metrics. Calling it again keeps the trained weights (a new
        optimizer state unless the same optimizer object is passed). An optimizer object serves one model only."""
        loss_obj = _losses.get(loss)
        opt = _optimizers.get(optimizer)
        if metrics is not None and not isinstance(metrics, (list, tuple)):
            raise TypeError(f"metrics must be a list, got {type(metrics).__name__}: write metrics=[{metrics!r}]")
        mets = [_metrics.get(m) for m in (metrics or [])]
        opt.attach(self, f"optimizer {type(opt).__name__}")
        if self.optimizer is not None and self.optimizer is not opt:
            self.optimizer.detach()
        self.loss, self.optimizer, self.metrics = loss_obj, opt, mets
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

    def compute_gradients(self, x, y, sample_weight=None, training=True):
        """Forward, loss and backward for one device batch; fills the gradient buffer.

        x: (batch, in) and y on the model's device. Returns ``(loss, output)``: the 0-d batch loss and the output
        (batch, out), exactly what predict returns for x (dropout on when ``training``).
        """
        out, logits, caches = self._forward(x, training, keep_caches=True)
        loss, grad = self._loss(out, logits, y, sample_weight)
        last = len(self.layers) - 1
        for i in range(last, -1, -1):
            fused = {"fused": True} if logits is not None and i == last else {}
            grad = self.layers[i].backward(grad, caches[i], self._need_input_grad[i], **fused)
        return loss, out

    def apply_gradients(self) -> None:
        """One optimizer step from the gradient buffer (filled by :meth:`compute_gradients`)."""
        self.optimizer.step(self._params.values, self._params.grads, fast=self._device.kernels)

    def test_step(self, x, y, sample_weight=None):
        """``(loss, output)`` for one device batch in inference mode; nothing changes."""
        out, logits, _ = self._forward(x, False, keep_caches=False)
        return self._loss(out, logits, y, sample_weight)[0], out

    def predict_step(self, x):
        """Output (batch, out) for one device batch in inference mode; nothing changes."""
        for layer in self.layers:
            x = layer.forward(x, False)
        return x

    def prepare_batch(self, x, y=None, sample_weight=None):
        """Validate one custom-loop batch and send host data to the device (data on another device raises);
        builds the model on first use. Returns ``(x, y, sample_weight)`` on the model's device."""
        x = _data.check_array(x, "x")
        y = None if y is None else _data.check_array(y, "y", ndim=(1, 2))
        sample_weight = None if sample_weight is None else _data.check_array(sample_weight, "sample_weight", ndim=(1,))
        _data.check_lengths(x=x, y=y, sample_weight=sample_weight)
        self.check_input_dim(x.shape[1])
        if y is not None:  # label ranges are read back only for host data: no device sync per custom-loop step
            self.check_targets(y, x.shape[1], values=library_of(y) == "numpy")
        self.build(x.shape[1])
        return (self._here(x, "x", self.dtype),
                None if y is None else self._here(y, "y", "int64" if self.loss.sparse else self.dtype),
                None if sample_weight is None else self._here(sample_weight, "sample_weight", self.dtype))

    def check_targets(self, y, input_dim=None, name="y", values=True) -> None:
        """Raise ValueError when targets ``y`` do not fit the loss and the output width (nothing changes)."""
        self.loss.check_targets(y, self.output_width(input_dim or self.input_dim), name, values=values)

    def _here(self, a, name, dtype):
        if self._device.owns(a) or library_of(a) == "numpy":
            return self._device.asarray(a, dtype)
        raise ValueError(
            f"{name} lives on {_describe(a)} but the model is on {self._device.name}; move it explicitly "
            f"(portanet.to_numpy({name}) or model.device.asarray({name})) or use fit/evaluate/predict, which stream it")

    @_on_device
    def train_step(self, x, y, sample_weight=None):
        """One optimizer step on one batch; returns the batch loss as a 0-d array on the device (no host sync)."""
        self._require_compiled("train_step()")
        xb, yb, wb = self.prepare_batch(x, y, sample_weight)
        loss, _ = self.compute_gradients(xb, yb, wb)
        self.apply_gradients()
        return loss

    @_on_device
    def loss_and_grads(self, x, y, sample_weight=None, training=False):
        """``(loss: float, {name: gradient})`` for one batch, without updating anything.

        ``training=False`` (default) disables dropout so the result is deterministic.
        """
        self._require_compiled("loss_and_grads()")
        xb, yb, wb = self.prepare_batch(x, y, sample_weight)
        loss, _ = self.compute_gradients(xb, yb, wb, training=training)
        return float(loss), {name: self._device.copy(g) for name, g in self._params.gradients().items()}

    # -- fit / evaluate / predict ----------------------------------------------------------
    @_on_device
    def fit(self, x, y=None, **kwargs):
        """Train; see :func:`portanet.training.fit` for the arguments. Returns a :class:`~portanet.History`."""
        return _training.fit(self, x, y, **kwargs)

    @_on_device
    def evaluate(self, x, y=None, **kwargs) -> dict:
        """Mean loss and metrics; see :func:`portanet.training.evaluate`."""
        return _training.evaluate(self, x, y, **kwargs)

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
        """Put a :meth:`snapshot` back in place (parameter views stay valid)."""
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
        params = self._params.to(target) if self.built else None
        if self.optimizer is not None:
            self.optimizer.to(target)
        self._device = target
        if params is not None:
            random_state = self._random.get_state()
            random = target.random_source(self._random_seed)
            if random_state is not None:
                random.set_state(random_state)  # continues its stream where the library can export it
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
        """Host copies of everything (weights, state, optimizer state, random states) and the device by name, so
        ``pickle`` and ``copy.deepcopy`` work; the device is resolved again when unpickled."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("_params", "_random", "_need_input_grad")}
        state["layers"] = [layer.unbound_copy() for layer in self.layers]
        state["_device"] = (self._device.backend, self._device.name)
        if self.built:
            params = self._params
            state["_params"] = (params.layout, to_numpy(params.values).copy(), to_numpy(params.state).copy())
            state["random_state"] = self.random_state()
        return state

    def __setstate__(self, state):
        backend, name = state.pop("_device")
        params = state.pop("_params", None)
        random_state = state.pop("random_state", None)
        self.__dict__.update(state)
        self._params = self._random = None
        for layer in self.layers:
            layer.attach(self, f"layer {layer.name!r}")
        if self.optimizer is not None:
            self.optimizer.attach(self, "optimizer")
        self._device = _device_or_cpu(backend, name)
        if self.optimizer is not None:
            self.optimizer.to(self._device)
        if params is not None:
            layout, values, states = params
            dev = self._device
            with dev.scope():
                buffer = ParameterBuffer(dev, self.dtype, layout, dev.from_host(values, self.dtype),
                                         dev.from_host(states, self.dtype))
                self._install(buffer, dev.random_source(self._random_seed))
            self.set_random_state(random_state)

    def __repr__(self):
        inner = ", ".join(repr(layer) for layer in self.layers)
        return f"Model([{inner}], device={self._device.name!r}, dtype={self.dtype!r})"

    # -- summary ---------------------------------------------------------------------------
    def _summary(self):
        """``(title, rows, total)``: one row (layer, output shape, activation, parameters) per layer; shapes and
        counts are "?" until the input width is known."""
        dim = self.input_dim if self.input_dim is not None else (self.layers[0].input_dim if self.layers else None)
        title = (f"Model on {self._device.name} ({self.backend}, {self.dtype}), input "
                 f"{'(batch, ?)' if dim is None else f'(batch, {dim})'}")
        rows = []
        for layer in self.layers:
            activation = getattr(layer, "activation", None)
            count, shape = "?", "(batch, ?)"
            if dim is not None:
                count = sum(math.prod(s) for s in layer.param_shapes(dim).values())
                dim = layer.output_dim(dim)
                shape = f"(batch, {dim})"
            rows.append((f"{layer.name} ({type(layer).__name__})", shape, "" if activation is None else activation.name,
                         "?" if count == "?" else f"{count:,}"))
        total = "?" if any(row[3] == "?" for row in rows) else f"{self._count(rows):,}"
        return title, rows, total

    def _count(self, rows) -> int:
        return sum(int(row[3].replace(",", "")) for row in rows)

    def summary(self) -> None:
        """Print a table of the layers (name and type, output shape, activation, parameters) and the total."""
        title, rows, total = self._summary()
        cells = [("Layer (type)", "Output shape", "Activation", "Params"), *rows]
        widths = [max(len(row[i]) for row in cells) for i in range(4)]

        def line(row):
            return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

        rule = "-" * len(line(cells[0]))
        total_line = "Total params: ? (not built yet)" if total == "?" else f"Total params: {total}"
        print("\n".join([title, line(cells[0]), rule, *map(line, rows), rule, total_line]))

    def _repr_html_(self) -> str:
        """The summary as an HTML table (Jupyter shows it when a model is the last expression of a cell)."""
        title, rows, total = self._summary()
        esc = html.escape
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row[:3]) +
                       f"<td style='text-align:right'>{row[3]}</td></tr>" for row in rows)
        return (f"<table><caption>{esc(title)}</caption><thead><tr><th>Layer (type)</th><th>Output shape</th>"
                f"<th>Activation</th><th>Params</th></tr></thead><tbody>{body}</tbody><tfoot><tr><td colspan='3'>"
                f"Total params</td><td style='text-align:right'>{total}</td></tr></tfoot></table>")

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

    def get_config(self) -> dict:
        """Architecture and training configuration as plain JSON-able data."""
        return {
            "layers": [layer.get_config() for layer in self.layers],
            "input_dim": self.input_dim,
            "dtype": self.dtype,
            "loss": None if self.loss is None else self.loss.get_config(),
            "optimizer": None if self.optimizer is None else self.optimizer.get_config(),
            "metrics": [m.get_config() for m in self.metrics],
        }

    @classmethod
    def from_config(cls, config: dict, device="cpu", backend=None) -> "Model":
        """An unbuilt model from :meth:`get_config` data, compiled when it names a loss; build it with
        ``build(config["input_dim"])``. Bad configs raise ValueError or TypeError."""
        model = cls([_layers.get(layer) for layer in config["layers"]], device=device, backend=backend,
                    dtype=config["dtype"])
        if config.get("loss") is not None:
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


def _flat(device, pieces, dtype):
    """One (n,) device array from host pieces (arrays or lists) in order."""
    xp = device.xp
    parts = [xp.reshape(device.from_host(p, dtype), (-1,)) for p in pieces]
    return xp.concat(parts) if parts else device.zeros((0,), dtype)


def _device_or_cpu(backend, name):
    """The device an unpickled model lived on, or NumPy on the CPU (with a warning) where it is not available."""
    spec = name.split(":", 1)[1] if name.startswith(f"{backend}:") else name
    try:
        return resolve_device(spec, backend)
    except (ImportError, RuntimeError, ValueError) as exc:
        warnings.warn(f"the model was saved on {name} ({backend}), which is not available here ({exc}); it is "
                      "restored on the CPU (NumPy)", RuntimeWarning, stacklevel=3)
        return resolve_device("cpu")


def _describe(a) -> str:
    try:
        import array_api_compat

        return f"{library_of(a)} device {array_api_compat.device(a)}"
    except Exception:  # noqa: BLE001 - only for an error message
        return type(a).__name__
