"""fit(): validation split, class weights, NaN/inf in inputs and in the loss, and the model summary."""

import numpy as np
import pytest

import portanet as pn
from portanet import to_numpy
from portanet.data import split_rows, split_sizes
from portanet.data import StreamError
from portanet.testing import assert_close

RNG = np.random.default_rng(0)
X = RNG.standard_normal((80, 4)).astype(np.float32)
SORTED = np.repeat([0, 1], [60, 20])  # labels sorted by class, 3:1, as in many datasets on disk

overflow = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                      "ignore:invalid value encountered:RuntimeWarning")


def _classifier(device="cpu", lr=0.01, seed=0):
    model = pn.Model([pn.Dense(6, "relu"), pn.Dense(2, "softmax")], device=device, seed=seed)
    return model.compile("sparse_categorical_crossentropy", pn.SGD(lr=lr), metrics=["accuracy"])


def _host(model):
    return to_numpy(model.parameter_buffer.values).copy()


class Loader:
    """A re-iterable stream of (x, y) batches with a length, like a DataLoader."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


# -- validation split ---------------------------------------------------------------------------------------------
def test_split_rows_holds_out_the_fraction_with_the_class_mix_of_the_data():
    train, val = split_rows(80, 0.25, SORTED, seed=1)
    assert len(val) == 20 and len(train) == 60 and not set(train) & set(val)
    assert np.bincount(SORTED[val]).tolist() == [15, 5]


def test_split_rows_is_shuffled_and_depends_on_the_seed():
    _, a = split_rows(80, 0.25, None, seed=1)
    _, b = split_rows(80, 0.25, None, seed=2)
    assert len(a) == 20 and not np.array_equal(a, np.arange(60, 80)) and not np.array_equal(a, b)


def test_split_rows_never_takes_every_row_of_a_class():
    labels = np.array([0] * 10 + [1, 2])
    train, val = split_rows(12, 0.5, labels, seed=0)
    assert set(labels[train]) == {0, 1, 2}


@pytest.mark.parametrize("seed", range(20))
def test_split_sizes_are_the_sizes_split_rows_gives_for_every_seed(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    labels = [None, rng.integers(0, int(rng.integers(1, 8)), n), np.repeat(np.arange(n // 2), 2)[:n]][seed % 3]
    fraction = float(rng.uniform(1 / n, 1 - 1 / n))
    if not 1 <= round(fraction * n) < n:
        fraction = 1 / n
    train, val = split_rows(n, fraction, labels, seed=seed)
    assert split_sizes(n, fraction, labels) == (len(train), len(val))


def test_a_stratified_split_short_of_rows_keeps_them_for_training():
    labels = np.repeat(np.arange(5), 2)  # 6 of 10 rows asked for, but each class keeps one row: 5 held out
    assert split_sizes(10, 0.6, labels) == (5, 5)


def test_validation_split_is_stratified_not_the_last_rows(device):
    model = _classifier(device, lr=1e-12)  # predicts class 0 everywhere and does not learn
    model.build(4).set_parameters({"dense_1.kernel": np.zeros((6, 2)), "dense_1.bias": np.array([5.0, 0.0])})
    history = model.fit(X, SORTED, epochs=1, validation_split=0.25, verbose=0)
    assert history["val_accuracy"] == [0.75]  # the last 20 rows would all be class 1: accuracy 0
    assert history["accuracy"] == [0.75]


def test_validation_split_stratifies_one_hot_and_binary_targets():
    one_hot = pn.Model([pn.Dense(2, "softmax")], seed=0).compile("categorical_crossentropy", pn.SGD(lr=1e-12),
                                                                   ["accuracy"])
    one_hot.build(4).set_parameters({"dense_0.kernel": np.zeros((4, 2)), "dense_0.bias": np.array([5.0, 0.0])})
    assert one_hot.fit(X, np.eye(2)[SORTED], validation_split=0.25, verbose=0)["val_accuracy"] == [0.75]
    binary = pn.Model([pn.Dense(1, "sigmoid")], seed=0).compile("binary_crossentropy", pn.SGD(lr=1e-12), ["accuracy"])
    binary.build(4).set_parameters({"dense_0.kernel": np.zeros((4, 1)), "dense_0.bias": np.array([-5.0])})
    assert binary.fit(X, SORTED.astype(np.float32), validation_split=0.25, verbose=0)["val_accuracy"] == [0.75]


def test_validation_split_keeps_sample_weights_with_their_rows():
    weights = np.where(SORTED == 1, 0.0, 1.0)
    model = _classifier(lr=1e-12)
    model.build(4).set_parameters({"dense_1.kernel": np.zeros((6, 2)), "dense_1.bias": np.array([0.0, 5.0])})
    history = model.fit(X, SORTED, sample_weight=weights, validation_split=0.25, verbose=0)
    assert history["val_accuracy"] == [0.25]  # metrics are unweighted; every class-0 row weighs 1, class-1 rows 0
    loss_of_class_0 = float(model.evaluate(X[:1], SORTED[:1])["loss"])
    assert history["loss"][0] == pytest.approx(loss_of_class_0 * 45 / 60, rel=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    ({"validation_split": 1.0}, r"validation_split must be a number in \[0, 1\), got 1.0"),
    ({"validation_split": 0.001}, r"validation_split=0.001 of 80 rows leaves 0 for validation"),
    ({"validation_split": 0.2, "validation_data": (X, SORTED)}, r"pass validation_data or validation_split"),
])
def test_validation_split_rejects_what_it_cannot_do(kwargs, message):
    model = _classifier()
    with pytest.raises(ValueError, match=message):
        model.fit(X, SORTED, verbose=0, **kwargs)


def test_validation_split_of_a_stream_asks_for_validation_data():
    batches = Loader([(X[:40], SORTED[:40]), (X[40:], SORTED[40:])])
    with pytest.raises(ValueError, match=r"validation_split needs in-memory arrays.*pass validation_data= instead"):
        _classifier().fit(batches, validation_split=0.2, verbose=0)


# -- class weights ------------------------------------------------------------------------------------------------
def test_class_weight_trains_exactly_like_the_matching_sample_weight(device):
    a, b = _classifier(device, lr=0.1), _classifier(device, lr=0.1)
    a.fit(X, SORTED, epochs=2, batch_size=16, class_weight={1: 3.0}, verbose=0)
    b.fit(X, SORTED, epochs=2, batch_size=16, sample_weight=np.where(SORTED == 1, 3.0, 1.0), verbose=0)
    assert_close(a.parameter_buffer.values, _host(b), device=device, rtol=0, atol=0)


def test_class_weight_multiplies_sample_weight():
    a, b = _classifier(lr=0.1), _classifier(lr=0.1)
    w = RNG.uniform(0.5, 2, 80)
    a.fit(X, SORTED, epochs=1, batch_size=16, class_weight={0: 2.0}, sample_weight=w, verbose=0)
    b.fit(X, SORTED, epochs=1, batch_size=16, sample_weight=w * np.where(SORTED == 0, 2.0, 1.0), verbose=0)
    np.testing.assert_allclose(_host(a), _host(b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("class_weight,error,message", [
    ([1, 2], TypeError, r"class_weight must be a dict \{class: weight\}, got list"),
    ({2: 1.0}, ValueError, r"class_weight keys must be class indices in \[0, 2\), got 2"),
    ({"a": 1.0}, ValueError, r"class_weight keys must be class indices"),
    ({0: -1.0}, ValueError, r"class_weight\[0\] must be a finite number >= 0, got -1.0"),
    ({0: float("inf")}, ValueError, r"class_weight\[0\] must be a finite number >= 0"),
])
def test_class_weight_is_checked_before_training(class_weight, error, message):
    model = _classifier().build(4)
    before = _host(model)
    with pytest.raises(error, match=message):
        model.fit(X, SORTED, class_weight=class_weight, verbose=0)
    np.testing.assert_array_equal(_host(model), before)


def test_class_weight_needs_a_classification_loss():
    model = pn.Model([pn.Dense(1)]).compile("mse")
    with pytest.raises(ValueError, match=r"class_weight needs a classification loss .*got mse"):
        model.fit(X, X[:, 0], class_weight={0: 1.0}, verbose=0)


# -- NaN and inf in the inputs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["x", "y", "sample_weight", "validation x"])
def test_nan_in_in_memory_inputs_is_rejected_before_training(device, where):
    x, y, w = X.copy(), X[:, :1].copy(), np.ones(80)
    x_val = X.copy()
    {"x": x, "y": y, "sample_weight": w, "validation x": x_val}[where][17, ...] = np.nan
    model = pn.Model([pn.Dense(3, "tanh"), pn.Dense(1)], device=device, seed=0).compile("mse").build(4)
    before = _host(model)
    with pytest.raises(ValueError, match=rf"^{where} holds NaN or inf \(the first in row 17\)"):
        model.fit(device.asarray(x), device.asarray(y), sample_weight=w, validation_data=(x_val, y), verbose=0)
    np.testing.assert_array_equal(_host(model), before)


@overflow
def test_inf_in_a_streamed_batch_stops_training_and_puts_the_weights_back(device):
    x = X.copy()
    x[45, 2] = np.inf
    batches = Loader([(x[i:i + 10], SORTED[i:i + 10]) for i in range(0, 80, 10)])
    model = _classifier(device).build(4)
    before = _host(model)
    with pytest.raises(StreamError, match=r"batch 4 of x \(Loader\) in epoch 1 holds NaN or inf"):
        model.fit(batches, epochs=2, verbose=0)
    assert_close(model.parameter_buffer.values, before, device=device, rtol=0, atol=0)
    assert model.optimizer.iterations == 0


def test_a_bad_batch_before_the_first_step_of_adam_puts_back_the_fresh_optimizer(tmp_path):
    """The rollback snapshot of an optimizer that has not stepped holds no slots: restoring it must work."""
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=X.shape)
    x[...] = X
    x[25, 1] = np.nan
    model = pn.Model([pn.Dense(4, "tanh"), pn.Dense(3, "softmax")], seed=0)
    model.compile("sparse_categorical_crossentropy", pn.Adam())
    with pytest.raises(StreamError, match=r"batch 2 of x \(memmap\) in epoch 1 holds NaN or inf"):
        model.fit(x, SORTED, batch_size=10, shuffle=False, verbose=0)
    assert model.optimizer.iterations == 0 and model.optimizer.state == {}


# -- NaN and inf in the loss --------------------------------------------------------------------------------------
def _regression(device):
    model = pn.Model([pn.Dense(4, "tanh"), pn.Dense(1)], device=device, seed=0)
    return model.compile("mse", pn.Adam(lr=0.01))


def _exploding_targets():
    y = X[:, :1] * 2
    y[65] = 1e30  # finite, but its squared error overflows float32: step 7 of each epoch has an inf loss
    return y


@overflow
def test_a_non_finite_loss_raises_naming_epoch_and_step_and_keeps_finite_weights(device):
    y = _exploding_targets()
    model = _regression(device)
    model.fit(X[:60], y[:60], epochs=1, batch_size=10, shuffle=False, verbose=0)  # a clean epoch first
    after_epoch_1 = (_host(model), model.optimizer.iterations)
    with pytest.raises(FloatingPointError, match=r"the loss became (inf|NaN or inf) at epoch 1, step 7 of 8; "
                                                 r"training stopped and the model keeps the weights from .*"
                                                 r"learning rate too high.*not scaled"):
        model.fit(X, y, epochs=2, batch_size=10, shuffle=False, verbose=0)
    assert np.isfinite(_host(model)).all()
    assert all(np.isfinite(to_numpy(v)).all() for v in model.optimizer.state.values())
    if device.host_memory:  # checked before each update: the weights from before the bad step
        reference = _regression("cpu")
        reference.fit(X[:60], y[:60], epochs=1, batch_size=10, shuffle=False, verbose=0)
        reference.fit(X[:60], y[:60], epochs=1, batch_size=10, shuffle=False, verbose=0)
        assert_close(model.parameter_buffer.values, _host(reference), device=device, rtol=1e-6, atol=1e-7)
    else:  # no per-step read on a device: the weights from the last read (the start of this fit)
        assert_close(model.parameter_buffer.values, after_epoch_1[0], device=device, rtol=0, atol=0)
        assert model.optimizer.iterations == after_epoch_1[1]


@overflow
def test_a_non_finite_loss_is_caught_at_the_next_log_read_on_a_device(device):
    model = _regression(device)
    weights = []

    class Record(pn.Callback):
        def on_log(self, step, logs=None):
            weights.append(_host(model))

    kept = "before that step" if device.host_memory else "step 6 of epoch 1"
    with pytest.raises(FloatingPointError, match=rf"at epoch 1, step 7 of 8; training stopped and the model keeps "
                                                 rf"the weights from {kept}\."):
        model.fit(X, _exploding_targets(), epochs=1, batch_size=10, shuffle=False, verbose=0, log_every=3,
                  callbacks=[Record()])
    assert len(weights) == 2
    if not device.host_memory:
        assert_close(model.parameter_buffer.values, weights[-1], device=device, rtol=0, atol=0)


@overflow
def test_an_update_that_overflows_mid_epoch_goes_back_to_the_last_read_on_every_backend(device):
    """Weights that overflow (the loss still finite) are found at the next read; the model goes back to the state
    the read before found finite, on the host as on a device (the host kept only epoch-end snapshots: the whole
    epoch's steps were lost, at a log_every read's cost and against the README's 'last state checked finite')."""
    model = pn.Model([pn.Dense(3, "tanh"), pn.Dense(1)], device=device, seed=0).compile("mse", pn.SGD(lr=1e-4))
    reads = {}

    class Explode(pn.Callback):
        def on_log(self, step, logs=None):
            reads[step] = (_host(model), model.optimizer.iterations)

        def on_batch_end(self, step, loss=None):
            if step == 4:
                self.model.optimizer.learning_rate = 1e38  # step 5's update overflows; its loss was finite

    with pytest.raises(FloatingPointError, match=r"the weights or the optimizer state became NaN or inf during "
                                                 r"epoch 1 .*keeps the weights from step 4 of epoch 1\."):
        model.fit(X, X[:, :1] * 1e3, epochs=1, batch_size=10, shuffle=False, verbose=0, log_every=2,
                  callbacks=[Explode()])
    assert sorted(reads) == [1, 3]
    assert_close(model.parameter_buffer.values, reads[3][0], device=device, rtol=0, atol=0)
    assert model.optimizer.iterations == reads[3][1] == 4


@overflow
def test_an_update_that_overflows_the_weights_is_undone_from_the_last_snapshot(device):
    model = pn.Model([pn.Dense(3, "tanh"), pn.Dense(1)], device=device, seed=0).compile("mse", pn.SGD(lr=1e38))
    model.build(4)
    before = _host(model)
    with pytest.raises(FloatingPointError, match=r"at epoch 1, step 2 of 8; training stopped and the model keeps the "
                                                 r"weights from the start of training"):
        model.fit(X, X[:, :1] * 1e3, epochs=2, batch_size=10, shuffle=False, verbose=0)  # step 1's loss is finite,
    #                                                                   its update lr * gradient is not
    assert_close(model.parameter_buffer.values, before, device=device, rtol=0, atol=0)
    assert model.optimizer.iterations == 0


@overflow
def test_a_non_finite_loss_from_a_too_high_learning_rate_is_caught():
    x = X * 100
    model = pn.Model([pn.Dense(32, "relu"), pn.Dense(1)], seed=0).compile("mse", pn.SGD(lr=10.0))
    with pytest.raises(FloatingPointError, match=r"the loss became .* at epoch \d+, step \d+ of 3"), \
            pytest.warns(pn.SetupWarning, match="unscaled inputs"):  # the warning that foretold it
        model.fit(x, x[:, :1] ** 2, epochs=20, batch_size=32, verbose=0)
    assert np.isfinite(_host(model)).all()


# -- summary ------------------------------------------------------------------------------------------------------
def test_summary_prints_layers_output_shapes_activations_and_parameter_counts(capsys):
    model = pn.Model([pn.Dense(64, "relu"), pn.Dropout(0.1), pn.Dense(10, "softmax")]).build(784)
    model.summary()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Model on cpu (numpy, float32), input (batch, 784)"
    assert lines[1].split() == ["Layer", "(type)", "Output", "shape", "Activation", "Params"]
    assert lines[3].split() == ["dense_0", "(Dense)", "(batch,", "64)", "relu", "50,240"]
    assert lines[4].split() == ["dropout_0", "(Dropout)", "(batch,", "64)", "0"]
    assert lines[5].split() == ["dense_1", "(Dense)", "(batch,", "10)", "softmax", "650"]
    assert lines[-1] == "Total params: 50,890" and model.count_params() == 50_890


def test_summary_of_an_unbuilt_model_shows_unknown_shapes(capsys):
    pn.Model([pn.Dense(3)]).summary()
    out = capsys.readouterr().out
    assert "(batch, ?)" in out and "Total params: ? (not built yet)" in out


def test_summary_uses_a_declared_input_width_before_building(capsys):
    pn.Model([pn.Dense(3, input_dim=5)]).summary()
    assert "Total params: 18" in capsys.readouterr().out


def test_models_show_as_an_html_table_in_notebooks():
    class Odd(pn.activations.ActivationFunction):
        name = "odd<>"  # layer names are identifiers; an activation's name is any string, and is escaped

    page = pn.Model([pn.Dense(4, "tanh"), pn.Dense(1, Odd(), name="out")]).build(2)._repr_html_()
    assert page.startswith("<table>") and "<td>dense_0 (Dense)</td>" in page and "<td>odd&lt;&gt;</td>" in page
    assert "<td style='text-align:right'>17</td></tr></tfoot>" in page
