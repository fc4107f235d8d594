"""Run under mpiexec: in-place all-reduce and broadcast on every CPU backend, host reductions, objects, checksums.

Each rank asserts its own results; exit status 0 and one "ok <backend>" line per backend and rank on success.
Backends that are not installed are left out (the test expects the ones it can import).
"""

import importlib.util
import sys

import array_api_compat
import numpy as np

from portanet import distributed, resolve_device, to_numpy

comm = distributed.get_communicator("mpi", timeout=120)
rank, size = comm.rank, comm.size
CASES = {
    "numpy": ("numpy", "cpu"),
    "torch": ("torch", "cpu"),
    "array_api_strict": ("array_api_strict", "CPU_DEVICE"),
    "array_api_strict-device1": ("array_api_strict", "device1"),
}
DEVICES = {name: resolve_device(where, backend=lib) for name, (lib, where) in CASES.items()
           if importlib.util.find_spec(lib) is not None}
for name, device in DEVICES.items():
    for dtype in ("float32", "float64"):
        host = (np.arange(7) + 100 * rank).astype(dtype)
        x = device.from_host(host)
        where = array_api_compat.device(x)
        y = comm.allreduce_(x)
        assert y is x, f"{name}: allreduce_ returned a different object"
        assert array_api_compat.device(x) == where, f"{name}: the array moved to {array_api_compat.device(x)}"
        expected = sum((np.arange(7) + 100 * r).astype(dtype) for r in range(size))
        got = to_numpy(x)
        assert got.dtype == np.dtype(dtype), f"{name}: dtype became {got.dtype}"
        np.testing.assert_array_equal(got, expected, err_msg=f"{name} {dtype} allreduce_")

        for root in range(size):
            z = device.from_host(np.full((2, 3), 10.0 * rank + 1, dtype=dtype))
            assert comm.broadcast_(z, root=root) is z
            np.testing.assert_array_equal(to_numpy(z), np.full((2, 3), 10.0 * root + 1, dtype=dtype),
                                          err_msg=f"{name} {dtype} broadcast_ from {root}")
            assert array_api_compat.device(z) == array_api_compat.device(device.from_host(host))
        comm.check_identical(z, f"{name} broadcast result")
        comm.check_identical(z, f"{name} broadcast result", exact=True)
    empty = device.from_host(np.zeros(0))
    assert comm.allreduce_(empty) is empty
    print(f"ok {name} rank {rank}", flush=True)

np.testing.assert_array_equal(comm.allreduce_host([1.5, rank]), [1.5 * size, sum(range(size))])
np.testing.assert_array_equal(comm.allreduce_host(np.array([rank, -rank]), op="max"), [size - 1, 0])
np.testing.assert_array_equal(comm.allreduce_host(np.array([rank, -rank]), op="min"), [0, 1 - size])
assert comm.allgather_object({"rank": rank}) == [{"rank": r} for r in range(size)]
assert comm.broadcast_object(f"seed from {rank}", root=size - 1) == f"seed from {size - 1}"
assert comm.agree(("dense", 784, 10), "the model") == ("dense", 784, 10)
comm.barrier()
print(f"ok host rank {rank}", flush=True)
sys.exit(0)
