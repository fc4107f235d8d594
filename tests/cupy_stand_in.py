"""Stand-ins for CuPy, written from its source (v13.6 and v14.2: cupy/_core/_kernel.pyx, core.pyx, cuda/stream.pyx),
so that CuPy-only code runs on machines without a GPU (tests/test_cupy_stand_in.py, tests/test_gpu_check.py).

- :class:`NumpyAsCupy`: NumPy plus ``ElementwiseKernel`` (bodies executed with NumPy the way CuPy binds them: ``T``
  from the array arguments, Python scalars cast to ``T``) and a ``maximum`` that cannot ``reduce`` (CuPy 13/14).
- :class:`SimulatedGPU`: streams, events, device and pinned memory, where queued work runs as late as the events
  allow, or (the compute stream) at once.
"""

from __future__ import annotations

import re
import types

import numpy as np


# -- ElementwiseKernel, run with NumPy ---------------------------------------------------------------------------
class ElementwiseKernel:
    """``cupy.ElementwiseKernel`` for the simple bodies CupyKernels uses: one type parameter ``T`` bound from the
    array arguments (all must agree, else TypeError, as in CuPy), scalars cast to ``T``, output arrays written in
    place (CuPy binds them as ``T &name``), missing outputs allocated."""

    def __init__(self, in_params, out_params, operation, name):
        self.ins = [p.split()[-1] for p in in_params.split(",")]
        self.outs = [p.split()[-1] for p in out_params.split(",")]
        self.statements = [s.strip() for s in operation.split(";") if s.strip()]
        self.name = name

    def __call__(self, *args):
        if len(args) not in (len(self.ins), len(self.ins) + len(self.outs)):
            raise TypeError(f"{self.name}: wrong number of arguments")
        arrays = [a for a in args if isinstance(a, np.ndarray)]
        dtypes = {a.dtype for a in arrays}
        if len(dtypes) != 1:
            raise TypeError(f"{self.name}: type is mismatched: {dtypes}")
        t = dtypes.pop().type
        shape = np.broadcast_shapes(*(a.shape for a in arrays))
        env = {name: (a if isinstance(a, np.ndarray) else t(a)) for name, a in zip(self.ins, args)}
        outs = list(args[len(self.ins):]) or [np.empty(shape, t) for _ in self.outs]
        env.update(zip(self.outs, outs))
        env.update(T=t, sqrt=np.sqrt, where=np.where)
        for statement in self.statements:
            exec(_python(statement, self.outs), {}, env)  # noqa: S102 - our own kernel strings only
        return outs[0] if len(outs) == 1 else tuple(outs)


def _python(statement, outs):
    """One C statement of a kernel body as NumPy: ``(T)x`` casts, ``c ? a : b``, plain assignments in place."""
    statement = re.sub(r"\(T\)\s*([\w.]+)", r"T(\1)", statement)
    target, op, expr = re.match(r"(\w+)\s*([-+*/]?=)\s*(.+)", statement).groups()
    ternary = re.match(r"(.+?)\?(.+?):(.+)", expr)
    if ternary:
        expr = "where({}, {}, {})".format(*(part.strip() for part in ternary.groups()))
    if op == "=" and target in outs:
        return f"{target}[...] = {expr}"
    return f"{target} {op} {expr}"


class NumpyAsCupy:
    """NumPy with CuPy's ElementwiseKernel and its ``maximum`` that cannot ``reduce`` (CuPy 13/14)."""

    ElementwiseKernel = ElementwiseKernel

    class _Maximum:
        def __call__(self, *args, **kwargs):
            return np.maximum(*args, **kwargs)

        def reduce(self, *args, **kwargs):
            raise NotImplementedError("cupy.maximum.reduce")

    maximum = _Maximum()

    def __getattr__(self, name):
        return getattr(np, name)


# -- streams, events and memory of a simulated GPU ---------------------------------------------------------------
class _Event:
    def __init__(self, disable_timing=False):
        self.stream, self.position = None, 0

    @property
    def done(self):
        return self.stream is None or self.stream.ran >= self.position

    def synchronize(self):
        if self.stream is not None:
            self.stream.run_to(self.position)


class _Stream:
    """A FIFO of device work that runs only when waited for (an ``eager`` stream: as soon as it is queued); a queued
    wait for an event pulls in the other stream's work up to that event."""

    def __init__(self, gpu, name, eager=False):
        self.gpu, self.name, self.queue, self.ran, self.eager = gpu, name, [], 0, eager

    def enqueue(self, work):
        self.queue.append(work)
        if self.eager:
            self.synchronize()

    def record(self, event=None):
        event = event or _Event()
        event.stream, event.position = self, len(self.queue)
        return event

    def wait_event(self, event):
        self.enqueue(event)

    def run_to(self, position):
        while self.ran < position:
            work = self.queue[self.ran]
            if isinstance(work, _Event):
                work.synchronize()
            else:
                work()
            self.ran += 1

    def synchronize(self):
        self.run_to(len(self.queue))


class _DeviceArray:
    """Device memory as a NumPy array that only queued stream work reads or writes."""

    def __init__(self, gpu, data):
        self.gpu, self.data = gpu, data
        self.shape, self.dtype = data.shape, data.dtype

    def __getitem__(self, index):
        return _DeviceArray(self.gpu, self.data[index])

    def set(self, host, stream=None):  # cudaMemcpyAsync: reads the pinned buffer when the copy runs, not now
        stream = stream or self.gpu.current
        stream.enqueue(lambda: np.copyto(self.data, host))

    def copy(self):
        out = self.gpu.empty(self.shape, self.dtype)
        self.gpu.current.enqueue(lambda: np.copyto(out.data, self.data))
        return out


class SimulatedGPU:
    """Just enough of ``cupy`` and ``cupyx`` for :func:`prefetch_uploads`. ``order``: "lazy" (nothing runs until
    waited for; when the host finally waits for everything, the side stream's uploads go first, overtaking the
    compute stream's copies) or "compute-eager" (the compute stream runs each piece of work as it is queued, the
    side stream's uploads as late as they can)."""

    def __init__(self, order):
        self.streams = []
        self.current = self._stream("compute", eager=order == "compute-eager")
        self.pinned_allocations = 0
        self.cuda = types.SimpleNamespace(Stream=lambda non_blocking=False: self._stream("side"), Event=_Event,
                                          get_current_stream=lambda: self.current)

    def _stream(self, name, eager=False):
        stream = _Stream(self, name, eager)
        self.streams.append(stream)
        return stream

    def empty(self, shape, dtype):
        dtype = np.dtype(dtype)
        poison = np.nan if dtype.kind == "f" else -12345
        return _DeviceArray(self, np.full(shape, poison, dtype))

    def empty_pinned(self, shape, dtype):
        self.pinned_allocations += 1
        return np.empty(shape, dtype)

    def finish(self):
        for stream in sorted(self.streams, key=lambda s: s.name != "side"):
            stream.synchronize()
