"""Data-parallel communication: communicators (one process, MPI, NCCL) and the host index math that shards data.

Collectives only: no training loop, no layer math. MPI and CuPy are imported when a communicator needs them, never
at ``import portanet`` (importing ``mpi4py.MPI`` initialises MPI).

Failure handling (MPI), in order of what catches it first:

* An uncaught exception on a rank (including ``KeyboardInterrupt`` and :class:`DistributedError`) prints its
  traceback, then the rank calls ``MPI_Abort``: ``mpiexec`` kills every rank and exits non-zero at once
  (``abort_on_error=True``, the default, installs this as ``sys.excepthook``).
* A rank that dies (a signal, ``os._exit``) without finalising MPI: MPICH's ``mpiexec`` kills the others and
  exits with that rank's status (for a signal it prints ``BAD TERMINATION ... signal N``). A rank that exits
  with status 0 this way ends the job with status 0: MPICH reports nothing, so do not ``os._exit(0)`` mid-run.
* Anything else (a rank stuck in a loop or I/O, one that returned or called ``sys.exit`` and so finalised MPI, one
  whose error was caught, one calling a different collective, an exception in a thread, which no excepthook
  sees): every collective here is nonblocking and polled against a deadline, so the waiting ranks raise
  :class:`DistributedError` naming the operation after ``timeout`` seconds (default 300, environment
  variable ``PORTANET_DIST_TIMEOUT``); uncaught, that aborts the job as above. A communicator that timed out is
  broken: later calls raise at once, and the process aborts at exit instead of waiting in ``MPI_Finalize``.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import pickle
import sys
import time
from typing import NamedTuple

import array_api_compat
import numpy as np

__all__ = ["Communicator", "LocalCommunicator", "MPICommunicator", "NCCLCommunicator", "DistributedError",
           "RankMismatchError", "get_communicator", "derive_seed", "Shard", "shard_batches", "split_rows",
           "shard_iterable", "DEFAULT_TIMEOUT", "TIMEOUT_ENV"]

DEFAULT_TIMEOUT = 300.0
TIMEOUT_ENV = "PORTANET_DIST_TIMEOUT"
CUDA_AWARE_ENV = "PORTANET_MPI_CUDA_AWARE"
_MPI_HINT = 'install the MPI extra: pip install "portanet[mpi]" (mpi4py and MPICH wheels; mpiexec lands next to python)'


class DistributedError(RuntimeError):
    """A collective failed or did not complete in time: another rank stopped, hangs or called something else."""


class RankMismatchError(DistributedError):
    """Ranks disagree about something that must be the same everywhere (shapes, configs, parameters).

    Raised on every rank, with the same message naming each rank's value.
    """


def _timeout(timeout) -> float:
    if timeout is None:
        raw = os.environ.get(TIMEOUT_ENV)
        if raw is None:
            return DEFAULT_TIMEOUT
        try:
            timeout = float(raw)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
        name = TIMEOUT_ENV
    else:
        name = "timeout"
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


# -- arrays: where they live and how they reach the host --------------------------------------------------------
_DEVICES: dict = {}


def _device_of(x):
    """The :class:`portanet.Device` that ``x`` lives on (cached per library and device)."""
    from . import resolve_device  # the public name: stable across the backend restructuring

    where = array_api_compat.device(x)
    key = (type(x), str(where))
    if key not in _DEVICES:
        _DEVICES[key] = resolve_device(where, backend=array_api_compat.array_namespace(x))
    return _DEVICES[key]


def _host_view(x):
    """A writable NumPy view sharing ``x``'s memory, or None when ``x`` is not in host memory.

    NumPy arrays are their own view; torch CPU tensors and array-api-strict's CPU device arrays are viewed through
    DLPack (no copy). Arrays on other devices, array-api-strict's "device1" included, get None: they are staged.
    """
    if type(x) is np.ndarray:
        view = x
    elif not getattr(_device_of(x), "host_memory", False):
        return None
    else:
        try:
            view = np.from_dlpack(x, copy=False)
        except TypeError:  # NumPy < 2.1 has no copy=; CPU DLPack imports never copy
            view = np.from_dlpack(x)
        except (BufferError, RuntimeError, ValueError):
            return None
    return view if view.flags.c_contiguous and view.flags.writeable else None


def _write_back(x, host):
    """Copy the host array ``host`` into ``x`` in place, through ``x``'s device's explicit upload."""
    x[...] = _device_of(x).from_host(host)
    return x


def _to_host(x) -> np.ndarray:
    from . import to_numpy

    return np.ascontiguousarray(to_numpy(x))


def _text(what) -> str:
    return what() if callable(what) else what


def _describe(x) -> str:
    return f"{int(np.prod(x.shape))} {str(x.dtype).rsplit('.', 1)[-1]}"


# -- the interface ----------------------------------------------------------------------------------------------
class Communicator:
    """What data-parallel training needs from a group of ``size`` processes; this process is ``rank``.

    Device arrays (the flat gradient or parameter buffer) are reduced and broadcast *in place*, as one message;
    host values (loss sums, counts, flags) travel as small NumPy arrays; anything picklable can be gathered.
    Every method is a collective: all ranks call it, in the same order, or the others wait (until ``timeout``).
    """

    rank: int = 0
    size: int = 1
    timeout: float = DEFAULT_TIMEOUT

    @property
    def is_root(self) -> bool:
        """True on rank 0, the rank that logs, shows progress and writes files."""
        return self.rank == 0

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"

    def check_device(self, device) -> None:
        """ValueError unless this communicator can reduce arrays that live on ``device`` (a
        :class:`portanet.backends.Device`); MPI takes any (staged through the host where needed)."""

    # -- collectives subclasses provide ------------------------------------------------------------------------
    def allreduce_(self, array):
        """Sum ``array`` (any supported library/device, contiguous) over ranks, in place; returns ``array``."""
        raise NotImplementedError

    def broadcast_(self, array, root: int = 0):
        """Overwrite ``array`` on every rank with ``root``'s copy, in place; returns ``array``.

        Shapes and dtypes are checked first (one small extra collective): raises :class:`RankMismatchError`.
        """
        raise NotImplementedError

    def allreduce_host(self, values, op: str = "sum") -> np.ndarray:
        """Reduce a handful of host numbers (``op``: "sum", "max" or "min") over ranks; returns a new NumPy array."""
        raise NotImplementedError

    def allgather_object(self, obj) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``obj`` is pickled)."""
        raise NotImplementedError

    def broadcast_object(self, obj, root: int = 0):
        """``root``'s ``obj`` on every rank (pickled): e.g. a shuffle seed drawn on rank 0."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Return once every rank has called it (or raise :class:`DistributedError` after ``timeout``)."""
        raise NotImplementedError

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now, with exit status ``code``."""
        raise NotImplementedError

    # -- built on the collectives ------------------------------------------------------------------------------
    def agree(self, value, what: str):
        """Return ``value`` when every rank passed an equal one; else raise :class:`RankMismatchError` on every rank.

        ``value``: anything picklable that compares with ``==`` (ints, strings, tuples of shapes, config dicts).
        ``what`` names it in the message, e.g. ``"the number of parameters"``.
        """
        values = self.allgather_object(value)
        if any(not _equal(v, values[0]) for v in values[1:]):
            raise RankMismatchError(f"ranks disagree about {what}: {_by_value(values)}")
        return value

    def checksum(self, array) -> np.ndarray:
        """``[sum, sum |x|, sum x^2, sum x*i/n]`` of ``array`` in float64, computed on its device; one read-back.

        Cheap enough for every epoch (four reductions and no copy of the buffer to the host); the position-weighted
        sum catches values that moved. Reduction order may differ between ranks (thread counts, GPU kernels), so
        compare with a relative tolerance (:meth:`check_identical`) rather than bit for bit.
        """
        from . import to_numpy

        dev = _device_of(array)
        xp = dev.xp
        with dev.scope():
            x = xp.reshape(xp.astype(array, xp.float64), (-1,))
            n = x.shape[0]
            ramp = xp.arange(n, dtype=xp.float64, device=array_api_compat.device(x)) / max(n, 1)
            stats = xp.stack([xp.sum(x), xp.sum(xp.abs(x)), xp.sum(x * x), xp.sum(x * ramp)])
        return to_numpy(stats).astype(np.float64)

    def check_identical(self, array, what: str, rtol: float = 1e-9, exact: bool = False) -> None:
        """Raise :class:`RankMismatchError` on every rank unless ``array`` is the same on all ranks.

        Default: the :meth:`checksum` statistics must agree within ``rtol`` (relative to ``sum |x|``, or ``sum x^2``
        for that statistic): any real divergence (a missed or different update, other initial weights) is far
        above it, reduction-order noise is far below. ``exact=True`` compares a BLAKE2 hash of the bytes instead:
        bit-for-bit, at the cost of copying the array to the host.
        """
        if exact:
            digest = hashlib.blake2b(_to_host(array).tobytes(), digest_size=16).hexdigest()
            digests = self.allgather_object(digest)
            if any(d != digests[0] for d in digests[1:]):
                raise RankMismatchError(f"{what} differ between ranks (BLAKE2 of the bytes): {_by_value(digests)}")
            return
        stats = self.allgather_object(self.checksum(array))
        if not all(_close(s, stats[0], rtol) for s in stats[1:]):
            shown = [tuple(float(f"{v:.17g}") for v in s) for s in stats]
            raise RankMismatchError(
                f"{what} differ between ranks (checksum [sum, sum|x|, sum x^2, sum x*i/n], rtol={rtol:g}): "
                f"{_by_value(shown)}")

    def close(self) -> None:
        """Release what the communicator holds (a no-op unless a subclass says otherwise)."""


def _equal(a, b) -> bool:
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # arrays and other values without a single truth value
        return repr(a) == repr(b)


def _by_value(values) -> str:
    """``"ranks 0, 2: 784; rank 1: 783"``: ranks grouped by equal values, in rank order."""
    groups: list = []
    for rank, value in enumerate(values):
        for group in groups:
            if _equal(group[0], value):
                group[1].append(rank)
                break
        else:
            groups.append((value, [rank]))
    parts = []
    for value, ranks in groups:
        shown = repr(value)
        shown = shown if len(shown) <= 200 else shown[:197] + "..."
        parts.append(f"{'ranks' if len(ranks) > 1 else 'rank'} {', '.join(map(str, ranks))}: {shown}")
    return "; ".join(parts)


def _close(a, b, rtol) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if np.isnan(a).any() or np.isnan(b).any():
        return bool(np.array_equal(a, b, equal_nan=True))
    scale = np.maximum(np.abs([a[1], a[1], a[2], a[1]]), np.abs([b[1], b[1], b[2], b[1]]))
    return bool(np.all(np.abs(a - b) <= rtol * scale))


# -- one process ------------------------------------------------------------------------------------------------
class LocalCommunicator(Communicator):
    """The single-process group (size 1): every collective returns its input, so training code has one path."""

    def __init__(self, timeout=None):
        self.rank, self.size = 0, 1
        self.timeout = _timeout(timeout)

    def allreduce_(self, array):
        return array

    def broadcast_(self, array, root: int = 0):
        _check_root(root, 1)
        return array

    def allreduce_host(self, values, op: str = "sum") -> np.ndarray:
        _mpi_op_name(op)
        return _host_values(values).copy()

    def allgather_object(self, obj) -> list:
        return [obj]

    def broadcast_object(self, obj, root: int = 0):
        _check_root(root, 1)
        return obj

    def barrier(self) -> None:
        return None

    def abort(self, code: int = 1) -> None:
        """Raise ``SystemExit(code)``: in one process, unwinding (finally blocks, flushes) is safe."""
        raise SystemExit(code)


def _check_root(root, size):
    if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < size:
        raise ValueError(f"root must be a rank in 0..{size - 1}, got {root!r}")


def _mpi_op_name(op):
    if op not in ("sum", "max", "min"):
        raise ValueError(f"op must be 'sum', 'max' or 'min', got {op!r}")
    return op


def _host_values(values) -> np.ndarray:
    arr = np.array(values)  # a copy: reduced in place, the caller's array stays as it was
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"values must be host numbers (int or float), got dtype {arr.dtype}")
    return np.ascontiguousarray(arr)


# -- MPI ----------------------------------------------------------------------------------------------------------
_HOOKED: list = []  # the MPICommunicators whose rank aborts the job on an uncaught exception
_BROKEN: list = []  # communicators that timed out: abort at exit instead of waiting in MPI_Finalize


def _import_mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:  # also raised when mpi4py finds no MPI library
        raise ImportError(f"distributed='mpi' needs mpi4py and an MPI library ({exc}); {_MPI_HINT}") from exc
    return MPI


class MPICommunicator(Communicator):
    """Collectives over mpi4py (``comm``: default ``MPI.COMM_WORLD``), each nonblocking and polled to a deadline.

    ``timeout``: seconds a collective may wait for the other ranks (default ``PORTANET_DIST_TIMEOUT`` or 300).
    ``abort_on_error``: when there are other ranks, install a ``sys.excepthook`` that prints the traceback, then
    aborts the whole job.
    ``cuda_aware``: hand CUDA arrays (``__cuda_array_interface__``) to MPI directly; None asks
    ``MPI.Query_cuda_support()`` where mpi4py has it, else the environment variable ``PORTANET_MPI_CUDA_AWARE=1``.
    The MPICH wheels are not CUDA-aware.

    Where the data goes: NumPy buffers, torch CPU tensors and array-api-strict CPU arrays are handed to MPI in
    place (the latter two through a DLPack view, no copy). Arrays on other devices (CuPy, torch CUDA,
    array-api-strict "device1") are staged: one explicit download, the reduction on the host copy, one upload
    written back into the array (two copies of the buffer per call, plus a host allocation).
    """

    #: seconds a wait polls without sleeping (peers a little behind cost no latency), then sleeps this long per poll
    spin_seconds = 0.05
    poll_interval = 0.001
    abort_grace = 0.2

    def __init__(self, comm=None, timeout=None, abort_on_error: bool = True, cuda_aware=None):
        MPI = _import_mpi()
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = _timeout(timeout)
        self.cuda_aware = _cuda_aware(MPI) if cuda_aware is None else bool(cuda_aware)
        self._broken = None
        self._calls = 0
        if abort_on_error and self.size > 1:  # alone (or in a REPL) there is nobody to stop: keep the process alive
            _install_excepthook(self)

    # -- waiting --------------------------------------------------------------------------------------------------
    def _start(self, what):
        if self._broken is not None:
            raise DistributedError(f"rank {self.rank} of {self.size}: cannot run {_text(what)}: this communicator is "
                                   f"broken ({self._broken})")
        self._calls += 1

    def _wait(self, request, what):
        """Poll ``request`` until done; raise :class:`DistributedError` after ``timeout`` seconds or on an MPI error.

        ``what`` (a string, or a callable giving one: built only when needed) names the operation in the error.
        """
        start = time.monotonic()
        deadline, spin_until = start + self.timeout, start + self.spin_seconds
        try:
            while not request.Test():
                now = time.monotonic()
                if now >= deadline:
                    what = _text(what)
                    self._break(f"{what} (collective call {self._calls}) did not complete within {self.timeout:g} s")
                    raise DistributedError(
                        f"rank {self.rank} of {self.size}: {what} (collective call {self._calls}) did not complete "
                        f"within {self.timeout:g} s: another rank has stopped, hangs, or is in a different collective "
                        f"(timeout: {TIMEOUT_ENV} or timeout=). The job cannot continue.")
                if now > spin_until:
                    time.sleep(self.poll_interval)
        except self._MPI.Exception as exc:
            what = _text(what)
            self._break(f"{what} failed: {exc}")
            raise DistributedError(f"rank {self.rank} of {self.size}: {what} failed in MPI: {exc}") from exc

    def _break(self, reason):
        self._broken = reason
        if self not in _BROKEN:
            _BROKEN.append(self)

    def _op(self, op):
        return {"sum": self._MPI.SUM, "max": self._MPI.MAX, "min": self._MPI.MIN}[_mpi_op_name(op)]

    # -- device buffers ---------------------------------------------------------------------------------------
    def _direct(self, x):
        """``x`` itself or a zero-copy host view when MPI can use it in place; None when it must be staged."""
        view = _host_view(x)
        if view is not None:
            return view
        if self.cuda_aware and hasattr(x, "__cuda_array_interface__"):
            _device_of(x).synchronize()  # the kernels that wrote x are queued: MPI reads memory directly
            return x
        return None

    def allreduce_(self, array):
        def what():
            return f"allreduce_ of {_describe(array)} values"

        self._start(what)
        buf = self._direct(array)
        host = _to_host(array) if buf is None else buf
        self._wait(self.comm.Iallreduce(self._MPI.IN_PLACE, host, op=self._MPI.SUM), what)
        return array if buf is not None else _write_back(array, host)

    def broadcast_(self, array, root: int = 0):
        _check_root(root, self.size)
        what = f"broadcast_ of {_describe(array)} values from rank {root}"
        self.agree((tuple(array.shape), str(array.dtype).rsplit(".", 1)[-1]),
                   f"the shape and dtype of the array in {what}")
        self._start(what)
        buf = self._direct(array)
        host = _to_host(array) if buf is None else buf
        self._wait(self.comm.Ibcast(host, root=root), what)
        return array if buf is not None else _write_back(array, host)

    # -- host values ------------------------------------------------------------------------------------------
    def allreduce_host(self, values, op: str = "sum") -> np.ndarray:
        mpi_op = self._op(op)
        host = _host_values(values)
        what = f"allreduce_host({op}) of {host.size} values"
        self._start(what)
        self._wait(self.comm.Iallreduce(self._MPI.IN_PLACE, host, op=mpi_op), what)
        return host

    def allgather_object(self, obj) -> list:
        data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
        sizes = np.zeros(self.size, dtype=np.int64)
        what = f"allgather_object of a {type(obj).__name__}"
        self._start(what)
        self._wait(self.comm.Iallgather(np.array([data.size], dtype=np.int64), sizes), what + " (sizes)")
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        gathered = np.empty(int(sizes.sum()), dtype=np.uint8)
        self._start(what)
        self._wait(self.comm.Iallgatherv(data, [gathered, (sizes, offsets), self._MPI.BYTE]), what)
        return [pickle.loads(gathered[o:o + s].tobytes()) for o, s in zip(offsets, sizes)]

    def broadcast_object(self, obj, root: int = 0):
        _check_root(root, self.size)
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if self.rank == root else b""
        size = np.array([len(data)], dtype=np.int64)
        what = f"broadcast_object from rank {root}"
        self._start(what)
        self._wait(self.comm.Ibcast(size, root=root), what + " (size)")
        buf = np.frombuffer(bytearray(data), dtype=np.uint8) if self.rank == root else np.empty(int(size[0]), np.uint8)
        self._start(what)
        self._wait(self.comm.Ibcast(buf, root=root), what)
        return obj if self.rank == root else pickle.loads(buf.tobytes())

    def barrier(self) -> None:
        self._start("barrier")
        self._wait(self.comm.Ibarrier(), "barrier")

    def abort(self, code: int = 1) -> None:
        """Flush this rank's output, then ``MPI_Abort``: ``mpiexec`` kills every rank and exits with ``code``.

        Waits ``abort_grace`` seconds first so ``mpiexec`` forwards what this rank printed (it stops forwarding
        once it kills the job). MPICH's ``MPI_Abort`` may return before ``mpiexec`` kills this process: it then
        ends with ``os._exit(code)``, skipping ``MPI_Finalize`` (which would wait for the dead ranks).
        """
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed stream must not keep the job alive
                pass
        time.sleep(self.abort_grace)
        self.comm.Abort(code)
        os._exit(code)

    def close(self) -> None:
        """Stop aborting the job on this rank's uncaught exceptions (the excepthook goes back as it was)."""
        if self in _HOOKED:
            _HOOKED.remove(self)
        if not _HOOKED and getattr(sys.excepthook, "_portanet_previous", None) is not None:
            sys.excepthook = sys.excepthook._portanet_previous


def _cuda_aware(MPI) -> bool:
    raw = os.environ.get(CUDA_AWARE_ENV)
    if raw is not None:
        return raw.strip().lower() in ("1", "true", "yes")
    query = getattr(MPI, "Query_cuda_support", None)
    try:
        return bool(query()) if query is not None else False
    except Exception:  # noqa: BLE001 - an MPI without the MPIX extension: not CUDA-aware as far as we know
        return False


def _install_excepthook(comm: MPICommunicator):
    if comm not in _HOOKED:
        _HOOKED.append(comm)
    if getattr(sys.excepthook, "_portanet_previous", None) is not None:
        return
    previous = sys.excepthook

    def abort_on_uncaught(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        if _HOOKED:
            first = _HOOKED[0]
            sys.stderr.write(f"portanet.distributed: uncaught {exc_type.__name__} on rank {first.rank} of "
                             f"{first.size}; calling MPI_Abort so the other ranks stop instead of waiting\n")
            first.abort(1)

    abort_on_uncaught._portanet_previous = previous
    sys.excepthook = abort_on_uncaught


@atexit.register
def _abort_if_broken():
    """Registered before mpi4py's finaliser runs (it is a C-level exit hook): a broken job must not wait there."""
    if _BROKEN:
        comm = _BROKEN[0]
        sys.stderr.write(f"portanet.distributed: rank {comm.rank} exits with a broken communicator "
                         f"({comm._broken}); calling MPI_Abort instead of MPI_Finalize\n")
        comm.abort(1)


# -- NCCL (CuPy) --------------------------------------------------------------------------------------------------
class NCCLCommunicator(Communicator):
    """All-reduce and broadcast of CuPy arrays over NCCL; host values, objects and barriers go over MPI.

    UNVERIFIED: written against ``cupy.cuda.nccl`` (``NcclCommunicator``, ``allReduce``, ``bcast``, ``abort``,
    ``check_async_error``) but not yet run on a GPU. One process per GPU; the NCCL unique id is broadcast over MPI.
    ``device``: the CUDA device index for this rank (default: the rank within its node, modulo the GPU count).
    Each device collective is queued on CuPy's current stream, then waited for with the same deadline as MPI
    (one host synchronisation per call; NCCL errors and timeouts abort the NCCL communicator and raise
    :class:`DistributedError`). ``ncclCommInitRank`` itself cannot time out: a barrier with a deadline runs first.
    """

    def __init__(self, comm=None, timeout=None, device=None, abort_on_error: bool = True):
        try:  # before MPI starts: a machine without CuPy fails here, having initialised nothing
            import cupy
            from cupy.cuda import nccl
        except ImportError as exc:
            raise ImportError(f"distributed='nccl' needs CuPy with NCCL ({exc}); install portanet[cuda12] or "
                              "portanet[cuda13] and NCCL, or use distributed='mpi'") from exc
        if not getattr(nccl, "available", False):
            raise ImportError("distributed='nccl': this CuPy was built without NCCL; use distributed='mpi'")
        self._cupy, self._nccl_mod = cupy, nccl
        self._mpi = MPICommunicator(comm, timeout, abort_on_error=abort_on_error)
        self.rank, self.size, self.timeout = self._mpi.rank, self._mpi.size, self._mpi.timeout
        if device is None:
            local = self._mpi.comm.Split_type(self._mpi._MPI.COMM_TYPE_SHARED)
            device = local.Get_rank() % cupy.cuda.runtime.getDeviceCount()
            local.Free()
        self.device = int(device)
        uid = self._mpi.broadcast_object(nccl.get_unique_id() if self.rank == 0 else None)
        self._mpi.barrier()
        with cupy.cuda.Device(self.device):
            self._nccl = nccl.NcclCommunicator(self.size, uid, self.rank)

    def check_device(self, device) -> None:
        if not array_api_compat.is_cupy_namespace(device.xp):
            raise ValueError(f"distributed='nccl' reduces CuPy arrays on the GPU, but the model is on {device.name}: "
                             f"use distributed='mpi', or a model on device='cuda:{self.device}'")

    def _buffer(self, array, what):
        if type(array).__module__.split(".")[0] != "cupy":
            raise TypeError(f"NCCLCommunicator.{what} takes CuPy arrays, got {type(array).__name__}; "
                            "use distributed='mpi' for other backends")
        if array.device.id != self.device:
            raise ValueError(f"NCCLCommunicator.{what}: the array is on cuda:{array.device.id} but this rank's NCCL "
                             f"communicator is on cuda:{self.device}")
        if not array.flags.c_contiguous:
            raise ValueError(f"NCCLCommunicator.{what} needs a contiguous array")
        nccl = self._nccl_mod
        types = {"float16": nccl.NCCL_FLOAT16, "float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64,
                 "int32": nccl.NCCL_INT32, "int64": nccl.NCCL_INT64}
        if array.dtype.name not in types:
            raise TypeError(f"NCCLCommunicator.{what}: unsupported dtype {array.dtype} (one of {sorted(types)})")
        return types[array.dtype.name]

    def _wait_stream(self, stream, what):
        event = stream.record()
        start = time.monotonic()
        while not event.done:
            try:
                self._nccl.check_async_error()
            except Exception as exc:  # noqa: BLE001 - NcclError: report it as a failed collective
                self._nccl.abort()
                raise DistributedError(f"rank {self.rank} of {self.size}: {what} failed in NCCL: {exc}") from exc
            if time.monotonic() - start > self.timeout:
                self._nccl.abort()
                self._mpi._break(f"{what} did not complete within {self.timeout:g} s")
                raise DistributedError(f"rank {self.rank} of {self.size}: {what} did not complete within "
                                       f"{self.timeout:g} s (NCCL communicator aborted)")
            time.sleep(self._mpi.poll_interval)

    def allreduce_(self, array):
        dtype = self._buffer(array, "allreduce_")
        with self._cupy.cuda.Device(self.device):
            stream = self._cupy.cuda.get_current_stream()
            self._nccl.allReduce(array.data.ptr, array.data.ptr, array.size, dtype, self._nccl_mod.NCCL_SUM, stream.ptr)
            self._wait_stream(stream, f"allreduce_ of {_describe(array)} values")
        return array

    def broadcast_(self, array, root: int = 0):
        _check_root(root, self.size)
        self.agree((tuple(array.shape), str(array.dtype)), "the shape and dtype of the array in broadcast_")
        dtype = self._buffer(array, "broadcast_")
        with self._cupy.cuda.Device(self.device):
            stream = self._cupy.cuda.get_current_stream()
            self._nccl.bcast(array.data.ptr, array.size, dtype, root, stream.ptr)
            self._wait_stream(stream, f"broadcast_ of {_describe(array)} values from rank {root}")
        return array

    def allreduce_host(self, values, op: str = "sum") -> np.ndarray:
        return self._mpi.allreduce_host(values, op)

    def allgather_object(self, obj) -> list:
        return self._mpi.allgather_object(obj)

    def broadcast_object(self, obj, root: int = 0):
        return self._mpi.broadcast_object(obj, root)

    def barrier(self) -> None:
        self._mpi.barrier()

    def abort(self, code: int = 1) -> None:
        self._mpi.abort(code)

    def close(self) -> None:
        self._nccl.destroy()
        self._mpi.close()


_SHARED: dict = {}  # ("mpi" | "nccl", options) -> the communicator made for them (one per process)


def get_communicator(spec=None, **options) -> Communicator:
    """The communicator ``fit(distributed=spec)`` uses.

    ``spec``: None or "local" (one process), "mpi" (:class:`MPICommunicator`; size 1 when started without
    ``mpiexec``), "nccl" (:class:`NCCLCommunicator`), or a :class:`Communicator`, returned as it is.
    ``options`` go to the constructor (``timeout=``, ...). "mpi" and "nccl" make one communicator per process for
    each set of options and return it again on later calls (``fit`` and ``evaluate`` share it; an NCCL communicator
    is costly to set up); one that timed out stays broken (its collectives raise :class:`DistributedError`).
    The name alone (what ``fit(distributed="mpi")`` asks for) returns the first communicator made for that name, with
    whatever options: ``get_communicator("mpi", timeout=60)`` before ``fit(..., distributed="mpi")`` sets fit's
    timeout.
    """
    if isinstance(spec, Communicator):
        if options:
            raise TypeError(f"options {sorted(options)} apply only when distributed is a name, not a Communicator")
        return spec
    name = spec.lower() if isinstance(spec, str) else spec
    if name is None or name == "local":
        return LocalCommunicator(**options)
    if name not in ("mpi", "nccl"):
        raise ValueError(f"distributed must be None, 'local', 'mpi', 'nccl' or a Communicator, got {spec!r}")
    try:
        key = (name, tuple(sorted(options.items())))
        hash(key)
    except TypeError:  # an unhashable option (an MPI communicator object may be): a new communicator each time
        key = None
    if not options:  # the name alone: this process's communicator for it, whichever options made it first
        key = next((k for k in _SHARED if k[0] == name), key)
    if key not in _SHARED:
        comm = MPICommunicator(**options) if name == "mpi" else NCCLCommunicator(**options)
        if key is None:
            return comm
        _SHARED[key] = comm
    return _SHARED[key]


def derive_seed(*keys) -> int:
    """A seed in ``[0, 2**62)`` from ``keys`` (ints, strings, JSON-able values such as a generator's state), the same
    on every rank and in every run: ``derive_seed(base, epoch, rank)`` gives each rank its own dropout stream per
    epoch, reproducible from ``base``. BLAKE2 of the keys' JSON."""
    text = json.dumps(keys, sort_keys=True, default=repr, separators=(",", ":"))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 2


# -- sharding: host index math ------------------------------------------------------------------------------------
class Shard(NamedTuple):
    """This rank's part of one global batch.

    ``rows``: int64 indices into the data set (a contiguous piece of the global batch, maybe empty);
    ``global_rows``: rows in the whole global batch; ``weight``: ``len(rows) / global_rows``, the factor for this
    rank's mean gradient so that the sum over ranks is the mean gradient over the global batch.
    """

    rows: np.ndarray
    global_rows: int
    weight: float


def split_rows(n: int, rank: int, size: int) -> tuple:
    """``(start, stop)`` of ``rank``'s contiguous part of ``n`` rows split over ``size`` ranks.

    The first ``n % size`` ranks take ``n // size + 1`` rows, the others ``n // size`` (as ``numpy.array_split``):
    part sizes differ by at most one, and ranks past ``n`` get an empty part.
    """
    _check_rank(rank, size)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    base, extra = divmod(int(n), size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _check_rank(rank, size):
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < size:
        raise ValueError(f"rank must be in 0..{size - 1}, got {rank!r}")


def shard_batches(n: int, batch_size: int, rank: int, size: int, *, seed=None, shuffle: bool = True,
                  drop_last: bool = False, order=None) -> list:
    """One epoch of :class:`Shard` s for ``rank``: the same steps on every rank, each a piece of one global batch.

    The epoch's order is ``order`` (a permutation of ``range(n)``, identical on every rank), else
    ``numpy.random.default_rng(seed).permutation(n)`` when ``shuffle`` (``seed`` is required: every rank must draw
    the same permutation, so derive it from a seed broadcast from rank 0 and the epoch number), else ``0..n-1``.
    Global batches are consecutive ``batch_size`` slices of that order, as in a single process; each is split over
    the ranks by :func:`split_rows`.

    The last global batch may be short (``n % batch_size`` rows; dropped with ``drop_last``). Every rank still
    takes part in that step, possibly with zero rows and weight 0: it must contribute a zero gradient (not the NaN
    mean of an empty batch) to the all-reduce. Raises ValueError when ``batch_size < size`` (ranks idle every step).
    """
    _check_rank(rank, size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size < size:
        raise ValueError(f"batch_size (the global batch) must be at least the number of ranks {size}, got {batch_size}")
    if order is not None:
        order = np.asarray(order)
        if order.shape != (n,) or order.dtype.kind not in "iu":
            raise ValueError(f"order must be a permutation of range({n}) (an int array of shape ({n},)), "
                             f"got {order.dtype} array of shape {order.shape}")
    elif shuffle:
        if seed is None:
            raise ValueError("shuffle=True needs a seed shared by all ranks (e.g. comm.broadcast_object(seed)), "
                             "got seed=None")
        order = np.random.default_rng(seed).permutation(n)
    else:
        order = np.arange(n)
    stop = n - n % batch_size if drop_last else n
    shards = []
    for begin in range(0, stop, batch_size):
        batch = order[begin:min(begin + batch_size, stop)]
        lo, hi = split_rows(len(batch), rank, size)
        shards.append(Shard(batch[lo:hi].astype(np.int64), len(batch), (hi - lo) / len(batch)))
    return shards


def shard_iterable(batches, rank: int, size: int, *, weights: bool = False):
    """Every ``size``-th batch of an iterable, starting at ``rank``: rank r takes batches r, r + size, r + 2 size, ...

    Each rank reads the whole stream (and skips what is not its own), in rounds of ``size`` batches; a last,
    incomplete round is dropped on every rank, so all ranks run the same number of steps (a rank that ran one step
    more would wait for the others until the timeout). Caveats: all ranks must see the same stream (same batches,
    same order, same length: seed any shuffling identically); a step's global batch is ``size`` stream batches, not
    one (unlike :func:`shard_batches`), so the effective batch size grows with the number of ranks; reading costs
    ``size`` times the work of one rank's share unless the source can skip cheaply.

    ``weights=True`` yields ``(batch, weight)``: this batch's rows over the round's rows, the factor for its mean
    gradient (``1 / size`` when the round's batches are equally long). Rows are counted on the first element of a
    tuple batch, else on the batch itself.
    """
    _check_rank(rank, size)  # here, not at the first next(): a generator would report it late
    return _rounds(iter(batches), rank, size, weights)


def _rounds(batches, rank, size, weights):
    round_ = []
    for batch in batches:
        round_.append(batch)
        if len(round_) < size:
            continue
        mine = round_[rank]
        if weights:
            rows = [_rows(b) for b in round_]
            yield mine, rows[rank] / max(sum(rows), 1)
        else:
            yield mine
        round_ = []


def _rows(batch) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0])
