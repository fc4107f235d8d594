"""Setups that used to train without a word: an error where they cannot be right, a SetupWarning with the fix where
they are likely wrong, and silence for the setups people mean (on every backend)."""

import warnings

import numpy as np
import pytest

import portanet as pn
from portanet import SetupWarning

RNG = np.random.default_rng(0)
X = RNG.standard_normal((64, 6)).astype(np.float32)
LABELS = (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0).astype(np.int64)  # 3 classes
BINARY = (X[:, 0] > 0).astype(np.float32)
ONE_HOT = np.eye(3, dtype=np.float32)[LABELS]
PIXELS = RNG.integers(0, 256, (64, 6)).astype(np.uint8)


def _model(device, *last, loss, metrics=None, hidden=True):
    layers = ([pn.Dense(8, "relu")] if hidden else []) + list(last)
    return pn.Model(layers, device=device, seed=0).compile(loss, "adam", metrics)


@pytest.fixture
def no_setup_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", SetupWarning)
        yield


# -- setups that cannot be right: errors at compile (and at build, for layers added later) ---------------------------
@pytest.mark.parametrize("loss", ["binary_crossentropy", "mse", "categorical_crossentropy"])
def test_softmax_over_one_unit_is_an_error_naming_the_layer_and_the_fix(device, loss):
    with pytest.raises(ValueError, match=r"layer 'dense_1' applies softmax to 1 unit: its output is always 1\.0.*"
                                         r"Dense\(1, activation='sigmoid'\) with loss='binary_crossentropy'"):
        _model(device, pn.Dense(1, "softmax"), loss=loss)


def test_softmax_over_one_unit_is_caught_as_a_separate_layer_and_when_built_uncompiled(device):
    with pytest.raises(ValueError, match="layer 'activation_0' applies softmax to 1 unit"):
        _model(device, pn.Dense(1), pn.Activation("softmax"), loss="binary_crossentropy")
    with pytest.raises(ValueError, match="layer 'dense_0' applies softmax to 1 unit"):
        pn.Model([pn.Dense(1, "softmax")], device=device).build(6)


def test_a_layer_added_after_compile_is_checked_when_fit_builds_the_model(device):
    model = pn.Model(device=device).compile("binary_crossentropy")
    model.add(pn.Dense(1, "softmax"))
    with pytest.raises(ValueError, match="applies softmax to 1 unit"):
        model.fit(X, BINARY, verbose=0)
    assert not model.built


@pytest.mark.parametrize("loss,units,activation", [
    ("binary_crossentropy", 1, "sigmoid"), ("categorical_crossentropy", 3, "softmax"),
    ("sparse_categorical_crossentropy", 3, "softmax")])
def test_from_logits_on_a_probability_output_is_an_error_with_the_fix(device, loss, units, activation):
    with pytest.raises(ValueError, match=rf"{loss} with from_logits=True expects logits, but layer 'dense_1' .*"
                                         rf"{activation}.*Drop from_logits"):
        _model(device, pn.Dense(units, activation), loss=pn.losses.get({"name": loss, "from_logits": True}))


@pytest.mark.parametrize("loss", ["categorical_crossentropy", "sparse_categorical_crossentropy"])
def test_a_categorical_crossentropy_on_sigmoid_outputs_is_an_error(device, loss):
    with pytest.raises(ValueError, match=rf"{loss} needs probabilities that sum to 1 .*activation='softmax'"):
        _model(device, pn.Dense(3, "sigmoid"), loss=loss)


@pytest.mark.parametrize("loss,wanted", [("binary_crossentropy", "sigmoid"), ("categorical_crossentropy", "softmax"),
                                         ("sparse_categorical_crossentropy", "softmax")])
@pytest.mark.parametrize("activation", ["linear", "relu", "tanh"])
def test_a_crossentropy_on_unbounded_outputs_is_an_error_suggesting_the_activation_or_from_logits(device, loss, wanted,
                                                                                                  activation):
    units = 1 if loss == "binary_crossentropy" else 3
    with pytest.raises(ValueError, match=rf"{loss} needs probabilities, but layer 'dense_1' .*'{activation}'.*"
                                         rf"activation='{wanted}'.*from_logits=True"):
        _model(device, pn.Dense(units, activation), loss=loss)


@pytest.mark.parametrize("loss", ["categorical_crossentropy", "sparse_categorical_crossentropy"])
def test_a_categorical_crossentropy_over_one_output_is_an_error(device, loss):
    with pytest.raises(ValueError, match=rf"{loss} needs one output per class .* the model has 1 output"):
        _model(device, pn.Dense(1), loss=pn.losses.get({"name": loss, "from_logits": True}))


# -- targets that cannot be right: errors where the values are read anyway --------------------------------------------
@pytest.mark.parametrize("call", ["fit", "evaluate", "train_step"])
def test_binary_crossentropy_on_minus_one_plus_one_labels_is_an_error(device, call):
    model = _model(device, pn.Dense(1, "sigmoid"), loss="binary_crossentropy")
    y = device.asarray(2 * BINARY - 1)  # on the model's device too: in-memory targets are read once, up front
    with pytest.raises(ValueError, match=r"targets must be probabilities or 0/1 labels in \[0, 1\], but y holds values "
                                         r"in \[-1, 1\].*\(y \+ 1\) / 2"):
        if call == "train_step":
            model.train_step(X, 2 * BINARY - 1)
        else:
            getattr(model, call)(X, y, **({"verbose": 0} if call == "fit" else {}))
    assert not model.built


def test_binary_crossentropy_on_class_labels_suggests_a_softmax_per_class(device):
    model = _model(device, pn.Dense(1, "sigmoid"), loss="binary_crossentropy")
    with pytest.raises(ValueError, match=r"values in \[0, 2\].*sparse_categorical_crossentropy"):
        model.fit(X, LABELS, verbose=0)


def test_binary_crossentropy_targets_are_checked_in_every_host_batch_of_a_stream():
    model = _model("cpu", pn.Dense(1, "sigmoid"), loss="binary_crossentropy")
    batches = iter([(X[:32], BINARY[:32]), (X[32:], 2 * BINARY[32:] - 1)])
    with pytest.raises(pn.data.StreamError, match=r"batch 1 of y: binary_crossentropy targets must be"):
        model.fit(batches, steps_per_epoch=2, verbose=0)


def test_categorical_crossentropy_with_negative_targets_is_an_error(device):
    model = _model(device, pn.Dense(3, "softmax"), loss="categorical_crossentropy")
    with pytest.raises(ValueError, match=r"one-hot rows or probabilities in \[0, 1\], but y holds values in \[-1, 1\]"):
        model.fit(X, 2 * ONE_HOT - 1, verbose=0)


@pytest.mark.parametrize("loss", ["categorical_crossentropy", "mse", "binary_crossentropy"])
def test_integer_labels_for_a_loss_that_wants_one_column_per_output_suggest_the_sparse_loss(device, loss):
    activation = "sigmoid" if loss == "binary_crossentropy" else "softmax"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SetupWarning)  # mse on a softmax: tested above
        model = _model(device, pn.Dense(3, activation), loss=loss)
    with pytest.raises(ValueError, match=r"shape \(samples, 3\).*got \(64,\); y looks like integer class labels: use "
                                         r"loss='sparse_categorical_crossentropy'"):
        model.fit(X, LABELS, verbose=0)


# -- likely mistakes: one warning with the fix ----------------------------------------------------------------------
def test_binary_crossentropy_on_a_softmax_over_several_classes_warns(device):
    with pytest.warns(SetupWarning, match="binary_crossentropy on the softmax output of layer 'dense_1' .* treats "
                                          "each of "
                                          "its 3 outputs as a separate yes/no question.*categorical_crossentropy"):
        _model(device, pn.Dense(3, "softmax"), loss="binary_crossentropy")


@pytest.mark.parametrize("loss", ["mse", "mae", "huber"])
def test_a_regression_loss_on_a_softmax_output_warns(device, loss):
    with pytest.warns(SetupWarning, match=rf"loss '{loss}' on the softmax output .*sparse_categorical_crossentropy"):
        _model(device, pn.Dense(3, "softmax"), loss=loss)


def test_dropout_after_the_output_layer_warns(device):
    with pytest.warns(SetupWarning, match="the model ends with Dropout"):
        _model(device, pn.Dense(3, "softmax"), pn.Dropout(0.5), loss="sparse_categorical_crossentropy")


@pytest.mark.parametrize("metric", ["accuracy", "binary_accuracy"])
def test_a_threshold_of_one_half_on_logits_warns_and_names_threshold_zero(device, metric):
    with pytest.warns(SetupWarning, match=rf"metric '{metric}' compares what predict returns with 0.5.*logits.*"
                                          rf"BinaryAccuracy\(threshold=0.0, name='{metric}'\)"):
        _model(device, pn.Dense(1), loss=pn.BinaryCrossentropy(from_logits=True), metrics=[metric])


class _Stream:
    """A re-iterable of (x, y) batches with a length, as a data loader is."""

    def __init__(self, x, y, size=16):
        self.batches = [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


@pytest.mark.parametrize("form", ["array", "device array", "sliceable", "stream"])
def test_raw_pixel_values_warn_once_with_the_fix(device, form):
    model = _model(device, pn.Dense(3, "softmax"), loss="sparse_categorical_crossentropy")
    data = {"array": (PIXELS, LABELS), "device array": (device.asarray(PIXELS), device.asarray(LABELS)),
            "sliceable": (_Sliceable(PIXELS), LABELS),
            "stream": (_Stream(PIXELS, LABELS), None)}[form]
    with pytest.warns(SetupWarning, match=r"x holds values up to 25\d in size \(raw pixel values\? dtype uint8\).*"
                                          r"x / 255 .*load_mnist\(normalize=True\).*standardize") as record:
        model.fit(*data, epochs=2, verbose=0)
    assert len([w for w in record if issubclass(w.category, SetupWarning)]) == 1  # once per fit, not per batch


class _Sliceable:
    """An h5py/zarr-like dataset: shape, dtype, len and contiguous slicing only."""

    def __init__(self, data):
        self.data, self.shape, self.dtype = data, data.shape, data.dtype

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        return self.data[key].copy()


def test_unscaled_float_features_warn(device):
    model = _model(device, pn.Dense(1), loss="mse")
    with pytest.warns(SetupWarning, match=r"x holds values up to \d{4} in size \(dtype float32\).*\(x - mean\) / std"):
        model.fit(X * 1000, X[:, 0], verbose=0)


def test_the_same_warning_from_the_same_line_is_shown_once(device):
    model = _model(device, pn.Dense(3, "softmax"), loss="sparse_categorical_crossentropy")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        for _ in range(3):
            model.fit(PIXELS, LABELS, verbose=0)
    assert len([w for w in record if issubclass(w.category, SetupWarning)]) == 1
    assert record[0].filename == __file__  # attributed to the user's line, not to portanet's


def test_validation_inputs_scaled_unlike_the_training_inputs_warn(device):
    model = _model(device, pn.Dense(3, "softmax"), loss="sparse_categorical_crossentropy")
    scaled = PIXELS.astype(np.float32) / 255
    with pytest.warns(SetupWarning, match=r"validation x holds values up to 25\d in size but x up to 1: the two are "
                                          "scaled differently"):
        model.fit(device.asarray(scaled), LABELS, validation_data=(device.asarray(PIXELS), LABELS), verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SetupWarning)
        model.fit(scaled, LABELS, validation_data=(scaled[:10], LABELS[:10]), verbose=0)


def test_a_memory_map_is_looked_at_through_its_first_rows_only(tmp_path):
    path = tmp_path / "x.npy"
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(3000, 6))
    x[:] = 0.5
    x[2000:] = 1000.0  # beyond the first 1024 rows: not read up front
    x.flush()
    model = _model("cpu", pn.Dense(3, "softmax"), loss="sparse_categorical_crossentropy")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SetupWarning)
        model.fit(np.load(path, mmap_mode="r"), np.zeros(3000, np.int64) + np.arange(3000) % 3, verbose=0)


@pytest.mark.parametrize("activation,low,high", [("sigmoid", 0, 1), ("tanh", -1, 1), ("relu", 0, None)])
def test_regression_targets_the_output_activation_cannot_reach_warn(device, activation, low, high):
    model = _model(device, pn.Dense(1, activation), loss="mse")
    y = 3 * X[:, 0] - 0.5
    reach = rf"\[{low}, {high}\]" if high is not None else rf"\[{low}, inf\)"
    with pytest.warns(SetupWarning, match=rf"y holds values in \[-\d.*\] but layer 'dense_1' \({activation}\) outputs "
                                          rf"values in {reach} only.*linear output"):
        model.fit(X, y, verbose=0)


def test_categorical_targets_that_are_not_distributions_warn(device):
    model = _model(device, pn.Dense(3, "softmax"), loss="categorical_crossentropy")
    multi_hot = np.maximum(ONE_HOT, (X[:, 3:] > 0).astype(np.float32))
    with pytest.warns(SetupWarning, match="some rows of y do not sum to 1.*activation='sigmoid'"):
        model.fit(X, multi_hot, verbose=0)


def test_labels_sorted_by_class_without_shuffling_warn(device, no_setup_warnings):
    order = np.argsort(LABELS, kind="stable")
    model = _model(device, pn.Dense(3, "softmax"), loss="sparse_categorical_crossentropy")
    model.fit(X[order], LABELS[order], verbose=0)  # shuffle=True: fine
    with pytest.warns(SetupWarning, match="y is sorted by class and shuffle=False"):
        model.fit(X[order], LABELS[order], shuffle=False, verbose=0)


# -- and silence for the setups people mean --------------------------------------------------------------------------
@pytest.mark.parametrize("units,activation,loss,y,metrics", [
    (3, "softmax", "sparse_categorical_crossentropy", LABELS, ["accuracy", "top_k_accuracy"]),
    (3, "softmax", "categorical_crossentropy", ONE_HOT, ["accuracy"]),
    (1, "sigmoid", "binary_crossentropy", BINARY, ["accuracy", "binary_accuracy"]),
    (3, "sigmoid", "binary_crossentropy", (X[:, :3] > 0).astype(np.float32), ["binary_accuracy"]),
    (1, None, {"name": "binary_crossentropy", "from_logits": True}, BINARY,
     [{"name": "binary_accuracy", "threshold": 0.0}]),
    (3, None, {"name": "sparse_categorical_crossentropy", "from_logits": True}, LABELS, ["accuracy"]),
    (1, None, "mse", X[:, 0] - X[:, 1], ["mae"]),
    (1, "sigmoid", "mse", BINARY, ["accuracy"]),
    (2, "tanh", "huber", np.tanh(X[:, :2]), ["mse"]),
])
def test_sound_setups_train_without_a_warning(device, no_setup_warnings, units, activation, loss, y, metrics):
    model = _model(device, pn.Dense(units, activation), loss=loss, metrics=metrics)
    model.fit(device.asarray(X), device.asarray(y), epochs=1, verbose=0, validation_split=0.25)


def test_normalized_mnist_like_images_do_not_warn(no_setup_warnings):
    model = _model("cpu", pn.Dense(3, "softmax"), loss="sparse_categorical_crossentropy")
    model.fit(PIXELS.astype(np.float32) / 255, LABELS, verbose=0)


def test_loading_a_saved_model_does_not_repeat_its_setup_warnings(tmp_path, no_setup_warnings):
    with pytest.warns(SetupWarning):
        model = _model("cpu", pn.Dense(3, "softmax"), loss="mse")
    model.build(6).save(tmp_path / "m.safetensors")
    loaded = pn.load(tmp_path / "m.safetensors")
    assert loaded.loss.name == "mse"

