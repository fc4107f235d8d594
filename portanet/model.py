"""Model: a stack of layers with one flat parameter buffer on one device; compile, fit, evaluate, predict, to().

Math goes through the device's namespace ``xp``; host data is streamed in by :mod:`portanet.data`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import html
import math
import numbers
import warnings

import array_api_compat

from . import layers as _layers
from . import losses as _losses
from . import metrics as _metrics
from . import optimizers as _optimizers
from . import backends as _backend
from . import data as _data
from . import io as _io
from .backends import Device, dtype_name, host_rng, is_host_data, resolve_device
from .callbacks import CallbackList, History
from .data import Batches, check_array, check_lengths

__all__ = ["Model"]

_FLOATS = ("float32", "float64")


def _on_device(method):
    """Run a Model method with the model's device current, so every allocation lands there (CuPy, multi-GPU)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._device.scope():
            return method(self, *args, **kwargs)

    return wrapper


class Model:
    """A feed-forward network of :class:`~portanet.layers.Layer` objects.

    ``device``: "cpu" (NumPy), "cuda" / "cuda:N" (CuPy), or a namespace's own device with ``backend=``
    (``Model(backend=array_api_strict, device=array_api_strict.Device("device1"))``, ``backend="torch"``).
    ``dtype``: "float32" (default) or "float64". ``seed``: one seed gives the same initial weights on every backend.
    """

    def __init__(self, layers=None, device="cpu", dtype="float32", seed=None, backend=None):
        self._device = resolve_device(device, backend)
        self.dtype = dtype_name(dtype)
        if self.dtype not in _FLOATS:
            raise ValueError(f"dtype must be one of {_FLOATS}, got {dtype!r}")
        self.seed = seed
        self._rng = host_rng(seed)
        self.layers: list = []
        self.input_dim = None
        self.loss = None
        self.optimizer = None
        self.metrics: list = []
        self.stop_training = False
        self.history = None
        self._training = None  # while fit() runs: what ModelCheckpoint saves besides weights and optimizer
        self._flat = None
        self._grads = None
        self._random = None
        for layer in layers or []:
            self.add(layer)

    # -- structure ------------------------------------------------------------------------
    @property
    def device(self) -> Device:
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
        return self._flat is not None

    def add(self, layer) -> "Model":
        if not isinstance(layer, _layers.Layer):
            raise TypeError(f"layer must be a portanet Layer (Dense, Dropout, Activation), got {type(layer).__name__}")
        if self.built:
            raise RuntimeError("cannot add layers to a model that is already built (it has trained or seen data)")
        if layer.name is None:
            count = sum(1 for other in self.layers if other.kind == layer.kind)
            layer.name = f"{layer.kind}_{count}"
        if any(other.name == layer.name for other in self.layers):
            raise ValueError(f"layer name {layer.name!r} is already used in this model")
        self.layers.append(layer)
        return self

    @property
    def output_dim(self) -> int | None:
        """Width of the model's output (None until the input width is known)."""
        return None if self.input_dim is None else _output_dim(self.layers, self.input_dim)

    @_on_device
    def build(self, input_dim: int) -> "Model":
        """Allocate and initialize parameters for inputs of width ``input_dim`` (done by ``fit`` when first needed)."""
        if not self.layers:
            raise RuntimeError("the model has no layers: add at least one Dense layer")
        first = self.layers[0].input_dim
        if first is not None and first != input_dim:
            raise ValueError(f"x has {input_dim} features but the first layer was declared with input_dim={first}")
        specs, dim = [], input_dim
        for layer in self.layers:
            values = layer.init_params(self._rng, dim)
            specs.append((layer, layer.param_shapes(dim), values))
            dim = layer.output_dim(dim)
        dev, xp = self._device, self._device.xp
        pieces = [xp.reshape(dev.from_host(values[k], self.dtype), (-1,)) for _, shapes, values in specs for k in shapes]
        flat = xp.concat(pieces) if pieces else dev.zeros((0,), self.dtype)
        self.input_dim = input_dim
        self._specs = [(layer, shapes) for layer, shapes, _ in specs]
        self._random_seed = int(self._rng.integers(2**62))
        self._install(flat)
        return self

    @_on_device
    def _install(self, flat):
        """Make ``flat`` the parameter buffer and bind every layer's parameter and gradient views to it."""
        dev, xp = self._device, self._device.xp
        self._flat = flat
        self._grads = xp.zeros_like(flat)
        self._random = dev.random_source(self._random_seed)
        offset = 0
        for layer, shapes in self._specs:
            params, grads = {}, {}
            for key, shape in shapes.items():
                size = 1
                for s in shape:
                    size *= s
                params[key] = xp.reshape(flat[offset:offset + size], shape)
                grads[key] = xp.reshape(self._grads[offset:offset + size], shape)
                offset += size
            layer.bind(xp, params, grads, self._random, fast=dev.kernels)
        self._need_input_grad = [any(l.param_shapes(1) for l in self.layers[:i]) for i in range(len(self.layers))]

    def _require_built(self, what):
        if not self.built:
            raise RuntimeError(f"{what} needs a built model: call fit() or build(input_dim) first")

    def parameters(self) -> dict:
        """Ordered ``{"dense_0.kernel": array, ...}``: live views on the model's device."""
        self._require_built("parameters()")
        return {f"{layer.name}.{k}": v for layer, _ in self._specs for k, v in layer.params.items()}

    @_on_device
    def set_parameters(self, values: dict) -> None:
        """Overwrite parameters from ``{name: array}`` (any library/device); names and shapes are checked first."""
        current = self.parameters()
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
        return int(self._flat.shape[0])

    # -- compile ---------------------------------------------------------------------------
    def compile(self, loss="mse", optimizer="adam", metrics=None) -> "Model":
        """Choose loss, optimizer and metrics. Calling it again keeps the trained weights (new optimizer state)."""
        loss_obj = _losses.get(loss)
        opt = _optimizers.get(optimizer)
        mets = [_metrics.get(m) for m in (metrics or [])]
        self.loss, self.optimizer, self.metrics = loss_obj, opt, mets
        return self

    def _fusion(self) -> str:
        """How the loss meets the output: "layer" (fused with the last Dense's activation), "logits" or "plain"."""
        last = self.layers[-1]
        if self.loss.from_logits:
            return "logits"
        if self.loss.fuses and isinstance(last, _layers.Dense) and last.activation.name == self.loss.fuses:
            return "layer"
        return "plain"

    def _require_compiled(self, what):
        if self.loss is None:
            raise RuntimeError(f"{what} needs a compiled model: call compile(loss=..., optimizer=...) first")

    # -- the training step -----------------------------------------------------------------
    def _forward(self, x, training=False):
        for layer in self.layers:
            x = layer.forward(x, training)
        return x

    def _forward_loss(self, x, y, sample_weight=None, training=False):
        """Forward pass and loss for one device batch.

        Returns ``(loss, grad, out, fusion)``: the 0-d loss, dL/d(out), the output (pre-activation unless
        ``fusion == "plain"``) and how the loss met the output (see :meth:`_fusion`).
        """
        xp = self.xp
        fusion = self._fusion()
        if fusion == "layer":
            h = x
            for layer in self.layers[:-1]:
                h = layer.forward(h, training)
            out = self.layers[-1].forward_logits(h)
        else:
            out = self._forward(x, training)
        kernels = self._device.kernels
        if fusion == "plain":
            per, grad = self.loss.per_sample(out, y, xp)
        elif kernels is not None and type(self.loss) is _losses.SparseCategoricalCrossentropy:
            probs = kernels.softmax_(xp.asarray(out, copy=True))  # as predict's softmax computes it
            per, grad = kernels.sparse_softmax_crossentropy(out, probs, y)
        else:
            per, grad = self.loss.per_sample_logits(out, y, xp)
        loss, grad = _losses.reduce(per, grad, xp, sample_weight)
        return loss, grad, out, fusion

    def _loss_and_backward(self, x, y, sample_weight=None, training=True):
        """Forward, loss and backward for one device batch; fills the gradient buffer. Returns ``(loss, out, logits)``."""
        loss, grad, out, fusion = self._forward_loss(x, y, sample_weight, training)
        fused_last = fusion == "layer"
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            if fused_last and i == len(self.layers) - 1:
                grad = layer.backward(grad, self._need_input_grad[i], fused=True)
            else:
                grad = layer.backward(grad, self._need_input_grad[i])
        for layer in self.layers:
            layer.clear_cache()
        return loss, out, fusion != "plain"

    def _train_batch(self, x, y, sample_weight=None, before_step=None):
        loss, out, logits = self._loss_and_backward(x, y, sample_weight, training=True)
        if before_step is not None:  # fit's NaN guard: may raise before a bad update reaches the weights
            before_step(loss)
        self.optimizer.step(self._flat, self._grads, fast=self._device.kernels)
        return loss, out, logits

    def _device_batch(self, x, y=None, sample_weight=None):
        """Validate a custom-loop batch and send host data to the device; other devices raise."""
        x = check_array(x, "x")
        if y is not None:
            y = check_array(y, "y", ndim=(1, 2))
        check_lengths(x=x, y=y, sample_weight=sample_weight)
        if self.built and x.shape[1] != self.input_dim:
            raise ValueError(f"x has {x.shape[1]} features but the model expects {self.input_dim}")
        if y is not None:  # label ranges are read back only for host data: no device sync per custom-loop step
            self.loss.check_targets(y, _output_dim(self.layers, x.shape[1]), values=is_host_data(y))
        if not self.built:
            self.build(x.shape[1])
        return (self._to_here(x, "x", self.dtype),
                None if y is None else self._to_here(y, "y", "int64" if self.loss.sparse else self.dtype),
                None if sample_weight is None else self._to_here(sample_weight, "sample_weight", self.dtype))

    def _to_here(self, a, name, dtype):
        if self._device.owns(a) or is_host_data(a):
            return self._device.asarray(a, dtype)
        raise ValueError(
            f"{name} lives on {_describe(a)} but the model is on {self._device.name}; move it explicitly "
            f"(portanet.to_numpy({name}) or model.device.asarray({name})) or use fit/evaluate/predict, which stream it"
        )

    @_on_device
    def train_step(self, x, y, sample_weight=None):
        """One optimizer step on one batch; returns the batch loss as a 0-d array on the device (no host sync)."""
        self._require_compiled("train_step()")
        xb, yb, wb = self._device_batch(x, y, sample_weight)
        return self._train_batch(xb, yb, wb)[0]

    @_on_device
    def loss_and_grads(self, x, y, sample_weight=None, training=False):
        """``(loss: float, {name: gradient})`` for one batch, without updating anything.

        ``training=False`` (default) disables dropout so the result is deterministic.
        """
        self._require_compiled("loss_and_grads()")
        xb, yb, wb = self._device_batch(x, y, sample_weight)
        loss, _, _ = self._loss_and_backward(xb, yb, wb, training=training)
        xp = self.xp
        grads = {f"{layer.name}.{k}": xp.asarray(v, copy=True) for layer, _ in self._specs for k, v in layer.grads.items()}
        return float(loss), grads

    # -- fit / evaluate / predict ----------------------------------------------------------
    def _prepare(self, x, y, sample_weight, what, steps=None):
        """Validate data before anything changes; build the model if needed. Returns ``(x, y, sample_weight)``.

        Arrays (any library/device), memory maps and sliceables are checked without being read (all of an
        in-memory ``y``, the first batch of others); an iterable of batches comes back as a stream whose first
        batch was read and checked. ``steps``: batches per epoch of such an iterable.
        """
        self._require_compiled(what)
        x, y, sample_weight = _data.check_inputs(x, y, sample_weight, steps_per_epoch=steps)
        width = _data.input_width(x)
        if self.built and width != self.input_dim:
            raise ValueError(f"x has {width} features but the model expects {self.input_dim}")
        if not self.layers:
            raise RuntimeError("the model has no layers: add at least one Dense layer")
        out_dim = self.output_dim if self.built else _output_dim(self.layers, width)
        targets = _data.first_targets(x, y)
        self.loss.check_targets(targets, out_dim, values=is_host_data(targets) or _data.in_memory(y))
        if not self.built:
            self.build(width)
        return x, y, sample_weight

    def _batches(self, x, y, sample_weight, batch_size, shuffle):
        return Batches(x, y, sample_weight, batch_size=batch_size, shuffle=shuffle, rng=self._rng,
                       device=self._device, dtype=self.dtype, y_dtype=self.loss.target_kind(),
                       check_targets=self._check_targets)

    def _check_targets(self, y, name="y", values=True):
        self.loss.check_targets(y, self.output_dim, name, values=values)

    @contextlib.contextmanager
    def _restored_on_stream_error(self, batches):
        """Put weights, optimizer state and RNG back as they were if a batch read mid-training is unusable."""
        if not batches.reads_lazily:
            yield
            return
        xp, opt = self.xp, self.optimizer
        saved = (xp.asarray(self._flat, copy=True), {k: xp.asarray(v, copy=True) for k, v in opt.state.items()},
                 opt.iterations, self._rng.bit_generator.state, self._random.get_state())
        try:
            yield
        except _data.StreamError:
            flat, opt.state, opt.iterations, self._rng.bit_generator.state, random_state = saved
            self._flat[...] = flat
            self._random.set_state(random_state)
            for layer in self.layers:
                layer.clear_cache()
            raise

    @_on_device
    def fit(self, x, y=None, *, epochs=1, batch_size=32, shuffle=True, validation_data=None, validation_split=0.0,
            sample_weight=None, class_weight=None, callbacks=None, verbose=1, steps_per_epoch=None, log_every=None,
            resume_from=None) -> History:
        """Train for ``epochs`` passes over (x, y); returns a :class:`History` of per-epoch loss and metrics.

        x: (samples, features); y: (samples, outputs), or (samples,) labels/targets; arrays of any library and
        device, memory maps, sliceables (h5py, zarr), or x alone as an iterable of (x, y[, sample_weight])
        batches with ``steps_per_epoch`` batches per epoch (required when it has no length). Data is streamed to
        the device one batch at a time. ``verbose``: 0 silent, 1 a progress bar per epoch with the running loss and
        metrics (read about 20 times per epoch), 2 one line per epoch.
        ``log_every``: also read the running loss and metrics back every that many steps (callbacks'
        ``on_log``); by default they are read once per epoch (about 20 times with ``verbose=1``).
        ``validation_split``: fraction of the rows of in-memory (x, y) held out for validation, drawn at random and
        stratified by class for classification losses. ``validation_data``: (x_val, y_val[, sample_weight]).
        ``sample_weight``: (samples,) weight of each row's loss. ``class_weight``: ``{class: weight}`` multiplying
        the loss of each sample of that class (classification losses; absent classes weigh 1).
        ``resume_from``: a checkpoint written by :class:`~portanet.callbacks.ModelCheckpoint`; weights, optimizer,
        RNG state, history and callback state are restored and training continues up to ``epochs`` in all.

        NaN or inf in in-memory inputs raise ValueError before training (streamed batches: StreamError, with the
        weights put back). A NaN or inf loss stops training with FloatingPointError naming the epoch and step; the
        model keeps its last finite weights (``callbacks=[TerminateOnNaN()]`` stops without raising).
        """
        if log_every is not None and (isinstance(log_every, bool) or not isinstance(log_every, int) or log_every <= 0):
            raise ValueError(f"log_every must be a positive integer or None, got {log_every!r}")
        x, y, sample_weight = self._prepare(x, y, sample_weight, "fit()", steps=steps_per_epoch)
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
        fraction = _data.check_fraction(validation_split, x, y, sample_weight)
        val = None
        if validation_data is not None:
            if fraction:
                raise ValueError("pass validation_data or validation_split to fit(), not both")
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) not in (2, 3):
                raise ValueError("validation_data must be a tuple (x_val, y_val) or (x_val, y_val, sample_weight)")
            val = self._prepare(*validation_data, *(() if len(validation_data) == 3 else (None,)), "fit()")
        class_table = self._class_weight_table(class_weight)
        for name, a in (("x", x), ("y", y), ("sample_weight", sample_weight)) + (
                () if val is None else (("validation x", val[0]), ("validation y", val[1]))):
            _reject_nonfinite(a, name)
        checkpoint = None if resume_from is None else _io.read_checkpoint(resume_from, self)
        # -- nothing has changed so far; from here on the model trains
        split_seed = None
        if fraction:
            split_seed = checkpoint.fit.get("split_seed") if checkpoint else int(self._rng.integers(2**63))
            x, y, sample_weight, val = self._split_validation(x, y, sample_weight, fraction, split_seed)
        train = self._batches(x, y, sample_weight, batch_size, shuffle)
        config = {"epochs": epochs, "batch_size": train.batch_size, "shuffle": bool(shuffle),
                  "validation_split": fraction, "split_seed": split_seed}
        if checkpoint is not None:
            _warn_if_changed(checkpoint, config)
        history = History()
        cbs = CallbackList([history, *(callbacks or [])], model=self, verbose=verbose, epochs=epochs,
                           steps=len(train))
        every = log_every or (max(1, len(train) // 20) if verbose == 1 else None)
        self.stop_training = False
        cbs.on_train_begin()
        if checkpoint is not None:
            checkpoint.load_callback_states(cbs.callbacks)
            checkpoint.restore(self)
            history.epoch, history.history = checkpoint.history["epoch"], checkpoint.history["history"]
        self._training = {"history": history, "callbacks": cbs.callbacks, "fit": config}
        guard = _Guard(self, check_inputs=train.reads_lazily)
        try:
            with self._restored_on_stream_error(train):
                for epoch in range(checkpoint.epoch if checkpoint else 0, epochs):
                    cbs.on_epoch_begin(epoch)
                    try:
                        logs = self._run_epoch(train, cbs, epoch, guard, every, class_table)
                    except _NonFiniteLoss as bad:
                        self._stop_on_nonfinite(bad, guard, cbs, len(train))
                        break
                    if val is not None:
                        val_logs = self._evaluate(*val, batch_size=max(batch_size, 1024))
                        logs.update({f"val_{k}": v for k, v in val_logs.items()})
                    cbs.on_epoch_end(epoch, logs)
                    if self.stop_training:
                        break
        finally:
            self._training = None
        cbs.on_train_end()
        self.history = history
        return history

    def _run_epoch(self, batches, cbs, epoch, guard, log_every=None, class_table=None) -> dict:
        """One pass; loss and metric sums stay on the device, read at the end (and every ``log_every`` steps)."""
        totals = _Totals(self, guard)
        for step, (xb, yb, wb) in enumerate(batches):
            if class_table is not None:
                w = self.xp.take(class_table, self._class_labels(yb, self.xp), axis=0)
                wb = w if wb is None else wb * w
            loss, out, logits = self._train_batch(xb, yb, wb, before_step=guard.batch(xb, epoch, step))
            totals.add(loss, out, yb, logits)
            cbs.on_batch_end(step, loss)
            if log_every and (step + 1) % log_every == 0:
                cbs.on_log(step, totals.logs())
                guard.passed(epoch, step + 1)
        logs = totals.logs()
        guard.passed(epoch + 1, 0)
        return logs

    def _stop_on_nonfinite(self, bad, guard, cbs, steps):
        """Put the last finite weights back, then raise FloatingPointError unless a callback stops training."""
        kept = guard.recover()
        for layer in self.layers:
            layer.clear_cache()
        what = "NaN or inf" if bad.value is None else ("NaN" if math.isnan(bad.value) else str(bad.value))
        message = (f"the loss became {what} at epoch {bad.epoch + 1}, step {bad.step + 1} of {steps}; training "
                   f"stopped and the model keeps {kept}. Likely causes: a learning rate too high (try one 10x "
                   "lower), inputs that are not scaled (standardize each feature to mean 0 and std 1), NaN or inf in "
                   "y, or a loss or activation that overflows. callbacks=[TerminateOnNaN()] stops without raising.")
        cbs.on_nonfinite_loss(bad.epoch, bad.step)
        if not self.stop_training:
            raise FloatingPointError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _classes(self) -> int | None:
        """Number of classes for a classification loss (2 for a single sigmoid output), None otherwise."""
        if self.loss.sparse or self.loss.name == "categorical_crossentropy":
            return self.output_dim
        if self.loss.name == "binary_crossentropy" and self.output_dim == 1:
            return 2
        return None

    def _class_labels(self, y, xp):
        """Integer class labels (samples,) of targets ``y`` (namespace ``xp``) for a classification loss."""
        if self.loss.sparse:
            return xp.astype(xp.reshape(y, (-1,)), xp.int64)
        if self.output_dim == 1:
            return xp.astype(xp.reshape(y, (-1,)) > 0.5, xp.int64)
        return xp.argmax(y, axis=1)

    def _class_weight_table(self, class_weight):
        """``class_weight`` as a (classes,) array on the device, checked; None when not given."""
        if class_weight is None:
            return None
        if not isinstance(class_weight, dict):
            raise TypeError(f"class_weight must be a dict {{class: weight}}, got {type(class_weight).__name__}")
        n = self._classes()
        if n is None:
            raise ValueError("class_weight needs a classification loss (sparse_categorical_crossentropy, "
                             f"categorical_crossentropy, or binary_crossentropy with one output), got {self.loss.name}")
        table = [1.0] * n
        for label, weight in class_weight.items():
            if isinstance(label, bool) or not hasattr(label, "__index__") or not 0 <= label < n:
                raise ValueError(f"class_weight keys must be class indices in [0, {n}), got {label!r}")
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 <= weight < math.inf:
                raise ValueError(f"class_weight[{label}] must be a finite number >= 0, got {weight!r}")
            table[int(label)] = float(weight)
        return self._device.from_host(table, self.dtype)

    def _split_validation(self, x, y, sample_weight, fraction, seed):
        """Hold out ``fraction`` of the rows (stratified by class for classification) as validation data."""
        labels = None
        if self._classes() is not None:
            labels = _backend.to_numpy(self._class_labels(y, array_api_compat.array_namespace(y)))
        train_rows, val_rows = _data.split_rows(x.shape[0], fraction, labels, seed)
        take = _backend.take_rows
        parts = [None if a is None else (take(a, train_rows), take(a, val_rows)) for a in (x, y, sample_weight)]
        (x, x_val), (y, y_val) = parts[0], parts[1]
        w, w_val = parts[2] or (None, None)
        return x, y, w, (x_val, y_val, w_val)

    @_on_device
    def evaluate(self, x, y=None, *, batch_size=1024, sample_weight=None, steps=None) -> dict:
        """Mean loss and metrics over (x, y) as ``{"loss": float, "accuracy": float, ...}``.

        Takes what ``fit`` takes; ``steps``: batches to read from an iterable of batches without a length.
        """
        x, y, sample_weight = self._prepare(x, y, sample_weight, "evaluate()", steps=steps)
        return self._evaluate(x, y, sample_weight, batch_size)

    def _evaluate(self, x, y, sample_weight=None, batch_size=1024) -> dict:
        totals = _Totals(self)
        for xb, yb, wb in self._batches(x, y, sample_weight, batch_size, shuffle=False):
            loss, _, out, fusion = self._forward_loss(xb, yb, wb, training=False)
            totals.add(loss, out, yb, fusion != "plain")
        for layer in self.layers:
            layer.clear_cache()
        return totals.logs()

    @_on_device
    def predict(self, x, *, batch_size=1024, to_numpy=False):
        """Outputs (samples, outputs) for x, computed batch by batch.

        x: an array of any library/device, a memory map or a sliceable. Returns an array of the model's namespace
        on its device, or with ``to_numpy=True`` a NumPy array filled batch by batch on the host (the device then
        holds one batch of outputs at a time).
        """
        self._require_built("predict()")
        x = check_array(x, "x")
        if x.shape[1] != self.input_dim:
            raise ValueError(f"x has {x.shape[1]} features but the model expects {self.input_dim}")
        n, width = x.shape[0], self.output_dim
        result = _data.host_empty((n, width), self.dtype) if to_numpy else self._device.zeros((n, width), self.dtype)
        start = 0
        for xb, _, _ in Batches(x, batch_size=batch_size, device=self._device, dtype=self.dtype):
            out = self._forward(xb, training=False)
            stop = start + out.shape[0]
            result[start:stop, ...] = _backend.to_numpy(out) if to_numpy else out
            start = stop
        for layer in self.layers:
            layer.clear_cache()
        return result

    # -- placement -------------------------------------------------------------------------
    def to(self, device=None, backend=None) -> "Model":
        """Move parameters, gradients, optimizer state, dropout generator and caches to another device or library,
        in place; returns the model. Moving and moving back gives bit-identical parameters.

        ``device``: "cpu", "cuda:1", a namespace's device object, read in the model's current library when it has
        that device (a torch model stays torch); or a backend ("torch", "numpy", ``array_api_strict``) for its
        default device. ``backend=`` switches library explicitly. On error (no CuPy, no such device) nothing moves.
        """
        target = _backend.move_target(self._device, device, backend)
        if target == self._device:
            return self
        with target.scope():
            flat = target.copy(self._flat) if self.built else None  # never aliases
        if self.optimizer is not None:
            self.optimizer.to(target)
        for layer in self.layers:
            layer.clear_cache()
        self._device = target
        if flat is not None:
            random_state = self._random.get_state()
            self._install(flat)
            self._random.set_state(random_state)  # host generators (NumPy, array-api-strict) continue their stream
        return self

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
                         count))
        counts = [row[3] for row in rows]
        return title, rows, (sum(counts) if "?" not in counts else "?")

    def summary(self) -> None:
        """Print a table of the layers (name and type, output shape, activation, parameters) and the total."""
        title, rows, total = self._summary()
        header = ("Layer (type)", "Output shape", "Activation", "Params")
        cells = [header] + [(name, shape, act, f"{n:,}" if n != "?" else n) for name, shape, act, n in rows]
        widths = [max(len(str(row[i])) for row in cells) for i in range(4)]

        def line(row):
            return "  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

        rule = "-" * len(line(header))
        body = [line(row) for row in cells[1:]]
        print("\n".join([title, line(header), rule, *body, rule,
                         f"Total params: {total:,}" if total != "?" else "Total params: ? (not built yet)"]))

    def _repr_html_(self) -> str:
        """The summary as an HTML table (Jupyter shows it when a model is the last expression of a cell)."""
        title, rows, total = self._summary()
        esc = html.escape
        body = "".join(f"<tr><td>{esc(name)}</td><td>{esc(shape)}</td><td>{esc(act)}</td>"
                       f"<td style='text-align:right'>{n:,}</td></tr>" if n != "?" else
                       f"<tr><td>{esc(name)}</td><td>{esc(shape)}</td><td>{esc(act)}</td><td>?</td></tr>"
                       for name, shape, act, n in rows)
        return (f"<table><caption>{esc(title)}</caption><thead><tr><th>Layer (type)</th><th>Output shape</th>"
                f"<th>Activation</th><th>Params</th></tr></thead><tbody>{body}</tbody><tfoot><tr><td colspan='3'>"
                f"Total params</td><td style='text-align:right'>{total if total == '?' else f'{total:,}'}</td></tr>"
                "</tfoot></table>")

    # -- persistence -----------------------------------------------------------------------
    def save(self, path, include_optimizer: bool = True) -> None:
        """Write the model to one safetensors file: weights, optimizer state (with ``include_optimizer``), and the
        architecture and training configuration as JSON metadata; written atomically. :func:`portanet.load` reads it."""
        _io.save(self, path, include_optimizer)

    def save_weights(self, path) -> None:
        """Write the weights (no optimizer state) to one safetensors file; :meth:`load_weights` reads it back."""
        _io.save_weights(self, path)

    @_on_device
    def load_weights(self, path) -> "Model":
        """Copy the weights of a portanet file (or a safetensors file with matching names) into this model; names
        and shapes are checked first (ModelFileError). Returns the model."""
        _io.load_weights(self, path)
        return self

    @staticmethod
    def load(path, device="cpu", backend=None) -> "Model":
        """Same as :func:`portanet.load`: rebuild a saved model on ``device`` / ``backend``."""
        return _io.load(path, device=device, backend=backend)

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

    def _clone(self, dtype=None) -> "Model":
        """A copy with the same architecture, weights and loss on the same device (optionally another dtype)."""
        clone = Model([layer.unbound_copy() for layer in self.layers], device=self._device, dtype=dtype or self.dtype,
                      seed=0)
        clone.loss = copy.deepcopy(self.loss)
        if self.built:
            clone.build(self.input_dim)
            clone._flat[...] = clone._device.xp.astype(self._flat, clone._flat.dtype)
        return clone


class _Totals:
    """Sample-weighted sums of the loss and metrics, kept on the device until :meth:`logs` reads them once.

    With a :class:`_Guard` that tracks on the device, its flags ride along in the same transfer and are checked.
    """

    def __init__(self, model, guard=None):
        self.xp, self.metrics = model.xp, model.metrics
        self.loss, self.sums, self.n = None, [None] * len(model.metrics), 0
        self.guard = guard if guard is not None and not guard.host else None

    def add(self, loss, out, y, logits):
        nb = out.shape[0]
        self.loss = loss * nb if self.loss is None else self.loss + loss * nb
        for i, metric in enumerate(self.metrics):
            s = metric.batch_sum(out, y, self.xp, logits)
            self.sums[i] = s if self.sums[i] is None else self.sums[i] + s
        self.n += nb

    def logs(self) -> dict:
        """Means so far, read back from the device in one transfer."""
        xp, dtype = self.xp, self.loss.dtype
        flags = self.guard.flags() if self.guard is not None else ()
        values = _backend.to_numpy(xp.stack([xp.astype(s, dtype) for s in (self.loss, *self.sums, *flags)]))
        if flags:
            self.guard.verify([float(v) for v in values[-len(flags):]])
            values = values[:-len(flags)]
        return {name: float(s) / self.n for name, s in zip(["loss", *(m.name for m in self.metrics)], values)}


class _NonFiniteLoss(Exception):
    """Raised inside fit's loop at the first NaN/inf loss; ``value`` is None when only known on the device."""

    def __init__(self, epoch, step, value=None):
        super().__init__(epoch, step, value)
        self.epoch, self.step, self.value = epoch, step, value


class _Guard:
    """Stops training at the first NaN/inf loss (or NaN/inf in a lazily read x batch) and keeps finite weights.

    In host memory each step's loss (and x batch) is checked before its update, so a bad step never reaches the
    weights. On other devices nothing is read per step: flags accumulate on the device, ride along with the periodic
    read of the running loss (:class:`_Totals`), and on a failure the weights and optimizer state go back to the
    snapshot taken at the last good read.
    """

    def __init__(self, model, check_inputs):
        self.model, self.check_inputs, self.host = model, check_inputs, model.device.host_memory
        self.passed(0, 0)

    def passed(self, epoch, step):
        """A read found everything finite up to ``step`` of ``epoch`` (0-based): snapshot and restart the flags.

        In host memory steps are checked one by one and the snapshot is only a fallback (for a finite loss whose
        update overflowed), taken at epoch boundaries.
        """
        if self.host and step:
            return
        model, xp, opt = self.model, self.model.xp, self.model.optimizer
        where = "the start of training" if epoch == step == 0 else (
            f"the end of epoch {epoch}" if step == 0 else f"step {step} of epoch {epoch + 1}")
        self.saved = (xp.asarray(model._flat, copy=True), {k: xp.asarray(v, copy=True) for k, v in opt.state.items()},
                      opt.iterations, where)
        self.epoch, self.since = epoch, step
        if not self.host:
            dev = model.device
            self.loss_ok, self.loss_steps = xp.logical_not(dev.zeros((), "bool")), dev.zeros((), "int64")
            self.x_ok, self.x_steps = self.loss_ok, self.loss_steps

    def batch(self, xb, epoch, step):
        """Check (host memory) or track (device) the x batch of one step; returns that step's ``before_step(loss)``."""
        xp = self.model.xp
        if self.host:
            if self.check_inputs and not bool(xp.all(xp.isfinite(xb))):
                raise _data.StreamError(_bad_batch(epoch, step))

            def check(loss):
                value = float(loss)
                if not math.isfinite(value):
                    raise _NonFiniteLoss(epoch, step, value)
            return check

        if self.check_inputs:  # leading finite steps since the last read, counted on the device
            self.x_ok = xp.logical_and(self.x_ok, xp.all(xp.isfinite(xb)))
            self.x_steps = self.x_steps + xp.astype(self.x_ok, xp.int64)

        def track(loss):
            self.loss_ok = xp.logical_and(self.loss_ok, xp.isfinite(loss))
            self.loss_steps = self.loss_steps + xp.astype(self.loss_ok, xp.int64)
        return track

    def flags(self):
        return (self.x_ok, self.x_steps, self.loss_ok, self.loss_steps)

    def verify(self, values):
        x_ok, x_steps, loss_ok, loss_steps = values
        if self.check_inputs and not x_ok:
            raise _data.StreamError(_bad_batch(self.epoch, self.since + int(x_steps)))
        if not loss_ok:
            raise _NonFiniteLoss(self.epoch, self.since + int(loss_steps))

    def recover(self) -> str:
        """Make the weights finite again; say which weights the model now holds."""
        model, xp = self.model, self.model.xp
        if self.host and bool(xp.all(xp.isfinite(model._flat))):
            return "the weights from before that step"
        flat, state, iterations, where = self.saved
        model._flat[...] = flat
        model.optimizer.state = {k: xp.asarray(v, copy=True) for k, v in state.items()}
        model.optimizer.iterations = iterations
        return f"the weights from {where}"


def _bad_batch(epoch, step) -> str:
    return (f"batch {step} of x in epoch {epoch + 1} holds NaN or inf; training stopped and the weights were put "
            "back as they were: clean or impute the data first")


def _reject_nonfinite(a, name):
    """ValueError when an in-memory float array holds NaN or inf (one device read; lazily read data is checked per
    batch during training instead)."""
    if a is None or not _data.in_memory(a):
        return
    xp = array_api_compat.array_namespace(a)
    if not xp.isdtype(a.dtype, "real floating"):
        return
    finite = xp.isfinite(a)
    if bool(xp.all(finite)):
        return
    first = int(xp.argmin(xp.astype(xp.reshape(finite, (-1,)), a.dtype)))
    row = first // math.prod(a.shape[1:])
    raise ValueError(f"{name} holds NaN or inf (the first in row {row}); training on it would turn the weights into "
                     "NaN: clean or impute the data first")


def _warn_if_changed(checkpoint, config):
    for key in ("batch_size", "shuffle", "validation_split"):
        if key in checkpoint.fit and checkpoint.fit[key] != config[key]:
            warnings.warn(f"resuming from {checkpoint.path} with {key}={config[key]!r}, but it was trained with "
                          f"{checkpoint.fit[key]!r}: training will not continue exactly as an uninterrupted run would",
                          stacklevel=4)


def _output_dim(layers, width):
    for layer in layers:
        width = layer.output_dim(width)
    return width


def _describe(a) -> str:
    import array_api_compat

    try:
        return f"{type(a).__module__.split('.')[0]} device {array_api_compat.device(a)}"
    except Exception:  # noqa: BLE001
        return type(a).__name__
