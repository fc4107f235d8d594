"""Batch iteration: validate inputs; cut arrays, memory maps, sliceables and streams of batches into (shuffled)
batches; send each batch to the model's device. Host data is read one batch (or one block) at a time.

Nothing here does layer math, and nothing here knows which array library is underneath (that is ``backends``).
"""

from __future__ import annotations

import collections.abc
import os

import array_api_compat
import numpy as np

from .backends import Device, dtype_name, host_rng, resolve_device, take_rows

__all__ = ["batches", "Batches", "StreamError", "check_array", "check_inputs", "check_lengths", "host_empty",
           "is_stream"]

BLOCK_BYTES = 32 * 2**20  # default block for disk-backed data: one contiguous read, then shuffled within


class StreamError(ValueError):
    """A batch read during an epoch (from a stream, or a sliceable read batch by batch) is unusable.

    ``fit`` catches it only to put weights and optimizer state back as they were, then re-raises it.
    """


def is_stream(x) -> bool:
    """True for an iterable of batches (generator, iterator, a list-less loader) rather than an array or sliceable."""
    if isinstance(x, (list, tuple, str, bytes, dict)) or hasattr(x, "shape"):
        return False
    return isinstance(x, collections.abc.Iterable)


def check_array(x, name: str = "x", ndim: tuple = (2,)):
    """Validate a numeric array-like; return it (Python sequences become NumPy arrays).

    Arrays of any library, NumPy memory maps and sliceables with ``shape`` and ``dtype`` (h5py, zarr, your own
    class with ``__len__`` and slicing) are returned as they are, never read here; pandas objects (anything with
    ``.iloc``) and anything without ``shape`` and ``dtype`` go through ``numpy.asarray``.
    Raises ValueError/TypeError naming ``name``, what was expected and what was got.
    """
    if x is None:
        raise TypeError(f"{name} must be an array, got None")
    if is_stream(x):
        raise TypeError(f"{name} must be an array here, got an iterable of batches ({type(x).__name__}); "
                        "iterables of (x, y[, sample_weight]) batches go to fit/evaluate as x, with y=None")
    if isinstance(x, (list, tuple)) or not (hasattr(x, "shape") and hasattr(x, "dtype")) or hasattr(x, "iloc"):
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


def check_inputs(x, y=None, sample_weight=None, *, steps_per_epoch=None):
    """Validate what ``fit`` / ``evaluate`` got, reading nothing but a stream's first batch.

    Returns ``(x, y, sample_weight)``: checked arrays, or an iterable of batches wrapped as a stream (y and
    sample_weight None) whose first batch has been read and checked.
    """
    if isinstance(x, _Stream) or is_stream(x):
        for name, value in (("y", y), ("sample_weight", sample_weight)):
            if value is not None:
                raise ValueError(f"{name} must be None when x is an iterable of (x, y[, sample_weight]) batches, "
                                 f"got {type(value).__name__}")
        return (x if isinstance(x, _Stream) else _Stream(x, steps_per_epoch)), None, None
    if steps_per_epoch is not None:
        raise ValueError(f"steps_per_epoch is for iterables of batches; an epoch over arrays covers every row "
                         f"(x is a {type(x).__name__}), got steps_per_epoch={steps_per_epoch!r}")
    x = check_array(x, "x")
    if y is None:
        raise TypeError("y must be an array of targets, got None (or pass x as an iterable of (x, y) batches)")
    y = check_array(y, "y", ndim=(1, 2))
    if sample_weight is not None:
        sample_weight = check_array(sample_weight, "sample_weight", ndim=(1,))
    check_lengths(x=x, y=y, sample_weight=sample_weight)
    return x, y, sample_weight


def input_width(x) -> int:
    """Features per sample of checked inputs (a stream's first batch)."""
    return x.width if isinstance(x, _Stream) else x.shape[1]


def first_targets(x, y):
    """Targets to check before training: all of an in-memory ``y``, the first batch of a stream or sliceable."""
    if isinstance(x, _Stream):
        return x.first[1]
    return y if in_memory(y) or isinstance(y, np.memmap) else np.asarray(y[0:1024])


def in_memory(a) -> bool:
    """True for arrays held in memory (any library, any device); False for memory maps and other sliceables."""
    return array_api_compat.is_array_api_obj(a) and not isinstance(a, np.memmap)


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class _Stream:
    """An iterable of ``(x, y)`` or ``(x, y, sample_weight)`` batches, ``steps`` of them per epoch, checked one by one.

    A one-shot iterator (a generator) is consumed across epochs, as in Keras; anything else is iterated afresh
    each epoch. The first batch is read and checked up front; a one-shot iterator keeps it for the first epoch.
    """

    def __init__(self, source, steps_per_epoch=None):
        self.source = source
        self.one_shot = isinstance(source, collections.abc.Iterator)
        if steps_per_epoch is None and (self.one_shot or not hasattr(source, "__len__")):
            raise ValueError(f"steps_per_epoch is required when x is an iterable without a length "
                             f"({type(source).__name__}), got None")
        self.width = None
        it = source if self.one_shot else iter(source)
        try:
            first = next(it)
        except StopIteration:
            raise ValueError(f"x ({type(source).__name__}) yielded no batches") from None
        self.first = self._check(first, 0)
        self.width, self._y_tail = self.first[0].shape[1], tuple(self.first[1].shape[1:])
        self.steps = _positive_int(len(source) if steps_per_epoch is None else steps_per_epoch, "steps_per_epoch")
        self._pending = self.first if self.one_shot else None

    def epoch(self):
        """Yield this epoch's ``steps`` checked batches (host or device arrays, as the source made them)."""
        it = self.source if self.one_shot else iter(self.source)
        for i in range(self.steps):
            if self._pending is not None:
                batch, self._pending = self._pending, None
                yield batch
                continue
            try:
                item = next(it)
            except StopIteration:
                hint = ("; a generator is shared by all epochs, so it must yield steps_per_epoch * epochs batches"
                        if self.one_shot else "")
                raise StreamError(f"x ended after {i} batches of this epoch, but steps_per_epoch={self.steps} "
                                  f"were expected{hint}") from None
            yield self._check(item, i)

    def _check(self, item, i):
        where = f"batch {i} of x"
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            got = type(item).__name__ + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
            raise StreamError(f"{where}: expected an (x, y) or (x, y, sample_weight) tuple, got a {got}")
        try:
            xb = check_array(item[0], "x")
            yb = check_array(item[1], "y", ndim=(1, 2))
            wb = None if len(item) == 2 or item[2] is None else check_array(item[2], "sample_weight", ndim=(1,))
            check_lengths(x=xb, y=yb, sample_weight=wb)
        except (TypeError, ValueError) as exc:
            raise StreamError(f"{where}: {exc}") from exc
        if self.width is not None and xb.shape[1] != self.width:
            raise StreamError(f"{where}: x has {xb.shape[1]} features but batch 0 had {self.width}")
        if self.width is not None and tuple(yb.shape[1:]) != self._y_tail:
            raise StreamError(f"{where}: y has shape {tuple(yb.shape)} but batch 0 had y of shape "
                              f"(samples{''.join(f', {d}' for d in self._y_tail)})")
        return xb, yb, wb


class Batches:
    """Iterable of ``(x, y, sample_weight)`` batches on ``device`` (``y``, weights may be None); a pass per ``iter``.

    ``x``, ``y``: arrays of any supported library and device (gathered where they live, moved batch by batch),
    NumPy memory maps and sliceables with ``shape`` and ``dtype`` (read in contiguous slices), or, as ``x`` alone,
    an iterable of ``(x, y[, sample_weight])`` batches (``steps_per_epoch`` batches per pass, required when it
    has no length).

    ``shuffle``: a full permutation per pass for in-memory arrays; for memory maps and sliceables a block shuffle
    (contiguous blocks of ``block_size`` rows, about 32 MB by default, in shuffled order, rows shuffled within a
    block) so reads stay sequential. Both come from the host generator ``rng`` (a seed or Generator). Streams are
    not shuffled. ``y_dtype``: "float" (model dtype) or "int" (int64 class labels). ``prefetch``: None or True
    overlaps uploads with compute on CUDA (CuPy), False turns it off; other devices ignore it. ``check_targets``:
    called as ``check_targets(y, name, values=...)`` on every host ``y`` batch that was not checked up front.
    """

    def __init__(self, x, y=None, sample_weight=None, *, batch_size=32, shuffle=False, rng=None,
                 device="cpu", dtype="float32", y_dtype="float", drop_last=False, steps_per_epoch=None,
                 block_size=None, prefetch=None, check_targets=None):
        self.batch_size = _positive_int(batch_size, "batch_size")
        if isinstance(x, _Stream) or is_stream(x):
            x, y, sample_weight = check_inputs(x, y, sample_weight, steps_per_epoch=steps_per_epoch)
            self.n = None
        else:
            if steps_per_epoch is not None:
                check_inputs(x, steps_per_epoch=steps_per_epoch)  # raises the explanation
            x = check_array(x, "x")
            y = None if y is None else check_array(y, "y", ndim=(1, 2))
            sample_weight = None if sample_weight is None else check_array(sample_weight, "sample_weight", ndim=(1,))
            self.n = check_lengths(x=x, y=y, sample_weight=sample_weight)
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.shuffle = bool(shuffle)
        self.rng = host_rng(rng)
        self.device = device if isinstance(device, Device) else resolve_device(device)
        self.dtype = dtype_name(dtype)
        self.y_dtype = self.dtype if y_dtype == "float" else "int64"
        self.drop_last = drop_last
        self.prefetch = prefetch
        self.check_targets = check_targets
        self.block = None if self.n is None else self._block_rows(block_size)

    @property
    def stream(self) -> bool:
        """True when ``x`` is an iterable of batches."""
        return self.n is None

    @property
    def reads_lazily(self) -> bool:
        """True when batches are read (and so checked) during the pass: streams, memory maps, sliceables."""
        return self.stream or not all(a is None or in_memory(a) for a in (self.x, self.y, self.sample_weight))

    def __len__(self):
        if self.stream:
            return self.x.steps
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self):
        parts = self.x.epoch() if self.stream else self._slices()
        if self.check_targets is not None and (self.stream or not (in_memory(self.y) or self.y is None)):
            parts = self._checked(parts)
        return self.device.upload_batches(parts, (self.dtype, self.y_dtype, self.dtype), prefetch=self.prefetch)

    def _block_rows(self, block_size) -> int:
        lazy = [a for a in (self.x, self.y, self.sample_weight) if a is not None and not in_memory(a)]
        if not lazy:
            return self.n
        if block_size is None:
            row_bytes = sum(int(np.prod(a.shape[1:])) * np.dtype(a.dtype).itemsize for a in lazy)
            block_size = max(1, BLOCK_BYTES // max(row_bytes, 1))
        block_size = _positive_int(block_size, "block_size")
        return max(self.batch_size, block_size // self.batch_size * self.batch_size)

    def _plan(self):
        """``(start, stop, order)`` blocks for one pass; ``order`` is None (rows in sequence) or a permutation.

        Entering a block asks the kernel to start reading the next one from any memory-mapped file.
        """
        starts = range(0, self.n, self.block)
        if self.shuffle and len(starts) > 1:
            starts = [starts[i] for i in self.rng.permutation(len(starts))]
        maps = [a for a in (self.x, self.y, self.sample_weight) if isinstance(a, np.memmap)]
        for k, start in enumerate(starts):
            stop = min(start + self.block, self.n)
            for a in maps:
                if k == 0:
                    _read_ahead(a, start, stop)
                if k + 1 < len(starts):
                    _read_ahead(a, starts[k + 1], min(starts[k + 1] + self.block, self.n))
            yield start, stop, (self.rng.permutation(stop - start) if self.shuffle else None)

    def _slices(self):
        """Host-side batches (views where the source allows), not yet on the device."""
        arrays = (self.x, self.y, self.sample_weight)
        for start, stop, order in self._plan():
            blocks = [None if a is None else _rows(a, start, stop, order is not None) for a in arrays]
            for b in range(0, stop - start, self.batch_size):
                end = min(b + self.batch_size, stop - start)  # the array API has no out-of-range slices
                if self.drop_last and end - b < self.batch_size:
                    break
                pick = slice(b, end) if order is None else order[b:end]
                yield tuple(None if blk is None else _pick(blk, pick) for blk in blocks)

    def _checked(self, parts):
        for i, part in enumerate(parts):
            y = part[1]
            if y is not None:
                try:
                    self.check_targets(y, "y", values=isinstance(y, np.ndarray))
                except ValueError as exc:
                    raise StreamError(f"batch {i} of y: {exc}") from exc
            yield part


def _rows(a, start, stop, gathered=False):
    """Rows ``start:stop`` of ``a``: the array itself or a view when in memory, one contiguous read otherwise.

    A memory map gives a view of its pages, or (``gathered``: rows will be picked in shuffled order) a copy, so the
    file is read sequentially once instead of page by page at random; h5py or zarr read the slice either way.
    """
    if in_memory(a):
        return a if (start, stop) == (0, a.shape[0]) else a[(slice(start, stop),) + (slice(None),) * (len(a.shape) - 1)]
    block = np.asarray(a[start:stop])
    return block.copy() if gathered and isinstance(a, np.memmap) else block


def _read_ahead(a, start, stop):
    """Ask the kernel to read rows ``start:stop`` of memory map ``a`` from its file now, asynchronously, so disk
    reads overlap compute (``posix_fadvise`` WILLNEED: page cache only, no process memory; no-op where unsupported).
    """
    root = a
    while isinstance(root.base, np.ndarray):  # a view of a view of the map: find the array the file offset belongs to
        root = root.base
    if not (hasattr(os, "posix_fadvise") and isinstance(root, np.memmap) and root.filename and a.flags.c_contiguous):
        return
    row_bytes = a.strides[0] if len(a.shape) > 1 else a.itemsize
    offset = root.offset + (a.ctypes.data - root.ctypes.data) + start * row_bytes
    try:
        fd = os.open(root.filename, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, offset, (stop - start) * row_bytes, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def _pick(block, pick):
    if isinstance(pick, slice):
        return block[(pick,) + (slice(None),) * (len(block.shape) - 1)]  # a full index: the array API rule
    return take_rows(block, pick)


def batches(x, y=None, *, batch_size=32, shuffle=False, seed=None, device="cpu", dtype="float32", y_dtype="float",
            steps_per_epoch=None, prefetch=None):
    """Iterate ``(x_batch, y_batch)`` on ``device`` for custom training loops (``y_batch`` None without ``y``).

    ``x`` and ``y`` are anything :class:`Batches` takes (``x`` alone may be an iterable of ``(x, y)`` batches).
    """
    for xb, yb, _ in Batches(x, y, batch_size=batch_size, shuffle=shuffle, rng=seed, device=device, dtype=dtype,
                             y_dtype=y_dtype, steps_per_epoch=steps_per_epoch, prefetch=prefetch):
        yield xb, yb


def host_empty(shape, dtype) -> np.ndarray:
    """An uninitialized host (NumPy) array, filled batch by batch (``predict(..., to_numpy=True)``)."""
    return np.empty(shape, dtype_name(dtype))


# -- validation split: which rows go where (host index math) ----------------------------------------
def check_fraction(fraction, x, y, sample_weight) -> float:
    """``fit(validation_split=...)`` checked: a number in [0, 1), and in-memory data with rows to spare."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"validation_split must be a number in [0, 1), got {fraction!r}")
    if not fraction:
        return 0.0
    if not all(a is None or in_memory(a) for a in (x, y, sample_weight)):
        raise ValueError("validation_split needs in-memory arrays (a random split of a stream, memory map or "
                         f"sliceable would read it all); pass validation_data= instead (x is a {type(x).__name__})")
    n = x.shape[0]
    n_val = round(fraction * n)
    if not 1 <= n_val < n:
        raise ValueError(f"validation_split={fraction} of {n} rows leaves {n_val} for validation and {n - n_val} for "
                         "training; both need at least one")
    return float(fraction)


def split_rows(n: int, fraction: float, labels, seed: int):
    """``(train_rows, val_rows)``: sorted host int64 indices, about ``fraction`` of the ``n`` rows for validation.

    ``labels`` (host int array of class labels, or None): each class contributes its share (largest remainders
    get the rounding, a class never gives all its rows), so validation and training see the same class mix.
    """
    rng = np.random.default_rng(seed)
    n_val = round(fraction * n)
    val = rng.permutation(n)[:n_val]
    if labels is not None:
        classes, counts = np.unique(labels, return_counts=True)
        exact = counts * (n_val / n)
        take = np.minimum(np.floor(exact).astype(np.int64), np.maximum(counts - 1, 0))
        spare = n_val - int(take.sum())
        for i in np.lexsort((rng.random(len(classes)), take - exact)):  # largest remainder first, ties at random
            if spare > 0 and take[i] < counts[i] - 1:
                take[i] += 1
                spare -= 1
        if take.sum():  # else every class is a singleton: the plain random split above
            val = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)])
    is_val = np.zeros(n, bool)
    is_val[val] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)
