"""Contracts a user relies on without reading the code: every call checks everything before it changes anything;
one object has one owner; checkpoints hold the end of the epoch whatever the callback order; models copy and pickle."""

import copy
import itertools
import pickle

import numpy as np
import pytest

import portanet as pn
from portanet import to_numpy
from portanet.testing import assert_close

RNG = np.random.default_rng(0)
X = RNG.standard_normal((64, 5)).astype(np.float32)
Y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)


def _model(device="cpu", seed=0, dropout=0.2):
    model = pn.Model([pn.Dense(8, "relu"), pn.Dropout(dropout), pn.Dense(2, "softmax")], device=device, seed=seed)
    return model.compile("sparse_categorical_crossentropy", pn.Adam(learning_rate=0.01), ["accuracy"])


def _weights(model):
    return to_numpy(model.parameter_buffer.values).copy()


VALID = dict(epochs=2, batch_size=16, validation_split=0.25, verbose=0)
INVALID = [
    (dict(VALID, epochs=-1), ValueError, "epochs must be a non-negative integer"),
    (dict(VALID, epochs=1.5), ValueError, "epochs must be a non-negative integer"),
    (dict(VALID, batch_size=0), ValueError, "batch_size must be a positive integer"),
    (dict(VALID, verbose=3), ValueError, "verbose must be 0, 1 or 2"),
    (dict(VALID, log_every=0), ValueError, "log_every must be a positive integer or None"),
    (dict(VALID, validation_split=1.0), ValueError, r"validation_split must be a number in \[0, 1\)"),
    (dict(VALID, class_weight={5: 1.0}), ValueError, r"class_weight keys must be class indices in \[0, 2\)"),
    (dict(VALID, callbacks=pn.EarlyStopping()), TypeError, "callbacks must be a list of Callback objects"),
    (dict(VALID, validation_split=0.0, callbacks=[pn.EarlyStopping(monitor="val_loss")]), ValueError,
     "EarlyStopping monitors 'val_loss'"),
    (dict(VALID, callbacks=[pn.EarlyStopping(monitor="val_acuracy")]), ValueError, "monitors 'val_acuracy'"),
    (dict(VALID, callbacks=[pn.ModelCheckpoint("{val_los}.safetensors")]), ValueError, "has a field that is not"),
    (dict(VALID, validation_split=0.0, validation_data=(X[:, :3], Y)), ValueError,
     "validation x has 3 features but x has 5"),
    (dict(VALID, resume_from="/nonexistent/ckpt.safetensors"), FileNotFoundError, "nonexistent"),
]


@pytest.mark.parametrize("order", [0, 1, 2])
def test_invalid_fit_calls_change_nothing_and_draw_no_random_numbers(device, order):
    """A list of invalid calls, each followed by the valid call, gives the weights of the valid call alone."""
    reference = _model(device)
    reference.fit(X, Y, **VALID)
    model = _model(device)
    calls = list(INVALID)
    np.random.default_rng(order).shuffle(calls)
    for kwargs, error, message in calls:
        with pytest.raises(error, match=message):
            model.fit(X, Y, **kwargs)
        assert not model.built
    model.fit(X, Y, **VALID)
    np.testing.assert_array_equal(_weights(model), _weights(reference))
    assert model.random_state() == reference.random_state()


def test_invalid_fit_calls_on_a_trained_model_leave_weights_optimizer_and_random_state(device):
    model = _model(device)
    model.fit(X, Y, epochs=1, verbose=0)
    before = (_weights(model), {k: to_numpy(v).copy() for k, v in model.optimizer.state.items()},
              model.optimizer.iterations, model.random_state())
    for kwargs, error, message in INVALID:
        with pytest.raises(error, match=message):
            model.fit(X, Y, **kwargs)
    np.testing.assert_array_equal(_weights(model), before[0])
    for name, value in model.optimizer.state.items():
        np.testing.assert_array_equal(to_numpy(value), before[1][name])
    assert model.optimizer.iterations == before[2] and model.random_state() == before[3]


# -- one object, one owner -------------------------------------------------------------------------------------------
def test_an_optimizer_serves_one_model():
    adam = pn.Adam()
    first = _model().compile("sparse_categorical_crossentropy", adam)
    keep = pn.Model([pn.Dense(2, "softmax")])
    with pytest.raises(ValueError, match="optimizer Adam already belongs to another model"):
        keep.compile("sparse_categorical_crossentropy", adam)
    assert keep.optimizer is None and first.optimizer is adam


def test_a_layer_serves_one_model():
    dense = pn.Dense(3)
    first = pn.Model([dense])
    with pytest.raises(ValueError, match="layer 'dense_0' already belongs to another model"):
        pn.Model([dense])
    assert first.layers == [dense]


def test_a_callback_serves_one_model_at_a_time():
    stop = pn.EarlyStopping(monitor="loss", patience=5)
    first = _model()
    first.fit(X, Y, epochs=1, verbose=0, callbacks=[stop])
    with pytest.raises(ValueError, match="callback EarlyStopping already belongs to another model"):
        _model(seed=1).fit(X, Y, epochs=1, verbose=0, callbacks=[stop])


def test_an_object_whose_model_is_gone_can_serve_again():
    adam = pn.Adam()
    first = _model()
    first.compile("sparse_categorical_crossentropy", adam)
    del first
    import gc

    gc.collect()
    pn.Model([pn.Dense(2, "softmax")]).compile("sparse_categorical_crossentropy", adam)


def test_recompiling_with_the_same_optimizer_keeps_it():
    model = _model()
    model.fit(X, Y, epochs=1, verbose=0)
    model.compile("sparse_categorical_crossentropy", model.optimizer)
    assert model.optimizer.iterations > 0


# -- checkpoints hold the end of the epoch -----------------------------------------------------------------------------
class Scripted(pn.Callback):
    def __init__(self, values):
        self.values = values

    def on_epoch_end(self, epoch, logs=None):
        logs["score"] = self.values[epoch]


SCORES = [3.0, 1.0, 2.0, 0.5]


@pytest.mark.parametrize("order", [(0, *p) for p in itertools.permutations(range(1, 4))])  # the scorer runs first
def test_a_checkpoint_holds_every_callbacks_state_after_the_epoch_whatever_the_order(tmp_path, order):
    last, best = tmp_path / "last.safetensors", tmp_path / "best.safetensors"

    def callbacks():
        return [Scripted(SCORES), pn.ModelCheckpoint(last), pn.ModelCheckpoint(best, monitor="score",
                                                                               save_best_only=True),
                pn.ReduceLROnPlateau(monitor="score", patience=1, factor=0.5)]

    straight = _model(dropout=0.0)
    straight.fit(X, Y, epochs=4, verbose=0, callbacks=[callbacks()[i] for i in order])
    best_straight = to_numpy(pn.load(best).parameter_buffer.values)
    interrupted = _model(dropout=0.0)
    interrupted.fit(X, Y, epochs=2, verbose=0, callbacks=[callbacks()[i] for i in order])
    resumed = _model(dropout=0.0)
    resumed.fit(X, Y, epochs=4, verbose=0, resume_from=last, callbacks=[callbacks()[i] for i in order])
    np.testing.assert_array_equal(_weights(resumed), _weights(straight))
    np.testing.assert_array_equal(to_numpy(pn.load(best).parameter_buffer.values), best_straight)
    assert resumed.optimizer.learning_rate == straight.optimizer.learning_rate


# -- copies and pickles ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_model_copies_and_pickles_with_weights_optimizer_state_and_device(device, how):
    model = _model(device)
    model.fit(X, Y, epochs=1, verbose=0)
    twin = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert twin.device == model.device and twin.backend == model.backend
    assert_close(twin.parameter_buffer.values, _weights(model), device=device, rtol=0, atol=0)
    assert twin.optimizer.iterations == model.optimizer.iterations
    twin.fit(X, Y, epochs=1, verbose=0, shuffle=False)
    model.fit(X, Y, epochs=1, verbose=0, shuffle=False)
    assert_close(twin.parameter_buffer.values, _weights(model), device=device, rtol=0, atol=0)
    assert twin.layers[0] is not model.layers[0] and twin.optimizer is not model.optimizer


def test_device_equality_and_hash_agree_with_its_name(device):
    assert device == device.name and hash(device) == hash(device.name)
    assert {device.name: 1}.get(device) == 1


# -- small API edges -------------------------------------------------------------------------------------------------
def test_a_single_layer_instead_of_a_list_is_a_type_error_showing_the_list():
    with pytest.raises(TypeError, match=r"got a single Dense: write Model\(\[Dense\(...\)\]\)"):
        pn.Model(pn.Dense(3))


def test_a_single_callback_instead_of_a_list_is_a_type_error_showing_the_list():
    with pytest.raises(TypeError, match=r"got a single EarlyStopping: write callbacks=\[EarlyStopping\(...\)\]"):
        _model().fit(X, Y, callbacks=pn.EarlyStopping(monitor="loss"), verbose=0)


def test_compile_requires_a_loss():
    model = pn.Model([pn.Dense(2, "softmax")])
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'loss'"):
        model.compile()
    with pytest.raises(TypeError, match="compile\\(\\) needs a loss: .*got None"):
        model.compile(None, "adam")
    assert model.loss is None and model.optimizer is None


@pytest.mark.parametrize("save", ["save", "save_weights", "checkpoint"])
def test_saving_into_a_missing_folder_names_the_users_path_before_training(tmp_path, save):
    path = tmp_path / "no" / "such" / "m.safetensors"
    model = _model()
    if save == "checkpoint":  # found before the first epoch, not after it
        with pytest.raises(FileNotFoundError, match=f"cannot write {path}: the folder {path.parent} does not exist"):
            model.fit(X, Y, epochs=3, verbose=0, callbacks=[pn.ModelCheckpoint(path)])
        assert not model.built
        return
    model.build(X.shape[1])
    with pytest.raises(FileNotFoundError, match=f"cannot write {path}: the folder {path.parent} does not exist"):
        getattr(model, save)(path)


def test_a_checkpoint_folder_is_checked_before_training_with_a_users_callback_too(tmp_path):
    path = tmp_path / "missing" / "ckpt.safetensors"
    model = _model()
    with pytest.raises(FileNotFoundError, match="the folder .*missing does not exist"):
        model.fit(X, Y, epochs=3, verbose=0, callbacks=[pn.Callback(), pn.ModelCheckpoint(path)])
    assert model.optimizer.iterations == 0


def test_check_gradients_samples_32_elements_of_each_parameter_by_default(monkeypatch):
    seen = {}
    original = pn.gradcheck.numerical_gradients

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.update({name: len(idx) for name, (idx, _) in result.items()})
        return result

    monkeypatch.setattr(pn.gradcheck, "numerical_gradients", spy)
    model = pn.Model([pn.Dense(40, "tanh"), pn.Dense(3, "softmax")], seed=0).compile("sparse_categorical_crossentropy")
    errors = pn.check_gradients(model, X[:8], Y[:8])
    assert seen == {"dense_0.kernel": 32, "dense_0.bias": 32, "dense_1.kernel": 32, "dense_1.bias": 3}
    assert max(errors.values()) < 1e-6
