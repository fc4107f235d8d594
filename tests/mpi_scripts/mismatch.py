"""Run under mpiexec: disagreements raise RankMismatchError on every rank; each rank reports what it caught."""

import numpy as np

from portanet import distributed

comm = distributed.get_communicator("mpi", timeout=120)
rank = comm.rank


def report(label, call):
    try:
        call()
    except distributed.RankMismatchError as exc:
        print(f"{label} rank {rank} caught RankMismatchError: {exc}", flush=True)
    else:
        print(f"{label} rank {rank} passed", flush=True)


report("input", lambda: comm.agree((784 + rank, 10), "the input shape"))
report("config", lambda: comm.agree({"layers": [64, 10], "dtype": "float32"}, "the model config"))

weights = np.linspace(-1, 1, 1000)
report("same", lambda: comm.check_identical(weights, "the parameters"))
drifted = weights.copy()
drifted[10] += 1e-3 * rank  # a replica that missed part of an update
report("drift", lambda: comm.check_identical(drifted, "the parameters"))
one_ulp = weights.copy()
one_ulp[500] = np.nextafter(one_ulp[500], 2.0) if rank == 1 else one_ulp[500]
report("ulp", lambda: comm.check_identical(one_ulp, "the parameters"))
report("ulp-exact", lambda: comm.check_identical(one_ulp, "the parameters", exact=True))
report("broadcast-shape", lambda: comm.broadcast_(np.zeros(3 + rank)))
comm.barrier()
