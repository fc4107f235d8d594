"""Structured fuzzing of model files and checkpoints: hostile values at any place of the header, the metadata JSON
(config, optimizer state, checkpoint state) and the tensors, with or without a valid checksum, fed to every loader.

The contract: loading succeeds with finite weights, or raises ModelFileError naming the file, and a model that
loads_weights or resumes from a bad file is left exactly as it was. The CI budget is small and fixed (seconds);
a long run by hand:

    PORTANET_FUZZ_EXAMPLES=5000 python -m pytest -q tests/test_io_fuzz.py -p no:cacheprovider

(``PORTANET_FUZZ_EXAMPLES`` is the number of examples per test; add ``--hypothesis-show-statistics`` for timings.)
"""

import json
import os
import struct
import tempfile

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import portanet as pn
from portanet import ModelFileError, to_numpy

EXAMPLES = int(os.environ.get("PORTANET_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

RNG = np.random.default_rng(0)
X = RNG.standard_normal((32, 4)).astype(np.float32)
Y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)


def _layers():
    return [pn.Dense(5, "elu"), pn.Dropout(0.1), pn.Dense(2, "softmax")]


def _compiled():
    model = pn.Model(_layers(), seed=0)
    return model.compile("sparse_categorical_crossentropy", pn.Adam(lr=0.01), metrics=["accuracy"])


def _callbacks(path=None):
    callbacks = [pn.EarlyStopping(monitor="loss", patience=5, restore_best_weights=True),
                 pn.ReduceLROnPlateau(monitor="loss", patience=1)]
    return callbacks + ([pn.ModelCheckpoint(path)] if path else [])


class _Bytes(bytes):
    def __repr__(self):  # a failing example prints the edited file, not the originals
        return f"<{len(self)} bytes>"


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """A model file and a checkpoint (with EarlyStopping's best weights and ReduceLROnPlateau's counters)."""
    folder = tmp_path_factory.mktemp("fuzz")
    model = _compiled()
    model.fit(X, Y, epochs=2, batch_size=8, verbose=0, callbacks=_callbacks(folder / "ckpt.safetensors"))
    model.save(folder / "model.safetensors")
    return {name: _Bytes((folder / f"{name}.safetensors").read_bytes()) for name in ("model", "ckpt")}


# -- hostile values -----------------------------------------------------------------------------------------------
NAMES = st.sampled_from(["callback.x", "optimizer", "callback", "optimizer.m", "a.b", "", "dense_0", "x" * 65,
                         "9lives", "é", "dense_0.kernel", "__metadata__", "checksum"])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, -1, 2**53, 2**63, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308]),
    st.text(max_size=12), NAMES, st.sampled_from(["F32", "F64", "I64", "float32", "adam", "relu", "dense", "softmax"]))
HOSTILE = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=8) | NAMES, inner, max_size=4)),
                       max_leaves=8)


def _paths(value, prefix=()):
    """Every place in a JSON document: (path, value there)."""
    yield prefix, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, prefix + (i,))


def _replace(doc, path, value):
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return doc


def _delete(doc, path):
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    return doc


def _parts(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _pack(header, body) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def _with_checksum(data: bytes) -> bytes:
    """The same file with its checksum recomputed: a hostile file may carry a valid one."""
    fd, name = tempfile.mkstemp(suffix=".safetensors")
    os.close(fd)
    try:
        with open(name, "wb") as f:
            f.write(data)
        with safe_open(name, framework="numpy") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - the mutation broke the container itself: nothing to re-sign
        return data
    finally:
        os.unlink(name)
    meta.pop("checksum", None)
    meta["checksum"] = pn.io._digest(meta, tensors)
    return safetensors.numpy.save(tensors, metadata=meta)


@st.composite
def mutated(draw, originals_bytes):
    """A valid file with one to three hostile edits, re-signed or not."""
    data = originals_bytes
    for _ in range(draw(st.integers(1, 3))):
        header, body = _parts(data)
        where = draw(st.sampled_from(["metadata json", "metadata json", "metadata json", "metadata key", "header",
                                      "tensor values", "tensor shape"]))
        meta = header.get("__metadata__", {})
        if where == "metadata json":
            keys = [k for k in ("config", "optimizer", "checkpoint") if k in meta]
            key = draw(st.sampled_from(keys))
            doc = json.loads(meta[key])
            path, _ = draw(st.sampled_from(list(_paths(doc))))
            if path and draw(st.booleans()) and draw(st.booleans()):
                doc = _delete(doc, path)
            else:
                doc = _replace(doc, path, draw(HOSTILE))
            meta[key] = json.dumps(doc)  # NaN and inf become NaN / Infinity, which Python's json reads back
        elif where == "metadata key":
            key = draw(st.sampled_from(sorted(meta) + ["evil"]))
            if key in meta and draw(st.booleans()):
                del meta[key]
            else:
                meta[key] = json.dumps(draw(HOSTILE))
        elif where == "header":
            path, _ = draw(st.sampled_from([p for p in _paths(header) if p[0][:1] != ("__metadata__",)]))
            header = _replace(header, path, draw(HOSTILE)) if path else header
        else:
            names = sorted(k for k in header if k != "__metadata__")
            name = draw(st.sampled_from(names))
            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, "f.safetensors")
                with open(path, "wb") as f:
                    f.write(_pack(header, body))
                try:
                    with safe_open(path, framework="numpy") as f:
                        tensors = {k: f.get_tensor(k) for k in f.keys()}
                except Exception:  # noqa: BLE001 - an earlier edit broke the container: edit the header instead
                    continue
            old = tensors[name]
            if where == "tensor values":
                bad = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e38, 0.0]))
                new = old.copy()
                if new.size:
                    new.reshape(-1)[draw(st.integers(0, new.size - 1))] = bad
            else:
                shape = draw(st.lists(st.integers(0, 7), max_size=3))
                new = np.ones(shape, draw(st.sampled_from([old.dtype, np.float64, np.float32])))
            tensors[name] = new
            header, body = _parts(safetensors.numpy.save(tensors, metadata=meta))
            meta = header.get("__metadata__", {})
        if meta:
            header["__metadata__"] = meta
        data = _pack(header, body)
    return _with_checksum(data) if draw(st.booleans()) or draw(st.booleans()) else data


# -- the contract -------------------------------------------------------------------------------------------------
def _write(tmp, data):
    path = os.path.join(tmp, "bad.safetensors")
    with open(path, "wb") as f:
        f.write(data)
    return path


def _state(model):
    return (to_numpy(model.parameter_buffer.values).copy(), model.optimizer.iterations,
            {k: to_numpy(v).copy() for k, v in model.optimizer.state.items()}, model.rng.bit_generator.state)


def _assert_unchanged(model, before):
    values, iterations, slots, rng = _state(model)
    np.testing.assert_array_equal(values, before[0])
    assert iterations == before[1] and rng == before[3] and slots.keys() == before[2].keys()
    for key in slots:
        np.testing.assert_array_equal(slots[key], before[2][key])


def _assert_finite(model):
    assert bool(model.parameter_buffer.all_finite())
    for slot in (model.optimizer.state.values() if model.optimizer is not None else ()):
        assert np.isfinite(to_numpy(slot)).all()


def _only_model_file_error(call, path):
    try:
        result = call()
    except ModelFileError as exc:
        assert path in str(exc)
        event(f"ModelFileError: {str(exc)[len(path) + 2:][:40]}")  # --hypothesis-show-statistics lists them
        return None
    event("loaded")
    return result


@pytest.mark.parametrize("which", ["model", "ckpt"])
@FUZZ
@given(data=st.data())
def test_load_of_a_hostile_file_gives_a_finite_model_or_model_file_error(originals, which, data):
    bad = data.draw(mutated(originals[which]))
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(tmp, bad)
        model = _only_model_file_error(lambda: pn.load(path), path)
    if model is not None:
        _assert_finite(model)


@pytest.mark.parametrize("which", ["model", "ckpt"])
@FUZZ
@given(data=st.data())
def test_load_weights_of_a_hostile_file_changes_nothing_unless_it_loads(originals, which, data):
    bad = data.draw(mutated(originals[which]))
    model = _compiled().build(4)
    before = _state(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(tmp, bad)
        if _only_model_file_error(lambda: model.load_weights(path), path) is None:
            _assert_unchanged(model, before)
        else:
            _assert_finite(model)


@FUZZ
@given(data=st.data())
def test_resuming_from_a_hostile_checkpoint_changes_nothing_unless_it_trains(originals, data):
    bad = data.draw(mutated(originals["ckpt"]))
    model = _compiled()
    built = data.draw(st.booleans())
    if built:
        model.build(4)
    before = _state(model) if built else model.rng.bit_generator.state
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(tmp, bad)
        try:
            history = _only_model_file_error(
                lambda: model.fit(X, Y, epochs=3, batch_size=8, verbose=0, resume_from=path, callbacks=_callbacks()),
                path)
        except FloatingPointError:  # finite but absurd values (a weight of 1e38) can make training diverge
            history = "diverged"
    if history is None:
        if built:
            _assert_unchanged(model, before)
        else:
            assert not model.built and model.rng.bit_generator.state == before
    else:
        _assert_finite(model)
