"""Input data: one adapter per kind of input (in-memory arrays, memory maps and other sliceables, iterables of
batches), each validating once; batches cut from them (shuffled) and sent to the model's device.

Host data is read one batch (or one block) at a time. Nothing here does layer math, and nothing here knows which
array library is underneath (that is :mod:`portanet.backends`).
"""

from __future__ import annotations

import collections.abc
import numbers
import os

import array_api_compat
import numpy as np

from .backends import Device, dtype_name, host_rng, is_host_data, library_of, resolve_device, take_rows

__all__ = ["adapt", "batches", "Batches", "device_batch", "ArrayAdapter", "SliceableAdapter", "StreamAdapter",
           "StreamError", "check_array", "check_lengths", "check_fraction", "split_rows", "split_sizes", "host_empty",
           "is_stream", "in_memory"]

BLOCK_BYTES = 32 * 2**20  # default block for disk-backed data: one contiguous read, then shuffled within


class StreamError(ValueError):
    """A batch read during an epoch (from a stream, a memory map or a sliceable) is unusable or could not be read.

    ``fit`` puts the model back as it was before the call (weights, state, optimizer, random generators), then
    re-raises it; the message names the source, the batch and the field.
    """


def is_stream(x) -> bool:
    """True for an iterable of batches (generator, iterator, a list-less loader) rather than an array or sliceable."""
    if isinstance(x, (list, tuple, str, bytes, dict)) or hasattr(x, "shape"):
        return False
    return isinstance(x, collections.abc.Iterable)


def in_memory(a) -> bool:
    """True for arrays held in memory (any library, any device); False for memory maps and other sliceables."""
    return array_api_compat.is_array_api_obj(a) and not isinstance(a, np.memmap)


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
        if name.endswith("x") and len(x.shape) > 2:
            hint = "; flatten it first, e.g. x.reshape(len(x), -1)"
        elif name.endswith("x") and len(x.shape) == 1:
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


def positive_int(value, name) -> int:
    """``value`` as an int when it is a positive integer, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _field(prefix, name):
    return f"{prefix} {name}" if prefix else name


# -- adapters -----------------------------------------------------------------------------------------------------
class _Adapter:
    """What every adapter offers: ``width`` (features), ``n`` (rows, None for a stream), ``reads_lazily``,
    ``first_targets()`` (targets to check up front), ``steps(batch_size)`` and ``parts(...)``: one pass of host
    or device ``(x, y, sample_weight)`` batches, each checked as it is read."""

    n: int | None = None
    width: int = 0
    reads_lazily = False

    def steps(self, batch_size: int, drop_last: bool = False) -> int:
        return self.n // batch_size if drop_last else -(-self.n // batch_size)


class _RowsAdapter(_Adapter):
    """Arrays addressable by rows: ``x`` (samples, features), ``y`` (samples[, outputs]) or None, ``sample_weight``
    (samples,) or None; ``prefix`` names them in errors ("validation" -> "validation x")."""

    def __init__(self, x, y=None, sample_weight=None, prefix=""):
        self.prefix = prefix
        self.x = check_array(x, _field(prefix, "x"))
        self.y = None if y is None else check_array(y, _field(prefix, "y"), ndim=(1, 2))
        self.sample_weight = None if sample_weight is None else check_array(
            sample_weight, _field(prefix, "sample_weight"), ndim=(1,))
        self.n = check_lengths(**{_field(prefix, "x"): self.x, _field(prefix, "y"): self.y,
                                  _field(prefix, "sample_weight"): self.sample_weight})
        self.width = self.x.shape[1]

    @property
    def arrays(self):
        return self.x, self.y, self.sample_weight

    @staticmethod
    def _batches_of(blocks):
        """Cut ``(block arrays, picks)`` pairs into batches: slices (views) in order, gathered rows otherwise."""
        for arrays, picks in blocks:
            for pick in picks:
                yield tuple(None if a is None else _pick(a, pick) for a in arrays)


class ArrayAdapter(_RowsAdapter):
    """In-memory arrays of any library and device: a full permutation per shuffled pass, rows gathered where the
    arrays live (views of the source when not shuffled); validated once, nothing is read per batch."""

    def first_targets(self):
        return self.y

    def parts(self, batch_size, shuffle=False, rng=None, drop_last=False, part=None):
        order = host_rng(rng).permutation(self.n) if shuffle else None
        return self._batches_of([(self.arrays, _picks(self.n, batch_size, order, drop_last, part))])

    def nonfinite(self):
        """``(name, first bad row)`` of the first float array holding NaN or inf, else None (one read per array)."""
        for name, a in zip(("x", "y", "sample_weight"), self.arrays):
            if a is None:
                continue
            xp = array_api_compat.array_namespace(a)
            if not xp.isdtype(a.dtype, "real floating"):
                continue
            finite = xp.isfinite(a)
            if not bool(xp.all(finite)):
                first = int(xp.argmin(xp.astype(xp.reshape(finite, (-1,)), a.dtype)))
                return _field(self.prefix, name), first // max(1, _row_size(a))
        return None

    def take(self, rows):
        """A new adapter over rows ``rows`` (host int array) of these arrays, gathered where they live."""
        return ArrayAdapter(*(None if a is None else take_rows(a, rows) for a in self.arrays), prefix=self.prefix)


class SliceableAdapter(_RowsAdapter):
    """Memory maps and sliceables with ``shape``, ``dtype``, ``len`` and contiguous slicing (h5py, zarr): read one
    contiguous block at a time (about 32 MB, ``block_size`` rows), blocks in shuffled order and rows shuffled within
    a block when shuffling; the kernel is asked to read the next block of a memory map ahead. Each batch is checked
    as it is read; a failing read raises :class:`StreamError` naming the rows and the field."""

    reads_lazily = True

    def __init__(self, x, y=None, sample_weight=None, prefix="", block_size=None):
        super().__init__(x, y, sample_weight, prefix)
        lazy = [a for a in self.arrays if a is not None and not in_memory(a)]
        if block_size is None:
            row_bytes = sum(_row_size(a) * np.dtype(a.dtype).itemsize for a in lazy)
            block_size = max(1, BLOCK_BYTES // max(row_bytes, 1))
        self.block_size = positive_int(block_size, "block_size")

    def first_targets(self):
        y = self.y
        return None if y is None else y if in_memory(y) or isinstance(y, np.memmap) else self._read(y, 1, 0, min(self.n, 1024))

    def parts(self, batch_size, shuffle=False, rng=None, drop_last=False, part=None):
        block = max(batch_size, self.block_size // batch_size * batch_size)
        return self._batches_of(self._blocks(block, shuffle, host_rng(rng), batch_size, drop_last, part))

    def _blocks(self, block, shuffle, rng, batch_size, drop_last, part):
        starts = range(0, self.n, block)
        if shuffle and len(starts) > 1:
            starts = [starts[i] for i in rng.permutation(len(starts))]
        maps = [a for a in self.arrays if isinstance(a, np.memmap)]
        for k, start in enumerate(starts):
            stop = min(start + block, self.n)
            for a in maps:
                if k == 0:
                    _read_ahead(a, start, stop)
                if k + 1 < len(starts):
                    _read_ahead(a, starts[k + 1], min(starts[k + 1] + block, self.n))
            picks = _picks(stop - start, batch_size, rng.permutation(stop - start) if shuffle else None, drop_last,
                           part)
            rows = None
            if part is not None:  # read this process's rows of the block only; picks become positions among them
                rows = np.unique(np.concatenate([_positions(p) for p in picks] or [np.zeros(0, np.int64)]))
                picks = [np.searchsorted(rows, _positions(p)) for p in picks]
            arrays = tuple(None if a is None else self._read(a, i, start, stop, gathered=shuffle, rows=rows)
                           for i, a in enumerate(self.arrays))
            yield arrays, picks

    def _read(self, a, index, start, stop, gathered=False, rows=None):
        """Rows ``start:stop`` of ``a``: a view when in memory, one contiguous read otherwise; or, given ``rows``
        (sorted positions in the block), just those rows.

        A memory map gives a view of its pages, or (``gathered``: rows will be picked in shuffled order) a copy, so
        the file is read sequentially once instead of page by page at random; h5py or zarr read the slice either way.
        With ``rows``, a memory map copies those rows only; other sliceables read the contiguous range spanning them.
        """
        if in_memory(a):
            if rows is not None:
                return take_rows(a, rows + start)
            return a if (start, stop) == (0, a.shape[0]) else a[(slice(start, stop),) + (slice(None),) * (len(a.shape) - 1)]
        try:
            if rows is not None and isinstance(a, np.memmap):
                return np.asarray(a[rows + start])
            if rows is not None:
                first, last = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
                return np.asarray(a[start + first:start + last])[rows - first]
            block = np.asarray(a[start:stop])
        except Exception as exc:  # noqa: BLE001 - any failure of the source is a data error, named as one
            name = _field(self.prefix, ("x", "y", "sample_weight")[index])
            raise StreamError(f"reading rows {start}:{stop} of {name} ({type(a).__name__}) failed: "
                              f"{type(exc).__name__}: {exc}") from exc
        return block.copy() if gathered and isinstance(a, np.memmap) else block


class StreamAdapter(_Adapter):
    """An iterable of ``(x, y)`` or ``(x, y, sample_weight)`` batches, ``steps`` of them per epoch, checked one by
    one against the first.

    A one-shot iterator (a generator) is consumed across epochs, as in Keras; anything else is iterated afresh
    each epoch. The first batch is read and checked up front; a one-shot iterator keeps it for the first epoch.
    """

    reads_lazily = True

    def __init__(self, source, steps=None, prefix=""):
        self.source, self.prefix = source, prefix
        self.one_shot = isinstance(source, collections.abc.Iterator)
        if steps is None and (self.one_shot or not hasattr(source, "__len__")):
            raise ValueError(f"steps_per_epoch is required when x is an iterable without a length "
                             f"({type(source).__name__}), got None")
        self.width = None
        item = self._next(self._iterator(), 0)
        if item is None:
            raise ValueError(f"{_field(prefix, 'x')} ({type(source).__name__}) yielded no batches")
        self.first = self._check(item, 0)
        self.width, self._y_tail = self.first[0].shape[1], tuple(self.first[1].shape[1:])
        self.n_steps = positive_int(len(source) if steps is None else steps, "steps_per_epoch")
        self._pending = self.first if self.one_shot else None

    def first_targets(self):
        return self.first[1]

    def steps(self, batch_size=None, drop_last=False) -> int:
        return self.n_steps

    def parts(self, batch_size=None, shuffle=False, rng=None, drop_last=False, part=None):
        """Yield this epoch's ``steps`` checked batches (arrays in memory: host or device, as the source made them;
        anything else, an h5py dataset say, read into a NumPy array here); ``part`` is ignored: a stream is taken to
        be this process's share already."""
        it = self._iterator()
        for i in range(self.n_steps):
            if self._pending is not None:
                batch, self._pending = self._pending, None
                yield batch
                continue
            item = self._next(it, i)
            if item is None:
                hint = ("; a generator is shared by all epochs, so it must yield steps_per_epoch * epochs batches"
                        if self.one_shot else "")
                raise StreamError(f"{_field(self.prefix, 'x')} ended after {i} batches of this epoch, but "
                                  f"steps_per_epoch={self.n_steps} were expected{hint}")
            yield self._check(item, i)

    def _iterator(self):
        if self.one_shot:
            return self.source
        try:
            return iter(self.source)
        except Exception as exc:  # noqa: BLE001 - a source that cannot start an epoch is a data error too
            raise StreamError(f"starting a pass over {_field(self.prefix, 'x')} ({type(self.source).__name__}) "
                              f"failed: {type(exc).__name__}: {exc}") from exc

    def _next(self, it, i):
        try:
            return next(it)
        except StopIteration:
            return None
        except Exception as exc:  # noqa: BLE001 - a failing source is a data error, named as one
            raise StreamError(f"reading batch {i} of {_field(self.prefix, 'x')} ({type(self.source).__name__}) "
                              f"failed: {type(exc).__name__}: {exc}") from exc

    def _check(self, item, i):
        where = f"batch {i} of {_field(self.prefix, 'x')}"
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            got = type(item).__name__ + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
            raise StreamError(f"{where}: expected an (x, y) or (x, y, sample_weight) tuple, got a {got}")
        try:
            xb = _read(check_array(item[0], "x"))
            yb = _read(check_array(item[1], "y", ndim=(1, 2)))
            wb = None if len(item) == 2 or item[2] is None else _read(check_array(item[2], "sample_weight", ndim=(1,)))
            check_lengths(x=xb, y=yb, sample_weight=wb)
        except Exception as exc:  # noqa: BLE001 - whatever reading or checking the batch raised, it is a data error
            what = "" if isinstance(exc, (TypeError, ValueError)) else (
                f"reading it from {type(self.source).__name__} failed: {type(exc).__name__}: ")
            raise StreamError(f"{where}: {what}{exc}") from exc
        if self.width is not None and xb.shape[1] != self.width:
            raise StreamError(f"{where}: x has {xb.shape[1]} features but batch 0 had {self.width}")
        if self.width is not None and tuple(yb.shape[1:]) != self._y_tail:
            raise StreamError(f"{where}: y has shape {tuple(yb.shape)} but batch 0 had y of shape "
                              f"(samples{''.join(f', {d}' for d in self._y_tail)})")
        return xb, yb, wb


def _read(a):
    """``a`` when it is an array in memory; anything else (an h5py dataset, a memory map yielded as a batch) read
    into a NumPy array now, while a failure is still a data error."""
    return a if in_memory(a) else np.asarray(a)


def adapt(x, y=None, sample_weight=None, *, steps=None, block_size=None, prefix="", targets=False, streams=True):
    """The adapter for ``x`` (and ``y``, ``sample_weight``), validated: arrays, sliceables or a stream.

    ``targets``: y is required (fit/evaluate); a stream carries its own targets. ``streams=False`` refuses
    iterables of batches. Reads nothing but a stream's first batch. Raises ValueError/TypeError naming the argument,
    the expected and the got.
    """
    if isinstance(x, _Adapter):
        return x
    if is_stream(x) and streams:
        for name, value in (("y", y), ("sample_weight", sample_weight)):
            if value is not None:
                raise ValueError(f"{name} must be None when x is an iterable of (x, y[, sample_weight]) batches, "
                                 f"got {type(value).__name__}")
        return StreamAdapter(x, steps, prefix)
    if steps is not None:
        raise ValueError(f"steps_per_epoch is for iterables of batches; an epoch over arrays covers every row "
                         f"(x is a {type(x).__name__}), got steps_per_epoch={steps!r}")
    if targets and y is None:
        raise TypeError(f"{_field(prefix, 'y')} must be an array of targets, got None (or pass x as an iterable of "
                        "(x, y) batches)")
    parts = [None if a is None else check_array(a, _field(prefix, n), nd) for a, n, nd in
             ((x, "x", (2,)), (y, "y", (1, 2)), (sample_weight, "sample_weight", (1,)))]
    if all(a is None or in_memory(a) for a in parts):
        return ArrayAdapter(*parts, prefix=prefix)
    return SliceableAdapter(*parts, prefix=prefix, block_size=block_size)


class Batches:
    """Iterable of ``(x, y, sample_weight)`` batches on ``device`` (``y``, weights may be None); a pass per ``iter``.

    ``x``, ``y``: arrays of any supported library and device (gathered where they live, moved batch by batch),
    NumPy memory maps and sliceables with ``shape`` and ``dtype`` (read in contiguous slices), or, as ``x`` alone,
    an iterable of ``(x, y[, sample_weight])`` batches (``steps_per_epoch`` batches per pass, required when it
    has no length), or an adapter from :func:`adapt`.

    ``shuffle``: a full permutation per pass for in-memory arrays; for memory maps and sliceables a block shuffle
    (contiguous blocks of ``block_size`` rows, about 32 MB by default, in shuffled order, rows shuffled within a
    block) so reads stay sequential. Both come from the host generator ``rng`` (a seed or Generator). Streams are
    not shuffled. ``part``: None, or a function ``part(rows) -> (start, stop)`` choosing this process's share of
    each batch of ``rows`` rows (data-parallel training: ``lambda rows: distributed.split_rows(rows, rank, size)``);
    the batches and the shuffle stay those of one process, each yields only that share (possibly no rows), and a
    memory map's share is all that is copied from it; ``batch_rows`` receives each batch's full number of rows, in
    batch order (pop one per batch: the weight of a share is its rows over those). Streams are taken as they are.
    ``y_dtype``: "float" (model dtype) or "int" (int64 class labels). ``prefetch``: None or True
    overlaps uploads with compute on CUDA, False turns it off; other devices ignore it. ``check_targets``:
    called as ``check_targets(y, name, values=...)`` on every host ``y`` batch that was not checked up front.
    """

    def __init__(self, x, y=None, sample_weight=None, *, batch_size=32, shuffle=False, rng=None,
                 device="cpu", dtype="float32", y_dtype="float", drop_last=False, steps_per_epoch=None,
                 block_size=None, prefetch=None, check_targets=None, part=None):
        self.batch_size = positive_int(batch_size, "batch_size")
        if block_size is not None:
            positive_int(block_size, "block_size")
        self.source = adapt(x, y, sample_weight, steps=steps_per_epoch, block_size=block_size)
        self.shuffle = bool(shuffle)
        self.rng = host_rng(rng)
        self.device = device if isinstance(device, Device) else resolve_device(device)
        self.dtype = dtype_name(dtype)
        self.y_dtype = self.dtype if y_dtype == "float" else "int64"
        self.drop_last = drop_last
        self.prefetch = prefetch
        self.check_targets = check_targets
        self.part = part
        self.batch_rows = collections.deque()  # with part: rows of each batch cut so far and not yet popped

    @property
    def stream(self) -> bool:
        """True when ``x`` is an iterable of batches."""
        return isinstance(self.source, StreamAdapter)

    @property
    def reads_lazily(self) -> bool:
        """True when batches are read (and so checked) during the pass: streams, memory maps, sliceables."""
        return self.source.reads_lazily

    def __len__(self):
        return self.source.steps(self.batch_size, self.drop_last)

    def _slices(self):
        """Host-side (or source-side) batches of one pass, not yet on the device."""
        part = self.part
        if part is not None:
            self.batch_rows.clear()

            def part(rows, share=self.part):  # called once per batch, in batch order, when the batch is cut
                self.batch_rows.append(rows)
                return share(rows)

        return self.source.parts(self.batch_size, self.shuffle, self.rng, self.drop_last, part)

    def __iter__(self):
        parts = self._slices()
        if self.check_targets is not None and self.source.reads_lazily and not in_memory(
                getattr(self.source, "y", None)):
            parts = self._checked(parts)
        return self.device.upload_batches(parts, (self.dtype, self.y_dtype, self.dtype), prefetch=self.prefetch)

    def _checked(self, parts):
        prefix = self.source.prefix
        for i, part in enumerate(parts):
            y = part[1]
            if y is not None:
                try:
                    self.check_targets(y, "y", values=isinstance(y, np.ndarray) or self.device.host_memory)
                except ValueError as exc:
                    raise StreamError(f"batch {i} of {_field(prefix, 'y')}: {exc}") from exc
            yield part


def _row_size(a) -> int:
    size = 1
    for d in a.shape[1:]:
        size *= int(d)
    return size


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


def _picks(rows, batch_size, order, drop_last, part) -> list:
    """Each batch of a block of ``rows`` rows as a slice (``order`` None: in order) or host int array of positions;
    with ``part``, only ``part(batch rows) -> (start, stop)`` of each batch."""
    picks = []
    for b in range(0, rows, batch_size):
        end = min(b + batch_size, rows)  # the array API has no out-of-range slices
        if drop_last and end - b < batch_size:
            break
        if part is not None:
            b, end = (b + i for i in part(end - b))
        picks.append(slice(b, end) if order is None else order[b:end])
    return picks


def _positions(pick) -> np.ndarray:
    return np.arange(pick.start, pick.stop, dtype=np.int64) if isinstance(pick, slice) else pick


def _pick(block, pick):
    if isinstance(pick, slice):
        return block[(pick,) + (slice(None),) * (len(block.shape) - 1)]  # a full index: the array API rule
    return take_rows(block, pick)


def device_batch(model, x, y=None, sample_weight=None):
    """One custom-loop batch for ``model`` (``train_step``, ``loss_and_grads``): validated (shapes, lengths, width,
    targets), the model built on first use, host data sent to its device. Data on another device raises
    ValueError naming both devices: a custom loop moves its data explicitly (fit/evaluate/predict stream it).
    Returns ``(x, y, sample_weight)`` on the model's device."""
    x = check_array(x, "x")
    y = None if y is None else check_array(y, "y", ndim=(1, 2))
    sample_weight = None if sample_weight is None else check_array(sample_weight, "sample_weight", ndim=(1,))
    check_lengths(x=x, y=y, sample_weight=sample_weight)
    model.check_input_dim(x.shape[1])
    device = model.device
    if y is not None:  # target values are read back only where that costs no device sync
        model.check_targets(y, x.shape[1], values=is_host_data(y) or device.host_memory)
    for name, a in (("x", x), ("y", y), ("sample_weight", sample_weight)):
        if not (a is None or device.owns(a) or is_host_data(a)):
            raise ValueError(
                f"{name} lives on {_describe(a)} but the model is on {device.name}; move it explicitly "
                f"(portanet.to_numpy({name}) or model.device.asarray({name})) or use fit/evaluate/predict, which "
                "stream it")
    model.build(x.shape[1])
    dtypes = (model.dtype, "int64" if model.loss.sparse else model.dtype, model.dtype)
    return tuple(None if a is None else device.asarray(a, dt) for a, dt in zip((x, y, sample_weight), dtypes))


def _describe(a) -> str:
    try:
        return f"{library_of(a)} device {array_api_compat.device(a)}"
    except Exception:  # noqa: BLE001 - only for an error message
        return type(a).__name__


def batches(x, y=None, *, batch_size=32, shuffle=False, seed=None, device="cpu", dtype="float32", y_dtype="float",
            steps_per_epoch=None, prefetch=None):
    """Iterate ``(x_batch, y_batch)`` on ``device`` for custom training loops (``y_batch`` None without ``y``).

    ``x`` and ``y`` are anything :class:`Batches` takes (``x`` alone may be an iterable of ``(x, y)`` batches).
    ``x`` batches come as ``dtype`` (float32 by default: pass ``dtype=model.dtype`` for a float64 model).
    """
    for xb, yb, _ in Batches(x, y, batch_size=batch_size, shuffle=shuffle, rng=seed, device=device, dtype=dtype,
                             y_dtype=y_dtype, steps_per_epoch=steps_per_epoch, prefetch=prefetch):
        yield xb, yb


def host_empty(shape, dtype) -> np.ndarray:
    """An uninitialized host (NumPy) array, filled batch by batch (``predict(..., to_numpy=True)``)."""
    return np.empty(shape, dtype_name(dtype))


# -- validation split: which rows go where (host index math) ----------------------------------------
def check_fraction(fraction, source) -> float:
    """``fit(validation_split=...)`` checked: a number in [0, 1), and in-memory data with rows to spare."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 <= fraction < 1:
        raise ValueError(f"validation_split must be a number in [0, 1), got {fraction!r}")
    if not fraction:
        return 0.0
    if not isinstance(source, ArrayAdapter):
        kind = type(getattr(source, "x", getattr(source, "source", None))).__name__
        raise ValueError("validation_split needs in-memory arrays (a random split of a stream, memory map or "
                         f"sliceable would read it all); pass validation_data= instead (x is a {kind})")
    n = source.n
    n_val = round(fraction * n)
    if not 1 <= n_val < n:
        raise ValueError(f"validation_split={fraction} of {n} rows leaves {n_val} for validation and {n - n_val} for "
                         "training; both need at least one")
    return float(fraction)


def split_rows(n: int, fraction: float, labels, seed: int):
    """``(train_rows, val_rows)``: sorted host int64 indices, about ``fraction`` of the ``n`` rows for validation.

    ``labels`` (host int array of class labels, or None): each class contributes its share (largest remainders
    get the rounding, a class never gives all its rows), so validation and training see the same class mix; the
    sizes are :func:`split_sizes`'s.
    """
    rng = np.random.default_rng(seed)
    n_val = round(fraction * n)
    val = rng.permutation(n)[:n_val]
    if labels is not None:
        classes, take = _class_shares(n, n_val, labels, rng)
        if take.sum():  # else every class is a singleton: the plain random split above
            val = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)])
    is_val = np.zeros(n, bool)
    is_val[val] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def split_sizes(n: int, fraction: float, labels) -> tuple[int, int]:
    """``(training rows, validation rows)`` that :func:`split_rows` gives for any seed: ``round(fraction * n)``
    validation rows, fewer when a stratified split runs out of classes that can give one more row."""
    n_val = round(fraction * n)
    if labels is not None:
        # the seed only breaks ties between classes; how many rows the shares add up to does not depend on it
        take = _class_shares(n, n_val, labels, np.random.default_rng(0))[1]
        n_val = int(take.sum()) or n_val
    return n - n_val, n_val


def _class_shares(n: int, n_val: int, labels, rng):
    """``(classes, rows of each for validation)``: each class's share of ``n_val`` rounded down, then one more row
    for the largest remainders (ties in ``rng``'s order) while rows are left, never all of a class's rows."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (n_val / n)
    take = np.minimum(np.floor(exact).astype(np.int64), np.maximum(counts - 1, 0))
    spare = n_val - int(take.sum())
    for i in np.lexsort((rng.random(len(classes)), take - exact)):  # largest remainder first, ties at random
        if spare > 0 and take[i] < counts[i] - 1:
            take[i] += 1
            spare -= 1
    return classes, take
