"""model.fit(..., distributed="mpi") on N ranks == model.fit(...) in one process with the same global batch.

    mpiexec -n 2 python fit_equivalence.py OUT.npz        # data-parallel
    python fit_equivalence.py OUT.npz --plain              # the reference: distributed=None
    mpiexec -n 2 python fit_equivalence.py OUT.npz --cuda  # case 1 on CuPy too (a GPU machine; not yet run)
    mpiexec -n 2 python fit_equivalence.py OUT.npz --cuda --nccl   # ... reduced by NCCL (one GPU per rank)

Each case trains a float64 model (Adam, shuffling) through the public fit()/evaluate() and rank 0 writes the final
weights and every logged value to OUT.npz; the test compares the two files. The cases cover short last batches
split unevenly (45 % 8 = 5 -> 3 + 2), a last batch of one row (rank 1 contributes a zero gradient), an odd global
batch (7 = 4 + 3), validation data and metrics, validation_split, sample and class weights, a block-shuffled
memory map, a stream sharded with shard_iterable (uneven batches: weighted by rows) and evaluate(). Ranks start
from different seeds: rank 0's model is broadcast.
"""

import importlib.util
import os
import sys
import tempfile

import numpy as np

import portanet as pn
from portanet import distributed

OUT = sys.argv[1]
PLAIN = "--plain" in sys.argv
comm = distributed.get_communicator("mpi", timeout=120) if not PLAIN else distributed.LocalCommunicator()
DIST = None if PLAIN else "mpi"
BACKENDS = {"numpy": dict(device="cpu")}
if importlib.util.find_spec("torch") is not None:
    BACKENDS["torch"] = dict(device="cpu", backend="torch")
if importlib.util.find_spec("array_api_strict") is not None:
    BACKENDS["array_api_strict-device1"] = dict(device="device1", backend="array_api_strict")
NCCL = None
if "--cuda" in sys.argv:  # CuPy, all ranks on GPU 0 over MPI (staged through the host), or one GPU per rank (NCCL)
    NCCL = None if PLAIN or "--nccl" not in sys.argv else distributed.get_communicator("nccl", timeout=120)
    BACKENDS["cupy"] = dict(device="cuda" if NCCL is None else f"cuda:{NCCL.device}")


def model_for(layers, loss, metrics, where=None, seed=0):
    # every rank but 0 starts from other weights and another generator: fit must copy rank 0's
    model = pn.Model(layers, dtype="float64", seed=seed + 1000 * comm.rank, **(where or {}))
    model.compile(loss=loss, optimizer=pn.Adam(lr=0.02), metrics=metrics)
    return model


def classifier(where=None):
    return model_for([pn.Dense(6, activation="tanh"), pn.Dense(3, activation="softmax")],
                     "sparse_categorical_crossentropy", ["accuracy"], where)


def weights(model):
    return np.concatenate([pn.to_numpy(p).ravel() for p in model.parameters().values()])


results = {}


def record(name, model, history=None, logs=None):
    results[f"{name}/weights"] = weights(model)
    for key, values in (history.history if history is not None else {}).items():
        results[f"{name}/{key}"] = np.asarray(values, dtype=np.float64)
    for key, value in (logs or {}).items():
        results[f"{name}/evaluate_{key}"] = np.float64(value)


rng = np.random.default_rng(0)
x = rng.normal(size=(45, 4))
y = rng.integers(0, 3, size=45)
x_val, y_val = rng.normal(size=(13, 4)), rng.integers(0, 3, size=13)

# 1. short last batch split 3 + 2, validation data, metrics, on every CPU backend; verbose=2 on numpy
for backend, where in BACKENDS.items():
    model = classifier(where)
    verbose = 2 if backend == "numpy" and comm.rank == 0 else 0  # rank 0's verbose applies (the others print nothing)
    history = model.fit(x, y, epochs=3, batch_size=8, validation_data=(x_val, y_val), verbose=verbose,
                        distributed=NCCL if backend == "cupy" and NCCL else DIST)
    record(f"validation/{backend}", model, history)

# 2. a last batch of one row (41 % 8 = 1: rank 1 has none), sample weights, regression with a metric
xr, yr = rng.normal(size=(41, 3)), rng.normal(size=(41, 2))
wr = rng.uniform(0.5, 2.0, size=41)
model = model_for([pn.Dense(5, activation="relu"), pn.Dense(2)], "mse", ["mae"])
history = model.fit(xr, yr, sample_weight=wr, epochs=3, batch_size=8, verbose=1 if comm.rank == 0 else 0,
                    distributed=DIST)  # a progress bar on rank 0: the running loss read (and reduced) every step
record("one_row_last", model, history)

# 3. odd global batch 7 = 4 + 3, class weights, stratified validation_split
xc, yc = rng.normal(size=(40, 4)), rng.integers(0, 3, size=40)
model = classifier()
history = model.fit(xc, yc, epochs=3, batch_size=7, class_weight={0: 2.0, 2: 0.5}, validation_split=0.25, verbose=0,
                    distributed=DIST)
record("class_weight_split", model, history)

# 4. a memory map read in shuffled blocks of 16 rows (two global batches each), 45 rows: a partial last block
folder = tempfile.mkdtemp(prefix=f"portanet-equivalence-{comm.rank}-")
xm = np.lib.format.open_memmap(os.path.join(folder, "x.npy"), mode="w+", dtype=np.float64, shape=x.shape)
xm[...] = x
xm.flush()
xm = np.load(os.path.join(folder, "x.npy"), mmap_mode="r")
model = classifier()
history = model.fit(pn.data.SliceableAdapter(xm, y, block_size=16), epochs=3, batch_size=8,
                    validation_data=(x_val, y_val), verbose=0, distributed=DIST)
record("memmap", model, history)
del xm

# 5. a stream: uneven batches of rows, each rank takes every other one (shard_iterable); one process sees each
#    pair of batches as one batch, the global batch of a data-parallel step
sizes = [5, 3, 4, 4, 6, 2, 7, 1]
bounds = np.cumsum([0] + sizes)
pieces = [(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
if PLAIN:
    stream = [(np.concatenate([p[0] for p in pair]), np.concatenate([p[1] for p in pair]))
              for pair in zip(pieces[0::2], pieces[1::2])]
else:
    stream = list(distributed.shard_iterable(pieces, comm.rank, comm.size))


class Loader:
    """An iterable of batches with a length, read afresh each epoch (as a data loader is)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


model = classifier()
history = model.fit(Loader(stream), epochs=3, verbose=0, distributed=DIST)
record("stream", model, history)

# 6. evaluate(): each rank a share of each batch of 8 (45 rows), values over all rows on every rank
model = classifier()
model.fit(x, y, epochs=1, batch_size=8, verbose=0, distributed=DIST)
logs = model.evaluate(x_val, y_val, batch_size=4, distributed=DIST)
values = comm.allgather_object(logs)
assert all(v == values[0] for v in values), values  # the same values on every rank
record("evaluate", model, logs=logs)

# every rank holds the same weights at the end (fit's own checks compared checksums; here the bytes)
for name in [k for k in results if k.endswith("/weights")]:
    comm.check_identical(results[name], f"{name} after training", exact=True)
if comm.rank == 0:
    np.savez(OUT, **results)
    print(f"rank 0 of {comm.size} wrote {len(results)} arrays", flush=True)
