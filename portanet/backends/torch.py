"""PyTorch: CPU and CUDA torch devices. Inputs are detached from autograd and model code runs under ``no_grad``, so
a tensor that requires grad never reaches (or leaks out of) the math; dropout draws from a ``torch.Generator``.

torch is imported only when a torch device is resolved or a torch tensor is handled.
"""

from __future__ import annotations

import base64
import importlib
import warnings

import array_api_compat
import numpy as np

from .base import DEVICE_FORMS, Device, RandomSource, check_state, exporting, on_cuda

__all__ = ["TorchDevice", "TorchRandomSource"]


def _torch():
    try:
        return importlib.import_module("torch")
    except ImportError as exc:
        raise ImportError('backend \'torch\' is not installed: install it with pip install "portanet[torch]"') from exc


class TorchDevice(Device):
    """A ``torch.device`` ("cpu", "cuda:N"); arrays are tensors, never tracking gradients."""

    library = "torch"
    aliases = ("pytorch",)
    reads_device_strings = True

    @classmethod
    def resolve(cls, device, namespace=None):
        torch = _torch()
        try:
            dev = torch.device(device) if isinstance(device, (str, torch.device)) else torch.device("cuda", int(device))
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"unknown torch device {device!r}; {DEVICE_FORMS}") from exc
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"device={device!r} was requested but torch sees no CUDA device")
            index = dev.index or 0
            if index >= torch.cuda.device_count():
                raise ValueError(f"device index {index} is out of range: {torch.cuda.device_count()} CUDA device(s) "
                                 "visible")
            dev = torch.device("cuda", index)
        return cls(array_api_compat.array_namespace(torch.empty(0)), dev, str(dev))

    @classmethod
    def array_to_numpy(cls, x):
        return x.detach().cpu().numpy()

    @classmethod
    def take_rows(cls, a, rows):
        a = a.detach()
        if a.device.type != "cuda":
            return super().take_rows(a, rows)
        # The rows go up from pinned memory with non_blocking=True: queued, nothing waits for the device (a pageable
        # upload would synchronise the stream every batch). torch's caching host allocator records the copy on the
        # pinned block, so it is reused only once the copy is done.
        torch = _torch()
        try:
            index = torch.empty(len(rows), dtype=torch.int64, pin_memory=True)
        except RuntimeError:  # no pinned memory to be had: the plain (synchronising) upload
            return super().take_rows(a, rows)
        index.numpy()[...] = rows
        return torch.index_select(a, 0, index.to(a.device, non_blocking=True))

    @classmethod
    def released(cls, x):
        return x.detach()

    @property
    def host_memory(self):
        return self.device.type == "cpu"

    def scope(self):
        return _torch().no_grad()

    def _holds(self, x):
        return x.device == self.device or str(x.device) == str(self.device)

    def _adopt(self, x):
        return x.detach() if x.requires_grad else x  # the same memory, without autograd

    def _from_sibling(self, x):
        return x.detach().to(self.device)

    def _from_foreign(self, x, dtype):
        if not self.host_memory and on_cuda(x):  # CUDA to CUDA (CuPy, ...) through DLPack, not the host
            with exporting(x) as exported:  # torch passes its stream on x's device; x's library orders before it
                imported = _torch().from_dlpack(exported)
            return self.asarray(imported, dtype)
        return super()._from_foreign(x, dtype)

    def _duplicate(self, a):
        return a.detach().clone()

    def _upload(self, host):
        if not host.flags.writeable:  # a read-only memmap: torch cannot share it
            host = host.copy()
        return _torch().asarray(np.ascontiguousarray(host), device=self.device)

    def all_finite(self, a):
        """As :meth:`Device.all_finite`, as ``sum(a * 0) == 0`` (a finite value times 0 is 0, NaN and inf give NaN, a
        sum of zeros cannot overflow): torch's CPU ``isfinite`` is ~8x slower (0.56 against 0.07 ms for 235,000
        floats, ``benchmarks/guard.py``). Torch warns about nothing here; NumPy would, which is why this is torch's."""
        return (a * 0.0).sum() == 0

    def synchronize(self):
        if not self.host_memory:
            _torch().cuda.synchronize(self.device)

    def random_source(self, seed):
        return TorchRandomSource(self, seed)

    def upload_batches(self, parts, dtypes, prefetch=None):
        """As :meth:`Device.upload_batches`; on CUDA, unless ``prefetch`` is False, host arrays (NumPy, torch CPU
        tensors) are cast into pinned memory and copied with ``non_blocking=True``: nothing waits for the device per
        batch. The pinned tensor may be freed at once: torch's caching host allocator records the copy on its block
        and reuses it only once the copy is done."""
        if self.host_memory or prefetch is False:
            yield from super().upload_batches(parts, dtypes, prefetch)
            return
        pinned = True
        for part in parts:
            batch = []
            for a, dt in zip(part, dtypes):
                host = _host_view(a) if pinned else None
                if host is not None:
                    try:
                        batch.append(self._pinned_upload(host, dt))
                        continue
                    except RuntimeError as exc:
                        warnings.warn(f"pinned host memory is unavailable ({exc}); uploading batches without it",
                                      RuntimeWarning)
                        pinned = False
                batch.append(None if a is None else self.asarray(a, dt))
            yield tuple(batch)

    def _pinned_upload(self, host, dtype):
        staged = _torch().empty(host.shape, dtype=self.dtype(dtype), pin_memory=True)
        np.copyto(staged.numpy(), host, casting="unsafe")
        return staged.to(self.device, non_blocking=True)


def _host_view(a):
    """``a`` as a NumPy array sharing its memory when it is host data (NumPy, a torch CPU tensor), else None."""
    if isinstance(a, np.ndarray):
        return a
    torch = _torch()
    if isinstance(a, torch.Tensor) and a.device.type == "cpu":
        try:
            return a.detach().numpy()
        except (TypeError, RuntimeError):  # a dtype NumPy lacks (bfloat16): the plain upload
            return None
    return None


class TorchRandomSource(RandomSource):
    """Draws on the torch device from a ``torch.Generator``; its state travels as base64 text, tagged with the
    device type it belongs to (a CPU generator's state does not fit a CUDA one)."""

    def __init__(self, device, seed):
        super().__init__(device, seed)
        self._gen = _torch().Generator(device=device.device).manual_seed(self.seed)

    def uniform(self, shape, dtype):
        return _torch().rand(shape, generator=self._gen, dtype=self.device.dtype(dtype), device=self.device.device)

    def get_state(self):
        raw = self._gen.get_state().numpy().tobytes()
        return {"generator": "torch", "device_type": self.device.device.type,
                "state": base64.b64encode(raw).decode("ascii")}

    def set_state(self, state):
        if (check_state(state) and state.get("generator") == "torch"
                and state.get("device_type") == self.device.device.type):
            torch = _torch()
            raw = bytearray(base64.b64decode(state["state"]))
            self._gen.set_state(torch.frombuffer(raw, dtype=torch.uint8))
