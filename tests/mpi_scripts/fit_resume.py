"""Checkpoints written by data-parallel training resume in one process and the other way round.

    python fit_resume.py DIR first              # one process: the uninterrupted run, and 2 epochs -> DIR/one.ckpt
    mpiexec -n 2 python fit_resume.py DIR ranks # resume DIR/one.ckpt to 4 epochs; 2 epochs -> DIR/two.ckpt; dropout
    python fit_resume.py DIR last               # one process: resume DIR/two.ckpt to 4 epochs

Each mode writes its results to DIR/<mode>.npz; the test compares them with the uninterrupted run. "ranks" also
checks, with dropout, that 2 + 2 epochs resumed on 2 ranks give the uninterrupted 4 epochs on 2 ranks bit for bit,
that the ranks' dropout generators differ, and that only rank 0 wrote a checkpoint.
"""

import os
import sys

import numpy as np

import portanet as pn
from portanet import distributed


def say(line):
    """One write per line: mpiexec interleaves the ranks' output, and print() writes the newline separately."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()

DIR, MODE = sys.argv[1], sys.argv[2]
comm = distributed.get_communicator("mpi", timeout=120) if MODE == "ranks" else distributed.LocalCommunicator()
DIST = "mpi" if MODE == "ranks" else None
EPOCHS, HALF = 4, 2

rng = np.random.default_rng(5)
x, y = rng.normal(size=(45, 4)), rng.integers(0, 3, size=45)
x_val, y_val = rng.normal(size=(11, 4)), rng.integers(0, 3, size=11)


def model_for(dropout=0.0):
    layers = [pn.Dense(8, activation="relu")] + ([pn.Dropout(dropout)] if dropout else []) + \
        [pn.Dense(3, activation="softmax")]
    model = pn.Model(layers, dtype="float64", seed=3)
    model.compile(loss="sparse_categorical_crossentropy", optimizer=pn.Adam(lr=0.02), metrics=["accuracy"])
    return model


def train(epochs, dropout=0.0, save=None, resume=None):
    model = model_for(dropout)
    callbacks = [pn.ModelCheckpoint(save, monitor="loss")] if save else []
    history = model.fit(x, y, epochs=epochs, batch_size=8, validation_data=(x_val, y_val), callbacks=callbacks,
                        verbose=0, resume_from=resume, distributed=DIST)
    return model, pn.to_numpy(model.parameter_buffer.values).copy(), history.history


def path(name):
    return os.path.join(DIR, name)


out = {}
if MODE == "first":
    _, out["uninterrupted"], history = train(EPOCHS)
    out.update({f"uninterrupted/{k}": np.asarray(v) for k, v in history.items()})
    train(HALF, save=path("one.ckpt"))
elif MODE == "ranks":
    _, out["resumed"], history = train(EPOCHS, resume=path("one.ckpt"))  # written by one process
    out.update({f"resumed/{k}": np.asarray(v) for k, v in history.items()})
    train(HALF, save=path(f"two-rank{comm.rank}.ckpt"))  # each rank asks for its own file: rank 0 alone writes
    wrote = comm.allgather_object(os.path.exists(path(f"two-rank{comm.rank}.ckpt")))
    say(f"rank {comm.rank}: checkpoints written by rank: {wrote}")
    # dropout: the masks differ between ranks and continue exactly across a resume on the same number of ranks
    model, whole, _ = train(EPOCHS, dropout=0.3)
    states = comm.allgather_object(model.random_state()["dropout"])
    say(f"rank {comm.rank}: dropout generators differ between ranks: {states[0] != states[1]}")
    train(HALF, dropout=0.3, save=path("dropout.ckpt"))
    _, resumed, _ = train(EPOCHS, dropout=0.3, resume=path("dropout.ckpt"))
    diff = float(np.max(np.abs(resumed - whole)))
    alone = model_for(0.3)  # and they are not the one-process masks: the weights differ from a one-process run
    alone.fit(x, y, epochs=EPOCHS, batch_size=8, validation_data=(x_val, y_val), verbose=0)
    other = float(np.max(np.abs(pn.to_numpy(alone.parameter_buffer.values) - whole)))
    say(f"rank {comm.rank}: dropout resumed vs uninterrupted max diff {diff:.3g}; vs one process {other:.3g}")
else:
    _, out["resumed"], history = train(EPOCHS, resume=path("two-rank0.ckpt"))  # written by 2 ranks
    out.update({f"resumed/{k}": np.asarray(v) for k, v in history.items()})
if comm.rank == 0:
    np.savez(path(f"{MODE}.npz"), **out)
