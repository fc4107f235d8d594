"""Checkpoint and resume: what a checkpoint holds, exact continuation (also in a new process, also after SIGKILL
in the middle of a checkpoint write), and checks that a checkpoint fits the model."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from safetensors import safe_open

import portanet as pn
from portanet import ModelFileError, to_numpy
from portanet.testing import assert_close

RNG = np.random.default_rng(0)
X = RNG.standard_normal((64, 5)).astype(np.float32)
Y = (X[:, 0] + X[:, 1] * X[:, 2] > 0).astype(np.int64)


def _model(device="cpu", dropout=0.0):
    layers = [pn.Dense(8, "tanh")] + ([pn.Dropout(dropout)] if dropout else []) + [pn.Dense(2, "softmax")]
    model = pn.Model(layers, device=device, seed=3)
    return model.compile("sparse_categorical_crossentropy", pn.Adam(lr=0.02), metrics=["accuracy"])


def _fit(model, epochs, **kwargs):
    return model.fit(X, Y, epochs=epochs, batch_size=8, validation_split=0.25, verbose=0, **kwargs)


def _host(model):
    return to_numpy(model.parameter_buffer.values).copy()


# -- in one process, on every backend -----------------------------------------------------------------------------
def test_resuming_from_a_checkpoint_continues_exactly(device, tmp_path):
    path = tmp_path / "ckpt.safetensors"
    straight = _model(device)
    expected = _fit(straight, 4, callbacks=[pn.ReduceLROnPlateau(monitor="val_loss", patience=0, factor=0.5)])
    _fit(_model(device), 2, callbacks=[pn.ModelCheckpoint(path), pn.ReduceLROnPlateau(monitor="val_loss", patience=0,
                                                                                       factor=0.5)])
    resumed = _model(device)
    history = _fit(resumed, 4, resume_from=path, callbacks=[pn.ReduceLROnPlateau(monitor="val_loss", patience=0,
                                                                                  factor=0.5)])
    assert_close(resumed.parameter_buffer.values, _host(straight), device=device, rtol=0, atol=0)
    assert history.epoch == [0, 1, 2, 3] and history.history == expected.history
    assert resumed.optimizer.iterations == straight.optimizer.iterations == 4 * 6
    assert resumed.optimizer.lr == straight.optimizer.lr


def test_dropout_masks_continue_exactly_where_the_generator_lives_on_the_host(device, tmp_path):
    path = tmp_path / "ckpt.safetensors"
    straight = _model(device, dropout=0.3)
    _fit(straight, 3)
    if straight.random_state()["dropout"] is None:
        pytest.skip(f"the dropout generator of {device.backend} lives on the device and restarts from its seed")
    _fit(_model(device, dropout=0.3), 1, callbacks=[pn.ModelCheckpoint(path)])
    resumed = _model(device, dropout=0.3)
    _fit(resumed, 3, resume_from=path)
    assert_close(resumed.parameter_buffer.values, _host(straight), device=device, rtol=0, atol=0)


def test_a_checkpoint_holds_weights_optimizer_counters_rng_history_and_training_config(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    model = _model(dropout=0.1)
    stop = pn.EarlyStopping(monitor="val_loss", patience=5, restore_best_weights=True)
    _fit(model, 2, callbacks=[pn.ModelCheckpoint(path), stop])
    with safe_open(str(path), framework="numpy") as f:
        names, meta = set(f.keys()), f.metadata()
    state = json.loads(meta["checkpoint"])
    assert names == set(model.parameters()) | {"optimizer.m", "optimizer.v", "callback.EarlyStopping.0.best_weights.values",
                                                        "callback.EarlyStopping.0.best_weights.state"}
    assert state["epoch"] == 2 and state["step"] == model.optimizer.iterations == 12
    assert state["rng"] == model.random_state()["rng"] and state["random"] == model.random_state()["dropout"]
    assert state["history"] == {"epoch": [0, 1], "history": model.history.history}
    assert state["fit"] == {"epochs": 2, "batch_size": 8, "shuffle": True, "validation_split": 0.25,
                            "split_seed": state["fit"]["split_seed"]}
    assert state["callbacks"]["EarlyStopping.0"]["wait"] == stop.wait
    assert pn.load(path).count_params() == model.count_params()  # a checkpoint is also a model file


def test_callback_state_is_resumed(tmp_path):
    path = tmp_path / "ckpt.safetensors"

    class Scores(pn.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["score"] = [1, 2, 3, 4, 5][epoch]

    _fit(_model(), 2, callbacks=[Scores(), pn.EarlyStopping(monitor="score", patience=2), pn.ModelCheckpoint(path)])
    stop = pn.EarlyStopping(monitor="score", patience=2)
    history = _fit(_model(), 5, resume_from=path, callbacks=[Scores(), stop])
    assert stop.stopped_epoch == 2 and history.epoch == [0, 1, 2]  # one more bad epoch, not two


def test_resuming_a_finished_run_trains_nothing(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    first = _model()
    _fit(first, 2, callbacks=[pn.ModelCheckpoint(path)])
    again = _model()
    with pytest.warns(UserWarning, match=r"has already trained 2 epochs and fit\(\) was asked for 2 in all") as caught:
        history = _fit(again, 2, resume_from=path)
    assert {w.filename for w in caught} == {__file__}  # the caller's line, not portanet's internals
    np.testing.assert_array_equal(_host(again), _host(first))
    assert history.epoch == [0, 1]


def test_resuming_with_another_batch_size_warns(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    _fit(_model(), 1, callbacks=[pn.ModelCheckpoint(path)])
    with pytest.warns(UserWarning, match=r"with batch_size=16, but it was trained with 8: training will not continue "
                                         r"exactly") as caught:
        _model().fit(X, Y, epochs=2, batch_size=16, validation_split=0.25, verbose=0, resume_from=path)
    assert {w.filename for w in caught} == {__file__}


# -- checkpoints that do not fit ----------------------------------------------------------------------------------
def test_resuming_a_different_model_raises_and_changes_nothing(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    _fit(_model(), 1, callbacks=[pn.ModelCheckpoint(path)])
    other = pn.Model([pn.Dense(9, "tanh"), pn.Dense(2, "softmax")], seed=0).compile("sparse_categorical_crossentropy")
    other.build(5)
    before = _host(other)
    with pytest.raises(ModelFileError, match=r"saved from a different model: layers is .*'units': 8.* in the "
                                             r"checkpoint but .*'units': 9"):
        _fit(other, 3, resume_from=path)
    np.testing.assert_array_equal(_host(other), before)
    assert other.optimizer.iterations == 0


def test_resuming_from_a_model_file_says_it_is_not_a_checkpoint(tmp_path):
    model = _model()
    _fit(model, 1)
    model.save(tmp_path / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"it is a model file, not a checkpoint"):
        _fit(model, 2, resume_from=tmp_path / "model.safetensors")


@pytest.mark.parametrize("field,value,message", [
    ("epoch", -1, r"checkpoint epoch must be a non-negative integer"),
    ("rng", {"bit_generator": "PCG64", "state": "evil"}, r"random generator state is invalid"),
    ("history", {"epoch": [0], "history": {"loss": ["x"]}}, r"history\['loss'\] must be a list of 1 numbers"),
    ("callbacks", {"EarlyStopping.0": {"best": "x", "wait": 0, "best_epoch": 0}},
     r"state of callback EarlyStopping.0 is invalid"),
])
def test_a_tampered_checkpoint_raises_model_file_error_before_anything_changes(tmp_path, field, value, message):
    import safetensors.numpy

    path = tmp_path / "ckpt.safetensors"
    _fit(_model(), 1, callbacks=[pn.ModelCheckpoint(path)])
    with safe_open(str(path), framework="numpy") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    state = json.loads(meta["checkpoint"])
    state[field] = value
    meta["checkpoint"] = json.dumps(state)
    meta["checksum"] = pn.io._digest(meta, tensors)  # a hostile file can carry a valid checksum
    path.write_bytes(safetensors.numpy.save(tensors, meta))
    model = _model().build(5)
    before = _host(model)
    with pytest.raises(ModelFileError, match=message):
        _fit(model, 2, resume_from=path, callbacks=[pn.EarlyStopping()])
    np.testing.assert_array_equal(_host(model), before)


# -- across processes ---------------------------------------------------------------------------------------------
SCRIPT = textwrap.dedent('''
    """Train; modes: run (fresh), resume (from the checkpoint), hang (hang inside the 3rd checkpoint write)."""
    import os, stat, sys, time
    import numpy as np
    import portanet as pn

    mode, folder, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    checkpoint = os.path.join(folder, "ckpt.safetensors")
    if mode == "hang":
        real_fsync, writes = os.fsync, []

        def fsync(fd):  # the file's data is written, not yet renamed into place: the worst moment to die
            if stat.S_ISREG(os.fstat(fd).st_mode):
                writes.append(fd)
                if len(writes) == 3:
                    open(os.path.join(folder, "writing"), "w").close()
                    time.sleep(600)
            real_fsync(fd)

        os.fsync = fsync
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).astype(np.int64)
    model = pn.Model([pn.Dense(16, "relu"), pn.Dropout(0.3), pn.Dense(2, "softmax")], seed=7)
    model.compile("sparse_categorical_crossentropy", pn.Adam(lr=0.01), metrics=["accuracy"])
    callbacks = [pn.ModelCheckpoint(checkpoint), pn.ReduceLROnPlateau(monitor="loss", patience=0, factor=0.5),
                 pn.EarlyStopping(monitor="val_loss", patience=10, restore_best_weights=True)]
    model.fit(x, y, epochs=epochs, batch_size=16, validation_split=0.25, callbacks=callbacks, verbose=0,
              resume_from=checkpoint if mode == "resume" else None)
    model.save(os.path.join(folder, "final.safetensors"))
''')


def _run(tmp_path, mode, epochs, wait=True):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    process = subprocess.Popen([sys.executable, str(script), mode, str(tmp_path), str(epochs)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = process.communicate(timeout=300)
        assert process.returncode == 0, out
    return process


def _final_weights(folder):
    with safe_open(str(folder / "final.safetensors"), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys() if not k.startswith("optimizer.")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight")
    _run(folder, "run", 4)
    return _final_weights(folder)


def _assert_same(weights, expected):
    assert list(weights) == list(expected)
    for name in expected:
        np.testing.assert_array_equal(weights[name], expected[name], err_msg=name)


def test_two_epochs_then_resuming_in_a_new_process_gives_bit_identical_weights(tmp_path, uninterrupted):
    _run(tmp_path, "run", 2)
    _run(tmp_path, "resume", 4)
    _assert_same(_final_weights(tmp_path), uninterrupted)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX-only")
def test_sigkill_in_the_middle_of_a_checkpoint_write_leaves_the_last_checkpoint_and_resume_works(tmp_path,
                                                                                                   uninterrupted):
    process = _run(tmp_path, "hang", 4, wait=False)
    deadline = time.monotonic() + 300
    while not (tmp_path / "writing").exists():
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "the training process never reached its third checkpoint write"
        time.sleep(0.05)
    temporary = [p for p in os.listdir(tmp_path) if p.startswith(".ckpt.safetensors.")]
    assert len(temporary) == 1  # the new checkpoint is written in full but not yet in place
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL

    model = pn.load(tmp_path / "ckpt.safetensors")  # the checkpoint of epoch 2 is intact
    with safe_open(str(tmp_path / "ckpt.safetensors"), framework="numpy") as f:
        assert json.loads(f.metadata()["checkpoint"])["epoch"] == 2
    assert model.optimizer.iterations == 2 * 5
    _run(tmp_path, "resume", 4)
    _assert_same(_final_weights(tmp_path), uninterrupted)


# -- normalization state, a schedule mid-warm-up and decay rules, across processes -----------------------------------
DEEP_SCRIPT = textwrap.dedent('''
    """Train a BatchNormalization network with a warm-up schedule; modes: run (fresh), resume (from the checkpoint)."""
    import os, sys
    import numpy as np
    import portanet as pn

    mode, folder, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    checkpoint = os.path.join(folder, "ckpt.safetensors")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((90, 6)) * 2 + 1
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 1).astype(np.int64)
    model = pn.Model([pn.Dense(12, use_bias=False), pn.BatchNormalization(momentum=0.8), pn.Activation("relu"),
                      pn.Dense(8), pn.LayerNormalization(), pn.Dropout(0.2), pn.Dense(2, "softmax")], seed=11)
    # 6 steps per epoch (batch 12 of 72 training rows): the warm-up lasts 15 steps, past the checkpoint of epoch 2
    schedule = pn.CosineDecay(0.001, decay_steps=15, warmup_target=0.05, warmup_steps=15)
    optimizer = pn.AdamW(schedule, weight_decay=0.05, global_clipnorm=1.0)
    optimizer.include_in_weight_decay(var_names=["^dense_1\\\\.bias$"])
    model.compile("sparse_categorical_crossentropy", optimizer, metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=12, validation_split=0.2, verbose=0,
              callbacks=[pn.ModelCheckpoint(checkpoint)], resume_from=checkpoint if mode == "resume" else None)
    model.save(os.path.join(folder, "final.safetensors"))
    print("history", model.history.history)
''')


def _run_deep(folder, mode, epochs):
    script = folder / "deep.py"
    script.write_text(DEEP_SCRIPT)
    result = subprocess.run([sys.executable, str(script), mode, str(folder), str(epochs)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_batch_norm_statistics_and_a_schedule_mid_warm_up_resume_bit_identically_in_a_new_process(tmp_path):
    straight = tmp_path / "straight"
    straight.mkdir()
    expected_log = _run_deep(straight, "run", 4)
    _run_deep(tmp_path, "run", 2)
    with safe_open(str(tmp_path / "ckpt.safetensors"), framework="numpy") as f:
        state = json.loads(f.metadata()["checkpoint"])
        config = json.loads(f.metadata()["config"])
        moving = f.get_tensor("batch_normalization_0.moving_variance")
    assert state["step"] == 12 and config["optimizer"]["learning_rate"]["warmup_steps"] == 15  # mid-warm-up
    assert config["optimizer"]["include_in_weight_decay"] == {"var_list": [], "var_names": ["^dense_1\\.bias$"]}
    assert not np.allclose(moving, 1.0)  # the statistics have moved
    log = _run_deep(tmp_path, "resume", 4)
    assert log == expected_log  # the same history, "lr" of each epoch included
    _assert_same(_final_weights(tmp_path), _final_weights(straight))
    assert "batch_normalization_0.moving_mean" in _final_weights(tmp_path)
