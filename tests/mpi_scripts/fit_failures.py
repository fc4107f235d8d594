"""model.fit(..., distributed=...) on 2 ranks when something goes wrong on one of them.

    mpiexec -n 2 python fit_failures.py MODE

clean   errors every rank catches, each printed as "<case> rank <r> caught <type>: <message>" (exit status 0):
        disagreements before training (x's width, the batch size, the layers: the model is not even built),
        parameters perturbed on rank 1 mid-epoch (the end-of-epoch checksum), a loss that overflows on rank 1's
        rows only (the NaN guard stops every rank at the same step, with the same finite weights), a NaN read from a
        memory map in rank 1's share (StreamError on every rank, the model put back as it was), BatchNormalization
        with shares of 1 row (ValueError before training), EarlyStopping restoring weights on rank 1 only
        (RankMismatchError at the end of fit)
kill    rank 1 is killed by SIGKILL in its 3rd step
raise   rank 1 raises in a callback in its 3rd step (uncaught: the excepthook aborts the job)
hang    rank 1 stops answering in its 3rd step; rank 0's collective times out after 3 s (uncaught: the job aborts)
"""

import os
import signal
import sys
import tempfile
import time

import numpy as np

import portanet as pn
from portanet import distributed


def say(line):
    """One write per line: mpiexec interleaves the ranks' output, and print() writes the newline separately."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()

MODE = sys.argv[1]
comm = distributed.get_communicator("mpi", timeout=120)
rank = comm.rank
rng = np.random.default_rng(0)
x, y = rng.normal(size=(48, 4)), rng.integers(0, 3, size=48)


def model_for(units=6):
    model = pn.Model([pn.Dense(units, activation="tanh"), pn.Dense(3, activation="softmax")], dtype="float64", seed=0)
    model.compile(loss="sparse_categorical_crossentropy", optimizer=pn.Adam(lr=0.01))
    return model


class OnRank1(pn.Callback):
    """Run ``action(model)`` on rank 1 at the end of its ``at``-th step of the first epoch."""

    def __init__(self, action, at=2):
        self.action, self.at = action, at

    def on_batch_end(self, step, loss=None):
        if rank == 1 and self.params["rank"] == 1 and step == self.at and not self.model.history.epoch:
            self.action(self.model)


def same_on_all(model) -> bool:
    weights = comm.allgather_object(pn.to_numpy(model.parameter_buffer.values).tobytes())
    return all(w == weights[0] for w in weights)


def report(case, run):
    try:
        run()
    except Exception as exc:  # noqa: BLE001 - the test reads the type and message
        say(f"{case} rank {rank} caught {type(exc).__name__}: {exc}")
    else:
        say(f"{case} rank {rank} finished without an error")


if MODE == "clean":
    models = {}

    def fit_with(case, **changes):
        models[case] = model = model_for(changes.pop("units", 6))
        args = dict(x=x, y=y, epochs=2, batch_size=8, verbose=0, distributed="mpi")
        args.update(changes)
        model.fit(**args)

    report("width", lambda: fit_with("width", x=np.hstack([x, x[:, :1]]) if rank == 1 else x))
    report("batch_size", lambda: fit_with("batch_size", batch_size=8 + rank))
    report("layers", lambda: fit_with("layers", units=6 + rank))
    for case in ("width", "batch_size", "layers"):
        say(f"{case} rank {rank} built: {models[case].built}")

    def perturb(model):
        model.parameter_buffer.values[3] += 1e-3  # a replica that missed or changed part of an update

    report("perturbed", lambda: fit_with("perturbed", callbacks=[OnRank1(perturb)]))

    x_big = x.copy()
    x_big[29] = 1e200  # row 29 is in rank 1's part of its batch (rows 28-31 of 24-31) when not shuffled
    model = pn.Model([pn.Dense(4), pn.Dense(1)], dtype="float64", seed=0)
    model.compile(loss="mse", optimizer="sgd")
    report("overflow", lambda: model.fit(x_big, y * 1.0, epochs=2, batch_size=8, shuffle=False, verbose=0,
                                         distributed="mpi"))
    finite = bool(np.all(np.isfinite(pn.to_numpy(model.parameter_buffer.values))))
    say(f"overflow rank {rank} weights finite: {finite}, identical on every rank: {same_on_all(model)}")

    # a NaN read from a memory map in rank 1's share (row 29 again): StreamError everywhere, the model put back
    x_nan = np.lib.format.open_memmap(os.path.join(tempfile.mkdtemp(), "x.npy"), mode="w+", dtype=np.float64,
                                      shape=x.shape)
    x_nan[...] = x
    x_nan[29, 1] = np.nan
    model = model_for()
    model.build(4)
    before = pn.to_numpy(model.parameter_buffer.values).copy()
    report("nan_read", lambda: model.fit(x_nan, y, epochs=2, batch_size=8, shuffle=False, verbose=0, distributed="mpi"))
    kept = bool(np.array_equal(pn.to_numpy(model.parameter_buffer.values), before))
    say(f"nan_read rank {rank} weights put back: {kept}, identical on every rank: {same_on_all(model)}")

    # BatchNormalization on 2 ranks with global batches of 3: rank 1's share of each is 1 row (the variance of one
    # row is 0): a ValueError on every rank before the model is built, not on rank 1 mid-training
    bn = pn.Model([pn.Dense(5), pn.BatchNormalization(), pn.Dense(3, activation="softmax")], dtype="float64", seed=0)
    bn.compile(loss="sparse_categorical_crossentropy", optimizer="adam")
    report("bn_share", lambda: bn.fit(x[:42], y[:42], epochs=1, batch_size=3, verbose=0, distributed="mpi"))
    say(f"bn_share rank {rank} built: {bn.built}")

    # a callback on rank 1 only that puts other weights back at the end of training: the ranks' models would leave
    # fit() different; fit compares them after on_train_end
    x_val, y_val = rng.normal(size=(16, 4)), rng.integers(0, 3, size=16)
    stopper = [pn.EarlyStopping(monitor="val_loss", patience=1, restore_best_weights=True)] if rank == 1 else []
    model = model_for()
    model.compile(loss="sparse_categorical_crossentropy", optimizer=pn.Adam(lr=0.1))
    report("restore_one_rank", lambda: model.fit(x, y, epochs=40, batch_size=8, validation_data=(x_val, y_val),
                                                 verbose=0, callbacks=stopper, distributed="mpi"))

elif MODE in ("kill", "raise", "hang"):
    if MODE == "hang":
        comm.timeout = 3.0

    def fail(model):
        if MODE == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if MODE == "raise":
            raise RuntimeError("rank 1 failed on purpose in its 3rd step")
        time.sleep(600)

    model_for().fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[OnRank1(fail)], distributed=comm)
    say(f"rank {rank} finished training (unexpected)")
else:
    raise SystemExit(f"unknown mode {MODE!r}")
