"""Saving and loading: models, weights and training checkpoints, each one safetensors file written atomically.

Nothing from a file is ever unpickled or run; anything wrong with a file raises ModelFileError and nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import safetensors.numpy

from . import layers as _layers
from . import optimizers as _optimizers
from .backends import resolve_device, to_numpy
from .datasets import _write_atomic as _write_file

__all__ = ["ModelFileError", "save", "save_weights", "load", "load_weights", "save_checkpoint", "read_checkpoint",
           "Checkpoint"]

FORMAT, VERSION = "portanet", "1"
_MAX_HEADER = 100 * 2**20  # bytes; the safetensors library's own limit
_MAX_NDIM = 8  # portanet writes 1-D and 2-D tensors; a longer shape list is hostile (and slow to multiply out)
_DTYPES = {"F32": "float32", "F64": "float64"}
_CODES = {name: code for code, name in _DTYPES.items()}
_OPT, _CALLBACK = "optimizer.", "callback."


class ModelFileError(ValueError):
    """A file that cannot be loaded as asked: not safetensors, truncated, corrupted, hostile, or saved from a
    different architecture. The message names the file and what is wrong with it."""


# -- writing ------------------------------------------------------------------------------------------------------
def save(model, path, include_optimizer: bool = True) -> None:
    """Write ``model`` to ``path`` (one safetensors file): its weights, with ``include_optimizer`` the optimizer
    state, and the architecture and training configuration (``model.get_config()``) as JSON metadata."""
    tensors, meta = _model_parts(model, include_optimizer)
    _write_atomic(path, tensors, meta)


def save_weights(model, path) -> None:
    """Write the weights (and the architecture, for clear errors on load) without optimizer state."""
    save(model, path, include_optimizer=False)


def save_checkpoint(model, path, epoch: int, training: dict) -> None:
    """Write a checkpoint: what :func:`save` writes plus the training state ``fit(resume_from=path)`` continues from.

    ``training``: what ``fit`` keeps while it runs: ``history`` (a History), ``callbacks`` (the callback objects,
    whose ``state_dict()`` is saved), ``fit`` (JSON-able training configuration). ``epoch``: epochs completed.
    """
    tensors, meta = _model_parts(model, include_optimizer=True)
    states = {}
    for key, callback in _keyed(training["callbacks"]):
        state = dict(callback.state_dict())
        for field in [k for k, v in state.items() if hasattr(v, "shape")]:
            tensors[f"{_CALLBACK}{key}.{field}"] = np.ascontiguousarray(to_numpy(state.pop(field)), model.dtype)
        if state:
            states[key] = state
    history = training["history"]
    meta["checkpoint"] = json.dumps({
        "epoch": int(epoch), "step": int(model.optimizer.iterations), "rng": model._rng.bit_generator.state,
        "random": model._random.get_state(), "history": {"epoch": list(history.epoch), "history": history.history},
        "fit": training["fit"], "callbacks": states,
    })
    _write_atomic(path, tensors, meta)


def _model_parts(model, include_optimizer):
    model._require_built("save()")
    params = model.parameters()
    tensors = {name: np.ascontiguousarray(to_numpy(value)) for name, value in params.items()}
    meta = {"format": FORMAT, "version": VERSION, "config": json.dumps(model.get_config())}
    optimizer = model.optimizer
    if include_optimizer and optimizer is not None and (optimizer.state or optimizer.iterations):
        state = optimizer.state_dict()
        tensors.update({_OPT + k: np.ascontiguousarray(to_numpy(v)) for k, v in state["slots"].items()})
        meta["optimizer"] = json.dumps({"iterations": int(state["iterations"])})
    return tensors, meta


def _digest(meta: dict, tensors: dict) -> str:
    """SHA-256 over the metadata and every tensor (name, dtype, shape, bytes), independent of the file layout."""
    h = hashlib.sha256()
    for key in sorted(k for k in meta if k != "checksum"):
        h.update(json.dumps([key, meta[key]]).encode())
    for name in sorted(tensors):
        a = tensors[name]
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        h.update(np.ascontiguousarray(a).data)
    return "sha256:" + h.hexdigest()


def _write_atomic(path, tensors: dict, meta: dict) -> None:
    """Serialize with a checksum, then write through a temporary file in the destination's folder, fsync and rename
    (``datasets._write_atomic``): a reader, or a process killed mid-write, sees the old file or the new one."""
    data = safetensors.numpy.save(tensors, metadata={**meta, "checksum": _digest(meta, tensors)})
    _write_file(Path(os.fspath(path)), data)


# -- reading ------------------------------------------------------------------------------------------------------
class _File:
    """A safetensors file whose header has been parsed and size-checked; tensor data is read only on request."""

    def __init__(self, path):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            self._sniff(head, size)
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                self.fail(f"its safetensors header claims {n} bytes but the file has {size} in all: truncated or "
                          "not a safetensors file")
            if n > _MAX_HEADER:
                self.fail(f"its safetensors header claims {n} bytes, more than the format's limit of {_MAX_HEADER}")
            raw = f.read(n)
        header = self._parse(raw)
        meta = header.pop("__metadata__", {})
        if not (isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
            self.fail("its __metadata__ must map strings to strings")
        self.meta, self.size, self.data_bytes = meta, size, size - 8 - n
        self.entries = {name: self._entry(name, entry) for name, entry in header.items()}

    def fail(self, why, cause=None):
        raise ModelFileError(f"{self.path}: {why}") from cause

    def _sniff(self, head, size):
        if len(head) < 8:
            self.fail(f"too short to be a safetensors file ({size} bytes)")
        if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            self.fail("this is a zip archive (a NumPy .npz?), not a safetensors file; portanet never unpickles "
                      "anything: write models with model.save(path)")
        if head.startswith(b"\x93NUMPY"):
            self.fail("this is a NumPy .npy file, not a safetensors file: write models with model.save(path)")
        if head[0] == 0x80 and 2 <= head[1] <= 5:
            self.fail("this looks like a pickle (pickle.dump, torch.save), not a safetensors file; portanet never "
                      "unpickles anything: write models with model.save(path)")

    def _parse(self, raw) -> dict:
        try:
            header = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            self.fail(f"its safetensors header is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})", exc)
        if not isinstance(header, dict):
            self.fail(f"its safetensors header must be a JSON object, got {type(header).__name__}")
        return header

    def _entry(self, name, entry):
        """``(dtype name, shape)`` of one tensor, after checking that its declared size matches its byte range."""
        if not (isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"}):
            self.fail(f"tensor {name!r}: expected dtype, shape and data_offsets in the header, got {entry!r:.200}")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if code not in _DTYPES:
            self.fail(f"tensor {name!r} has dtype {code!r:.50}; portanet files hold F32 or F64 tensors")
        if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM and all(_is_int(d) and d >= 0 for d in shape)):
            self.fail(f"tensor {name!r} has shape {shape!r:.200}; expected a list of at most {_MAX_NDIM} "
                      "non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= self.data_bytes):
            self.fail(f"tensor {name!r} has data_offsets {offsets!r:.200} outside the {self.data_bytes} data bytes "
                      "in the file (truncated?)")
        declared = math.prod(shape) * np.dtype(_DTYPES[code]).itemsize  # Python ints: no overflow, no allocation
        if declared != offsets[1] - offsets[0]:
            self.fail(f"tensor {name!r} declares shape {tuple(shape)} ({declared} bytes) but spans "
                      f"{offsets[1] - offsets[0]} bytes")
        return _DTYPES[code], tuple(shape)

    def json(self, key, required=True):
        if key not in self.meta:
            if required:
                self.fail(f"it has no {key!r} entry in its metadata: not a portanet model file "
                          f"(a safetensors file from elsewhere can be read with load_weights when its names match)")
            return None
        try:
            return json.loads(self.meta[key])
        except (ValueError, RecursionError) as exc:
            self.fail(f"its {key!r} metadata is not valid JSON ({str(exc)[:200]})", exc)

    def check_portanet(self):
        if self.meta.get("format") != FORMAT:
            self.fail(f"not a portanet file (metadata format={self.meta.get('format')!r:.50}, expected {FORMAT!r})")
        if self.meta.get("version") != VERSION:
            self.fail(f"written by an unsupported portanet format version {self.meta.get('version')!r:.50} "
                      f"(this portanet reads version {VERSION})")

    def check_tensors(self, expected: dict, dtype: str | None, exact: bool = True):
        """Names (all of ``expected``; nothing else when ``exact``), shapes and, with ``dtype``, dtypes."""
        missing = [n for n in expected if n not in self.entries]
        if missing:
            self.fail(f"it lacks tensors {missing[:10]} that the architecture needs")
        extra = sorted(set(self.entries) - set(expected))
        if exact and extra:
            self.fail(f"it holds tensors {extra[:10]!r:.300} that the architecture does not have")
        for name, shape in expected.items():
            got_dtype, got_shape = self.entries[name]
            if got_shape != tuple(shape):
                self.fail(f"tensor {name!r} has shape {got_shape}, but the architecture needs {tuple(shape)}")
            if dtype is not None and got_dtype != dtype:
                self.fail(f"tensor {name!r} has dtype {got_dtype}, but the model's dtype is {dtype}")

    def arrays(self) -> dict:
        """Every tensor as a host NumPy array, after verifying the checksum when the file has one."""
        with open(self.path, "rb") as f:
            data = f.read(self.size + 1)
        try:
            if len(data) != self.size:
                raise ValueError(f"the file changed size while being read ({self.size} -> {len(data)} bytes)")
            arrays = safetensors.numpy.load(data)
        except Exception as exc:  # noqa: BLE001 - whatever the parser says about these bytes, the file is bad
            self.fail(f"its tensor data cannot be read ({type(exc).__name__}: {str(exc)[:200]})", exc)
        for name, (dtype, shape) in self.entries.items():  # the bytes read are the bytes checked
            a = arrays.get(name)
            if a is None or a.dtype != np.dtype(dtype) or a.shape != shape:
                self.fail(f"tensor {name!r} changed while the file was being read")
        if "checksum" in self.meta and _digest(self.meta, arrays) != self.meta["checksum"]:
            self.fail("its checksum does not match its contents: the file is corrupted")
        return arrays


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@contextlib.contextmanager
def _invalid(file: _File, what: str):
    """Any error raised while interpreting the file's content is the file's fault: report it as ModelFileError."""
    try:
        yield
    except ModelFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - hostile configs can trip any constructor; never leak another type
        file.fail(f"its {what} is invalid: {type(exc).__name__}: {str(exc)[:300]}", exc)


def _require(file, ok, why):
    if not ok:
        file.fail(why)


def _architecture(file: _File, device):
    """An unbuilt, compiled (when the file says so) model from the file's config, and its parameter shapes."""
    from .model import Model

    config = file.json("config")
    _require(file, isinstance(config, dict) and {"layers", "input_dim", "dtype"} <= set(config),
             "its config must be an object with layers, input_dim and dtype")
    layers, input_dim, dtype = config["layers"], config["input_dim"], config["dtype"]
    _require(file, isinstance(layers, list) and layers, "its config must list at least one layer")
    _require(file, _is_int(input_dim) and input_dim > 0, f"its config input_dim must be a positive integer, got {input_dim!r:.50}")
    _require(file, dtype in _CODES, f"its config dtype must be float32 or float64, got {dtype!r:.50}")
    with _invalid(file, "model config"):
        for layer in layers:
            if not (isinstance(layer, dict) and isinstance(layer.get("name"), str)):
                raise ValueError(f"each layer must be an object with a string name, got {layer!r:.100}")
        model = Model([_layers.get(layer) for layer in layers], device=device, dtype=dtype)
        if config.get("loss") is not None:
            model.compile(config["loss"], config.get("optimizer") or "adam", config.get("metrics") or [])
        shapes = _param_shapes(model.layers, input_dim)
    return model, config, shapes


def _param_shapes(layers, input_dim) -> dict:
    """``{"dense_0.kernel": (in, units), ...}`` in buffer order, computed without allocating anything."""
    shapes, dim = {}, input_dim
    for layer in layers:
        shapes.update({f"{layer.name}.{k}": tuple(s) for k, s in layer.param_shapes(dim).items()})
        dim = layer.output_dim(dim)
    return shapes


def _optimizer_slots(file: _File, optimizer, n_params: int) -> dict:
    """Expected optimizer tensors ``{"optimizer.m": (n,), ...}`` when the file has optimizer state, else {}."""
    state = file.json("optimizer", required=False)
    if state is None:
        return {}
    _require(file, optimizer is not None, "it has optimizer state but no optimizer in its config")
    _require(file, isinstance(state, dict) and _is_int(state.get("iterations")) and state["iterations"] >= 0,
             f"its optimizer state must hold a non-negative integer iterations, got {state!r:.100}")
    return {_OPT + slot: (n_params,) for slot in optimizer.slots}


def _flat(arrays, shapes) -> np.ndarray:
    return np.concatenate([arrays[name].reshape(-1) for name in shapes]) if shapes else np.zeros(0)


def _restore_optimizer(model, file, arrays):
    state = file.json("optimizer", required=False)
    if state is not None:
        dev, opt = model.device, model.optimizer
        opt.load_state_dict({"iterations": state["iterations"],
                             "slots": {s: dev.from_host(arrays[_OPT + s], model.dtype) for s in opt.slots}})


def load(path, device="cpu", backend=None):
    """Rebuild a model saved by :func:`save` (or a checkpoint) on ``device`` / ``backend`` (as ``Model`` takes them),
    compiled with its saved loss, optimizer (and its state, when saved) and metrics.

    Raises :class:`ModelFileError` for anything wrong with the file, ``OSError`` when it cannot be opened.
    """
    dev = resolve_device(device, backend)  # the caller's mistakes are not the file's
    file = _File(path)
    file.check_portanet()
    model, config, shapes = _architecture(file, dev)
    n = sum(math.prod(s) for s in shapes.values())
    expected = {**shapes, **_optimizer_slots(file, model.optimizer, n)}
    checkpoint = file.json("checkpoint", required=False)
    if checkpoint is not None:
        expected.update({k: v[1] for k, v in file.entries.items() if k.startswith(_CALLBACK)})
    file.check_tensors(expected, config["dtype"])
    arrays = file.arrays()
    with _invalid(file, "model config"):
        model.build(config["input_dim"])
    model._flat[...] = dev.from_host(_flat(arrays, shapes), model.dtype)
    _restore_optimizer(model, file, arrays)
    return model


def load_weights(model, path) -> None:
    """Copy the weights in ``path`` into ``model``: any portanet file (model, weights, checkpoint), or a safetensors
    file whose tensors are named like ``model.parameters()``. Names and shapes are checked before anything changes;
    float32 / float64 are cast to the model's dtype. An unbuilt model is built for the file's input width."""
    file = _File(path)
    config = file.json("config", required=False) if file.meta.get("format") == FORMAT else None
    if model.built:
        shapes = {name: tuple(v.shape) for name, v in model.parameters().items()}
    else:
        width = config.get("input_dim") if isinstance(config, dict) else None
        if not (_is_int(width) and width > 0):
            raise RuntimeError("load_weights() on an unbuilt model needs the input width: call model.build(input_dim) "
                               f"first ({file.path} does not record it)")
        with _invalid(file, "layer list"):
            shapes = _param_shapes(model.layers, width)
    file.check_tensors(shapes, None, exact=False)
    arrays = file.arrays()
    if not model.built:
        model.build(width)
    model._flat[...] = model.device.from_host(_flat(arrays, shapes), model.dtype)


# -- checkpoints --------------------------------------------------------------------------------------------------
class Checkpoint:
    """A checkpoint read and validated against a model; :meth:`restore` applies it (it cannot fail by then).

    ``epoch``: epochs completed; ``step``: optimizer steps taken; ``history``: ``{"epoch": [...], "history": {...}}``;
    ``fit``: the training configuration saved with it; ``callbacks``: ``{key: state}`` for callbacks' ``load_state_dict``.
    """

    def __init__(self, file, state, optimizer, arrays, shapes):
        self._file, self._optimizer, self._arrays, self._shapes = file, optimizer, arrays, shapes
        self.path = file.path
        self.epoch, self.step, self.history, self.fit = state["epoch"], state["step"], state["history"], state["fit"]
        self._rng, self._random = state["rng"], state["random"]
        self.callbacks = {key: dict(value) for key, value in state["callbacks"].items()}
        for name, a in arrays.items():
            if name.startswith(_CALLBACK):
                key, field = name[len(_CALLBACK):].rsplit(".", 1)
                self.callbacks.setdefault(key, {})[field] = a

    def load_callback_states(self, callbacks) -> None:
        """Give each callback its saved state, matched by class name and position among callbacks of its class."""
        for key, callback in _keyed(callbacks):
            if key in self.callbacks:
                with _invalid(self._file, f"state of callback {key}"):
                    callback.load_state_dict(self.callbacks[key])

    def restore(self, model) -> None:
        """Weights, optimizer (type, hyperparameters, state), host RNG and dropout generator state, into ``model``."""
        model._flat[...] = model.device.from_host(_flat(self._arrays, self._shapes), model.dtype)
        model.optimizer = self._optimizer
        _restore_optimizer(model, self._file, self._arrays)
        model._rng.bit_generator.state = self._rng
        if self._random is not None:
            model._random.set_state(self._random)


def read_checkpoint(path, model) -> Checkpoint:
    """Read and validate the checkpoint at ``path`` for ``model`` (built and compiled; same layers, input width and
    dtype) without changing anything. Raises :class:`ModelFileError`."""
    file = _File(path)
    file.check_portanet()
    config = file.json("config")
    state = file.json("checkpoint", required=False)
    _require(file, state is not None, "it is a model file, not a checkpoint: checkpoints are written by "
                                      "ModelCheckpoint during fit(); portanet.load(path) reads model files")
    mine = model.get_config()
    _require(file, isinstance(config, dict), "its config must be a JSON object")
    for key in ("layers", "input_dim", "dtype"):
        if config.get(key) != mine[key]:
            file.fail(f"it was saved from a different model: {key} is {config.get(key)!r:.300} in the checkpoint "
                      f"but {mine[key]!r:.300} in this model")
    with _invalid(file, "optimizer config"):
        optimizer = _optimizers.get(config.get("optimizer"))
    _check_state(file, state, model)
    shapes = _param_shapes(model.layers, model.input_dim)
    expected = {**shapes, **_optimizer_slots(file, optimizer, model.count_params())}
    for name, (dtype, shape) in file.entries.items():
        if name.startswith(_CALLBACK):
            _require(file, name.count(".") >= 3, f"callback tensor {name!r} must be named callback.<class>.<n>.<field>")
            expected[name] = shape
    file.check_tensors(expected, model.dtype)
    return Checkpoint(file, state, optimizer, file.arrays(), shapes)


def _check_state(file, state, model):
    _require(file, isinstance(state, dict) and {"epoch", "step", "rng", "random", "history", "fit", "callbacks"}
             <= set(state), "its checkpoint entry must hold epoch, step, rng, random, history, fit and callbacks")
    for key in ("epoch", "step"):
        _require(file, _is_int(state[key]) and state[key] >= 0, f"checkpoint {key} must be a non-negative integer")
    with _invalid(file, "random generator state"):
        np.random.Generator(type(model._rng.bit_generator)()).bit_generator.state = state["rng"]
        if state["random"] is not None:  # the model's kind of generator reads it (a state of another kind is ignored)
            model.device.random_source(0).set_state(state["random"])
    history = state["history"]
    _require(file, isinstance(history, dict) and isinstance(history.get("epoch"), list)
             and all(_is_int(e) for e in history["epoch"]) and isinstance(history.get("history"), dict),
             "its history must hold an epoch list and a history object")
    n = len(history["epoch"])
    for key, values in history["history"].items():
        _require(file, isinstance(values, list) and len(values) == n
                 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values),
                 f"history[{key!r:.50}] must be a list of {n} numbers")
    fit = state["fit"]
    _require(file, isinstance(fit, dict) and (fit.get("split_seed") is None or _is_int(fit["split_seed"])
                                              and fit["split_seed"] >= 0),
             "its fit configuration must be a JSON object (split_seed a non-negative integer or null)")
    callbacks = state["callbacks"]
    _require(file, isinstance(callbacks, dict) and all(isinstance(v, dict) for v in callbacks.values()),
             "its callback states must be JSON objects")


def _keyed(callbacks):
    """``("EarlyStopping.0", callback)`` for each callback: class name and index among callbacks of that class."""
    seen = {}
    for callback in callbacks:
        name = type(callback).__name__
        seen[name] = seen.get(name, -1) + 1
        yield f"{name}.{seen[name]}", callback
