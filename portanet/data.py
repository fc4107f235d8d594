"""Batch iteration: validate inputs, cut them into (shuffled) batches and send each batch to the model's device.

Host data is only ever read one batch at a time; nothing here does layer math.
"""

from __future__ import annotations

import numpy as np

from ._backend import Device, _library, dtype_name, host_rng, resolve_device

__all__ = ["batches", "Batches", "check_array", "check_lengths", "concat_host"]


def check_array(x, name: str = "x", ndim: tuple = (2,)):
    """Validate a numeric array-like; return it (Python sequences become NumPy arrays).

    Raises ValueError/TypeError naming ``name``, what was expected and what was got.
    """
    if x is None:
        raise TypeError(f"{name} must be an array, got None")
    if isinstance(x, (list, tuple)) or not (hasattr(x, "shape") and hasattr(x, "dtype")):
        try:
            x = np.asarray(x)
        except (ValueError, TypeError) as exc:
            raise TypeError(f"{name} must be a numeric array, got {type(x).__name__} that NumPy cannot convert ({exc})") from exc
    kind = _dtype_kind(x.dtype)
    if kind not in "biuf":
        raise TypeError(f"{name} must hold numbers (int or float), got dtype {x.dtype}")
    if len(x.shape) not in ndim:
        hint = ""
        if name == "x" and len(x.shape) > 2:
            hint = "; flatten it first, e.g. x.reshape(len(x), -1)"
        elif name == "x" and len(x.shape) == 1:
            hint = "; for a single feature use x.reshape(-1, 1)"
        want = " or ".join(f"{d}-D" for d in ndim)
        raise ValueError(f"{name} must be {want} (samples{', features' if 2 in ndim else ''}), got shape {tuple(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: expected at least one sample, got shape {tuple(x.shape)}")
    return x


def _dtype_kind(dtype) -> str:
    try:
        return np.dtype(dtype).kind
    except TypeError:
        name = dtype_name(dtype)
        return {"bool": "b"}.get(name, name[0] if name[0] in "iuf" else "O")


def check_lengths(**arrays) -> int:
    """All named arrays (None skipped) have the same number of rows; return it."""
    named = [(k, v) for k, v in arrays.items() if v is not None]
    n = named[0][1].shape[0]
    for k, v in named[1:]:
        if v.shape[0] != n:
            raise ValueError(f"{k} has {v.shape[0]} rows but {named[0][0]} has {n}")
    return n


class Batches:
    """Iterable of ``(x, y, sample_weight)`` batches on ``device``; ``y`` and weights may be None.

    ``x``, ``y``: NumPy arrays, memory maps, any sliceable with ``shape`` (read one batch at a time), or arrays
    of any supported library (moved to ``device`` batch by batch). ``shuffle`` draws a new permutation each
    pass from the host generator ``rng``. ``y_dtype``: "float" (model dtype) or "int" (int64 class labels).
    """

    def __init__(self, x, y=None, sample_weight=None, *, batch_size=32, shuffle=False, rng=None,
                 device="cpu", dtype="float32", y_dtype="float", drop_last=False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.n = check_lengths(x=x, y=y, sample_weight=sample_weight)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.rng = host_rng(rng)
        self.device = device if isinstance(device, Device) else resolve_device(device)
        self.dtype = dtype_name(dtype)
        self.y_dtype = self.dtype if y_dtype == "float" else "int64"
        self.drop_last = drop_last

    def __len__(self):
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self):
        order = self.rng.permutation(self.n) if self.shuffle else None
        for b in range(len(self)):
            start, stop = b * self.batch_size, min((b + 1) * self.batch_size, self.n)
            rows = slice(start, stop) if order is None else order[start:stop]
            yield (
                self._send(self.x, rows, self.dtype),
                None if self.y is None else self._send(self.y, rows, self.y_dtype),
                None if self.sample_weight is None else self._send(self.sample_weight, rows, self.dtype),
            )

    def _send(self, a, rows, dtype):
        dev = self.device
        if isinstance(rows, slice):
            return dev.asarray(a[(rows,) + (slice(None),) * (len(a.shape) - 1)], dtype)  # full index: array API rule
        lib = _library(a)
        if lib == "numpy" and isinstance(a, np.ndarray):
            return dev.asarray(a[rows], dtype)
        if lib == "numpy":  # a sliceable that is not an ndarray (h5py, zarr...): read rows in increasing order
            order = np.argsort(rows)
            block = np.asarray(a[rows[order].tolist()])
            return dev.asarray(block[np.argsort(order)], dtype)
        if dev.owns(a):
            xp = dev.xp
            return dev.asarray(xp.take(a, dev.from_host(rows), axis=0), dtype)
        return dev.asarray(_take_foreign(a, rows), dtype)


def _take_foreign(a, rows):
    """Rows of an array from another library, gathered in its own namespace before the move."""
    import array_api_compat

    xp = array_api_compat.array_namespace(a)
    index = xp.asarray(rows.astype(np.int64), device=array_api_compat.device(a)) if _library(a) != "cupy" else xp.asarray(rows)
    return xp.take(a, index, axis=0)


def batches(x, y=None, *, batch_size=32, shuffle=False, seed=None, device="cpu", dtype="float32", y_dtype="float"):
    """Iterate ``(x_batch, y_batch)`` on ``device`` for custom training loops (``y_batch`` None without ``y``)."""
    x = check_array(x, "x")
    if y is not None:
        y = check_array(y, "y", ndim=(1, 2))
    for xb, yb, _ in Batches(x, y, batch_size=batch_size, shuffle=shuffle, rng=seed, device=device, dtype=dtype,
                             y_dtype=y_dtype):
        yield xb, yb


def concat_host(parts) -> np.ndarray:
    """Join host (NumPy) batches along the sample axis."""
    return np.concatenate(parts, axis=0)
