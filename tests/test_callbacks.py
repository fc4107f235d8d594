"""Callbacks: History and its plot, progress display, EarlyStopping, ModelCheckpoint, learning-rate schedules,
TerminateOnNaN, and the order they run in."""

import re
import sys

import numpy as np
import pytest

import portanet as pn
from portanet import to_numpy
from portanet.testing import assert_close

RNG = np.random.default_rng(0)
X = RNG.standard_normal((60, 4)).astype(np.float32)
Y = (X[:, 0] - X[:, 1] > 0).astype(np.int64)


def _model(device="cpu", lr=0.01):
    model = pn.Model([pn.Dense(6, "relu"), pn.Dense(2, "softmax")], device=device, seed=0)
    return model.compile("sparse_categorical_crossentropy", pn.SGD(lr=lr), metrics=["accuracy"])


class Scripted(pn.Callback):
    """Puts ``values[epoch]`` into the logs as ``key`` (runs before the callbacks under test)."""

    def __init__(self, key, values):
        self.key, self.values = key, values

    def on_epoch_end(self, epoch, logs=None):
        logs[self.key] = self.values[epoch]


class Weights(pn.Callback):
    """Records a host copy of the weights at each epoch end."""

    def __init__(self):
        self.seen = []

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append(to_numpy(self.model.parameter_buffer.values).copy())


# -- History ------------------------------------------------------------------------------------------------------
def test_history_holds_training_and_validation_values_per_epoch(device):
    history = _model(device).fit(X, Y, epochs=3, validation_data=(X, Y), verbose=0)
    assert history.epoch == [0, 1, 2]
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy", "lr"}
    assert all(len(v) == 3 and all(isinstance(x, float) for x in v) for v in history.history.values())
    assert history["loss"] is history.history["loss"]


def test_history_plot_draws_one_panel_per_quantity_and_writes_the_file(tmp_path):
    history = _model().fit(X, Y, epochs=3, validation_data=(X, Y), verbose=0,
                           callbacks=[pn.LearningRateScheduler(lambda epoch, lr: lr)])
    figure = history.plot(tmp_path / "history.png")
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["loss", "accuracy", "lr"]
    assert [line.get_label() for line in figure.axes[0].get_lines()] == ["training", "validation"]
    assert (tmp_path / "history.png").read_bytes().startswith(b"\x89PNG")


def test_history_plot_without_matplotlib_says_how_to_install_it(monkeypatch):
    history = _model().fit(X, Y, epochs=1, verbose=0)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r'needs matplotlib.*pip install "portanet\[plot\]"'):
        history.plot()


def test_history_plot_of_an_empty_history_raises():
    with pytest.raises(ValueError, match="the history is empty"):
        pn.History().plot()


# -- progress display ---------------------------------------------------------------------------------------------
def test_verbose_0_prints_nothing(capsys):
    _model().fit(X, Y, epochs=2, verbose=0)
    assert capsys.readouterr() == ("", "")


def test_verbose_2_prints_one_line_per_epoch(capsys):
    _model().fit(X, Y, epochs=2, validation_data=(X, Y), verbose=2)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert re.match(r"epoch 2/2 - [\d.e+-]+s - loss: ", lines[1]) and "val_accuracy: " in lines[1]


def test_verbose_1_draws_a_progress_bar_per_epoch_then_a_line_with_every_log(capsys):
    _model().fit(X, Y, epochs=2, batch_size=10, verbose=1)
    out, err = capsys.readouterr()
    assert "epoch 1/2: 0/6" in err and "epoch 2/2: 0/6" in err  # drawn at each epoch's start, then redrawn
    assert [line.split(" - ")[0] for line in out.splitlines()] == ["epoch 1/2", "epoch 2/2"]
    assert "loss: " in out and "accuracy: " in out


def _frames(err):
    """Every state of the bar as the terminal shows it (tqdm redraws a line after each carriage return)."""
    return [frame for line in err.split("\n") for frame in line.split("\r") if frame.strip()]


def _fit_with_many_metrics(verbose=1):
    model = _model()
    model.compile("sparse_categorical_crossentropy", pn.SGD(lr=0.01),
                  metrics=["accuracy", pn.metrics.TopKAccuracy(k=1), "mse", "mae"])
    return model.fit(X, Y, epochs=2, batch_size=5, validation_data=(X, Y), verbose=verbose)


@pytest.mark.parametrize("columns", ["80", "40"])
def test_a_narrow_terminal_shows_every_metric_and_no_bar_wider_than_the_terminal(capsys, monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", columns)
    history = _fit_with_many_metrics()
    out, err = capsys.readouterr()
    frames = _frames(err)
    assert frames and all(len(frame) <= int(columns) for frame in frames)
    lines = out.splitlines()
    for epoch, line in enumerate(lines):
        for key, values in history.history.items():  # the validation metrics too, in full
            assert f"{key}: {values[epoch]:.4g}" in line


def test_a_terminal_that_reports_0_columns_gets_an_80_column_bar(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "0")
    monkeypatch.setattr("os.get_terminal_size", lambda *args: __import__("os").terminal_size((0, 0)))
    assert pn.callbacks.terminal_columns() == 80
    _fit_with_many_metrics()
    frames = _frames(capsys.readouterr().err)
    assert any(frame.startswith("epoch 1/2: 0/12 [") for frame in frames)
    assert all(len(frame) <= 80 for frame in frames)


def test_small_and_large_values_keep_four_significant_digits(capsys):
    pn.callbacks._Progress(2, 1, 1).on_epoch_begin(0)
    progress = pn.callbacks._Progress(2, 1, 1)
    progress.on_epoch_begin(0)
    progress.on_epoch_end(0, {"loss": 1.5678e-4, "mse": 12345.678, "accuracy": 0.93125})
    assert "loss: 0.0001568 - mse: 1.235e+04 - accuracy: 0.9313" in capsys.readouterr().out


def test_verbose_1_reads_the_running_loss_about_twenty_times_per_epoch():
    class Count(pn.Callback):
        reads = 0

        def on_log(self, step, logs=None):
            Count.reads += 1
            assert set(logs) == {"loss", "accuracy"}

    _model().fit(X, Y, epochs=1, batch_size=1, verbose=1, callbacks=[Count()])
    assert Count.reads == 20


def test_verbose_must_be_0_1_or_2():
    with pytest.raises(ValueError, match="verbose must be 0, 1 or 2, got 3"):
        _model().fit(X, Y, verbose=3)


# -- EarlyStopping ------------------------------------------------------------------------------------------------
def test_early_stopping_stops_after_patience_epochs_without_improvement():
    stop = pn.EarlyStopping(monitor="score", patience=2)
    history = _model().fit(X, Y, epochs=10, verbose=0,
                           callbacks=[Scripted("score", [5, 4, 4.5, 4.2, 3, 1, 1, 1, 1, 1]), stop])
    assert history.epoch == [0, 1, 2, 3] and stop.stopped_epoch == 3 and stop.best_epoch == 1


def test_early_stopping_min_delta_ignores_tiny_improvements():
    stop = pn.EarlyStopping(monitor="score", patience=1, min_delta=0.5)
    history = _model().fit(X, Y, epochs=5, verbose=0, callbacks=[Scripted("score", [5, 4.9, 4.8, 1, 1]), stop])
    assert len(history.epoch) == 2


def test_early_stopping_maximizes_accuracies_in_auto_mode():
    stop = pn.EarlyStopping(monitor="val_accuracy", patience=1)
    history = _model().fit(X, Y, epochs=6, verbose=0,
                           callbacks=[Scripted("val_accuracy", [0.5, 0.6, 0.7, 0.65, 0.6, 0.9]), stop])
    assert len(history.epoch) == 4 and stop.best_epoch == 2


@pytest.mark.parametrize("stops_early", [True, False], ids=["stopped early", "ran all epochs"])
def test_restore_best_weights_restores_them_whether_or_not_training_stopped_early(device, stops_early):
    weights = Weights()
    stop = pn.EarlyStopping(monitor="score", patience=2 if stops_early else 10, restore_best_weights=True)
    model = _model(device)
    history = model.fit(X, Y, epochs=5, verbose=0, callbacks=[Scripted("score", [3, 1, 2, 4, 5]), weights, stop])
    assert len(history.epoch) == (4 if stops_early else 5) and (stop.stopped_epoch is None) != stops_early
    assert_close(model.parameter_buffer.values, weights.seen[1], device=device, rtol=0, atol=0)
    assert not np.array_equal(weights.seen[-1], weights.seen[1])


def test_early_stopping_names_the_missing_monitor_and_the_available_keys():
    with pytest.raises(ValueError, match=r"EarlyStopping monitors 'val_loss' but the epoch logs hold "
                                         r"\['accuracy', 'loss', 'lr'\]; pass validation_data or validation_split"):
        _model().fit(X, Y, epochs=2, verbose=0, callbacks=[pn.EarlyStopping()])


@pytest.mark.parametrize("kwargs,message", [
    ({"mode": "up"}, r"mode must be 'auto', 'min' or 'max', got 'up'"),
    ({"patience": -1}, r"patience must be a non-negative integer, got -1"),
    ({"min_delta": "0.1"}, r"min_delta must be a finite number >= 0"),
    ({"min_delta": float("inf")}, r"min_delta must be a finite number >= 0, got inf"),
])
def test_early_stopping_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pn.EarlyStopping(**kwargs)


# -- ModelCheckpoint ----------------------------------------------------------------------------------------------
def test_model_checkpoint_fills_the_epoch_and_log_fields_of_its_path(tmp_path):
    _model().fit(X, Y, epochs=3, verbose=0, callbacks=[
        pn.ModelCheckpoint(tmp_path / "ckpt-{epoch:02d}-{loss:.2f}.safetensors")])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 3 and [n[:8] for n in names] == ["ckpt-01-", "ckpt-02-", "ckpt-03-"]
    assert pn.load(tmp_path / names[-1]).optimizer.iterations == 6


def test_model_checkpoint_save_best_only_writes_only_on_improvement(tmp_path):
    written = []

    class Spy(pn.Callback):
        def on_epoch_end(self, epoch, logs=None):
            written.append(checkpoint.last_path)

    checkpoint = pn.ModelCheckpoint(tmp_path / "best-{epoch}.safetensors", monitor="score", save_best_only=True)
    _model().fit(X, Y, epochs=4, verbose=0, callbacks=[Scripted("score", [3, 2, 2.5, 1]), checkpoint, Spy()])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-1.safetensors", "best-2.safetensors",
                                                          "best-4.safetensors"]


def test_model_checkpoint_with_an_unknown_field_names_the_keys(tmp_path):
    with pytest.raises(ValueError, match=r"has a field that is not 'epoch' or a log key"):
        _model().fit(X, Y, epochs=1, verbose=0, callbacks=[pn.ModelCheckpoint(tmp_path / "{val_auc}.safetensors")])


def test_model_checkpoint_runs_after_the_other_callbacks_whatever_the_list_order(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    reduce = pn.ReduceLROnPlateau(monitor="score", factor=0.5, patience=0)
    _model(lr=0.1).fit(X, Y, epochs=2, verbose=0, callbacks=[pn.ModelCheckpoint(path), Scripted("score", [1, 2]), reduce])
    assert pn.load(path).optimizer.lr == 0.05


# -- learning-rate schedules --------------------------------------------------------------------------------------
def test_learning_rate_scheduler_sets_the_rate_each_epoch_and_logs_it():
    model = _model(lr=0.1)
    history = model.fit(X, Y, epochs=3, verbose=0, callbacks=[pn.LearningRateScheduler(lambda epoch, lr: 0.1 / (epoch + 1))])
    assert history["lr"] == pytest.approx([0.1, 0.05, 0.1 / 3])
    assert model.optimizer.lr == pytest.approx(0.1 / 3)


def test_learning_rate_scheduler_rejects_a_bad_rate():
    with pytest.raises(ValueError, match=r"schedule\(0, 0.01\).* must give a positive finite learning rate, got -1"):
        _model().fit(X, Y, epochs=1, verbose=0, callbacks=[pn.LearningRateScheduler(lambda epoch, lr: -1)])


def test_reduce_lr_on_plateau_waits_for_patience_then_cools_down_and_stops_at_min_lr():
    model = _model(lr=1.0)
    reduce = pn.ReduceLROnPlateau(monitor="score", factor=0.5, patience=1, cooldown=1, min_lr=0.2)
    history = model.fit(X, Y, epochs=8, verbose=0, callbacks=[Scripted("score", [1] * 8), reduce])
    # epochs 2 (patience), 4 (after a cooldown epoch), 6: 1 -> 0.5 -> 0.25 -> 0.2 (min_lr)
    assert history["lr"] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.2, 0.2]


# -- TerminateOnNaN -----------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_terminate_on_nan_stops_quietly_with_finite_weights(device):
    y = X[:, :1] * 3
    y[40] = 1e30  # finite, but its squared error overflows float32: the loss of step 5 of each epoch is inf
    model = pn.Model([pn.Dense(4, "tanh"), pn.Dense(1)], device=device, seed=0).compile("mse", pn.SGD(lr=0.01))
    with pytest.warns(RuntimeWarning, match=r"the loss became .* at epoch 1, step 5 of 6") as caught:
        history = model.fit(X, y, epochs=3, batch_size=10, shuffle=False, verbose=0, callbacks=[pn.TerminateOnNaN()])
    assert [w.filename for w in caught if "the loss became" in str(w.message)] == [__file__]  # the caller's line
    assert history.epoch == []
    assert np.isfinite(to_numpy(model.parameter_buffer.values)).all()
