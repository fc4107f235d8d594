"""Data-parallel proof of concept on today's public API: N ranks with global batch B == 1 process with batch B.

Run as ``mpiexec -n N python equivalence.py OUT.npz`` or as ``python equivalence.py OUT.npz`` (one process). Each
rank starts from different initial weights (its own seed) until rank 0's are broadcast; every epoch reshuffles with
a seed broadcast from rank 0; each step all-reduces the weighted flat gradient once and runs pn.Adam on the flat
parameters. Rank 0 also trains a plain single-process reference (no sharding helpers, no communicator) and prints
the largest difference; it writes the distributed run's final weights to OUT.npz. Exit status 1 on a difference > 1e-12.
"""

import importlib.util
import sys

import numpy as np

import portanet as pn
from portanet import distributed

EPOCHS = 2
# (rows, global batch): uneven splits (7 = 4 + 3), short last batches (45 % 8 = 5 -> 3 + 2), and a last batch of
# one row, where rank 1 has no rows and contributes a zero gradient (41 % 8 = 1).
CASES = [(45, 8), (40, 7), (41, 8)]
BACKENDS = {name: where for name, where in {
    "numpy": dict(device="cpu"), "torch": dict(device="cpu", backend="torch"),
    "array_api_strict-device1": dict(device="device1", backend="array_api_strict"),
}.items() if importlib.util.find_spec(where.get("backend", "numpy")) is not None}


def make_model(seed, where):
    model = pn.Model([pn.Dense(6, activation="tanh"), pn.Dense(3, activation="softmax")], dtype="float64", seed=seed,
                     **where)
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam")
    return model.build(4)


def flatten(model, arrays):
    xp = model.xp
    return xp.concat([xp.reshape(a, (-1,)) for a in arrays.values()])


def unflatten(model, flat):
    xp, out, offset = model.xp, {}, 0
    for name, p in model.parameters().items():
        size = int(np.prod(p.shape))
        out[name] = xp.reshape(flat[offset:offset + size], p.shape)
        offset += size
    return out


def train_distributed(comm, x, y, batch_size, where, base_seed):
    model = make_model(seed=100 + comm.rank, where=where)  # different on each rank until the broadcast
    flat = comm.broadcast_(flatten(model, model.parameters()))
    model.set_parameters(unflatten(model, flat))
    opt = pn.Adam(lr=0.05)
    for epoch in range(EPOCHS):
        for shard in distributed.shard_batches(len(x), batch_size, comm.rank, comm.size, seed=[base_seed, epoch]):
            if len(shard.rows):
                _, grads = model.loss_and_grads(x[shard.rows], y[shard.rows])
                grad = flatten(model, grads) * shard.weight
            else:  # no rows in this step: a zero contribution, still part of the all-reduce
                grad = model.xp.zeros_like(flat)
            comm.allreduce_(grad)
            opt.step(flat, grad)
            model.set_parameters(unflatten(model, flat))
        comm.check_identical(flat, f"the parameters after epoch {epoch}")
        comm.check_identical(flat, f"the parameters after epoch {epoch}", exact=True)
    return pn.to_numpy(flat)


def train_reference(x, y, batch_size, where, base_seed):
    model = make_model(seed=100, where=where)
    flat = flatten(model, model.parameters())
    start = pn.to_numpy(flat).copy()
    opt = pn.Adam(lr=0.05)
    for epoch in range(EPOCHS):
        order = np.random.default_rng([base_seed, epoch]).permutation(len(x))
        for begin in range(0, len(x), batch_size):
            rows = order[begin:begin + batch_size]
            _, grads = model.loss_and_grads(x[rows], y[rows])
            opt.step(flat, flatten(model, grads))
            model.set_parameters(unflatten(model, flat))
    return pn.to_numpy(flat), start


def main(out):
    comm = distributed.get_communicator("mpi", timeout=120)
    base_seed = comm.broadcast_object(12345 if comm.rank == 0 else 999)
    rng = np.random.default_rng(0)
    results, worst = {}, 0.0
    for backend, where in BACKENDS.items():
        for n, batch_size in CASES:
            x = rng.normal(size=(n, 4))
            y = rng.integers(0, 3, size=n)
            got = train_distributed(comm, x, y, batch_size, where, base_seed)
            if comm.is_root:
                want, start = train_reference(x, y, batch_size, where, base_seed)
                diff, moved = float(np.max(np.abs(got - want))), float(np.max(np.abs(want - start)))
                worst = max(worst, diff)
                print(f"{backend} n={n} batch={batch_size} ranks={comm.size}: max |distributed - single| = {diff:.3g} "
                      f"(weights moved {moved:.3g})", flush=True)
                results[f"{backend}/{n}/{batch_size}"] = got
    if comm.is_root:
        np.savez(out, **results)
        print(f"worst difference {worst:.3g}", flush=True)
        if worst > 1e-12:
            sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1])
