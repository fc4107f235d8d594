"""Saving and loading: models, weights and training checkpoints, each one safetensors file written atomically.

Nothing from a file is ever unpickled or run; anything wrong with a file raises ModelFileError and nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import struct
from pathlib import Path

import numpy as np
import safetensors.numpy

from . import _interrupts
from . import layers as _layers
from . import losses as _losses
from . import metrics as _metrics
from . import optimizers as _optimizers
from ._files import write_atomic as _write_file
from .backends import to_numpy
from .params import Snapshot

__all__ = ["ModelFileError", "save", "save_weights", "load", "load_weights", "save_checkpoint", "read_checkpoint",
           "Checkpoint", "MAX_HEADER_BYTES", "MAX_METADATA_BYTES", "MAX_METADATA_ENTRIES", "MAX_JSON_CONTAINERS",
           "MAX_TENSORS", "MAX_LAYERS", "MAX_NDIM", "MAX_COUNT"]

FORMAT, VERSION = "portanet", "1"
# Limits on what a file may hold (README, "Reliability"): beyond them a file is refused with ModelFileError before
# its content is used, and save() refuses to write one. They keep loading linear in the file with small constants.
MAX_HEADER_BYTES = 100 * 2**20   # the safetensors format's own limit
MAX_METADATA_BYTES = 8 * 2**20   # all metadata together (config, optimizer, checkpoint state, history), in characters
MAX_METADATA_ENTRIES = 64
MAX_JSON_CONTAINERS = 200_000    # JSON lists and objects in all metadata together
MAX_TENSORS = 65_536
MAX_LAYERS = 10_000
MAX_NDIM = 8                     # portanet writes 1-D and 2-D tensors
MAX_COUNT = 2**53                # optimizer iterations, epochs, steps: exact as floats, far beyond any run
_DTYPES = {"F32": "float32", "F64": "float64"}
_CODES = {name: code for code, name in _DTYPES.items()}
_OPT, _CALLBACK = "optimizer.", "callback."
_META_KEYS = {"format", "version", "config", "optimizer", "checkpoint", "checksum"}
_WS = re.compile(r"[ \t\n\r]*")
_UINT = re.compile(r"(?:0|[1-9][0-9]{0,19})(?![0-9.eE])")  # a JSON integer >= 0 of at most 20 digits
# A tensor entry as safetensors writes it, matched in one go (anything else goes through the general scanner)
_N, _S = r"(?:0|[1-9][0-9]{0,19})(?![0-9.eE])", r"[ \t\n\r]*"
_ENTRY = re.compile(rf'"([^"\\\x00-\x1f]*)"{_S}:{_S}\{{{_S}"dtype"{_S}:{_S}"([A-Z0-9]{{1,8}})"{_S},{_S}"shape"{_S}:{_S}'
                    rf'\[{_S}((?:{_N}{_S}(?:,{_S}{_N}{_S}){{0,{MAX_NDIM - 1}}})?)\]{_S},{_S}"data_offsets"{_S}:{_S}'
                    rf'\[{_S}({_N}){_S},{_S}({_N}){_S}\]{_S}\}}')


class ModelFileError(ValueError):
    """A file that cannot be loaded as asked: not safetensors, truncated, corrupted, hostile, or saved from a
    different architecture. The message names the file and what is wrong with it."""


# -- writing ------------------------------------------------------------------------------------------------------
def save(model, path, include_optimizer: bool = True) -> None:
    """Write the built ``model`` to ``path`` (one safetensors file): its weights and non-trainable state, with
    ``include_optimizer`` the optimizer state, and the architecture and training configuration
    (``model.get_config()``) as JSON metadata."""
    tensors, meta = _model_parts(model, include_optimizer)
    _check_writable(model, tensors, meta)
    _write_atomic(path, tensors, meta)


def save_weights(model, path) -> None:
    """Write the weights and state (and the architecture, for clear errors on load) without optimizer state. An
    optimizer whose configuration cannot be recorded (a plain callable learning rate) is left out of the config:
    weights do not need it."""
    tensors, meta = _model_parts(model, include_optimizer=False, config=_config_for_weights(model))
    _check_writable(model, tensors, meta)
    _write_atomic(path, tensors, meta)


def _config_for_weights(model) -> dict:
    """``model.get_config()``, or, when its optimizer cannot record itself (a plain callable learning rate, which
    has no config), the same without the optimizer: for files that carry weights, not training (save_weights,
    ONNX export)."""
    try:
        return model.get_config()
    except ValueError:
        return model.get_config(include_optimizer=False)  # raises again if something else has no config


def save_checkpoint(model, path, epoch: int, params: dict) -> None:
    """Write a checkpoint: what :func:`save` writes plus the training state ``fit(resume_from=path)`` continues from.

    ``params``: the run's ``Callback.params``: ``history`` (a History), ``callbacks`` (the callback objects, whose
    ``state_dict()`` is saved; snapshot values as tensors), ``fit`` (JSON-able training configuration).
    ``epoch``: epochs completed.
    """
    tensors, meta = _model_parts(model, include_optimizer=True)
    states = {}
    for key, callback in _keyed(params["callbacks"]):
        state = dict(callback.state_dict())
        for field in [k for k, v in state.items() if isinstance(v, Snapshot)]:
            snap = state.pop(field)
            tensors[f"{_CALLBACK}{key}.{field}.values"] = _host(snap.values, model.dtype)
            tensors[f"{_CALLBACK}{key}.{field}.state"] = _host(snap.state, model.dtype)
        if state:
            states[key] = state
    history = params["history"]
    random = model.random_state()
    meta["checkpoint"] = json.dumps({
        "epoch": int(epoch), "step": int(model.optimizer.iterations), "rng": random["rng"],
        "random": random["dropout"], "history": {"epoch": list(history.epoch), "history": history.history},
        "fit": params["fit"], "callbacks": states,
    })
    _check_writable(model, tensors, meta)
    _write_atomic(path, tensors, meta)


def _host(a, dtype=None):
    host = np.ascontiguousarray(to_numpy(a))
    return host if dtype is None else host.astype(dtype, copy=False)


def _model_parts(model, include_optimizer, config=None):
    buffer = model.parameter_buffer
    tensors = {name: _host(v) for name, v in buffer.parameters().items()}
    tensors.update({name: _host(v) for name, v in buffer.states().items()})
    meta = {"format": FORMAT, "version": VERSION,
            "config": json.dumps(model.get_config() if config is None else config)}
    optimizer = model.optimizer
    if include_optimizer and optimizer is not None and (optimizer.state or optimizer.iterations):
        state = optimizer.state_dict()
        tensors.update({_OPT + k: _host(v) for k, v in state["slots"].items()})
        meta["optimizer"] = json.dumps({"iterations": int(state["iterations"])})
    return tensors, meta


def _check_writable(model, tensors: dict, meta: dict) -> None:
    """Refuse (ValueError) to write a file that load() would refuse: non-finite values, or beyond the limits."""
    if len(model.layers) > MAX_LAYERS:
        raise ValueError(f"cannot save a model of {len(model.layers)} layers: portanet files hold at most {MAX_LAYERS}")
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"cannot save {len(tensors)} tensors: portanet files hold at most {MAX_TENSORS}")
    size = sum(len(k) + len(v) for k, v in meta.items())
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"cannot save {size} characters of metadata (configuration, history): portanet files hold "
                         f"at most {MAX_METADATA_BYTES}")
    for name, a in tensors.items():
        if not np.isfinite(a).all():
            raise ValueError(f"cannot save {name}: it holds NaN or inf (fit() never produces such weights; were "
                             "they set by hand?)")


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
    """A safetensors file whose header has been parsed and checked; tensor data is read only on request.

    The header is parsed by a scanner that accepts only what a safetensors header may hold (tensor entries of a
    dtype string, a shape and two offsets, integers of at most 20 digits; metadata mapping strings to strings) and
    stops at the first entry beyond the limits, so time and memory stay linear in the header with small constants
    whatever it holds. ``entries``: ``{name: (dtype name, shape, start, stop)}``; ``meta``: the metadata.
    """

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
            if n > MAX_HEADER_BYTES:
                self.fail(f"its safetensors header claims {n} bytes, more than the format's limit of "
                          f"{MAX_HEADER_BYTES}")
            raw = f.read(n)
        if len(raw) != n:
            self.fail(f"the file changed size while being read (its header is {len(raw)} bytes, not {n})")
        self.size, self.data_bytes, self._header_bytes = size, size - 8 - n, n
        self._header_digest = hashlib.sha256(raw).digest()  # to see that the data read later has this header
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.fail(f"its safetensors header is not valid JSON (not UTF-8: {exc})", exc)
        del raw
        self.meta, self.entries, self._text, self._meta_size = {}, {}, text, 0
        self._parse(text)
        del self._text
        self._check_layout()
        containers = sum(v.count("[") + v.count("{") for v in self.meta.values())
        if containers > MAX_JSON_CONTAINERS:
            self.fail(f"its metadata holds {containers} JSON lists and objects, more than the limit of "
                      f"{MAX_JSON_CONTAINERS}")

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

    # -- the header scanner ---------------------------------------------------------------------------------------
    def _syntax(self, text, pos, expected):
        self.fail(f"its safetensors header is not valid JSON: expected {expected} at character {pos}, got "
                  f"{text[pos:pos + 40]!r}")

    def _ws(self, text, pos):
        return _WS.match(text, pos).end()

    def _string(self, text, pos):
        if text[pos:pos + 1] != '"':
            self._syntax(text, pos, "a string")
        try:
            return json.decoder.scanstring(text, pos + 1)
        except ValueError as exc:  # JSONDecodeError: an unterminated string, a bad escape
            self.fail(f"its safetensors header is not valid JSON ({exc})", exc)

    def _members(self, text, pos, what):
        """Yield ``(key, position of its value)`` for each member of the JSON object at ``pos``; the caller parses
        each value and hands back the position after it with ``send``."""
        pos = self._ws(text, pos)
        if text[pos:pos + 1] != "{":
            self.fail(f"{what} must be a JSON object, got {text[pos:pos + 40]!r}")
        pos = self._ws(text, pos + 1)
        if text[pos:pos + 1] == "}":
            return pos + 1
        while True:
            key, pos = self._string(text, pos)
            pos = self._ws(text, pos)
            if text[pos:pos + 1] != ":":
                self._syntax(text, pos, "':'")
            pos = yield key, self._ws(text, pos + 1)
            pos = self._ws(text, pos)
            if text[pos:pos + 1] == "}":
                return pos + 1
            if text[pos:pos + 1] != ",":
                self._syntax(text, pos, "',' or '}'")
            pos = self._ws(text, pos + 1)

    def _walk(self, text, pos, what, value):
        """Parse the object at ``pos`` calling ``value(key, position) -> position after the value``; return the
        position after the object."""
        members = self._members(text, pos, what)
        try:
            key, at = next(members)
            while True:
                key, at = members.send(value(key, at))
        except StopIteration as done:
            return done.value

    def _parse(self, text):
        """The top-level object: each member a tensor entry (one regular-expression match when written the usual
        way, else :meth:`_top`) or ``__metadata__``."""
        pos = self._ws(text, 0)
        if text[pos:pos + 1] != "{":
            self.fail(f"its safetensors header must be a JSON object, got {text[pos:pos + 40]!r}")
        pos = self._ws(text, pos + 1)
        if text[pos:pos + 1] == "}":
            pos += 1
        else:
            while True:
                match = _ENTRY.match(text, pos)
                if match is not None:
                    name, code, shape, start, stop = match.groups()
                    self._add(name, {"dtype": code, "shape": [int(d) for d in shape.split(",")] if shape else [],
                                     "data_offsets": [int(start), int(stop)]})
                    pos = match.end()
                else:
                    name, pos = self._string(text, pos)
                    pos = self._ws(text, pos)
                    if text[pos:pos + 1] != ":":
                        self._syntax(text, pos, "':'")
                    pos = self._top(name, self._ws(text, pos + 1))
                pos = self._ws(text, pos)
                if text[pos:pos + 1] == "}":
                    pos += 1
                    break
                if text[pos:pos + 1] != ",":
                    self._syntax(text, pos, "',' or '}'")
                pos = self._ws(text, pos + 1)
        if self._ws(text, pos) != len(text):
            self._syntax(text, self._ws(text, pos), "the end of the header")

    def _add(self, name, fields):
        if name == "__metadata__" or name in self.entries:
            self.fail(f"{name!r:.100} appears twice in its header" if name in self.entries else
                      "its __metadata__ must map strings to strings, got a tensor entry")
        if len(self.entries) >= MAX_TENSORS:
            self.fail(f"it holds more than {MAX_TENSORS} tensors, the limit for portanet files")
        self.entries[name] = self._entry(name, fields)

    def _top(self, name, pos):
        if name == "__metadata__":
            if self.meta:
                self.fail("its header holds __metadata__ twice")
            return self._walk(self._text, pos, "its __metadata__", self._metadata_entry)
        fields = {}
        end = self._walk(self._text, pos, f"tensor {name!r:.100}", lambda key, at: self._field(name, fields, key, at))
        self._add(name, fields)
        return end

    def _metadata_entry(self, key, pos):
        text = self._text
        if key in self.meta:
            self.fail(f"its __metadata__ holds {key!r:.50} twice")
        if len(self.meta) >= MAX_METADATA_ENTRIES:
            self.fail(f"its __metadata__ holds more than {MAX_METADATA_ENTRIES} entries")
        if text[pos:pos + 1] != '"':
            self.fail(f"its __metadata__ must map strings to strings; {key!r:.50} maps to {text[pos:pos + 40]!r}")
        value, end = self._string(text, pos)
        self._meta_size += len(key) + len(value)
        if self._meta_size > MAX_METADATA_BYTES:
            self.fail(f"its metadata is longer than the limit of {MAX_METADATA_BYTES} characters")
        self.meta[key] = value
        return end

    def _field(self, name, fields, key, pos):
        text = self._text
        if key not in ("dtype", "shape", "data_offsets") or key in fields:
            self.fail(f"tensor {name!r:.100}: expected dtype, shape and data_offsets in the header, got "
                      f"{'a second ' if key in fields else ''}{key!r:.50}")
        if key == "dtype":
            if text[pos:pos + 1] != '"':
                self.fail(f"tensor {name!r:.100} has dtype {text[pos:pos + 40]!r}; portanet files hold F32 or F64 "
                          "tensors")
            fields[key], end = self._string(text, pos)
            return end
        limit = MAX_NDIM if key == "shape" else 2
        numbers, pos = [], self._ws(text, pos)
        bad = (f"tensor {name!r:.100} has {key} {text[pos:pos + 60]!r}...; expected a list of at most {limit} "
               "non-negative integers")
        if text[pos:pos + 1] != "[":
            self.fail(bad)
        pos = self._ws(text, pos + 1)
        if text[pos:pos + 1] == "]":
            fields[key] = numbers
            return pos + 1
        while True:
            match = _UINT.match(text, pos)
            if match is None or len(numbers) == limit:
                self.fail(bad)
            numbers.append(int(match.group()))
            pos = self._ws(text, match.end())
            if text[pos:pos + 1] == "]":
                fields[key] = numbers
                return pos + 1
            if text[pos:pos + 1] != ",":
                self.fail(bad)
            pos = self._ws(text, pos + 1)

    def _entry(self, name, fields):
        """``(dtype name, shape, start, stop)`` of one tensor, after checking that its declared size matches its
        byte range."""
        if len(fields) != 3:
            self.fail(f"tensor {name!r:.100}: expected dtype, shape and data_offsets in the header, got "
                      f"{sorted(fields)}")
        code, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
        if code not in _DTYPES:
            self.fail(f"tensor {name!r:.100} has dtype {code!r:.50}; portanet files hold F32 or F64 tensors")
        if len(offsets) != 2 or not offsets[0] <= offsets[1] <= self.data_bytes:
            self.fail(f"tensor {name!r:.100} has data_offsets {offsets!r:.200} outside the {self.data_bytes} data "
                      "bytes in the file (truncated?)")
        declared = math.prod(shape) * np.dtype(_DTYPES[code]).itemsize  # Python ints: no overflow, no allocation
        if declared != offsets[1] - offsets[0]:
            self.fail(f"tensor {name!r:.100} declares shape {tuple(shape)} ({declared} bytes) but spans "
                      f"{offsets[1] - offsets[0]} bytes")
        return _DTYPES[code], tuple(shape), offsets[0], offsets[1]

    def _check_layout(self):
        """The tensors' byte ranges tile the data exactly, as the safetensors format requires (no gap, no overlap:
        no byte read twice under two names)."""
        end = 0
        for name, (_, _, start, stop) in sorted(self.entries.items(), key=lambda item: item[1][2:]):
            if start != end:
                self.fail(f"tensor {name!r:.100} starts at data byte {start}, but the tensor before it ends at {end} "
                          "(a gap or an overlap)")
            end = stop
        if end != self.data_bytes:
            self.fail(f"its tensors end at data byte {end}, but the file holds {self.data_bytes} (truncated, or "
                      "bytes appended)")

    # -- what the loaders use ---------------------------------------------------------------------------------------
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
        unknown = sorted(set(self.meta) - _META_KEYS)
        if unknown:
            self.fail(f"its metadata holds {unknown[:5]!r:.200}, which portanet files of version {VERSION} never do "
                      f"(they hold {sorted(_META_KEYS)})")

    def check_tensors(self, expected: dict, dtype: str | None, exact: bool = True):
        """Names (all of ``expected``; nothing else when ``exact``), shapes and, with ``dtype``, dtypes."""
        missing = [n for n in expected if n not in self.entries]
        if missing:
            self.fail(f"it lacks tensors {missing[:10]} that the architecture needs")
        if exact and len(self.entries) > len(expected):
            extra = sorted(n for n in self.entries if n not in expected)
            self.fail(f"it holds tensors {extra[:10]!r:.300} that the architecture does not have")
        for name, shape in expected.items():
            got_dtype, got_shape = self.entries[name][:2]
            if got_shape != tuple(shape):
                self.fail(f"tensor {name!r} has shape {got_shape}, but the architecture needs {tuple(shape)}")
            if dtype is not None and got_dtype != dtype:
                self.fail(f"tensor {name!r} has dtype {got_dtype}, but the model's dtype is {dtype}")

    def arrays(self, used) -> dict:
        """Every tensor as a host NumPy array (views of one buffer holding the file), after verifying the checksum
        (required in portanet files) and that the tensors named in ``used`` hold no NaN or inf."""
        if "checksum" not in self.meta and self.meta.get("format") == FORMAT:
            self.fail("it has no checksum in its metadata: portanet writes one into every file, so the file was "
                      "damaged or edited")
        data = bytearray(self.size + 1)
        with open(self.path, "rb") as f:
            got = f.readinto(data)
        base = 8 + self._header_bytes
        if got != self.size or hashlib.sha256(memoryview(data)[8:base]).digest() != self._header_digest:
            self.fail("the file changed while being read")
        arrays = {name: np.frombuffer(data, np.dtype(dtype).newbyteorder("<"), math.prod(shape),
                                      base + start).reshape(shape)
                  for name, (dtype, shape, start, _) in self.entries.items()}
        if "checksum" in self.meta and _digest(self.meta, arrays) != self.meta["checksum"]:
            self.fail("its checksum does not match its contents: the file is corrupted")
        for name in used:
            if not np.isfinite(arrays[name]).all():
                self.fail(f"tensor {name!r} holds NaN or inf (portanet never saves such values: the file was "
                          "damaged or edited)")
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


def _architecture(file: _File, factory, check_config=True):
    """An unbuilt, compiled (when the file says so) model made by ``factory(config)`` from the file's config, and
    the shapes of its parameters and state."""
    config = _config(file, check_config)
    with _invalid(file, "config"):
        model = factory(config)
        shapes = _shapes(model.layers, config["input_dim"])
    return model, config, shapes


def _config(file: _File, check_config=True) -> dict:
    """The file's model config, every value checked before use: its structure here, hyperparameters by the
    constructors they go to (each layer, the loss, the optimizer, each metric), errors naming the field. With
    ``check_config=False`` only the structure: the caller's factory does not read the hyperparameters."""
    config = file.json("config")
    _require(file, isinstance(config, dict) and {"layers", "input_dim", "dtype"} <= set(config),
             "its config must be an object with layers, input_dim and dtype")
    layers, input_dim, dtype = config["layers"], config["input_dim"], config["dtype"]
    _require(file, isinstance(layers, list) and 1 <= len(layers) <= MAX_LAYERS,
             f"its config must list between 1 and {MAX_LAYERS} layers, got "
             f"{len(layers) if isinstance(layers, list) else type(layers).__name__}")
    _require(file, _is_int(input_dim) and 0 < input_dim < MAX_COUNT,
             f"its config input_dim must be a positive integer, got {input_dim!r:.50}")
    _require(file, isinstance(dtype, str) and dtype in _CODES,
             f"its config dtype must be float32 or float64, got {dtype!r:.50}")
    for i, layer in enumerate(layers):
        _require(file, isinstance(layer, dict) and isinstance(layer.get("name"), str),
                 f"each layer must be an object with a string name; config layers[{i}] is {layer!r:.100}")
        if not check_config:
            continue
        with _invalid(file, f"config layers[{i}]"):
            _layers.get(layer)
    for key, get in (("loss", _losses.get), ("optimizer", _optimizers.get)):
        if check_config and config.get(key) is not None:
            with _invalid(file, f"config {key}"):
                get(config[key])
    metrics = config.get("metrics")
    _require(file, metrics is None or isinstance(metrics, list), f"its config metrics must be a list, got "
                                                                 f"{type(metrics).__name__}")
    for i, metric in enumerate((metrics or []) if check_config else []):
        with _invalid(file, f"config metrics[{i}]"):
            _metrics.get(metric)
    return config


def _shapes(layers, input_dim) -> tuple:
    """``({"dense_0.kernel": (in, units), ...}, {state name: shape})`` in buffer order, allocating nothing."""
    params, states, dim = {}, {}, input_dim
    for layer in layers:
        params.update({f"{layer.name}.{k}": tuple(s) for k, s in layer.param_shapes(dim).items()})
        states.update({f"{layer.name}.{k}": tuple(s) for k, s in layer.state_shapes(dim).items()})
        dim = layer.output_dim(dim)
    return params, states


def _optimizer_slots(file: _File, optimizer, n_params: int) -> dict:
    """Expected optimizer tensors ``{"optimizer.m": (n,), ...}`` when the file has optimizer state, else {}."""
    state = file.json("optimizer", required=False)
    if state is None:
        return {}
    _require(file, optimizer is not None, "it has optimizer state but no optimizer in its config")
    _require(file, isinstance(state, dict) and _is_int(state.get("iterations"))
             and 0 <= state["iterations"] < MAX_COUNT,
             f"its optimizer state must hold iterations, an integer in [0, 2**53), got {state!r:.100}")
    return {_OPT + slot: (n_params,) for slot in optimizer.slots}


def _callback_shapes(file: _File, n: int, m: int) -> dict:
    """``{name: shape}`` of the callbacks' weights snapshots in the file: ``callback.<class>.<n>.<field>.values``
    of shape (n,) (the parameters) and ``....state`` of shape (m,), always in pairs."""
    shapes = {}
    for name in file.entries:
        if name.startswith(_CALLBACK):
            parts = name[len(_CALLBACK):].split(".")
            _require(file, len(parts) == 4 and parts[0].isidentifier() and parts[1].isdigit()
                     and parts[2].isidentifier() and parts[3] in ("values", "state"),
                     f"callback tensor {name!r:.100} must be named callback.<class>.<n>.<field>.values or .state")
            shapes[name] = (n,) if parts[3] == "values" else (m,)
    for name in shapes:
        pair = name[: name.rindex(".")]
        _require(file, f"{pair}.values" in shapes and f"{pair}.state" in shapes,
                 f"callback snapshot {pair!r:.100} needs both its .values and .state tensors")
    return shapes


def _flat(arrays, shapes) -> np.ndarray:
    return np.concatenate([arrays[name].reshape(-1) for name in shapes]) if shapes else np.zeros(0)


def _assign(model, arrays, shapes) -> None:
    """Write the file's parameters and state into the built model's buffer (one update: Ctrl-C waits for it)."""
    buffer, dev = model.parameter_buffer, model.device
    params, states = shapes
    values = dev.from_host(_flat(arrays, params), model.dtype)
    state = dev.from_host(_flat(arrays, states), model.dtype) if states else None
    with _interrupts.update():
        buffer.values[...] = values
        if state is not None:
            buffer.state[...] = state


def _own(dev, a, dtype):
    """A device array of its own (never a view of the buffer the file was read into)."""
    return dev.from_host(np.array(a, dtype=dtype))


def _check_slots(file, optimizer, arrays):
    """Slots that are running means of squares (Adam's ``v``) hold no negative value (its square root would be NaN)."""
    for slot in getattr(optimizer, "nonnegative_slots", ()):
        a = arrays.get(_OPT + slot)
        if a is not None and not (a >= 0).all():
            file.fail(f"tensor {_OPT + slot!r} holds negative values; it is a running mean of squared gradients")


def _restore_optimizer(model, file, arrays):
    state = file.json("optimizer", required=False)
    if state is not None:
        dev, opt = model.device, model.optimizer
        opt.load_state_dict({"iterations": state["iterations"],
                             "slots": {s: _own(dev, arrays[_OPT + s], model.dtype) for s in opt.slots}})


def _count(shapes) -> int:
    return sum(math.prod(s) for s in shapes.values())


def load(path, factory, check_config=True):
    """Rebuild a model saved by :func:`save` (or a checkpoint): ``factory(config)`` makes the unbuilt model from the
    file's ``get_config()`` data (``portanet.load`` passes ``Model.from_config`` on the chosen device); it is
    built, and its weights, state and optimizer state are set from the file. ``check_config=False`` is for a
    factory that makes the architecture from its own knowledge, with layers, losses or optimizers that are not in
    portanet's registries (``portanet.sklearn``'s pickles): the config's layer, loss, optimizer and metric entries
    are then not checked against the registries; its structure, and the tensors against the model the factory
    makes, still are.

    Raises :class:`ModelFileError` for anything wrong with the file, ``OSError`` when it cannot be opened.
    """
    file = _File(path)
    file.check_portanet()
    model, config, shapes = _architecture(file, factory, check_config)
    n, m = _count(shapes[0]), _count(shapes[1])
    expected = {**shapes[0], **shapes[1], **_optimizer_slots(file, model.optimizer, n)}
    if file.json("checkpoint", required=False) is not None:
        expected.update(_callback_shapes(file, n, m))
    file.check_tensors(expected, config["dtype"])
    arrays = file.arrays(expected)
    _check_slots(file, model.optimizer, arrays)
    with _invalid(file, "config"):
        model.build(config["input_dim"])
    _assign(model, arrays, shapes)
    _restore_optimizer(model, file, arrays)
    return model


def load_weights(model, path) -> None:
    """Copy the weights (and state) in ``path`` into ``model``: any portanet file (model, weights, checkpoint), or a
    safetensors file whose tensors are named like ``model.parameters()``. Names, shapes, the checksum and that the
    values are finite are checked before anything changes; float32 / float64 are cast to the model's dtype. An
    unbuilt model is built for the input width a portanet file records (RuntimeError for another file)."""
    file = _File(path)
    if model.built:
        width = model.input_dim
    elif file.meta.get("format") == FORMAT:
        config = file.json("config")
        width = config.get("input_dim") if isinstance(config, dict) else None
        _require(file, _is_int(width) and 0 < width < MAX_COUNT,
                 f"its config input_dim must be a positive integer, got {width!r:.50}")
    else:
        raise RuntimeError("load_weights() on an unbuilt model needs the input width: call model.build(input_dim) "
                           f"first ({file.path} does not record it)")
    with _invalid(file, "layer list"):
        model.check_input_dim(width)
        shapes = _shapes(model.layers, width)
    params, states = shapes
    present_states = {k: v for k, v in states.items() if k in file.entries}
    file.check_tensors({**params, **present_states}, None, exact=False)
    arrays = file.arrays({**params, **present_states})
    if not model.built:
        model.build(width)
    _assign(model, arrays, (params, present_states) if len(present_states) == len(states) else (params, {}))


# -- checkpoints --------------------------------------------------------------------------------------------------
class Checkpoint:
    """A checkpoint read and validated against a model; :meth:`restore` applies it (it cannot fail by then).

    ``epoch``: epochs completed; ``step``: optimizer steps taken; ``history``: ``{"epoch": [...], "history": {...}}``;
    ``fit``: the training configuration saved with it; ``callbacks``: ``{key: state}`` for callbacks'
    ``load_state_dict`` (weights snapshots as host arrays until :meth:`load_callback_states`).
    """

    def __init__(self, file, state, optimizer, arrays, shapes):
        self._file, self._optimizer, self._arrays, self._shapes = file, optimizer, arrays, shapes
        self.path = file.path
        self.epoch, self.step, self.history, self.fit = state["epoch"], state["step"], state["history"], state["fit"]
        self._random = {"rng": state["rng"], "dropout": state["random"]}
        self.callbacks = {key: dict(value) for key, value in state["callbacks"].items()}
        self._snapshots = {}
        for name, a in arrays.items():
            if name.startswith(_CALLBACK):
                key, field, part = name[len(_CALLBACK):].rsplit(".", 2)
                self._snapshots.setdefault((key, field), {})[part] = a

    def check_callback_states(self, callbacks) -> None:
        """Ask each callback whether it can take its saved state (``Callback.check_state_dict``), weights
        snapshots included as host arrays; changes nothing. Raises :class:`ModelFileError` naming the callback."""
        states = {key: dict(value) for key, value in self.callbacks.items()}
        for (key, field), parts in self._snapshots.items():
            states.setdefault(key, {})[field] = Snapshot(parts["values"], parts["state"])
        for key, callback in _keyed(callbacks):
            if key in states:
                with _invalid(self._file, f"state of callback {key}"):
                    callback.check_state_dict(states[key])

    def load_callback_states(self, callbacks, model) -> None:
        """Give each callback its saved state, matched by class name and position among callbacks of its class;
        weights snapshots are sent to ``model``'s device first."""
        dev = model.device
        for (key, field), parts in self._snapshots.items():
            snap = Snapshot(_own(dev, parts["values"], model.dtype), _own(dev, parts["state"], model.dtype))
            self.callbacks.setdefault(key, {})[field] = snap
        for key, callback in _keyed(callbacks):
            if key in self.callbacks:
                with _invalid(self._file, f"state of callback {key}"):
                    callback.load_state_dict(self.callbacks[key])

    def restore(self, model) -> None:
        """Weights, state, optimizer (type, hyperparameters, state), host RNG and dropout generator state, into
        ``model`` (built)."""
        with _interrupts.update():
            _assign(model, self._arrays, self._shapes)
            model.compile(model.loss, self._optimizer, model.metrics)
            _restore_optimizer(model, self._file, self._arrays)
            model.set_random_state(self._random)


def read_checkpoint(path, model, input_dim: int, callbacks=None) -> Checkpoint:
    """Read and validate the checkpoint at ``path`` for ``model`` (compiled; built or to be built for inputs of
    width ``input_dim``; same layers, input width and dtype) without changing anything; with ``callbacks`` (the
    run's), also that each can take its saved state. Raises :class:`ModelFileError`."""
    file = _File(path)
    file.check_portanet()
    config = file.json("config")
    state = file.json("checkpoint", required=False)
    _require(file, state is not None, "it is a model file, not a checkpoint: checkpoints are written by "
                                      "ModelCheckpoint during fit(); portanet.load(path) reads model files")
    mine = {**model.get_config(), "input_dim": input_dim}
    _require(file, isinstance(config, dict), "its config must be a JSON object")
    for key in ("layers", "input_dim", "dtype"):
        if config.get(key) != mine[key]:
            file.fail(f"it was saved from a different model: {key} is {config.get(key)!r:.300} in the checkpoint "
                      f"but {mine[key]!r:.300} in this model")
    with _invalid(file, "config optimizer"):
        optimizer = _optimizers.get(config.get("optimizer"))
    _check_state(file, state, model)
    shapes = _shapes(model.layers, input_dim)
    n, m = _count(shapes[0]), _count(shapes[1])
    expected = {**shapes[0], **shapes[1], **_optimizer_slots(file, optimizer, n), **_callback_shapes(file, n, m)}
    file.check_tensors(expected, model.dtype)
    arrays = file.arrays(expected)
    _check_slots(file, optimizer, arrays)
    checkpoint = Checkpoint(file, state, optimizer, arrays, shapes)
    if callbacks is not None:
        checkpoint.check_callback_states(callbacks)
    return checkpoint


def _check_state(file, state, model):
    _require(file, isinstance(state, dict) and {"epoch", "step", "rng", "random", "history", "fit", "callbacks"}
             <= set(state), "its checkpoint entry must hold epoch, step, rng, random, history, fit and callbacks")
    for key in ("epoch", "step"):
        _require(file, _is_int(state[key]) and 0 <= state[key] < MAX_COUNT,
                 f"checkpoint {key} must be a non-negative integer below 2**53, got {state[key]!r:.50}")
    with _invalid(file, "random generator state"):
        np.random.Generator(type(model.rng.bit_generator)()).bit_generator.state = state["rng"]
        if state["random"] is not None:
            model.device.random_source(0).set_state(state["random"])
    history = state["history"]
    _require(file, isinstance(history, dict) and isinstance(history.get("epoch"), list)
             and all(_is_int(e) and 0 <= e < MAX_COUNT for e in history["epoch"])
             and isinstance(history.get("history"), dict),
             "its history must hold an epoch list (integers >= 0) and a history object")
    n = len(history["epoch"])
    for key, values in history["history"].items():
        _require(file, isinstance(values, list) and len(values) == n
                 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values),
                 f"history[{key!r:.50}] must be a list of {n} numbers")
    fit = state["fit"]
    _require(file, isinstance(fit, dict) and (fit.get("split_seed") is None or _is_int(fit["split_seed"])
                                              and 0 <= fit["split_seed"] < 2**63),
             "its fit configuration must be a JSON object (split_seed an integer in [0, 2**63) or null)")
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
