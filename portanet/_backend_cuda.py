"""CUDA-only data movement: double-buffered uploads of host batches through pinned memory on a side stream.

Used by :meth:`portanet._backend.Device.upload_batches` for CuPy devices; nothing here does math.
"""

from __future__ import annotations

import warnings

import numpy as np

from ._backend import dtype_name

__all__ = ["prefetch_uploads"]


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
        side.wait_event(cp.cuda.get_current_stream().record())
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
    slot.uploaded = side.record()
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
    slot.released = stream.record()
    return out
