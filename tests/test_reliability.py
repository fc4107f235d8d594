"""The reliability contracts (README, "Reliability"), each tested by the attack that broke it:

- Ctrl-C: SIGINT at random times during fit and during a train_step loop leaves a model equal to a replay of the
  steps it counts (weights and optimizer slots, bit for bit), one Ctrl-C or two; held exactly inside updates;
- killed writers: temporaries of a SIGKILLed save are removed by the next save of that file;
- data failures: any failure of any source (x, y, sample_weight, validation) raises StreamError naming it, and the
  model is as it was before the call;
- non-finite state: fit never returns, checkpoints or restores non-finite weights or optimizer state (random
  numeric stress included);
- threads: predict and evaluate in one thread never change a fit running in another; a second fit, train_step and
  loss_and_grads are refused.

The attacks that need many trials take their count from ``PORTANET_ATTACK_TRIALS`` (a long run by hand:
``PORTANET_ATTACK_TRIALS=300 python -m pytest -q tests/test_reliability.py``).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest

import portanet as pn
from portanet import _interrupts, to_numpy
from portanet.data import StreamError
from portanet.testing import assert_close

TRIALS = int(os.environ.get("PORTANET_ATTACK_TRIALS", "0"))
RNG = np.random.default_rng(0)
X = RNG.standard_normal((64, 5)).astype(np.float32)
Y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
W = RNG.uniform(0.5, 1.5, 64).astype(np.float32)
posix = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
# Bad values met on a device are only counted there, read with the running loss: the arithmetic in between warns
numeric_warnings = pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")


def _torch_or_skip():
    try:
        import torch  # noqa: F401
    except ImportError:
        pytest.skip("torch is not installed")


# -- Ctrl-C -------------------------------------------------------------------------------------------------------
INTERRUPTS = textwrap.dedent('''
    """SIGINT at random times (once, or twice 0-3 ms apart) while training; then replay the step count."""
    import json, os, signal, sys, threading, time
    import numpy as np
    import portanet as pn

    backend, trials, seed, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    backend = None if backend == "numpy" else backend
    if backend == "torch":
        import torch
        torch.set_num_threads(1)  # spinning OpenMP threads make small matmuls erratic on a busy machine
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((256, 20)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    B, STEPS, EPOCHS = 32, 8, 12

    def make():
        layers = [pn.Dense(64, "relu"), pn.Dense(64, "tanh"), pn.Dense(2, "softmax")]
        model = pn.Model(layers, seed=1, backend=backend)
        return model.compile("sparse_categorical_crossentropy", pn.Adam(lr=1e-3, clipnorm=1.0))

    def batch(k):
        i = k % STEPS
        return x[i * B:(i + 1) * B], y[i * B:(i + 1) * B]

    def run(model, returned):
        if mode == "fit":
            model.fit(x, y, epochs=EPOCHS, batch_size=B, shuffle=False, verbose=0)
        else:
            for k in range(EPOCHS * STEPS):
                model.train_step(*batch(k))
                returned[0] += 1

    def host(a):
        return pn.to_numpy(a).copy()

    times = []
    for _ in range(3):
        start = time.perf_counter()
        run(make(), [0])
        times.append(time.perf_counter() - start)
    T = sorted(times)[1]
    pid = os.getpid()
    out = {"seconds_per_run": T, "before": 0, "mid": 0, "completed": 0, "bad": []}
    for trial in range(trials):
        model, returned = make(), [0]
        delays = [rng.uniform(0, 1.1 * T)]
        if trial % 2:
            delays.append(delays[0] + rng.uniform(0, 0.003))

        def fire(delays=delays):
            start = time.perf_counter()
            for d in delays:
                time.sleep(max(0.0, d - (time.perf_counter() - start)))
                os.kill(pid, signal.SIGINT)

        sender = threading.Thread(target=fire)
        interrupted = False
        try:
            try:
                sender.start()
                run(model, returned)
            finally:
                while sender.is_alive():
                    try:
                        sender.join()
                    except KeyboardInterrupt:
                        pass
        except KeyboardInterrupt:
            interrupted = True
        for _ in range(3):  # a signal still in flight lands here
            try:
                time.sleep(0.005)
                break
            except KeyboardInterrupt:
                pass
        it = model.optimizer.iterations
        if not model.built:
            out["before"] += 1
            continue
        replay = make().build(x.shape[1])
        for k in range(it):
            replay.train_step(*batch(k))
        problems = []
        if not np.array_equal(host(model.parameter_buffer.values), host(replay.parameter_buffer.values)):
            problems.append("weights differ from a replay of the step count")
        for name in model.optimizer.slots:
            a, b = model.optimizer.state.get(name), replay.optimizer.state.get(name)
            if (a is None) != (b is None) or (a is not None and not np.array_equal(host(a), host(b))):
                problems.append(f"optimizer slot {name} differs from the replay")
        if mode == "train_step" and it not in (returned[0], returned[0] + 1):
            problems.append(f"{it} steps applied but {returned[0]} train_step calls returned")
        if problems:
            out["bad"].append({"trial": trial, "iterations": it, "problems": problems})
        out["completed" if not interrupted else "before" if it == 0 else "mid"] += 1
    print(json.dumps(out))
''')


@posix
@pytest.mark.parametrize("mode", ["fit", "train_step"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_ctrl_c_at_random_times_leaves_the_model_a_replay_of_its_step_count(tmp_path, backend, mode):
    if backend == "torch":
        _torch_or_skip()
    trials = TRIALS or 16
    script = tmp_path / "interrupts.py"
    script.write_text(INTERRUPTS)
    done = subprocess.run([sys.executable, str(script), backend, str(trials), "0", mode], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["bad"] == [], report
    assert report["mid"] >= trials // 4, report  # the attack did hit training, not only its edges


@pytest.fixture
def sigint_handler():
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("the test runner installed its own SIGINT handler")
    yield
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_inside_an_update_is_raised_once_the_update_is_whole(sigint_handler):
    done = []
    with pytest.raises(KeyboardInterrupt):
        with _interrupts.update():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)  # even a second one waits
            done.append("update")
    assert done == ["update"]


def test_a_training_loop_polls_a_first_ctrl_c_and_a_second_interrupts_at_once(sigint_handler):
    seen = []
    with pytest.raises(KeyboardInterrupt):
        with _interrupts.deferred() as pending:
            signal.raise_signal(signal.SIGINT)
            seen.append(pending())
            with _interrupts.update():
                signal.raise_signal(signal.SIGINT)  # a second Ctrl-C during an update: raised when it is whole
                seen.append("update done")
            seen.append("not reached")
    assert seen == [True, "update done"]
    with pytest.raises(KeyboardInterrupt):
        with _interrupts.deferred():
            signal.raise_signal(signal.SIGINT)
            seen.append("loop went on")
    assert seen[-1] == "loop went on"  # held, then raised when the loop ended


def test_regions_do_nothing_outside_the_main_thread(sigint_handler):
    results = []

    def work():
        with _interrupts.deferred() as pending:
            with _interrupts.update():
                results.append(pending())

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert results == [False]


@posix
def test_temporaries_of_killed_writers_are_removed_by_the_next_save(tmp_path):
    path = tmp_path / "m.safetensors"
    child = textwrap.dedent(f"""
        import os, stat, time
        import portanet as pn
        real = os.fsync
        def fsync(fd):  # the temporary is written in full, not yet renamed: the worst moment to die
            if stat.S_ISREG(os.fstat(fd).st_mode):
                print("writing", flush=True)
                time.sleep(600)
            real(fd)
        os.fsync = fsync
        pn.Model([pn.Dense(256)], seed=0).build(256).save({str(path)!r})
    """)
    left = []
    for _ in range(3):  # each writer removes the temporary its killed predecessor left, then leaves its own
        process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "writing"
        process.kill()
        process.wait()
        left.append(sorted(p for p in os.listdir(tmp_path) if p.endswith(".part")))
    assert [len(names) for names in left] == [1, 1, 1] and len({names[0] for names in left}) == 3
    assert not path.exists()
    live = tmp_path / f".m.safetensors.{os.getppid()}.0000.part"  # a writer that is still alive: left alone
    live.write_bytes(b"partial")
    pn.Model([pn.Dense(2)], seed=0).build(3).save(path)
    assert sorted(os.listdir(tmp_path)) == sorted(["m.safetensors", live.name])
    pn.load(path)


# -- data failures ------------------------------------------------------------------------------------------------
class Sliceable:
    """An h5py-like array on disk: ``shape``, ``dtype``, ``len`` and slicing; reads fail after ``fail_after``."""

    def __init__(self, a, fail_after=None, error=OSError):
        self.a, self.fail_after, self.error, self.reads = a, fail_after, error, 0
        self.shape, self.dtype = a.shape, a.dtype

    def __len__(self):
        return len(self.a)

    def __getitem__(self, index):
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            raise self.error("HDF5 read failed (errno 5)")
        return self.a[index]


class Reopening:
    """A re-iterable with a length (a Dataset-like class) whose second pass cannot open its file."""

    def __init__(self, x, y):
        self.x, self.y, self.passes = x, y, 0

    def __len__(self):
        return len(self.x) // 8

    def __iter__(self):
        self.passes += 1
        if self.passes > 1:
            raise OSError("cannot reopen shard-0003")
        return ((self.x[i:i + 8], self.y[i:i + 8]) for i in range(0, len(self.x), 8))


class Unreadable:
    """Looks like an array (shape, no dtype) but reading it fails: a lazy handle whose file went away."""

    shape = (8, 5)

    def __array__(self, dtype=None, copy=None):
        raise OSError("stale NFS file handle")


def _stream(fail_at, make):
    def batches():
        for i in range(10**6):
            rows = slice(i % 8 * 8, i % 8 * 8 + 8)
            xb, yb, wb = X[rows].copy(), Y[rows].copy(), W[rows].copy()
            if i == fail_at:
                xb, yb, wb = make(xb, yb, wb)
            yield xb, yb, wb
    return batches()


def _raise(error):
    def make(xb, yb, wb):
        raise error("the data loader crashed")
    return make


def _nan(field):
    def make(xb, yb, wb):
        if field == "x":
            xb[3, 1] = np.nan
        else:
            wb[2] = np.inf
        return xb, yb, wb
    return make


SOURCES = {  # name -> (fit arguments, what the StreamError must say)
    "generator raising RuntimeError": (lambda: dict(x=_stream(11, _raise(RuntimeError)), steps_per_epoch=8),
                                       r"reading batch 3 of x \(generator\) failed: RuntimeError"),
    "generator raising OSError": (lambda: dict(x=_stream(11, _raise(OSError)), steps_per_epoch=8),
                                  r"reading batch 3 of x \(generator\) failed: OSError"),
    "NaN in streamed x": (lambda: dict(x=_stream(11, _nan("x")), steps_per_epoch=8),
                          r"batch 3 of x \(generator\) in epoch 2 holds NaN or inf"),
    "inf in streamed sample_weight": (lambda: dict(x=_stream(11, _nan("w")), steps_per_epoch=8),
                                      r"batch 3 of sample_weight \(generator\) in epoch 2 holds NaN or inf"),
    "a lazy batch that cannot be read": (lambda: dict(x=((Unreadable(), Y[:8]) if i == 11 else (X[:8], Y[:8])
                                                         for i in range(100)), steps_per_epoch=8),
                                         r"batch 3 of x: reading it from generator failed: OSError: stale NFS"),
    "a re-iterable that cannot start its second pass": (lambda: dict(x=Reopening(X, Y)),
                                                        r"starting a pass over x \(Reopening\) failed: OSError"),
    "an h5py-like x failing": (lambda: dict(x=Sliceable(X, fail_after=1), y=Y),
                               r"reading rows 0:64 of x \(Sliceable\) failed: OSError"),
    "an h5py-like y failing": (lambda: dict(x=X, y=Sliceable(Y, fail_after=2)),
                               r"reading rows 0:64 of y \(Sliceable\) failed: OSError"),
    "an h5py-like sample_weight failing": (lambda: dict(x=X, y=Y, sample_weight=Sliceable(W, fail_after=1,
                                                                                          error=RuntimeError)),
                                           r"reading rows 0:64 of sample_weight \(Sliceable\) failed: RuntimeError"),
    "validation data failing": (lambda: dict(x=X, y=Y, validation_data=(Sliceable(X, fail_after=1), Y)),
                                r"reading rows 0:64 of validation x \(Sliceable\) failed: OSError"),
    "NaN in validation x read lazily": (lambda: dict(x=X, y=Y, validation_data=(
        Sliceable(np.where(np.arange(64)[:, None] == 40, np.nan, X).astype(np.float32)), Y)),
        r"batch 0 of validation x \(Sliceable\) holds NaN or inf"),
}


def _classifier(device):
    model = pn.Model([pn.Dense(6, "tanh"), pn.Dropout(0.2), pn.Dense(2, "softmax")], device=device, seed=0)
    return model.compile("sparse_categorical_crossentropy", pn.Adam(lr=0.01), metrics=["accuracy"])


def _everything(model):
    """Weights, state, optimizer step count and slots, host generator state."""
    return (to_numpy(model.parameter_buffer.values).copy(), to_numpy(model.parameter_buffer.state).copy(),
            model.optimizer.iterations, {k: to_numpy(v).copy() for k, v in model.optimizer.state.items()},
            json.dumps(model.random_state()))


def _assert_same(model, before):
    now = _everything(model)
    np.testing.assert_array_equal(now[0], before[0])
    np.testing.assert_array_equal(now[1], before[1])
    assert now[2] == before[2] and now[3].keys() == before[3].keys() and now[4] == before[4]
    for key in now[3]:
        np.testing.assert_array_equal(now[3][key], before[3][key])


@numeric_warnings
@pytest.mark.parametrize("trained", [False, True], ids=["fresh", "trained"])
@pytest.mark.parametrize("source", list(SOURCES))
def test_any_failure_of_any_data_source_raises_stream_error_and_puts_the_model_back(device, source, trained):
    model = _classifier(device).build(5)
    if trained:
        model.fit(X, Y, epochs=1, batch_size=8, verbose=0)
    before = _everything(model)
    arguments, message = SOURCES[source]
    with pytest.raises(StreamError, match=message):
        model.fit(epochs=3, batch_size=8, verbose=0, shuffle=False, **arguments())
    _assert_same(model, before)


def test_a_stream_failure_puts_the_model_back_even_with_early_stopping_restoring_its_best_weights():
    model = _classifier("cpu").build(5)
    before = _everything(model)
    with pytest.raises(StreamError, match=r"reading batch 4 of x \(generator\) failed: OSError"):
        model.fit(_stream(20, _raise(OSError)), steps_per_epoch=8, epochs=4, verbose=0,
                  callbacks=[pn.EarlyStopping(monitor="loss", patience=5, restore_best_weights=True)])
    _assert_same(model, before)


def test_nan_in_streamed_regression_targets_raises_stream_error_and_puts_the_model_back(device):
    model = pn.Model([pn.Dense(4, "tanh"), pn.Dense(1)], device=device, seed=0).compile("mse", "adam").build(5)
    before = _everything(model)
    y = X[:, :1].copy()
    y[45] = np.nan
    batches = [(X[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)]
    with pytest.raises(StreamError, match=r"batch 5 of y \(list_iterator\) in epoch 1 holds NaN or inf"):
        model.fit(iter(batches * 2), steps_per_epoch=8, epochs=2, verbose=0)
    _assert_same(model, before)


# -- non-finite weights and optimizer state -----------------------------------------------------------------------
@numeric_warnings
@pytest.mark.parametrize("values", [[1.0, -2.0], [np.nan], [0.0, np.inf], [-np.inf], [3e38, 3e38, -3e38], [],
                                    [-0.0], [1e-45, np.nan, 1.0]])
def test_the_devices_finiteness_check_agrees_with_numpy(device, values):
    """The guard's check (torch's is ``sum(x * 0) == 0``): a sum of finite values that overflows is still finite."""
    a = device.asarray(np.array(values, np.float32))
    result = device.all_finite(a)
    assert device.owns(result) and bool(result) == bool(np.isfinite(values).all())


@numeric_warnings
@pytest.mark.filterwarnings("ignore::portanet.checks.SetupWarning")  # the unscaled inputs are the point here
def test_an_optimizer_state_that_overflows_stops_training_and_restores_a_finite_one(device):
    x = (X * 1e20).astype(np.float32)  # finite inputs whose squared gradients overflow float32: Adam's v becomes inf
    model = pn.Model([pn.Dense(1)], device=device, seed=0).compile("mae", pn.Adam(lr=1e-3)).build(5)
    start = _everything(model)
    with pytest.raises(FloatingPointError, match=r"the weights or the optimizer state became NaN or inf during "
                                                 r"epoch 1 .*keeps the weights from the start of training"):
        model.fit(x, X[:, :1], epochs=2, batch_size=8, verbose=0)
    _assert_same(model, start)


@numeric_warnings
@pytest.mark.filterwarnings("ignore:.*training stopped and the model keeps:RuntimeWarning")  # TerminateOnNaN's
@pytest.mark.filterwarnings("ignore::portanet.checks.SetupWarning")  # stress inputs are unscaled on purpose
def test_numeric_stress_never_leaves_or_saves_non_finite_state(device, tmp_path):
    """Random optimizers, learning rates up to 1e9, activations, losses and input scales up to the dtype's limit:
    whatever fit does (returns, raises FloatingPointError, stops quietly), the weights and optimizer state it leaves
    are finite and every checkpoint it wrote loads (before the fix, 14 of 150 such runs raised a ValueError from
    restoring an optimizer that had not stepped yet, and overflowing Adam states were saved)."""
    rng = np.random.default_rng(7)
    outcomes = {"returned": 0, "raised": 0, "stopped": 0}
    for i in range(TRIALS or 12):
        dtype = str(rng.choice(["float32", "float64"]))
        loss = str(rng.choice(["mse", "mae", "huber", "sparse_categorical_crossentropy", "binary_crossentropy"]))
        scale = float(10 ** rng.uniform(0, 38 if dtype == "float32" else 300))
        x = np.clip(RNG.standard_normal((48, 5)) * scale, -np.finfo(dtype).max / 2, np.finfo(dtype).max / 2)
        units, out = {"sparse_categorical_crossentropy": (3, "softmax"), "binary_crossentropy": (1, "sigmoid")}.get(
            loss, (2, None))
        y = (Y[:48] if units == 3 else Y[:48, None].astype(dtype) if units == 1
             else np.clip(x[:, :2] * 2, -np.finfo(dtype).max / 2, np.finfo(dtype).max / 2))
        model = pn.Model([pn.Dense(8, str(rng.choice(["relu", "tanh", "elu", "softplus", "linear"]))),
                          pn.Dense(units, out)], device=device, dtype=dtype, seed=i)
        model.compile(loss, {"name": str(rng.choice(["sgd", "adam", "rmsprop", "adamw"])),
                             "learning_rate": float(10 ** rng.uniform(-3, 9))})
        stop = rng.random() < 0.3
        callbacks = [pn.ModelCheckpoint(tmp_path / f"c{i}-{{epoch}}.safetensors"),
                     pn.EarlyStopping(monitor="loss", patience=2, restore_best_weights=True)]
        try:
            model.fit(x.astype(dtype), y, epochs=3, batch_size=16, verbose=0, log_every=int(rng.choice([1, 100])),
                      callbacks=callbacks + ([pn.TerminateOnNaN()] if stop else []))
            outcomes["stopped" if stop and len(model.history.epoch) < 3 else "returned"] += 1
        except FloatingPointError:
            outcomes["raised"] += 1
        assert bool(model.parameter_buffer.all_finite())
        assert all(np.isfinite(to_numpy(slot)).all() for slot in model.optimizer.state.values())
        for path in tmp_path.glob(f"c{i}-*.safetensors"):
            pn.load(path)
    assert outcomes["returned"] and outcomes["raised"] + outcomes["stopped"], outcomes


def test_fit_refuses_to_start_from_non_finite_weights(device):
    model = _classifier(device).build(5)
    kernel = model.parameters()["dense_0.kernel"]
    kernel[...] = model.device.asarray(np.full((5, 6), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"weights hold NaN or inf before training"):
        model.fit(X, Y, epochs=1, verbose=0)
    assert model.optimizer.iterations == 0


class _PoisonThenInterrupt(pn.Callback):
    """At step 5 of epoch 2, as an overflowing update would, turn a weight into inf; then Ctrl-C."""

    def on_batch_end(self, step, loss=None):
        if self.model.optimizer.iterations == 8 + 5:
            values = self.model.parameter_buffer.values
            values[0:1] = self.model.device.asarray(np.array([np.inf], np.float32))
            raise KeyboardInterrupt


def test_an_interrupted_fit_never_leaves_non_finite_weights(device):
    model = _classifier(device).build(5)
    with pytest.warns(RuntimeWarning, match=r"the model keeps the weights from the end of epoch 1") as caught:
        with pytest.raises(KeyboardInterrupt):
            model.fit(X, Y, epochs=3, batch_size=8, verbose=0, callbacks=[_PoisonThenInterrupt()])
    assert [w.filename for w in caught if "keeps the weights" in str(w.message)] == [__file__]  # the caller's line
    assert bool(model.parameter_buffer.all_finite())
    assert model.optimizer.iterations == 8  # the end of epoch 1, with its optimizer state


def test_saving_refuses_non_finite_weights_and_models_beyond_the_limits(tmp_path, monkeypatch):
    model = _classifier("cpu").build(5)
    model.parameters()["dense_1.bias"][0] = np.nan
    with pytest.raises(ValueError, match=r"cannot save dense_1.bias: it holds NaN or inf"):
        model.save(tmp_path / "m.safetensors")
    monkeypatch.setattr(pn.io, "MAX_LAYERS", 2)
    with pytest.raises(ValueError, match=r"cannot save a model of 3 layers: portanet files hold at most 2"):
        _classifier("cpu").build(5).save(tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == []


# -- threads ------------------------------------------------------------------------------------------------------
class _Watch(pn.Callback):
    def __init__(self):
        self.started, self.final = threading.Event(), None

    def on_train_begin(self, logs=None):
        self.started.set()

    def on_train_end(self, logs=None):  # still inside fit: nothing else can have changed the model since
        self.final = to_numpy(self.model.parameter_buffer.values).copy()


def _fit_for_threads(model, watch):
    model.fit(X, Y, epochs=4, batch_size=8, verbose=0, validation_split=0.25, callbacks=[watch])


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_predict_and_evaluate_in_one_thread_never_change_a_fit_in_another(backend):
    if backend == "torch":
        _torch_or_skip()
    device = pn.resolve_device("cpu", None if backend == "numpy" else backend)
    alone = _classifier(device).build(5)
    watch = _Watch()
    _fit_for_threads(alone, watch)
    expected = watch.final
    refused, calls = {"fit": 0, "train_step": 0, "loss_and_grads": 0}, 0
    for trial in range(TRIALS or 60):
        model, watch, errors = _classifier(device).build(5), _Watch(), []

        def train():
            try:
                _fit_for_threads(model, watch)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                watch.started.set()

        thread = threading.Thread(target=train)
        thread.start()
        watch.started.wait()
        while thread.is_alive():
            model.predict(X[:16])
            model.evaluate(X[:16], Y[:16])
            calls += 2
            if trial % 4 == 0:
                for name, call in (("fit", lambda: model.fit(X, Y, verbose=0)),
                                   ("train_step", lambda: model.train_step(X[:8], Y[:8])),
                                   ("loss_and_grads", lambda: model.loss_and_grads(X[:8], Y[:8]))):
                    try:
                        call()
                    except RuntimeError as exc:
                        assert "fit()" in str(exc) and "another thread" in str(exc)
                        refused[name] += 1
        thread.join()
        assert errors == []
        np.testing.assert_array_equal(watch.final, expected, err_msg=f"trial {trial}")
    assert calls > 0 and all(count > 0 for count in refused.values()), refused


def test_evaluate_and_predict_give_the_same_results_as_in_one_thread():
    model = _classifier("cpu").build(5)
    model.fit(X, Y, epochs=2, verbose=0)
    expected = model.predict(X), model.evaluate(X, Y)
    results = []

    def work():
        for _ in range(20):
            results.append((model.predict(X), model.evaluate(X, Y)))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for out, logs in results:
        assert_close(out, expected[0], device=model.device, rtol=0, atol=0)
        assert logs == expected[1]
