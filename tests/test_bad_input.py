"""Bad input raises a clear error naming the argument, the expected and the got; the model is left as it was."""

import numpy as np
import pytest

import portanet as pn
from portanet import to_numpy

X = np.random.default_rng(0).standard_normal((20, 4))
Y = np.arange(20) % 3


@pytest.fixture
def trained(device):
    model = pn.Model([pn.Dense(5, "relu"), pn.Dense(3, "softmax")], device=device, seed=0)
    model.compile("sparse_categorical_crossentropy", "adam", ["accuracy"])
    model.fit(X, Y, epochs=1, verbose=0)
    return model


def _snapshot(model):
    return {k: to_numpy(v).copy() for k, v in model.parameters().items()}, model.optimizer.iterations


def _unchanged(model, snapshot):
    params, iterations = snapshot
    assert model.optimizer.iterations == iterations
    for name, value in model.parameters().items():
        np.testing.assert_array_equal(to_numpy(value), params[name])


BAD_FIT = [
    ("mismatched lengths", X, Y[:19], ValueError, r"y has 19 rows but x has 20"),
    ("wrong feature width", X[:, :3], Y, ValueError, r"x has 3 features but the model expects 4"),
    ("label too large", X, np.where(Y == 2, 3, Y), ValueError, r"labels must be in \[0, 3\), got values in \[0, 3\]"),
    ("negative label", X, Y - 1, ValueError, r"labels must be in \[0, 3\)"),
    ("non-integer labels", X, Y + 0.5, ValueError, r"integer class labels"),
    ("strings", np.full((20, 4), "a"), Y, TypeError, r"x must hold numbers .*got dtype <U1"),
    ("objects", np.array([[object()] * 4] * 20), Y, TypeError, r"x must hold numbers"),
    ("ragged lists", [[1, 2], [3]], Y, TypeError, r"x must be a numeric array"),
    ("empty x", X[:0], Y[:0], ValueError, r"x is empty: expected at least one sample, got shape \(0, 4\)"),
    ("images not flattened", X.reshape(20, 2, 2), Y, ValueError, r"x must be 2-D .*got shape \(20, 2, 2\).*flatten"),
    ("one-hot for sparse loss", X, np.eye(3)[Y], ValueError, r"y must hold integer class labels of shape \(samples,\)"),
    ("None", None, Y, TypeError, r"x must be an array, got None"),
]


@pytest.mark.parametrize("what,x,y,error,message", BAD_FIT, ids=[c[0] for c in BAD_FIT])
def test_fit_rejects_bad_input_and_keeps_the_model(trained, what, x, y, error, message):
    snapshot = _snapshot(trained)
    with pytest.raises(error, match=message):
        trained.fit(x, y, epochs=1, verbose=0)
    _unchanged(trained, snapshot)


@pytest.mark.parametrize("what,x,y,error,message", BAD_FIT[:4], ids=[c[0] for c in BAD_FIT[:4]])
def test_evaluate_and_train_step_reject_bad_input(trained, what, x, y, error, message):
    snapshot = _snapshot(trained)
    with pytest.raises(error, match=message):
        trained.evaluate(x, y)
    with pytest.raises(error, match=message):
        trained.train_step(x, y)
    _unchanged(trained, snapshot)


def test_bad_validation_data_is_rejected_before_training(trained):
    snapshot = _snapshot(trained)
    with pytest.raises(ValueError, match="x has 3 features"):
        trained.fit(X, Y, epochs=1, validation_data=(X[:, :3], Y), verbose=0)
    with pytest.raises(ValueError, match="validation_data must be a tuple"):
        trained.fit(X, Y, epochs=1, validation_data=X, verbose=0)
    _unchanged(trained, snapshot)


@pytest.mark.parametrize("arg,value,message", [
    ("batch_size", 0, "batch_size must be a positive integer, got 0"),
    ("batch_size", 2.5, "batch_size must be a positive integer"),
    ("epochs", -1, "epochs must be a non-negative integer, got -1"),
    ("verbose", 5, "verbose must be 0, 1 or 2, got 5"),
])
def test_bad_fit_arguments_are_rejected(trained, arg, value, message):
    snapshot = _snapshot(trained)
    with pytest.raises(ValueError, match=message):
        trained.fit(X, Y, **{"epochs": 1, "verbose": 0, arg: value})
    _unchanged(trained, snapshot)


def test_predict_rejects_the_wrong_width(trained):
    with pytest.raises(ValueError, match="x has 5 features but the model expects 4"):
        trained.predict(np.ones((2, 5)))


def test_targets_must_match_the_output_width():
    model = pn.Model([pn.Dense(2)]).compile("mse")
    with pytest.raises(ValueError, match=r"y must have shape \(samples, 2\).*got \(20, 3\)"):
        model.fit(X, np.ones((20, 3)), verbose=0)
    assert not model.built


def test_unknown_names_are_rejected_at_construction():
    with pytest.raises(ValueError, match="unknown activation 'relu6'"):
        pn.Dense(3, "relu6")
    with pytest.raises(ValueError, match="unknown loss 'l2'"):
        pn.Model([pn.Dense(1)]).compile("l2")
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        pn.Model([pn.Dense(1)]).compile("mse", "lbfgs")
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        pn.Model([pn.Dense(1)]).compile("mse", metrics=["f1"])
    with pytest.raises(ValueError, match="Dense kernel_initializer: unknown initializer 'he_norm'; expected one of"):
        pn.Dense(3, kernel_initializer="he_norm")


def test_a_failed_compile_keeps_the_previous_configuration():
    model = pn.Model([pn.Dense(1)]).compile("mse", pn.SGD(lr=0.1))
    with pytest.raises(ValueError):
        model.compile("mse", "sgd", metrics=["f1"])
    assert model.optimizer.lr == 0.1


@pytest.mark.parametrize("kwargs,message", [
    ({"units": 0}, "units must be a positive integer, got 0"),
    ({"units": 2.0}, "units must be a positive integer"),
    ({"units": 3, "input_dim": -1}, "input_dim must be a positive integer"),
])
def test_dense_arguments_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pn.Dense(**kwargs)


def test_numpy_integers_and_floats_are_accepted_where_python_ones_are(tmp_path):
    """Counts computed with NumPy (``y.max() + 1`` is an np.int64) are integers: accepted, stored as plain ints, so
    the config stays JSON and the model saves."""
    n_classes = Y.max() + 1
    model = pn.Model([pn.Dense(np.int64(5), "relu", input_dim=np.int32(4)), pn.Dense(n_classes, "softmax")], seed=0)
    model.compile("sparse_categorical_crossentropy", "adam", [pn.metrics.TopKAccuracy(k=np.int64(2))])
    stop = pn.EarlyStopping(monitor="loss", patience=np.int64(1))
    model.fit(X, Y, epochs=np.int64(2), batch_size=np.int64(5), log_every=np.int64(2),
              validation_split=np.float32(0.25), verbose=0, callbacks=[stop])
    config = model.get_config()
    assert type(config["layers"][1]["units"]) is int and type(config["layers"][0]["input_dim"]) is int
    assert type(stop.patience) is int and type(model.metrics[0].k) is int
    model.save(tmp_path / "m.safetensors")
    assert pn.load(tmp_path / "m.safetensors").get_config()["layers"] == config["layers"]


def test_dropout_rate_is_validated():
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\), got 1"):
        pn.Dropout(1)


def test_model_arguments_are_validated():
    with pytest.raises(ValueError, match="dtype must be one of"):
        pn.Model(dtype="int32")
    with pytest.raises(TypeError, match="layer must be a portanet Layer"):
        pn.Model(["dense"])
    with pytest.raises(RuntimeError, match="compile"):
        pn.Model([pn.Dense(1)]).fit(X, Y)
    with pytest.raises(RuntimeError, match="no layers"):
        pn.Model().compile("mse").fit(X, Y)


def test_declared_input_dim_must_match_the_data():
    model = pn.Model([pn.Dense(2, input_dim=5)]).compile("mse")
    with pytest.raises(ValueError, match="x has 4 features but the first layer was declared with input_dim=5"):
        model.fit(X, np.ones((20, 2)), verbose=0)


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("make,message", [
    (lambda: pn.activations.ELU(alpha=INF), r"elu alpha must be a finite number > 0, got inf"),
    (lambda: pn.activations.ELU(alpha=0), r"elu alpha must be a finite number > 0, got 0"),
    (lambda: pn.activations.LeakyReLU(alpha=NAN), r"leaky_relu alpha must be in \[0, 1\), got nan"),
    (lambda: pn.Huber(delta=INF), r"huber delta must be a finite number > 0, got inf"),
    (lambda: pn.BinaryCrossentropy(from_logits="yes"), r"from_logits must be True or False"),
    (lambda: pn.Adam(epsilon=INF), r"Adam epsilon must be a finite number > 0, got inf"),
    (lambda: pn.Adam(beta_1=NAN), r"Adam beta_1 must be in \[0, 1\), got nan"),
    (lambda: pn.AdamW(beta_2=1.0), r"AdamW beta_2 must be in \[0, 1\), got 1.0"),
    (lambda: pn.Adam(weight_decay=INF), r"Adam weight_decay must be a finite number >= 0, got inf"),
    (lambda: pn.Adam(lr=INF), r"Adam learning_rate must be a positive finite number, got inf"),
    (lambda: pn.RMSprop(epsilon=-1.0), r"RMSprop epsilon must be a finite number > 0, got -1.0"),
    (lambda: pn.RMSprop(rho=INF), r"RMSprop rho must be in \[0, 1\), got inf"),
    (lambda: pn.RMSprop(centered=1), r"RMSprop centered must be True or False, got 1"),
    (lambda: pn.SGD(momentum=NAN), r"SGD momentum must be in \[0, 1\), got nan"),
    (lambda: pn.SGD(momentum=0.9, nesterov="yes"), r"SGD nesterov must be True or False"),
    (lambda: pn.SGD(clipnorm=INF), r"SGD clipnorm must be a positive finite number, got inf"),
    (lambda: pn.Dense(3, use_bias=None), r"Dense use_bias must be True or False, got None"),
    (lambda: pn.Dense(3, kernel_initializer="he_normall"), r"Dense kernel_initializer: unknown initializer 'he_normall'"),
    (lambda: pn.Dropout(NAN), r"dropout rate must be in \[0, 1\), got nan"),
    (lambda: pn.metrics.BinaryAccuracy(threshold=INF), r"binary_accuracy threshold must be a finite number"),
    (lambda: pn.EarlyStopping(min_delta=INF), r"EarlyStopping min_delta must be a finite number >= 0, got inf"),
    (lambda: pn.ReduceLROnPlateau(factor=NAN), r"ReduceLROnPlateau factor must be in \(0, 1\), got nan"),
    (lambda: pn.ReduceLROnPlateau(min_lr=INF), r"ReduceLROnPlateau min_lr must be a finite number >= 0"),
    (lambda: pn.CosineDecay(0.1, INF), r"CosineDecay decay_steps must be a finite number > 0"),
])
def test_constructors_reject_non_finite_and_out_of_range_values(make, message):
    """The same constructors build a model from a file: these checks are what keep a hostile file's values out."""
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("name", ["callback.x", "a.b", "optimizer", "callback", "", "9lives", "x" * 65, "é", "a-b",
                                  "a b", 7])
def test_layer_names_are_identifiers_that_cannot_collide_with_a_file_section(name):
    with pytest.raises(ValueError, match=r"a layer name must be an identifier"):
        pn.Dense(3, name=name)
    layer = pn.Dense(3)
    with pytest.raises(ValueError, match=r"a layer name must be an identifier"):
        layer.name = name


def test_a_model_names_its_layers_by_kind_and_refuses_a_name_twice():
    model = pn.Model([pn.Dense(3, name="hidden"), pn.Dense(3), pn.Dropout(0.1), pn.Dense(1, name="out_1")])
    assert [layer.name for layer in model.layers] == ["hidden", "dense_1", "dropout_0", "out_1"]
    with pytest.raises(ValueError, match=r"layer name 'hidden' is already used"):
        model.add(pn.Dense(2, name="hidden"))
