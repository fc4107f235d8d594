"""Run under mpiexec with a mode; rank 1 fails in that way while rank 0 waits in an all-reduce.

raise          rank 1 raises (excepthook aborts the job; the timeout is too long to be what ends it)
raise-nohook   both ranks without the excepthook: rank 1 raises and exits; rank 0's all-reduce times out
caught         as raise-nohook, but rank 0 catches the DistributedError, tries again, and exits normally
hang           rank 1 sleeps (stuck); rank 0 times out, its uncaught DistributedError aborts the job
exit           rank 1 leaves with os._exit(3), without finalising MPI
sigkill        rank 1 is killed by SIGKILL
"""

import os
import signal
import sys
import time

import numpy as np

from portanet import distributed

mode = sys.argv[1]
comm = distributed.get_communicator("mpi", timeout=120, abort_on_error=mode not in ("raise-nohook", "caught"))
rank = comm.rank
comm.barrier()  # every rank has started (imports can be slow on a loaded machine)
comm.timeout = 600.0 if mode in ("raise", "exit", "sigkill") else 2.0
print(f"rank {rank} ready", flush=True)
grads = np.ones(1000)
if rank == 1:
    if mode in ("raise", "raise-nohook", "caught"):
        raise RuntimeError("rank 1 failed on purpose")
    if mode == "hang":
        time.sleep(600)
    if mode == "exit":
        print("rank 1 leaves with os._exit(3)", flush=True)
        os._exit(3)
    if mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise SystemExit(f"unknown mode {mode!r}")
try:
    comm.allreduce_(grads)
except distributed.DistributedError as exc:
    if mode != "caught":
        raise
    print(f"rank 0 caught DistributedError: {exc}", flush=True)
    try:
        comm.allreduce_(grads)
    except distributed.DistributedError as again:
        print(f"rank 0 again: {again}", flush=True)
    sys.exit(0)
print("rank 0 finished the all-reduce (unexpected)", flush=True)
