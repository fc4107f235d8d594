"""Batch streaming: memory maps, sliceables and generators train like in-memory arrays; block shuffle; stream errors."""

import numpy as np
import pytest

import portanet as pn
from portanet import to_numpy
from portanet.data import Batches, StreamError, batches
from portanet.testing import assert_close

N, BATCH, STEPS = 100, 16, 7  # the last batch of an epoch has 4 rows
X = np.random.default_rng(2).standard_normal((N, 4)).astype("float32")
Y = np.arange(N) % 3


class Sliceable:
    """An h5py/zarr-like dataset: shape, dtype, len and contiguous slicing only; records what was read."""

    def __init__(self, data):
        self.data, self.shape, self.dtype, self.reads = data, data.shape, data.dtype, []

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"only contiguous slices, got {key!r}")
        self.reads.append((key.start, key.stop))
        return self.data[key].copy()


def _model(device="cpu"):
    model = pn.Model([pn.Dense(5, "relu"), pn.Dense(3, "softmax")], device=device, seed=0)
    return model.compile("sparse_categorical_crossentropy", "adam", ["accuracy"])


def _weights(model):
    return {k: to_numpy(v).copy() for k, v in model.parameters().items()}


def _batches_forever(x=X, y=Y):
    while True:
        for i in range(0, N, BATCH):
            yield x[i:i + BATCH], y[i:i + BATCH]


@pytest.fixture
def in_memory_weights(device):
    model = _model(device)
    model.fit(X, Y, epochs=2, batch_size=BATCH, shuffle=False, verbose=0)
    return model.parameters()


def _assert_same_weights(model, reference, device):
    for name, value in model.parameters().items():
        assert_close(value, reference[name], device=device, rtol=1e-6, atol=1e-7, err_msg=name)


def test_training_from_a_memory_map_matches_in_memory(device, in_memory_weights, tmp_path):
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "y.npy", Y)
    x_map, y_map = np.load(tmp_path / "x.npy", mmap_mode="r"), np.load(tmp_path / "y.npy", mmap_mode="r")
    model = _model(device)
    model.fit(x_map, y_map, epochs=2, batch_size=BATCH, shuffle=False, verbose=0)
    _assert_same_weights(model, in_memory_weights, device)


def test_training_from_a_generator_matches_in_memory(device, in_memory_weights):
    model = _model(device)
    model.fit(_batches_forever(), epochs=2, steps_per_epoch=STEPS, verbose=0)
    _assert_same_weights(model, in_memory_weights, device)


def test_training_from_a_sliceable_matches_in_memory(device, in_memory_weights):
    x, y = Sliceable(X), Sliceable(Y)
    model = _model(device)
    model.fit(x, y, epochs=2, batch_size=BATCH, shuffle=False, verbose=0)
    _assert_same_weights(model, in_memory_weights, device)
    assert all(stop - start <= N for start, stop in x.reads)


def test_training_from_an_h5py_dataset_matches_in_memory(device, in_memory_weights, tmp_path):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "data.h5", "w") as f:
        f["x"], f["y"] = X, Y
    with h5py.File(tmp_path / "data.h5", "r") as f:
        model = _model(device)
        model.fit(f["x"], f["y"], epochs=2, batch_size=BATCH, shuffle=False, verbose=0)
        model.fit(f["x"], f["y"], epochs=1, batch_size=BATCH, shuffle=True, verbose=0)  # block shuffle: slices only
    reference = _model(device)
    reference.fit(X, Y, epochs=2, batch_size=BATCH, shuffle=False, verbose=0)
    reference.fit(Sliceable(X), Sliceable(Y), epochs=1, batch_size=BATCH, shuffle=True, verbose=0)
    _assert_same_weights(model, reference.parameters(), device)


def test_a_reiterable_with_a_length_restarts_each_epoch(device, in_memory_weights):
    class Loader:
        def __len__(self):
            return STEPS

        def __iter__(self):
            return ((X[i:i + BATCH], Y[i:i + BATCH]) for i in range(0, N, BATCH))

    model = _model(device)
    model.fit(Loader(), epochs=2, verbose=0)
    _assert_same_weights(model, in_memory_weights, device)


def test_batches_already_on_the_device_can_be_passed_to_fit(device, in_memory_weights):
    stream = Batches(X, Y, batch_size=BATCH, device=device, y_dtype="int")
    model = _model(device)
    model.fit(stream, epochs=2, verbose=0)
    _assert_same_weights(model, in_memory_weights, device)


def test_evaluate_and_predict_take_streams_and_sliceables_like_arrays(device):
    model = _model(device).build(4)
    expected = model.evaluate(X, Y)
    assert model.evaluate(_batches_forever(), steps=STEPS) == pytest.approx(expected, rel=1e-6)
    assert model.evaluate(Sliceable(X), Sliceable(Y), batch_size=BATCH) == pytest.approx(expected, rel=1e-6)
    assert_close(model.predict(Sliceable(X), batch_size=BATCH), model.predict(X), device=device)


def test_sample_weights_can_come_with_each_batch(device):
    weights = np.linspace(0.5, 1.5, N).astype("float32")
    reference = _model(device)
    reference.fit(X, Y, sample_weight=weights, epochs=1, batch_size=BATCH, shuffle=False, verbose=0)
    model = _model(device)
    stream = ((X[i:i + BATCH], Y[i:i + BATCH], weights[i:i + BATCH]) for i in range(0, N, BATCH))
    model.fit(stream, steps_per_epoch=STEPS, verbose=0)
    _assert_same_weights(model, reference.parameters(), device)


def test_a_generator_is_consumed_across_epochs():
    taken = []

    def numbered():
        for i in range(3 * STEPS):
            taken.append(i)
            start = (i % STEPS) * BATCH
            yield X[start:start + BATCH], Y[start:start + BATCH]

    _model().fit(numbered(), epochs=3, steps_per_epoch=STEPS, verbose=0)
    assert taken == list(range(3 * STEPS))


# -- shuffling -------------------------------------------------------------------------------------


def _order(x, **kwargs):
    """Row order of one pass, read back from the first column (row indices)."""
    return np.concatenate([to_numpy(xb)[:, 0] for xb, _ in batches(x, batch_size=BATCH, **kwargs)]).astype(int)


ROWS = np.repeat(np.arange(N, dtype="float64")[:, None], 2, axis=1)


def test_in_memory_shuffle_is_a_full_permutation_fixed_by_the_seed():
    order = _order(ROWS, shuffle=True, seed=5)
    assert sorted(order) == list(range(N)) and list(order) != list(range(N))
    np.testing.assert_array_equal(order, _order(ROWS, shuffle=True, seed=5))
    assert list(order) != list(_order(ROWS, shuffle=True, seed=6))


def test_disk_backed_data_is_block_shuffled_with_contiguous_reads():
    source = Sliceable(ROWS)
    order = list(Batches(source, batch_size=BATCH, shuffle=True, rng=3, block_size=32)._slices())
    rows = np.concatenate([to_numpy(x)[:, 0] for x, _, _ in order]).astype(int)
    assert sorted(rows) == list(range(N)) and list(rows) != list(range(N))
    assert sorted(source.reads) == [(0, 32), (32, 64), (64, 96), (96, 100)]  # each block read once, in one slice
    assert source.reads != sorted(source.reads)  # blocks come in shuffled order
    for x, _, _ in order:  # a batch comes from one block
        assert len({int(r) // 32 for r in to_numpy(x)[:, 0]}) == 1


def test_block_shuffle_is_deterministic_for_a_seed(tmp_path):
    np.save(tmp_path / "rows.npy", ROWS)
    rows = np.load(tmp_path / "rows.npy", mmap_mode="r")
    first = _order(rows, shuffle=True, seed=11)
    np.testing.assert_array_equal(first, _order(rows, shuffle=True, seed=11))
    np.testing.assert_array_equal(first, _order(Sliceable(ROWS), shuffle=True, seed=11))
    assert list(first) != list(_order(rows, shuffle=True, seed=12))


def test_cpu_batches_are_views_of_the_source_where_possible(tmp_path):
    x = np.ascontiguousarray(X)
    np.save(tmp_path / "x.npy", x)
    x_map = np.load(tmp_path / "x.npy", mmap_mode="r")
    for source in (x, x_map):
        for xb, _ in batches(source, batch_size=BATCH):
            assert type(xb) is np.ndarray and np.shares_memory(xb, source)


def test_cuda_prefetch_gives_the_same_batches_as_plain_uploads(device):
    if device.backend != "cupy":
        pytest.skip("prefetch through pinned buffers exists only on CUDA (CuPy)")
    rows = np.arange(N * 3, dtype="float64").reshape(N, 3)
    prefetched = list(Batches(rows, Y, batch_size=BATCH, device=device, prefetch=True))
    plain = list(Batches(rows, Y, batch_size=BATCH, device=device, prefetch=False))
    assert len(prefetched) == len(plain) == STEPS  # every batch kept: none was overwritten by a later one
    for (xa, ya, _), (xb, yb, _) in zip(prefetched, plain):
        assert_close(xa, xb, device=device, rtol=0, atol=0)
        assert_close(ya, yb, device=device, rtol=0, atol=0)


# -- errors: named argument, expected and got; the model is left as it was ----------------------------------


@pytest.fixture
def trained(device):
    model = _model(device)
    model.fit(X, Y, epochs=1, batch_size=BATCH, verbose=0)
    return model


def _state(model):
    slots = {k: to_numpy(v).copy() for k, v in model.optimizer.state.items()}
    return _weights(model), slots, model.optimizer.iterations


def _assert_unchanged(model, state):
    weights, slots, iterations = _state(model)
    assert iterations == state[2]
    for name in state[0]:
        np.testing.assert_array_equal(weights[name], state[0][name], err_msg=name)
    for name in state[1]:
        np.testing.assert_array_equal(slots[name], state[1][name], err_msg=name)


def _stream_with(bad, at=3):
    """Good batches with ``bad`` in position ``at``."""
    good = _batches_forever()
    for i in range(STEPS):
        item = next(good)
        yield bad if i == at else item


MID_STREAM = [
    ("not a tuple", X[:8], r"batch 3 of x: expected an \(x, y\) or \(x, y, sample_weight\) tuple, got a ndarray"),
    ("a 1-tuple", (X[:8],), r"batch 3 of x: expected .* tuple, got a tuple of length 1"),
    ("other width", (X[:8, :3], Y[:8]), r"batch 3 of x: x has 3 features but batch 0 had 4"),
    ("lengths differ", (X[:8], Y[:5]), r"batch 3 of x: y has 5 rows but x has 8"),
    ("one-hot y", (X[:8], np.eye(3)[Y[:8]]),
     r"batch 3 of x: y has shape \(8, 3\) but batch 0 had y of shape \(samples\)"),
    ("text", (np.full((8, 4), "a"), Y[:8]), r"batch 3 of x: x must hold numbers"),
    ("label out of range", (X[:8], Y[:8] + 3), r"batch 3 of y: y labels must be in \[0, 3\)"),
]


@pytest.mark.parametrize("what,bad,message", MID_STREAM, ids=[c[0] for c in MID_STREAM])
def test_a_bad_batch_mid_epoch_raises_and_restores_the_model(trained, what, bad, message):
    state = _state(trained)
    with pytest.raises(StreamError, match=message):
        trained.fit(_stream_with(bad), steps_per_epoch=STEPS, verbose=0)
    _assert_unchanged(trained, state)


def test_a_bad_first_batch_is_rejected_before_anything_changes():
    model = _model()
    with pytest.raises(ValueError, match=r"batch 0 of x: expected an \(x, y\)"):
        model.fit(iter([X]), steps_per_epoch=1, verbose=0)
    with pytest.raises(ValueError, match=r"y labels must be in \[0, 3\)"):
        model.fit(iter([(X, Y + 1)]), steps_per_epoch=1, verbose=0)
    assert not model.built


def test_a_generator_that_ends_early_names_the_steps_and_restores_the_model(trained):
    state = _state(trained)
    short = ((X[i:i + BATCH], Y[i:i + BATCH]) for i in range(0, 80, BATCH))  # 5 batches
    with pytest.raises(StreamError, match=r"x ended after 5 batches of this epoch, but steps_per_epoch=7 were"):
        trained.fit(short, steps_per_epoch=STEPS, verbose=0)
    _assert_unchanged(trained, state)
    one_epoch = ((X[i:i + BATCH], Y[i:i + BATCH]) for i in range(0, N, BATCH))
    with pytest.raises(StreamError, match=r"x ended after 0 batches .* steps_per_epoch \* epochs batches"):
        trained.fit(one_epoch, steps_per_epoch=STEPS, epochs=2, verbose=0)
    _assert_unchanged(trained, state)


def test_a_sliceable_with_bad_labels_deep_inside_restores_the_model(trained):
    state = _state(trained)
    x, labels = np.tile(X, (12, 1)), np.tile(Y, 12)  # beyond the 1024 rows checked up front
    labels[1150] = 7
    with pytest.raises(StreamError, match=r"batch 11 of y: y labels must be in \[0, 3\), got values in \[0, 7\]"):
        trained.fit(Sliceable(x), Sliceable(labels), batch_size=100, shuffle=False, verbose=0)
    _assert_unchanged(trained, state)


@pytest.mark.parametrize("call,error,message", [
    (lambda m: m.fit(_batches_forever(), verbose=0), ValueError,
     r"steps_per_epoch is required when x is an iterable without a length \(generator\), got None"),
    (lambda m: m.fit(_batches_forever(), Y, steps_per_epoch=2, verbose=0), ValueError,
     r"y must be None when x is an iterable of \(x, y\[, sample_weight\]\) batches, got ndarray"),
    (lambda m: m.fit(X, Y, steps_per_epoch=3, verbose=0), ValueError,
     r"steps_per_epoch is for iterables of batches; .* got steps_per_epoch=3"),
    (lambda m: m.fit(_batches_forever(), steps_per_epoch=0, verbose=0), ValueError,
     r"steps_per_epoch must be a positive integer, got 0"),
    (lambda m: m.fit(iter([]), steps_per_epoch=1, verbose=0), ValueError, r"x \(list_iterator\) yielded no batches"),
    (lambda m: m.fit(X, verbose=0), TypeError, r"y must be an array of targets, got None"),
    (lambda m: m.predict(_batches_forever()), TypeError, r"x must be an array here, got an iterable of batches"),
], ids=["no steps", "y with a stream", "steps with arrays", "zero steps", "empty stream", "no y", "predict stream"])
def test_stream_arguments_are_checked_before_anything_changes(trained, call, error, message):
    state = _state(trained)
    with pytest.raises(error, match=message):
        call(trained)
    _assert_unchanged(trained, state)


@pytest.mark.parametrize("arg,value,message", [
    ("batch_size", 0, "batch_size must be a positive integer, got 0"),
    ("batch_size", -3, "batch_size must be a positive integer, got -3"),
    ("block_size", 0, "block_size must be a positive integer, got 0"),
])
def test_batches_arguments_are_validated(arg, value, message):
    with pytest.raises(ValueError, match=message):
        Batches(Sliceable(X), **{arg: value})
