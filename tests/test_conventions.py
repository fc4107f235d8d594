"""The conventions where libraries differ, as the README states them: the weighted-loss divisor (Keras's
sum_over_batch_size, not PyTorch's weighted cross-entropy), unweighted metrics, and thresholds applied to what predict
returns. PyTorch's autograd is the oracle."""

import numpy as np
import pytest

import portanet as pn
from portanet import to_numpy

torch = pytest.importorskip("torch", reason="PyTorch is the oracle here (the torch extra)")
F = torch.nn.functional

RNG = np.random.default_rng(3)
N = 40
X = RNG.standard_normal((N, 4))
LABELS = RNG.integers(0, 3, N)
CLASS_WEIGHT = np.array([1.0, 4.0, 0.5])
W = CLASS_WEIGHT[LABELS]


def _model(device, last=None, loss="sparse_categorical_crossentropy", metrics=None):
    model = pn.Model([pn.Dense(5, "tanh"), last or pn.Dense(3, "softmax")], device=device, dtype="float64", seed=1)
    return model.compile(loss, "sgd", metrics).build(4)


def _torch_logits(model):
    """The model's logits, recomputed by torch from its weights with autograd on (x: (N, 4))."""
    p = {k: torch.tensor(to_numpy(v), requires_grad=True) for k, v in model.parameters().items()}
    h = torch.tanh(torch.tensor(X) @ p["dense_0.kernel"] + p["dense_0.bias"])
    return h @ p["dense_1.kernel"] + p["dense_1.bias"], p


def test_the_weighted_loss_divides_by_the_batch_rows_as_keras_not_by_the_weights_as_torch(device):
    model = _model(device)
    loss, grads = model.loss_and_grads(X, LABELS, sample_weight=W)
    z, params = _torch_logits(model)
    per_row = F.cross_entropy(z, torch.tensor(LABELS), reduction="none")
    keras = (per_row * torch.tensor(W)).sum() / N  # sum_over_batch_size
    keras.backward()
    assert loss == pytest.approx(float(keras.detach()), rel=1e-12)
    for name, g in grads.items():
        np.testing.assert_allclose(to_numpy(g), params[name].grad.numpy(), rtol=1e-10, atol=1e-12)
    torch_weighted = F.cross_entropy(z, torch.tensor(LABELS), weight=torch.tensor(CLASS_WEIGHT)).detach()  # / sum(w)
    assert float(torch_weighted) == pytest.approx(loss * N / W.sum(), rel=1e-12)
    assert float(torch_weighted) != pytest.approx(loss, rel=1e-3)


def test_class_weight_is_the_same_divisor_as_sample_weight(device):
    a, b = _model(device), _model(device)
    a.fit(X, LABELS, class_weight=dict(enumerate(CLASS_WEIGHT)), epochs=1, batch_size=8, shuffle=False, verbose=0)
    b.fit(X, LABELS, sample_weight=W, epochs=1, batch_size=8, shuffle=False, verbose=0)
    np.testing.assert_array_equal(to_numpy(a.parameter_buffer.values), to_numpy(b.parameter_buffer.values))


def test_metrics_ignore_sample_weights_and_the_loss_does_not(device):
    model = _model(device, metrics=["accuracy"])
    plain, weighted = model.evaluate(X, LABELS), model.evaluate(X, LABELS, sample_weight=W)
    assert weighted["accuracy"] == plain["accuracy"]
    assert weighted["loss"] != pytest.approx(plain["loss"], rel=1e-3)
    z, _ = _torch_logits(model)
    per_row = F.cross_entropy(z, torch.tensor(LABELS), reduction="none").detach().numpy()
    assert weighted["loss"] == pytest.approx(float(np.sum(per_row * W) / N), rel=1e-10)


def test_binary_accuracy_thresholds_what_predict_returns_logits_with_a_from_logits_loss(device):
    y = (X[:, 0] > 0).astype(np.float64)
    with pytest.warns(pn.SetupWarning, match="'at_half' compares what predict returns with 0.5"):
        metrics = [pn.metrics.BinaryAccuracy(threshold=0.0, name="at_0"), pn.metrics.BinaryAccuracy(name="at_half")]
        model = _model(device, pn.Dense(1), pn.BinaryCrossentropy(from_logits=True), metrics)
    model.fit(X, y, epochs=5, verbose=0)
    logits = to_numpy(model.predict(X))[:, 0]
    logs = model.evaluate(X, y)
    probability = 1 / (1 + np.exp(-logits))
    assert logs["at_0"] == pytest.approx(np.mean((probability > 0.5) == (y > 0.5)))  # threshold 0 on logits
    assert logs["at_half"] == pytest.approx(np.mean((logits > 0.5) == (y > 0.5)))  # 0.5 compares logits
