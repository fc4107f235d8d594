"""CuPy: CUDA devices, CuPy's fused kernels (off unless PORTANET_CUPY_KERNELS=1), and double-buffered uploads of host
batches through pinned memory on a side stream. cupy is imported only when a CUDA device is resolved or used.
"""

from __future__ import annotations

import importlib
import os
import warnings

import array_api_compat
import numpy as np

from .base import Device, RandomSource, cuda_index, dtype_name, exporting, on_cuda
from .numpy import Kernels

__all__ = ["CupyDevice", "CupyKernels", "CupyRandomSource", "prefetch_uploads", "KERNELS_ENV"]

KERNELS_ENV = "PORTANET_CUPY_KERNELS"  # "1": use CupyKernels (not yet verified on a GPU); else the portable path
_HINT = ': install it with pip install "portanet[cuda12]" (CUDA 12) or "portanet[cuda13]" (CUDA 13)'


def _cupy():
    try:
        return importlib.import_module("cupy")
    except ImportError as exc:
        raise ImportError(f"backend 'cupy' is not installed{_HINT}") from exc


class CupyKernels(Kernels):
    """The NumPy kernels over CuPy, with ReLU backward and the Adam update each one fused elementwise kernel."""

    def __init__(self, cp):
        super().__init__(cp)
        self._relu_grad = cp.ElementwiseKernel("T grad, T a", "T out", "out = a > (T)0 ? grad : (T)0",
                                               "portanet_relu_grad")
        self._adam_kernel = cp.ElementwiseKernel(
            "T grad, T one_minus_b1, T one_minus_b2, T step_size, T inv_sqrt_bc2, T eps", "T param, T m, T v",
            "m += one_minus_b1 * (grad - m); v += one_minus_b2 * (grad * grad - v);"
            " param -= step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps);",
            "portanet_adam")

    def relu_(self, z):
        return self.mod.maximum(z, 0.0, out=z)  # one kernel on the GPU; a cached zero row would pin a device

    def _row_max(self, z):
        return z.max(axis=1)  # one kernel; cupy.maximum.reduce is not implemented (only add and multiply are)

    def _row_sum(self, z):
        return z.sum(axis=1)

    def relu_grad(self, grad, a):
        return self._relu_grad(grad, a)

    def adam(self, params, grads, m, v, beta_1, beta_2, step_size, inv_sqrt_bc2, epsilon, scratch=None):
        self._adam_kernel(grads, 1.0 - beta_1, 1.0 - beta_2, step_size, inv_sqrt_bc2, epsilon, params, m, v)
        return None


_KERNELS = []  # [CupyKernels], made on first use


class CupyDevice(Device):
    """A CUDA device through CuPy ("cuda", "cuda:N", a ``cupy.cuda.Device``), made current for every model method."""

    library = "cupy"
    aliases = ("cp",)
    serves = ("cuda",)
    default_device = "cuda"

    @classmethod
    def resolve(cls, device, namespace=None):
        index = cuda_index(device)
        cp = _cupy()
        try:
            count = cp.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CUDARuntimeError when no driver or device
            raise RuntimeError(f"device='cuda:{index}' was requested but no CUDA device is visible ({exc})") from exc
        if count == 0:
            raise RuntimeError(f"device='cuda:{index}' was requested but no CUDA device is visible")
        if not 0 <= index < count:
            raise ValueError(f"device index {index} is out of range: {count} CUDA device(s) visible "
                             f"(cuda:0..cuda:{count - 1})")
        dev = cp.cuda.Device(index)
        with dev:
            xp = array_api_compat.array_namespace(cp.empty(0))
        return cls(xp, dev, f"cuda:{index}")

    @classmethod
    def array_to_numpy(cls, x):
        return x.get()

    @classmethod
    def take_rows(cls, a, rows):
        xp = array_api_compat.array_namespace(a)
        with a.device:  # cupy.asarray of host rows: staged in pinned memory, copied without waiting for the device
            return xp.take(a, xp.asarray(rows), axis=0)

    @classmethod
    def array_scope(cls, x):
        return x.device

    def scope(self):
        return self.device

    def _holds(self, x):
        return x.device.id == self.device.id

    def _from_sibling(self, x):
        # CuPy copies between GPUs on the destination's current stream and orders nothing on the source: the copy
        # waits for the work queued on the source, and the source's later work (which may reuse x's memory once it
        # is freed) waits for the copy. No host synchronisation.
        cp = _cupy()
        with x.device:
            x = cp.ascontiguousarray(x)  # a non-contiguous x would be compacted on the source after the event
            source = cp.cuda.get_current_stream()
            written = _event(cp, source)
        with self.device:
            target = cp.cuda.get_current_stream()
            target.wait_event(written)
            out = self.xp.asarray(x)
            copied = _event(cp, target)
        with x.device:
            source.wait_event(copied)
        return out

    def _from_foreign(self, x, dtype):
        if on_cuda(x):  # CUDA to CUDA (torch, ...) through DLPack, not the host; CuPy passes its stream to x's
            with exporting(x) as exported:
                imported = self.xp.from_dlpack(exported)  # on x's device
            return self.asarray(imported, dtype)
        return super()._from_foreign(x, dtype)

    def _duplicate(self, a):
        with self.device:
            return a.copy()

    def _upload(self, host):
        with self.device:
            return self.xp.asarray(host)

    def synchronize(self):
        self.device.synchronize()

    def random_source(self, seed):
        return CupyRandomSource(self, seed)

    def upload_batches(self, parts, dtypes, prefetch=None):
        """As :meth:`Device.upload_batches`; unless ``prefetch`` is False, host batch i+1 is copied into pinned
        buffers and uploaded on a side stream while batch i computes (:func:`prefetch_uploads`)."""
        if prefetch is False:
            return super().upload_batches(parts, dtypes, prefetch)
        return prefetch_uploads(self, parts, dtypes)

    def _make_kernels(self):
        if os.environ.get(KERNELS_ENV) != "1":
            return None
        if not _KERNELS:
            _KERNELS.append(CupyKernels(_cupy()))
        return _KERNELS[0]


class CupyRandomSource(RandomSource):
    """Draws on the CUDA device from ``cupy.random.default_rng`` (XORWOW over cuRAND), created and always drawn
    from on this device. Its state cannot be exported: CuPy keeps one cuRAND state per thread in device memory and
    has no public API to read or set it, so ``get_state()`` is None and a restored model's dropout stream restarts
    from the seed."""

    def __init__(self, device, seed):
        super().__init__(device, seed)
        with device.device:
            self._gen = _cupy().random.default_rng(self.seed)

    def uniform(self, shape, dtype):
        with self.device.device:
            return self._gen.random(shape, dtype=dtype_name(dtype))


def _event(cp, stream):
    """An event recorded on ``stream`` now (no timing: cheaper to record and wait on); call on its device."""
    return stream.record(cp.cuda.Event(disable_timing=True))


# -- prefetch: CUDA-only data movement; nothing here does math --------------------------------------------------
class _Slot:
    """One half of the double buffer: per-array pinned host and device staging buffers, and the events guarding them."""

    def __init__(self):
        self.pinned, self.staged = {}, {}
        self.uploaded = None  # side-stream event: this slot's host-to-device copies are done
        self.released = None  # compute-stream event: this slot's staged arrays have been copied out
        self.batch = ()       # per array: (array, staged?) with staged arrays on the device, others moved later


def prefetch_uploads(device, parts, dtypes):
    """Yield each tuple of ``parts`` on the CuPy ``device``; reading and uploading batch i+1 overlaps batch i.

    Host arrays are cast into one of two pinned buffers (allocated once, grown when a batch is larger) and copied
    to a device staging buffer on a non-blocking side stream. The compute stream waits for that copy on an event,
    then copies the batch out of the staging buffer, so the caller owns what it gets. Arrays of other libraries or
    devices are moved with ``device.asarray``. Where pinned memory cannot be had, a warning says so and those
    batches are uploaded plainly.
    """
    import cupy as cp
    import cupyx

    with device.scope():
        side = cp.cuda.Stream(non_blocking=True)
    slots = (_Slot(), _Slot())
    it = iter(parts)
    part = next(it, None)
    i = 0
    try:
        while part is not None:
            with device.scope():
                if i == 0:
                    _stage(cp, cupyx, side, slots[0], part, dtypes)
                batch = _hand_out(cp, device, slots[i % 2], dtypes)
            yield batch  # the caller queues its work on batch i before asking for the next one
            part = next(it, None)
            i += 1
            if part is not None:
                with device.scope():
                    _stage(cp, cupyx, side, slots[i % 2], part, dtypes)
    finally:
        side.synchronize()  # no copy may still read a pinned buffer once they can be freed


def _stage(cp, cupyx, side, slot, part, dtypes):
    """Start uploading ``part`` into ``slot`` on the side stream; returns once it is copied into pinned memory."""
    if slot.uploaded is not None:
        slot.uploaded.synchronize()  # the pinned buffers' previous upload has finished: safe to overwrite
    if slot.released is not None:
        side.wait_event(slot.released)  # the staging buffers were copied out: safe to overwrite
    buffers = [_buffers(cp, cupyx, slot, k, a, dt) if isinstance(a, np.ndarray) else None
               for k, (a, dt) in enumerate(zip(part, dtypes))]
    if any(b is not None and b[2] for b in buffers):
        # fresh device memory may have been freed by work still queued on the compute stream
        side.wait_event(_event(cp, cp.cuda.get_current_stream()))
    batch = []
    for a, b in zip(part, buffers):
        if b is None or b[0] is None:
            batch.append((a, False))
            continue
        n = a.shape[0]
        pinned, staged = b[0][:n], b[1][:n]
        np.copyto(pinned, a, casting="unsafe")
        staged.set(pinned, stream=side)
        batch.append((staged, True))
    slot.uploaded = _event(cp, side)
    slot.batch = tuple(batch)


def _buffers(cp, cupyx, slot, k, a, dtype):
    """``(pinned, staged, fresh)`` buffers for array ``k`` of ``slot``, grown to fit ``a``; Nones without pinning."""
    dt = np.dtype(dtype_name(dtype))
    if k in slot.pinned and slot.pinned[k] is None:
        return None, None, False
    have = slot.pinned.get(k)
    if have is not None and have.dtype == dt and have.shape[1:] == a.shape[1:] and have.shape[0] >= a.shape[0]:
        return have, slot.staged[k], False
    try:
        pinned = cupyx.empty_pinned(a.shape, dt)
    except Exception as exc:  # noqa: BLE001 - pinned memory is a resource, not a correctness requirement
        warnings.warn(f"pinned host memory is unavailable ({exc}); uploading batches without prefetch", RuntimeWarning)
        slot.pinned[k] = None
        return None, None, False
    slot.pinned[k], slot.staged[k] = pinned, cp.empty(a.shape, dt)
    return pinned, slot.staged[k], True


def _hand_out(cp, device, slot, dtypes):
    """The slot's batch as arrays the caller owns, ordered after its upload on the compute stream."""
    stream = cp.cuda.get_current_stream()
    stream.wait_event(slot.uploaded)
    out = tuple(None if a is None else a.copy() if staged else device.asarray(a, dt)
                for (a, staged), dt in zip(slot.batch, dtypes))
    slot.released = _event(cp, stream)
    return out
