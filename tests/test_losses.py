"""Loss values against NumPy references, fused cross-entropy stability, target validation."""

import numpy as np
import pytest

from portanet import losses, to_numpy
from portanet.testing import assert_close

RNG = np.random.default_rng(0)
PRED = RNG.uniform(0.05, 0.95, (8, 3))
TARGET = RNG.uniform(0, 1, (8, 3))
LOGITS = RNG.standard_normal((8, 3)) * 3
LABELS = np.array([0, 2, 1, 1, 0, 2, 2, 1])
ONEHOT = np.eye(3)[LABELS]


def _log_softmax(z):
    s = z - z.max(1, keepdims=True)
    return s - np.log(np.exp(s).sum(1, keepdims=True))


CASES = {
    "mse": (losses.MeanSquaredError(), PRED, TARGET, np.mean((PRED - TARGET) ** 2)),
    "mae": (losses.MeanAbsoluteError(), PRED, TARGET, np.mean(np.abs(PRED - TARGET))),
    "huber": (losses.Huber(0.3), PRED * 2, TARGET,
              np.mean(np.where(np.abs(2 * PRED - TARGET) <= 0.3, 0.5 * (2 * PRED - TARGET) ** 2,
                               0.3 * (np.abs(2 * PRED - TARGET) - 0.15)))),
    "bce": (losses.BinaryCrossentropy(), PRED, TARGET,
            np.mean(-(TARGET * np.log(PRED) + (1 - TARGET) * np.log(1 - PRED)))),
    "cce": (losses.CategoricalCrossentropy(), PRED / PRED.sum(1, keepdims=True), ONEHOT,
            np.mean(-np.log((PRED / PRED.sum(1, keepdims=True))[np.arange(8), LABELS]))),
    "sparse": (losses.SparseCategoricalCrossentropy(), PRED / PRED.sum(1, keepdims=True), LABELS,
               np.mean(-np.log((PRED / PRED.sum(1, keepdims=True))[np.arange(8), LABELS]))),
}
LOGIT_CASES = {
    "bce": (losses.BinaryCrossentropy(from_logits=True), LOGITS, TARGET,
            np.mean(np.logaddexp(0, LOGITS) - TARGET * LOGITS)),
    "cce": (losses.CategoricalCrossentropy(from_logits=True), LOGITS, ONEHOT,
            np.mean(-_log_softmax(LOGITS)[np.arange(8), LABELS])),
    "sparse": (losses.SparseCategoricalCrossentropy(from_logits=True), LOGITS, LABELS,
               np.mean(-_log_softmax(LOGITS)[np.arange(8), LABELS])),
}


def _value(loss, pred, y, device, logits=False):
    xp = device.xp
    p = device.asarray(pred, "float64")
    t = device.asarray(y, "int64" if loss.sparse else "float64")
    per, grad = (loss.per_sample_logits if logits else loss.per_sample)(p, t, xp)
    return losses.reduce(per, grad, xp)


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_value_matches_reference(device, case):
    loss, pred, y, expected = CASES[case]
    value, grad = _value(loss, pred, y, device)
    assert_close(value, np.asarray(expected), device=device)
    assert grad.shape == pred.shape


@pytest.mark.parametrize("case", sorted(LOGIT_CASES))
def test_loss_from_logits_matches_reference(device, case):
    loss, z, y, expected = LOGIT_CASES[case]
    value, _ = _value(loss, z, y, device, logits=True)
    assert_close(value, np.asarray(expected), device=device)


@pytest.mark.parametrize("case", sorted(LOGIT_CASES))
def test_fused_gradient_is_p_minus_y_over_n(device, case):
    loss, z, y, _ = LOGIT_CASES[case]
    _, grad = _value(loss, z, y, device, logits=True)
    if case == "bce":
        p, target = 1 / (1 + np.exp(-z)), y
        expected = (p - target) / (z.shape[0] * z.shape[1])
    else:
        p = np.exp(_log_softmax(z))
        expected = (p - ONEHOT) / z.shape[0]
    assert_close(grad, expected, device=device)


@pytest.mark.parametrize("case", sorted(LOGIT_CASES))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_and_sigmoid_crossentropy_are_stable_for_large_logits(device, case, dtype):
    loss, _, y, _ = LOGIT_CASES[case]
    z = np.tile([1e4, -1e4, 0.0], (8, 1)) * np.where(np.arange(8)[:, None] % 2, 1, -1)
    xp = device.xp
    per, grad = loss.per_sample_logits(device.asarray(z, dtype), device.asarray(y, "int64" if loss.sparse else dtype), xp)
    value, grad = losses.reduce(per, grad, xp)
    assert np.isfinite(to_numpy(value)) and np.isfinite(to_numpy(grad)).all()
    assert grad.dtype == device.dtype(dtype)


def test_column_targets_do_not_broadcast_into_a_square_loss(device):
    pred = device.asarray(np.zeros((5, 1)), "float64")
    y_flat = device.asarray(np.ones(5), "float64")
    per, grad = losses.MeanSquaredError().per_sample(pred, y_flat, device.xp)
    assert per.shape == (5,) and grad.shape == (5, 1)
    assert_close(losses.reduce(per, grad, device.xp)[0], np.asarray(1.0), device=device)


def test_sample_weights_weight_each_row(device):
    loss, pred, y, _ = CASES["mse"]
    xp = device.xp
    w = np.arange(8, dtype=np.float64)
    per, grad = loss.per_sample(device.asarray(pred, "float64"), device.asarray(y, "float64"), xp)
    value, _ = losses.reduce(per, grad, xp, device.asarray(w, "float64"))
    expected = np.sum(np.mean((pred - y) ** 2, axis=1) * w) / 8
    assert_close(value, np.asarray(expected), device=device)


def test_sparse_labels_out_of_range_are_rejected():
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), got values in \[0, 3\]"):
        losses.SparseCategoricalCrossentropy().check_targets(np.array([0, 1, 3]), 3)
    with pytest.raises(ValueError, match="must be in"):
        losses.SparseCategoricalCrossentropy().check_targets(np.array([-1, 1]), 3)


def test_sparse_labels_must_be_integers():
    with pytest.raises(ValueError, match="integer class labels"):
        losses.SparseCategoricalCrossentropy().check_targets(np.array([0.5, 1.0]), 3)


def test_onehot_targets_must_match_the_output_width():
    with pytest.raises(ValueError, match=r"shape \(samples, 3\).*got \(4, 2\)"):
        losses.CategoricalCrossentropy().check_targets(np.zeros((4, 2)), 3)


def test_unknown_loss_names_the_choices():
    with pytest.raises(ValueError, match="unknown loss 'hinge'.*mse"):
        losses.get("hinge")


def test_loss_lookup_by_name_alias_and_config():
    assert isinstance(losses.get("mean_squared_error"), losses.MeanSquaredError)
    assert losses.get({"name": "binary_crossentropy", "from_logits": True}).from_logits
    assert losses.get({"name": "huber", "delta": 2.0}).delta == 2.0
