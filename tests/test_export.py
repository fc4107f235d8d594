"""ONNX export: ONNX Runtime reproduces ``predict`` for every activation, dtype and backend; the file is valid,
self-describing and written atomically; what cannot be exported is refused naming the layer.

The oracle is the model itself: ``model.predict`` on its own backend against ONNX Runtime on the exported file.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import portanet as pn
from portanet import export as pn_export
from portanet import to_numpy
from portanet.testing import assert_close, tolerance

try:
    import onnx
    import onnxruntime as ort
    _MISSING = None
except ImportError as exc:  # the tests that need them are skipped with this reason
    onnx = ort = None
    _MISSING = f"needs the onnx extra (pip install 'portanet[onnx]'): {exc}"

requires_onnx = pytest.mark.skipif(onnx is None, reason=_MISSING or "")

ACTIVATIONS = ["linear", "relu", {"name": "leaky_relu", "alpha": 0.2}, {"name": "elu", "alpha": 0.7}, "gelu",
               "sigmoid", "tanh", "softplus", "softmax"]
ACTIVATION_IDS = [a if isinstance(a, str) else a["name"] for a in ACTIVATIONS]
DTYPES = ["float32", "float64"]


def _run(path, x):
    """The exported file in ONNX Runtime's CPU provider: ``output`` for ``input`` = x."""
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return session.run(["output"], {"input": x})[0]


def _randomize(model, seed=0):
    """Random weights with O(1) activations and non-zero biases (fresh models have zero biases)."""
    rng = np.random.default_rng(seed)
    model.set_parameters({name: rng.standard_normal(tuple(v.shape)) * (1 / np.sqrt(v.shape[0]) if v.ndim == 2 else 0.5)
                          for name, v in model.parameters().items()})
    return model


def _assert_matches_predict(model, path, in_dim, dtype, batches=(1, 1000), scale=3.0):
    rng = np.random.default_rng(42)
    for batch in batches:
        x = (rng.standard_normal((batch, in_dim)) * scale).astype(dtype)
        out = _run(path, x)
        assert out.dtype == np.dtype(dtype) and out.shape == (batch, model.output_dim)
        assert_close(out, model.predict(x), err_msg=f"batch {batch}")


class Cube(pn.activations.ActivationFunction):
    """A custom activation without an ONNX mapping."""

    name = "cube"

    def forward(self, z, xp):
        return z * z * z

    def backward(self, grad, z, a, xp):
        return grad * 3 * z * z


class Swish(pn.activations.ActivationFunction):
    """x * sigmoid(x), exported through its to_onnx hook."""

    name = "swish"

    def forward(self, z, xp):
        e = xp.exp(-xp.abs(z))
        return z * xp.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))

    def backward(self, grad, z, a, xp):
        raise NotImplementedError  # not needed for inference

    def to_onnx(self, graph, x):
        return graph.op("Mul", x, graph.sigmoid(x))


# -- without onnx -----------------------------------------------------------------------------------------------------
def test_import_portanet_does_not_need_onnx_and_export_says_how_to_install_it(tmp_path):
    code = """if True:
        import sys
        sys.modules["onnx"] = None  # import onnx raises ImportError, as when it is not installed
        import portanet as pn
        model = pn.Model([pn.Dense(2)]).build(3)
        try:
            pn.export_onnx(model, sys.argv[1])
        except ImportError as error:
            print("ImportError:", error)
        """
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.onnx")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'ImportError: export_onnx needs the onnx package' in result.stdout
    assert 'pip install "portanet[onnx]"' in result.stdout
    assert not (tmp_path / "m.onnx").exists()


# -- ONNX Runtime against predict -----------------------------------------------------------------------------------
@requires_onnx
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=ACTIVATION_IDS)
def test_every_activation_matches_predict(device, dtype, activation, tmp_path):
    model = _randomize(pn.Model([pn.Dense(12, activation), pn.Dense(5, activation)], device=device, dtype=dtype,
                                seed=1).build(7))
    path = pn.export_onnx(model, tmp_path / "m.onnx")
    _assert_matches_predict(model, path, 7, dtype)


def _deep(device, dtype, seed=3):
    return pn.Model([
        pn.Dense(32, "relu"),
        pn.Dropout(0.3),
        pn.Dense(24, {"name": "leaky_relu", "alpha": 0.1}, use_bias=False),
        pn.Activation("tanh"),
        pn.Dense(20, "elu"),
        pn.Dense(20, "gelu"),
        pn.Dropout(0.5),
        pn.Dense(16, "softplus"),
        pn.Dense(16, "sigmoid", use_bias=False),
        pn.Activation("linear"),
        pn.Dense(12),
        pn.Activation("softmax"),
    ], device=device, dtype=dtype, seed=seed).build(10)


@requires_onnx
@pytest.mark.parametrize("dtype", DTYPES)
def test_deep_mixed_model_matches_predict_and_is_left_unchanged(device, dtype, tmp_path):
    model = _randomize(_deep(device, dtype))
    before = {name: to_numpy(v).copy() for name, v in model.parameters().items()}
    path = pn.export_onnx(model, tmp_path / "deep.onnx")
    _assert_matches_predict(model, path, 10, dtype)
    assert model.device == device
    for name, value in model.parameters().items():
        assert_close(value, before[name], device=device, rtol=0, atol=0, err_msg=name)


@requires_onnx
def test_dropout_is_identity_even_after_training(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 6)).astype("float32")
    model = pn.Model([pn.Dense(16, "relu"), pn.Dropout(0.5), pn.Dense(2, "softmax")], seed=0)
    model.compile("sparse_categorical_crossentropy", "adam")
    model.fit(x, (x[:, 0] > 0).astype("int64"), epochs=2, batch_size=16, verbose=0)
    assert_close(_run(pn.export_onnx(model, tmp_path / "m.onnx"), x), model.predict(x))


@requires_onnx
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a != "gelu"],
                         ids=[i for i in ACTIVATION_IDS if i != "gelu"])
def test_activations_keep_full_relative_precision_from_tiny_to_huge_inputs(dtype, activation, tmp_path):
    # Where ONNX Runtime's own Sigmoid returns 0 for z < -18 (float32) and naive log(1 + exp(z)) or exp(z) - 1 lose
    # every digit for small results, the export agrees with portanet to a few ulps (relative, no absolute slack).
    magnitudes = np.logspace(-30, 3, 67)
    x = np.concatenate([-magnitudes, [0.0], magnitudes]).astype(dtype)[None, :]
    model = pn.Model([pn.Activation(activation)], dtype=dtype).build(x.shape[1])
    out, expected = _run(pn.export_onnx(model, tmp_path / "a.onnx"), x), model.predict(x)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, expected, rtol=8 * np.finfo(dtype).eps, atol=0)


@requires_onnx
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_follows_the_tanh_form_operation_for_operation(dtype, tmp_path):
    # The tanh form cancels (1 + tanh -> 0) for z << 0 in portanet too; the export repeats the same operations, so
    # the two differ by |0.5 z| times the difference of two tanh implementations (a few ulps of 1): 24 eps at |z| 12.
    x = np.linspace(-12, 12, 2001).astype(dtype)[None, :]
    model = pn.Model([pn.Activation("gelu")], dtype=dtype).build(x.shape[1])
    out = _run(pn.export_onnx(model, tmp_path / "g.onnx"), x)
    assert_close(out, model.predict(x), atol=32 * np.finfo(dtype).eps)


@requires_onnx
@pytest.mark.parametrize("opset", range(pn_export.MIN_OPSET, pn_export.MAX_OPSET + 1))
def test_every_opset_in_the_documented_range_runs_and_matches(opset, tmp_path):
    model = _randomize(_deep("cpu", "float64"))
    path = pn.export_onnx(model, tmp_path / "m.onnx", opset=opset)
    assert onnx.load(path).opset_import[0].version == opset
    _assert_matches_predict(model, path, 10, "float64", batches=(9,))


# -- the file -------------------------------------------------------------------------------------------------------
@requires_onnx
def test_file_passes_the_full_check_and_describes_itself(tmp_path):
    model = _deep("cpu", "float32")
    model.compile("categorical_crossentropy", pn.SGD(lr=0.1))
    path = pn.export_onnx(model, tmp_path / "m.onnx")
    assert path == os.fspath(tmp_path / "m.onnx")
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.producer_name == "portanet" and proto.producer_version == pn.__version__
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", pn_export.DEFAULT_OPSET)]
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["portanet_version"] == pn.__version__
    assert json.loads(props["portanet_config"]) == model.get_config()
    # Parameters travel under their portanet names; nothing else but shared scalar constants.
    weights = {t.name for t in proto.graph.initializer if not t.name.startswith("const/")}
    assert weights == set(model.parameters())
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("input", "output")
    for value, width in ((inp, 10), (out, 12)):
        batch, features = value.type.tensor_type.shape.dim
        assert batch.dim_param == "batch" and not batch.HasField("dim_value")
        assert features.dim_value == width
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@requires_onnx
def test_a_model_trained_with_a_plain_callable_learning_rate_exports_without_its_optimizer(tmp_path):
    model = _randomize(_deep("cpu", "float32"))
    model.compile("categorical_crossentropy", pn.SGD(lambda step: 0.1 / (1 + step)))
    path = pn.export_onnx(model, tmp_path / "m.onnx")
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert json.loads(props["portanet_config"]) == model.get_config(include_optimizer=False)
    _assert_matches_predict(model, path, 10, "float32")


@requires_onnx
def test_batch_dimension_is_dynamic(tmp_path):
    model = _randomize(_deep("cpu", "float64"))
    session = ort.InferenceSession(pn.export_onnx(model, tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch in (1, 2, 37, 4096):
        x = rng.standard_normal((batch, 10))
        assert_close(session.run(None, {"input": x})[0], model.predict(x))


@requires_onnx
def test_float64_model_is_exported_as_double(tmp_path):
    proto = onnx.load(pn.export_onnx(pn.Model([pn.Dense(3, "elu")], dtype="float64").build(2), tmp_path / "m.onnx"))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    assert all(t.data_type == onnx.TensorProto.DOUBLE for t in proto.graph.initializer)


@requires_onnx
def test_model_without_parametrized_layers_exports_an_identity(tmp_path):
    model = pn.Model([pn.Dropout(0.5), pn.Activation("linear")]).build(4)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype("float32")
    assert_close(_run(pn.export_onnx(model, tmp_path / "m.onnx"), x), x, rtol=0, atol=0)


@requires_onnx
def test_export_replaces_an_existing_file_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    pn.export_onnx(pn.Model([pn.Dense(2)]).build(3), path)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


@requires_onnx
def test_failed_export_leaves_the_existing_file_untouched(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    with pytest.raises(pn_export.ExportError):
        pn.export_onnx(pn.Model([pn.Dense(2, Cube())]).build(3), path)
    assert path.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["m.onnx"]


@requires_onnx
def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pn.export_onnx(pn.Model([pn.Dense(2)]).build(3), tmp_path / "nowhere" / "m.onnx")


# -- what cannot be exported ----------------------------------------------------------------------------------------
@requires_onnx
@pytest.mark.parametrize("opset", [12, 29, 0, "17", 17.0, True])
def test_opset_outside_the_documented_range_is_refused(opset, tmp_path):
    with pytest.raises(ValueError, match=r"opset must be an integer from 13 to 28 \(default 21\), got"):
        pn.export_onnx(pn.Model([pn.Dense(2)]).build(3), tmp_path / "m.onnx", opset=opset)
    assert not (tmp_path / "m.onnx").exists()


@requires_onnx
def test_opset_newer_than_the_installed_onnx_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(onnx.defs, "onnx_opset_version", lambda: 21)
    model = pn.Model([pn.Dense(2, "sigmoid")]).build(3)
    with pytest.raises(ImportError, match=r"opset 28 needs a newer onnx package.*up to 21.*opset=21"):
        pn.export_onnx(model, tmp_path / "m.onnx", opset=28)
    assert onnx.load(pn.export_onnx(model, tmp_path / "m.onnx")).opset_import[0].version == 21


@requires_onnx
def test_unbuilt_model_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match=r"needs a built model: call fit\(\) or build\(input_dim\) first"):
        pn.export_onnx(pn.Model([pn.Dense(2)]), tmp_path / "m.onnx")


@requires_onnx
def test_non_model_is_refused(tmp_path):
    with pytest.raises(TypeError, match="model must be a portanet.Model, got list"):
        pn.export_onnx([pn.Dense(2)], tmp_path / "m.onnx")


@requires_onnx
@pytest.mark.parametrize("where", ["dense", "activation_layer"])
def test_custom_activation_without_hook_is_refused_naming_the_layer(where, tmp_path):
    layers = [pn.Dense(4, "relu", name="hidden")]
    layers += [pn.Dense(3, Cube(), name="cubic")] if where == "dense" else [pn.Activation(Cube(), name="cubic")]
    with pytest.raises(pn_export.ExportError) as info:
        pn.export_onnx(pn.Model(layers).build(2), tmp_path / "m.onnx")
    message = str(info.value)
    assert "layer 'cubic'" in message and "Cube" in message and "'cube'" in message
    assert "to_onnx(self, graph, x)" in message


@requires_onnx
def test_unknown_layer_class_is_refused_naming_the_layer(tmp_path):
    class Scaled(pn.Dense):  # a subclass may change the forward: it is not taken for a Dense
        def forward(self, x, training=False):
            return 2 * super().forward(x, training)

    model = pn.Model([pn.Dense(4), Scaled(3, name="twice")]).build(2)
    with pytest.raises(pn_export.ExportError, match=r"layer 'twice' is a Scaled, which has no ONNX mapping: "
                                                    r"export_onnx supports Dense, Dropout, Activation"):
        pn.export_onnx(model, tmp_path / "m.onnx")


@requires_onnx
def test_parameters_over_two_gigabytes_are_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(pn_export, "_MAX_BYTES", 100)
    with pytest.raises(pn_export.ExportError, match="at most 2 GB"):
        pn.export_onnx(pn.Model([pn.Dense(50)]).build(3), tmp_path / "m.onnx")


# -- the custom-activation hook -------------------------------------------------------------------------------------
@requires_onnx
@pytest.mark.parametrize("dtype", DTYPES)
def test_custom_activation_with_to_onnx_hook_is_exported(device, dtype, tmp_path):
    model = _randomize(pn.Model([pn.Dense(8, Swish()), pn.Dense(6), pn.Activation(Swish()), pn.Dense(3, "softmax")],
                                device=device, dtype=dtype, seed=0).build(5))
    path = pn.export_onnx(model, tmp_path / "swish.onnx")
    _assert_matches_predict(model, path, 5, dtype)


HELPERS = {  # OnnxGraph helper -> its float64 reference (log1p is fed |x|)
    "expm1": np.expm1,
    "log1p": lambda x: np.log1p(np.abs(x)),
    "softplus": lambda x: np.logaddexp(0.0, x),
    "sigmoid": lambda x: np.exp(-np.logaddexp(0.0, -x)),
}


@requires_onnx
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("helper", sorted(HELPERS))
def test_hook_helpers_are_accurate_to_a_few_ulps(helper, dtype, tmp_path):
    class Helper(pn.activations.ActivationFunction):
        name = helper

        def to_onnx(self, graph, x):
            if helper == "log1p":
                x = graph.op("Abs", x)
            return getattr(graph, helper)(x)

    magnitudes = np.logspace(-30 if dtype == "float32" else -300, 2.5, 131)
    x = np.concatenate([-magnitudes, [0.0], magnitudes])[None, :]
    model = pn.Model([pn.Activation(Helper())], dtype=dtype).build(x.shape[1])
    out = _run(pn.export_onnx(model, tmp_path / "h.onnx"), x.astype(dtype))
    with np.errstate(over="ignore"):  # expm1 overflows to inf in float32 (checked too)
        expected = HELPERS[helper](x.astype(dtype).astype("float64")).astype(dtype)
    np.testing.assert_allclose(out, expected, rtol=8 * np.finfo(dtype).eps, atol=0)


@requires_onnx
@pytest.mark.parametrize("returned", [None, 3, "nope"])
def test_hook_must_return_a_value_of_the_graph(returned, tmp_path):
    class Bad(pn.activations.ActivationFunction):
        name = "bad"

        def to_onnx(self, graph, x):
            return returned

    with pytest.raises(pn_export.ExportError, match=r"layer 'odd': Bad.to_onnx\(graph, x\) must return the name"):
        pn.export_onnx(pn.Model([pn.Activation(Bad(), name="odd")]).build(2), tmp_path / "m.onnx")


@requires_onnx
def test_hook_naming_an_unknown_input_is_refused(tmp_path):
    class Typo(pn.activations.ActivationFunction):
        name = "typo"

        def to_onnx(self, graph, x):
            return graph.op("Relu", "imput")

    with pytest.raises(pn_export.ExportError, match=r"in 'odd': Relu input 'imput' is not a value of the graph"):
        pn.export_onnx(pn.Model([pn.Activation(Typo(), name="odd")]).build(2), tmp_path / "m.onnx")


@requires_onnx
def test_hook_building_an_invalid_graph_fails_the_checker(tmp_path):
    class Wrong(pn.activations.ActivationFunction):
        name = "wrong"

        def to_onnx(self, graph, x):
            return graph.op("NoSuchOperator", x)

    with pytest.raises(pn_export.ExportError, match="fails ONNX's checker"):
        pn.export_onnx(pn.Model([pn.Activation(Wrong())]).build(2), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


# -- a real model ---------------------------------------------------------------------------------------------------
@requires_onnx
def test_mnist_model_keeps_its_test_accuracy_to_the_last_digit(mnist_dir, tmp_path):
    (x_train, y_train), (x_test, y_test) = pn.datasets.load_mnist(mnist_dir, download=False, normalize=True,
                                                                  flatten=True)
    model = pn.Model([pn.Dense(64, "relu"), pn.Dropout(0.1), pn.Dense(10, "softmax")], seed=0)
    model.compile("sparse_categorical_crossentropy", pn.Adam(lr=1e-3))
    model.fit(x_train[:12000], y_train[:12000], epochs=1, batch_size=64, verbose=0)
    expected = to_numpy(model.predict(x_test))
    served = _run(pn.export_onnx(model, tmp_path / "mnist.onnx"), x_test)
    correct_portanet = int(np.sum(np.argmax(expected, axis=1) == y_test))
    correct_onnx = int(np.sum(np.argmax(served, axis=1) == y_test))
    assert correct_portanet > 8500  # a real classifier, not chance
    assert correct_onnx == correct_portanet
    assert_close(served, expected, rtol=tolerance("float32"))


# -- normalization layers ---------------------------------------------------------------------------------------------
def _normalized(device, dtype, layer, seed=5):
    """Dense(6) -> ``layer`` -> Dense(3, softmax) with random weights and, for BatchNormalization, moving statistics
    away from their initial 0 and 1."""
    model = _randomize(pn.Model([pn.Dense(6), layer, pn.Dense(3, "softmax")], device=device, dtype=dtype,
                                seed=seed).build(4), seed)
    rng = np.random.default_rng(seed)
    buffer = model.parameter_buffer
    if buffer.state.shape[0]:
        buffer.state[...] = model.device.asarray(np.concatenate([rng.standard_normal(6), rng.uniform(0.2, 3.0, 6)]),
                                                 dtype)
    return model


NORMALIZATIONS = [
    lambda: pn.LayerNormalization(), lambda: pn.LayerNormalization(center=False, epsilon=1e-5),
    lambda: pn.LayerNormalization(scale=False), lambda: pn.BatchNormalization(),
    lambda: pn.BatchNormalization(center=False, scale=False, epsilon=0.1), lambda: pn.BatchNormalization(scale=False),
]
NORMALIZATION_IDS = ["layernorm", "layernorm-scale-only", "layernorm-center-only", "batchnorm", "batchnorm-neither",
                     "batchnorm-center-only"]


@requires_onnx
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", NORMALIZATIONS, ids=NORMALIZATION_IDS)
def test_normalization_layers_match_predict(device, dtype, make, tmp_path):
    model = _normalized(device, dtype, make())
    path = pn.export_onnx(model, tmp_path / "norm.onnx")
    _assert_matches_predict(model, path, 4, dtype)


@requires_onnx
def test_batch_normalization_exports_its_moving_statistics_by_name(tmp_path):
    model = _normalized("cpu", "float64", pn.BatchNormalization())
    proto = onnx.load(pn.export_onnx(model, tmp_path / "bn.onnx"))
    from onnx import numpy_helper

    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if not t.name.startswith("const/")}
    assert set(weights) == set(model.parameters()) | set(model.parameter_buffer.states())
    for name, value in model.parameter_buffer.states().items():
        np.testing.assert_array_equal(weights[name], to_numpy(value))


@requires_onnx
def test_a_trained_batch_normalized_model_serves_its_inference_outputs(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((96, 5)).astype("float32") * 3 + 2
    model = pn.Model([pn.Dense(8, use_bias=False), pn.BatchNormalization(), pn.Activation("relu"),
                      pn.Dense(8), pn.LayerNormalization(), pn.Dense(2, "softmax")], seed=0)
    model.compile("sparse_categorical_crossentropy", pn.Adam(0.01))
    model.fit(x, (x[:, 0] > 2).astype("int64"), epochs=3, batch_size=16, verbose=0)
    assert_close(_run(pn.export_onnx(model, tmp_path / "m.onnx"), x), model.predict(x))


@requires_onnx
@pytest.mark.parametrize("opset", range(pn_export.MIN_OPSET, pn_export.MAX_OPSET + 1))
def test_layer_normalization_exports_at_every_opset(opset, tmp_path):
    # ReduceMean takes its axes as an attribute up to opset 17 and as an input from opset 18 on.
    model = _normalized("cpu", "float64", pn.LayerNormalization())
    path = pn.export_onnx(model, tmp_path / "ln.onnx", opset=opset)
    assert onnx.load(path).opset_import[0].version == opset
    _assert_matches_predict(model, path, 4, "float64", batches=(9,))
