"""Persistence: one safetensors file per model, loadable on any backend; atomic writes; hostile files raise
ModelFileError and nothing else."""

import io
import json
import os
import pickle
import struct
import tempfile

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import portanet as pn
from portanet import ModelFileError, to_numpy
from portanet.testing import assert_close

RNG = np.random.default_rng(0)
X = RNG.standard_normal((48, 5)).astype(np.float32)
Y = (X[:, 0] + X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 0.8)


def _trained(device="cpu", dtype="float32"):
    model = pn.Model([pn.Dense(6, "relu"), pn.Dropout(0.2), pn.Dense(3, "softmax")], device=device, dtype=dtype,
                     seed=0)
    model.compile("sparse_categorical_crossentropy", pn.Adam(lr=0.01), metrics=["accuracy"])
    model.fit(X, Y, epochs=2, batch_size=16, verbose=0)
    return model


def _host(model):
    return {k: to_numpy(v).copy() for k, v in model.parameters().items()}


def _assert_same_weights(model, reference, device):
    for name, value in model.parameters().items():
        assert_close(value, reference[name], device=device, rtol=0, atol=0, err_msg=name)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained model (NumPy) saved with its optimizer state, and its weights on the host."""
    path = tmp_path_factory.mktemp("saved") / "model.safetensors"
    model = _trained()
    model.save(path)
    return path, model


def _other_devices():
    """NumPy, array-api-strict's device1 and torch, where installed."""
    devices = []
    for device, backend in (("cpu", None), ("device1", "array_api_strict"), ("cpu", "torch")):
        try:
            devices.append(pn.resolve_device(device, backend))
        except (ImportError, RuntimeError, ValueError):
            pass
    return devices


# -- round trips ----------------------------------------------------------------------------------------------
def test_save_then_load_gives_the_same_model_on_the_same_device(device, tmp_path):
    model = _trained(device)
    model.save(tmp_path / "m.safetensors")
    loaded = pn.load(tmp_path / "m.safetensors", device=device)
    assert loaded.device == device and loaded.get_config() == model.get_config()
    _assert_same_weights(loaded, _host(model), device)
    assert loaded.optimizer.iterations == model.optimizer.iterations
    for name, slot in loaded.optimizer.state.items():
        assert_close(slot, model.optimizer.state[name], device=device, rtol=0, atol=0)
    assert_close(loaded.predict(X), model.predict(X), device=device, rtol=0, atol=0)
    assert loaded.evaluate(X, Y) == model.evaluate(X, Y)


def test_a_model_saved_on_any_backend_loads_on_every_other(device, tmp_path):
    model = _trained(device, dtype="float64")
    model.save(tmp_path / "m.safetensors")
    reference = _host(model)
    for target in _other_devices():
        loaded = pn.load(tmp_path / "m.safetensors", device=target)
        _assert_same_weights(loaded, reference, target)
        assert all(target.owns(v) for v in loaded.optimizer.state.values())


def test_a_loaded_model_continues_training_exactly_like_the_original(tmp_path):
    def fresh():
        model = pn.Model([pn.Dense(6, "tanh"), pn.Dense(3, "softmax")], seed=1)
        return model.compile("sparse_categorical_crossentropy", pn.Adam(lr=0.01))

    model = fresh()
    model.fit(X, Y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    model.save(tmp_path / "m.safetensors")
    loaded = pn.load(tmp_path / "m.safetensors")
    for m in (model, loaded):
        m.fit(X, Y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    _assert_same_weights(loaded, _host(model), loaded.device)


def test_include_optimizer_false_leaves_a_fresh_optimizer(tmp_path):
    model = _trained()
    model.save(tmp_path / "m.safetensors", include_optimizer=False)
    loaded = pn.load(tmp_path / "m.safetensors")
    assert loaded.optimizer.iterations == 0 and loaded.optimizer.state == {}
    assert loaded.optimizer.get_config() == model.optimizer.get_config()


def test_the_file_is_plain_safetensors_with_the_config_as_json_metadata(saved):
    path, model = saved
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
        names = set(f.keys())
    assert json.loads(meta["config"]) == model.get_config()
    assert meta["format"] == "portanet" and meta["checksum"].startswith("sha256:")
    assert names == set(model.parameters()) | {"optimizer.m", "optimizer.v"}
    assert "pickle" not in open(path, "rb").read(200).decode("latin-1")


def test_save_weights_and_load_weights_round_trip_into_an_unbuilt_model(device, tmp_path):
    model = _trained(device)
    model.save_weights(tmp_path / "w.safetensors")
    twin = pn.Model([pn.Dense(6, "relu"), pn.Dropout(0.2), pn.Dense(3, "softmax")], device=device)
    assert twin.load_weights(tmp_path / "w.safetensors") is twin
    _assert_same_weights(twin, _host(model), device)


def test_load_weights_casts_float32_files_into_float64_models(saved):
    path, model = saved
    twin = pn.Model([pn.Dense(6, "relu"), pn.Dropout(0.2), pn.Dense(3, "softmax")], dtype="float64").build(5)
    twin.load_weights(path)
    for name, value in twin.parameters().items():
        assert value.dtype == np.float64
        np.testing.assert_array_equal(value, _host(model)[name])


def test_load_weights_reads_a_plain_safetensors_file_with_matching_names(tmp_path):
    model = _trained()
    safetensors.numpy.save_file(_host(model), str(tmp_path / "plain.safetensors"))
    twin = pn.Model([pn.Dense(6, "relu"), pn.Dropout(0.2), pn.Dense(3, "softmax")]).build(5)
    twin.load_weights(tmp_path / "plain.safetensors")
    _assert_same_weights(twin, _host(model), twin.device)


def test_load_weights_rejects_another_architecture_and_changes_nothing(saved):
    path, _ = saved
    other = pn.Model([pn.Dense(7, "relu"), pn.Dense(3, "softmax")], seed=3).build(5)
    before = _host(other)
    with pytest.raises(ModelFileError, match=r"tensor 'dense_0.kernel' has shape \(5, 6\), but the architecture needs \(5, 7\)"):
        other.load_weights(path)
    _assert_same_weights(other, before, other.device)


def test_an_uncompiled_model_loads_uncompiled(tmp_path):
    model = pn.Model([pn.Dense(3, "tanh")], seed=0).build(2)
    model.save(tmp_path / "m.safetensors")
    loaded = pn.load(tmp_path / "m.safetensors")
    assert loaded.loss is None and loaded.optimizer is None
    np.testing.assert_array_equal(loaded.predict(np.ones((1, 2))), model.predict(np.ones((1, 2))))


def test_a_custom_activation_loads_with_load_weights_and_load_says_why_it_cannot(tmp_path):
    class Cube(pn.activations.ActivationFunction):
        def forward(self, z, xp):
            return z * z * z

        def backward(self, grad, z, a, xp):
            return grad * 3 * z * z

    model = pn.Model([pn.Dense(3, Cube()), pn.Dense(1)], seed=0).build(2)
    model.save(tmp_path / "m.safetensors")
    with pytest.raises(ModelFileError, match=r"unknown activation 'custom'"):
        pn.load(tmp_path / "m.safetensors")
    twin = pn.Model([pn.Dense(3, Cube()), pn.Dense(1)]).load_weights(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(twin.predict(np.ones((1, 2))), model.predict(np.ones((1, 2))))


def test_a_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        pn.load(tmp_path / "nope.safetensors")


# -- atomic writes --------------------------------------------------------------------------------------------
def test_a_failed_write_leaves_the_previous_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    model = _trained()
    model.save(path)
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    model.fit(X, Y, epochs=1, verbose=0)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_saving_replaces_the_file_and_leaves_nothing_else(tmp_path):
    model = _trained()
    for _ in range(3):
        model.save(tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == ["m.safetensors"]


# -- hostile and broken files ---------------------------------------------------------------------------------
def _parts(path):
    """(tensors, metadata) of a saved file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _with_config(path, edit):
    tensors, meta = _parts(path)
    config = json.loads(meta["config"])
    edit(config)
    return safetensors.numpy.save(tensors, metadata={**meta, "config": json.dumps(config)})


def _with_tensor(path, name, value):
    tensors, meta = _parts(path)
    tensors[name] = value
    return safetensors.numpy.save(tensors, metadata=meta)


def _raw(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _pickled_npz():
    buffer = io.BytesIO()
    np.savez(buffer, weights=np.array([{"evil": "object"}], dtype=object))
    return buffer.getvalue()


def _deeply_nested():
    text = b"[" * 100_000 + b"]" * 100_000
    return struct.pack("<Q", len(text)) + text


HOSTILE = [
    ("empty", lambda p: b"", r"too short"),
    ("random bytes", lambda p: np.random.default_rng(1).bytes(4096), r"header claims \d+ bytes"),
    ("truncated in the data", lambda p: p.read_bytes()[:-17], r"outside the \d+ data bytes|truncated"),
    ("truncated in the header", lambda p: p.read_bytes()[:100], r"header claims|truncated"),
    ("a .npz holding a pickled object", lambda p: _pickled_npz(), r"zip archive \(a NumPy .npz\?\).*never unpickles"),
    ("a pickle", lambda p: pickle.dumps({"dense_0.kernel": [1.0]}), r"looks like a pickle"),
    ("a .npy file", lambda p: (lambda b: (np.save(b, np.ones(3)), b.getvalue())[1])(io.BytesIO()), r"\.npy file"),
    ("a kernel of the wrong shape", lambda p: _with_tensor(p, "dense_0.kernel", np.ones((6, 5), np.float32)),
     r"tensor 'dense_0.kernel' has shape \(6, 5\), but the architecture needs \(5, 6\)"),
    ("a kernel of the wrong dtype", lambda p: _with_tensor(p, "dense_0.kernel", np.ones((5, 6))),
     r"tensor 'dense_0.kernel' has dtype float64, but the model's dtype is float32"),
    ("an integer tensor", lambda p: _with_tensor(p, "dense_0.bias", np.ones(6, np.int64)), r"dtype 'I64'.*F32 or F64"),
    ("an extra tensor", lambda p: _with_tensor(p, "evil", np.ones(1, np.float32)), r"tensors \['evil'\] that the architecture"),
    ("an unknown layer", lambda p: _with_config(p, lambda c: c["layers"][0].update(kind="conv2d")),
     r"unknown layer kind 'conv2d'"),
    ("an unknown activation", lambda p: _with_config(p, lambda c: c["layers"][0].update(activation={"name": "swish"})),
     r"unknown activation 'swish'"),
    ("units of the wrong type", lambda p: _with_config(p, lambda c: c["layers"][0].update(units="6")),
     r"units must be a positive integer"),
    ("a layer that is not an object", lambda p: _with_config(p, lambda c: c["layers"].append(7)),
     r"each layer must be an object"),
    ("an unknown optimizer", lambda p: _with_config(p, lambda c: c.update(optimizer={"name": "lion"})),
     r"unknown optimizer 'lion'"),
    ("a bad dtype", lambda p: _with_config(p, lambda c: c.update(dtype="int8")), r"dtype must be float32 or float64"),
    ("an enormous declared shape", lambda p: _raw({"__metadata__": {"format": "portanet"},
                                                   "w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}},
                                                  bytes(16)),
     r"declares shape \(1099511627776, 1099511627776\) \(\d+ bytes\) but spans 16 bytes"),
    ("an enormous header length", lambda p: struct.pack("<Q", 2**62) + b"{}", r"header claims 4611686018427387904 bytes"),
    ("a shape with a million dimensions", lambda p: _raw({"w": {"dtype": "F32", "shape": [2**60] * 10**6,
                                                                "data_offsets": [0, 4]}}, bytes(4)),
     r"expected a list of at most 8 non-negative integers"),
    ("a header that is not JSON", lambda p: struct.pack("<Q", 4) + b"{{{{", r"header is not valid JSON"),
    ("a deeply nested header", lambda p: _deeply_nested(), r"header is not valid JSON|must be a JSON object"),
    ("offsets past the end", lambda p: _raw({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)),
     r"outside the 8 data bytes"),
    ("safetensors from elsewhere", lambda p: safetensors.numpy.save({"w": np.ones(2, np.float32)}),
     r"not a portanet file"),
    ("config that is not JSON", lambda p: safetensors.numpy.save(_parts(p)[0], {**_parts(p)[1], "config": "{oops"}),
     r"'config' metadata is not valid JSON"),
    ("a flipped bit in the weights", lambda p: (lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:])(p.read_bytes()),
     r"checksum does not match"),
]


@pytest.mark.parametrize("what,make,message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_broken_or_hostile_file_raises_model_file_error(saved, tmp_path, what, make, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(make(saved[0]))
    with pytest.raises(ModelFileError, match=message) as info:
        pn.load(path)
    assert str(path) in str(info.value)


def test_a_header_over_the_format_limit_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:  # a sparse file: 128 MiB long, nothing written
        f.write(struct.pack("<Q", 2**27))
        f.truncate(2**27 + 16)
    with pytest.raises(ModelFileError, match=r"header claims 134217728 bytes, more than the format's limit"):
        pn.load(path)


@pytest.mark.parametrize("what,make,message", HOSTILE[:7], ids=[h[0] for h in HOSTILE[:7]])
def test_load_weights_rejects_broken_files_and_changes_nothing(saved, tmp_path, what, make, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(make(saved[0]))
    model = _trained()
    before = _host(model)
    with pytest.raises(ModelFileError, match=message):
        model.load_weights(path)
    _assert_same_weights(model, before, model.device)


LOADERS = {
    "load": pn.load,
    "load_weights": lambda path: _trained().load_weights(path),
    "resume_from": lambda path: _trained().fit(X, Y, epochs=3, verbose=0, resume_from=path),
}


def _load_bytes(data: bytes, loader=pn.load):
    fd, name = tempfile.mkstemp(suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return loader(name)
    finally:
        os.unlink(name)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=512),
                      st.builds(lambda n, rest: struct.pack("<Q", n) + rest, st.integers(0, 600), st.binary(max_size=512))))
def test_loading_arbitrary_bytes_only_ever_raises_model_file_error(data):
    with pytest.raises(ModelFileError):
        _load_bytes(data)


@pytest.mark.parametrize("loader", ["load_weights", "resume_from"])
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=256))
def test_every_loader_raises_only_model_file_error_on_arbitrary_bytes(loader, data):
    with pytest.raises(ModelFileError):
        _load_bytes(data, LOADERS[loader])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_a_damaged_model_file_loads_unchanged_or_raises_model_file_error(saved, edits, cut):
    path, original = saved
    valid_bytes, reference = path.read_bytes(), _host(original)
    data = bytearray(valid_bytes)
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[:cut % len(data)]
    try:
        model = _load_bytes(bytes(data))
    except ModelFileError:
        return
    _assert_same_weights(model, reference, model.device)  # damage that got through changed nothing that matters
