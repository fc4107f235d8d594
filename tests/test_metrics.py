"""Metrics see exactly what predict returns: for every metric x loss x output activation, fused with the loss or not,
the value evaluate reports (and History's val_ value) equals the metric computed with NumPy from predict()."""

import numpy as np
import pytest

import portanet as pn
from portanet import to_numpy

# Some cases are deliberate likely-mistakes (mse on a softmax, accuracy at 0.5 on logits): metrics must still report
# exactly what predict returns, and the SetupWarning they give is tested in test_mistakes.py.
pytestmark = pytest.mark.filterwarnings("ignore::portanet.SetupWarning")

RNG = np.random.default_rng(0)
N, FEATURES, CLASSES = 97, 5, 4
X = RNG.standard_normal((N, FEATURES)).astype(np.float32)
LABELS = RNG.integers(0, CLASSES, N)
ONE_HOT = np.eye(CLASSES)[LABELS]
BINARY = (X[:, 0] > 0).astype(np.float64)
MULTI_BINARY = (X[:, :3] > 0).astype(np.float64)
REGRESSION = np.stack([X[:, 0] - X[:, 1], X[:, 2]], axis=1).astype(np.float64)

METRICS = [
    {"name": "accuracy"}, {"name": "binary_accuracy"}, {"name": "binary_accuracy", "threshold": 0.8,
    "metric_name": "ba_08"}, {"name": "binary_accuracy", "threshold": 0.2, "metric_name": "ba_02"},
    {"name": "top_k_accuracy", "k": 1, "metric_name": "top_1"}, {"name": "top_k_accuracy", "k": 2}, {"name": "mse"},
    {"name": "mae"}]


def _labels(y, outputs):
    return np.argmax(y, axis=1) if y.ndim == 2 and outputs > 1 else y.reshape(-1).astype(np.int64)


def _reference(metric, p, y):
    """The metric from NumPy, independently of portanet's implementation."""
    y2 = y.reshape(-1, 1) if y.ndim == 1 else y
    if isinstance(metric, pn.metrics.BinaryAccuracy) or (isinstance(metric, pn.metrics.Accuracy) and p.shape[1] == 1):
        threshold = getattr(metric, "threshold", 0.5)
        return float(np.mean(np.mean((p > threshold) == (y2 > 0.5), axis=1)))
    if isinstance(metric, pn.metrics.Accuracy):
        return float(np.mean(np.argmax(p, axis=1) == _labels(y, p.shape[1])))
    if isinstance(metric, pn.metrics.TopKAccuracy):
        labels = _labels(y, p.shape[1])
        hits = [np.argsort(-row, kind="stable").tolist().index(label) < metric.k for row, label in zip(p, labels)]
        return float(np.mean(hits))
    if isinstance(metric, pn.metrics.MeanSquaredError):
        return float(np.mean(np.mean((p - y2) ** 2, axis=1)))
    return float(np.mean(np.mean(np.abs(p - y2), axis=1)))


def _applies(metric, outputs):
    return not (metric["name"] == "top_k_accuracy" and outputs < 2)


# (loss, output units, output activation, targets): fused (softmax/sigmoid + cross-entropy), from logits, and plain
CASES = [
    ("sparse_categorical_crossentropy", CLASSES, "softmax", LABELS),
    ({"name": "sparse_categorical_crossentropy", "from_logits": True}, CLASSES, "linear", LABELS),
    ("categorical_crossentropy", CLASSES, "softmax", ONE_HOT),
    ({"name": "categorical_crossentropy", "from_logits": True}, CLASSES, "linear", ONE_HOT),
    ("binary_crossentropy", 1, "sigmoid", BINARY),
    ("binary_crossentropy", 3, "sigmoid", MULTI_BINARY),
    ({"name": "binary_crossentropy", "from_logits": True}, 1, "linear", BINARY),
    ("mse", CLASSES, "softmax", ONE_HOT),
    ("mse", 1, "sigmoid", BINARY),
    ("mse", 2, "linear", REGRESSION),
    ("mae", 2, "tanh", REGRESSION),
    ("huber", 3, "relu", MULTI_BINARY),
]
IDS = [f"{c[0] if isinstance(c[0], str) else c[0]['name'] + '-logits'}-{c[2]}{c[1]}" for c in CASES]


def _model(device, loss, units, activation, dtype="float32"):
    model = pn.Model([pn.Dense(7, "tanh"), pn.Dense(units, activation)], device=device, dtype=dtype, seed=3)
    return model.compile(loss, pn.Adam(learning_rate=0.05), metrics=[m for m in METRICS if _applies(m, units)])


@pytest.mark.parametrize("loss,units,activation,y", CASES, ids=IDS)
def test_evaluate_reports_the_metrics_of_what_predict_returns(device, loss, units, activation, y):
    model = _model(device, loss, units, activation).build(FEATURES)
    predicted = to_numpy(model.predict(X, batch_size=32)).astype(np.float64)
    reported = model.evaluate(X, y, batch_size=32)
    for metric in model.metrics:
        assert reported[metric.name] == pytest.approx(_reference(metric, predicted, y), rel=1e-6, abs=1e-6), \
            type(metric).__name__ + str(metric.get_config())


@pytest.mark.parametrize("loss,units,activation,y", CASES, ids=IDS)
def test_validation_metrics_in_the_history_are_those_of_predict_after_the_epoch(device, loss, units, activation, y):
    model = _model(device, loss, units, activation)
    history = model.fit(X, y, epochs=1, batch_size=16, validation_data=(X, y), verbose=0)
    predicted = to_numpy(model.predict(X)).astype(np.float64)
    for metric in model.metrics:
        assert history.history[f"val_{metric.name}"][-1] == pytest.approx(
            _reference(metric, predicted, y), rel=1e-6, abs=1e-6), metric.name


def test_near_ties_are_decided_on_the_probabilities_predict_returns():
    # Logits that differ by less than float32 can resolve after softmax: accuracy follows the probabilities.
    model = pn.Model([pn.Dense(3, "softmax", use_bias=False)], seed=0).build(1)
    model.compile("sparse_categorical_crossentropy", "sgd", ["accuracy", pn.metrics.TopKAccuracy(k=1, name="top_1")])
    model.set_parameters({"dense_0.kernel": np.array([[10.0, 10.0 + 1e-6, 10.0 - 1e-6]], np.float32)})
    x = np.ones((8, 1), np.float32)
    p = to_numpy(model.predict(x))
    expected = np.mean(np.argmax(p, axis=1) == 1)
    logs = model.evaluate(x, np.ones(8, np.int64))
    assert logs["accuracy"] == expected and logs["top_1"] == expected


def test_top_1_accuracy_breaks_ties_like_argmax():
    xp = pn.resolve_device("cpu").xp
    tied = np.array([[0.5, 0.5, 0.0], [0.2, 0.4, 0.4], [0.3, 0.3, 0.4]])
    labels = np.array([1, 1, 2])  # argmax picks 0, 1, 2: hits at rows 1 and 2 only
    top1 = pn.metrics.TopKAccuracy(k=1).batch_sum(tied, labels, xp)
    accuracy = pn.metrics.Accuracy().batch_sum(tied, labels, xp)
    assert float(top1) == float(accuracy) == 2.0
    assert float(pn.metrics.TopKAccuracy(k=2).batch_sum(tied, labels, xp)) == 3.0


def test_two_metrics_with_one_name_are_refused_and_a_name_tells_them_apart():
    model = pn.Model([pn.Dense(1, "sigmoid")])
    with pytest.raises(ValueError, match=r"two metrics are named 'binary_accuracy'; give one another name"):
        model.compile("binary_crossentropy", "sgd", ["binary_accuracy", pn.metrics.BinaryAccuracy(threshold=0.8)])
    model.compile("binary_crossentropy", "sgd", ["binary_accuracy", pn.metrics.BinaryAccuracy(0.8, name="ba_08")])
    config = model.get_config()["metrics"][1]
    assert config == {"name": "binary_accuracy", "metric_name": "ba_08", "threshold": 0.8}
    assert pn.metrics.get(config).name == "ba_08" and pn.metrics.get(config).threshold == 0.8


def test_metrics_ignore_sample_weights_and_the_loss_uses_them_over_the_batch_size():
    model = pn.Model([pn.Dense(CLASSES, "softmax")], seed=1).build(FEATURES)
    model.compile("sparse_categorical_crossentropy", "sgd", ["accuracy"])
    weights = np.linspace(0.0, 2.0, N)
    plain, weighted = model.evaluate(X, LABELS), model.evaluate(X, LABELS, sample_weight=weights)
    assert weighted["accuracy"] == plain["accuracy"]
    p = to_numpy(model.predict(X)).astype(np.float64)
    per_sample = -np.log(p[np.arange(N), LABELS])
    assert weighted["loss"] == pytest.approx(np.sum(weights * per_sample) / N, rel=1e-5)  # divisor: the row count
