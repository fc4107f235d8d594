"""The fit and evaluate loops: data adapters in, device batches to the model's step, loss and metric totals kept on
the device, the NaN guard, resume, class weights, validation split, callback dispatch.

Works through the model's documented interface (``compute_gradients``, ``apply_gradients``, ``test_step``,
``snapshot``/``restore``, ``build``, ``check_input_dim``, ``check_targets``, ``random_state``) and never imports
:mod:`portanet.model`. Every argument is checked before the model changes or a random number is drawn.
Data-parallel training (``distributed=``) adds a few hooks: this rank's rows of each batch (:class:`data.Batches`
``part``), :class:`_Replicas` around the step and at epoch ends, totals and guard flags reduced over ranks.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
import weakref

import array_api_compat

from . import checks as _checks
from . import _interrupts
from . import data as _data
from . import distributed as _distributed
from . import io as _io
from .backends import dtype_name, is_host_data, to_numpy
from .callbacks import CallbackList, History, check_callbacks

__all__ = ["fit", "evaluate", "check_not_training"]

_running = weakref.WeakKeyDictionary()  # model -> thread running fit() on it: a second concurrent fit is refused
_running_lock = threading.Lock()


def fit(model, x, y=None, *, epochs=1, batch_size=32, shuffle=True, validation_data=None, validation_split=0.0,
        sample_weight=None, class_weight=None, callbacks=None, verbose=1, steps_per_epoch=None, log_every=None,
        resume_from=None, distributed=None) -> History:
    """Train ``model`` for ``epochs`` passes over (x, y); returns a :class:`~portanet.History` of per-epoch logs.

    x: (samples, features); y: (samples, outputs), or (samples,) labels/targets; arrays of any library and
    device, memory maps, sliceables (h5py, zarr), or x alone as an iterable of (x, y[, sample_weight])
    batches with ``steps_per_epoch`` batches per epoch (required when it has no length). Data is streamed to
    the device one batch at a time. ``verbose``: 0 silent, 1 a progress bar per epoch with the running loss and
    metrics (read about 20 times per epoch), 2 one line per epoch.
    ``log_every``: also read the running loss and metrics back every that many steps (callbacks' ``on_log``).
    ``validation_split``: fraction of the rows of in-memory (x, y) held out for validation, drawn at random and
    stratified by class for classification losses. ``validation_data``: (x_val, y_val[, sample_weight]).
    ``sample_weight``: (samples,) weight of each row's loss. ``class_weight``: ``{class: weight}`` multiplying
    the loss of each sample of that class (classification losses; absent classes weigh 1).
    ``resume_from``: a checkpoint written by :class:`~portanet.callbacks.ModelCheckpoint`; weights, optimizer,
    random generator states, history and callback state are restored and training continues up to ``epochs``.

    Each epoch's logs (and so the History) hold ``"lr"``: the learning rate the epoch's last optimizer step used
    (with a per-step schedule, ``schedule(iterations - 1)``), a host float read without a device sync.

    Every argument is checked first (ValueError/TypeError naming it), before the model is built or changes.
    NaN or inf in in-memory inputs raise ValueError before training; lazily read batches (streams, memory maps,
    sliceables, validation data included) holding NaN or inf, or whose source raises anything while being read,
    raise :class:`~portanet.data.StreamError` and the model is put back as it was before the call. A NaN or inf
    loss, or weights or optimizer state found NaN or inf, stop training with FloatingPointError naming the epoch;
    the model keeps the last state checked finite (``callbacks=[TerminateOnNaN()]`` stops without raising). Ctrl-C
    (KeyboardInterrupt) ends training after the current step: completed steps are kept, with the optimizer state and
    step count that go with them (README, "Reliability"). A second fit of the same model in another thread raises
    RuntimeError.
    Data the model will likely learn badly from (unscaled inputs, targets the output cannot reach, labels sorted by
    class without shuffling) gives a :class:`~portanet.checks.SetupWarning` with the fix.

    ``distributed``: None (one process), "mpi", "nccl" or a :class:`~portanet.distributed.Communicator`: data-parallel
    training over the processes of an ``mpiexec`` job (started as one process, it is plain training). Every rank
    passes the same arguments (callbacks may differ; rank 0's ``verbose`` applies) and the whole data set; rank 0's
    initial weights and generators are copied to all; each global batch of ``batch_size`` rows (the one-process
    batches and shuffle) is split over the ranks, and the gradients are summed once per step, so the weights are
    those of one process (except with BatchNormalization, which normalizes each rank's share with its own statistics;
    every non-empty share needs the layer's 2 rows, else ValueError before training). Logs are over all ranks; rank 0
    alone shows progress and writes checkpoints. Ranks that disagree about the model, the data's shapes or the arguments
    raise :class:`~portanet.distributed.RankMismatchError` before training; parameters that differ after an epoch or at
    the end of fit (a callback given on some ranks only that changed the weights) raise it too; a rank that fails or
    stops makes the others raise DistributedError (or ends the job) within the communicator's timeout. Ctrl-C is not
    deferred (it ends the job).
    """
    # -- check everything; nothing changes and nothing is drawn until the model is built below
    _require_compiled(model, "fit()")
    epochs = _non_negative_int(epochs, "epochs")
    batch_size = _data.positive_int(batch_size, "batch_size")
    _check_verbose(verbose)
    if log_every is not None:
        if isinstance(log_every, bool) or not isinstance(log_every, numbers.Integral) or log_every <= 0:
            raise ValueError(f"log_every must be a positive integer or None, got {log_every!r}")
        log_every = int(log_every)
    user_callbacks = check_callbacks(callbacks)
    train = _data.adapt(x, y, sample_weight, steps=steps_per_epoch, targets=True)
    _check_model_fits(model, train)
    fraction = _data.check_fraction(validation_split, train)
    val = None
    if validation_data is not None:
        if fraction:
            raise ValueError("pass validation_data or validation_split to fit(), not both")
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) not in (2, 3):
            raise ValueError("validation_data must be a tuple (x_val, y_val) or (x_val, y_val, sample_weight)")
        val = _data.adapt(*validation_data, targets=True, prefix="validation")
        _check_model_fits(model, val, train.width)
    _check_training_rows(model, train, batch_size, fraction)
    out_dim = model.output_width(train.width)
    class_table = _class_weights(class_weight, model.loss, out_dim)
    for source in (train, val):
        bad = source.nonfinite() if isinstance(source, _data.ArrayAdapter) else None
        if bad:
            raise ValueError(f"{bad[0]} holds NaN or inf (the first in row {bad[1]}); training on it would turn the "
                             "weights into NaN: clean or impute the data first")
    _checks.check_training_data(model, train, shuffle, val)
    _check_monitors(model, user_callbacks, validation=val is not None or bool(fraction))
    if model.built and not bool(model.parameter_buffer.all_finite()):
        raise ValueError("the model's weights hold NaN or inf before training (set by set_parameters or "
                         "load_weights?); fit() never trains from them: load or set finite weights first")
    checkpoint = None if resume_from is None else _io.read_checkpoint(resume_from, model, train.width,
                                                                       user_callbacks)
    comm = _communicator(distributed, model)
    with _running_lock:
        if model in _running:
            raise RuntimeError("fit() is already running on this model (in another thread); one fit at a time")
        _running[model] = threading.get_ident()
    try:
        if comm is not None:
            _agree(comm, model, train, val, checkpoint, [epochs, batch_size, bool(shuffle), fraction, class_table,
                                                         log_every])
            _check_training_rows(model, train, batch_size, fraction, comm.size)  # the same answer on every rank
            verbose = comm.broadcast_object(verbose)  # rank 0's: it decides when the running loss is read
        # -- from here on the model changes; in one process, a first Ctrl-C waits until the current step is whole
        with _interrupts.deferred() if comm is None else contextlib.nullcontext(lambda: False) as interrupted:
            model.build(train.width)
            replicas = None if comm is None else _Replicas(comm, model).replicate()
            return _train(model, train, val, fraction, epochs, batch_size, shuffle, class_table, user_callbacks,
                          verbose, log_every, checkpoint, interrupted, replicas)
    finally:
        _running.pop(model, None)


def check_not_training(model, what: str) -> None:
    """Raise RuntimeError when ``fit()`` runs on ``model`` in another thread (``what`` would change the training
    state it is using: its gradient buffer, weights or optimizer)."""
    thread = _running.get(model)
    if thread is not None and thread != threading.get_ident():
        raise RuntimeError(f"{what} would change the training state of a model that fit() is training in another "
                           "thread; only predict() and evaluate() may run during fit()")


def _train(model, train, val, fraction, epochs, batch_size, shuffle, class_table, user_callbacks, verbose, log_every,
           checkpoint, interrupted, replicas=None):
    split_seed = None
    if fraction:
        split_seed = checkpoint.fit.get("split_seed") if checkpoint else int(model.rng.integers(2**63))
        train, val = _split_validation(model, train, fraction, split_seed)
    comm = None if replicas is None else replicas.comm
    batches = _batches(model, train, batch_size, shuffle, comm)
    if class_table is not None:
        class_table = model.device.from_host(class_table, model.dtype)
    config = {"epochs": epochs, "batch_size": batch_size, "shuffle": bool(shuffle), "validation_split": fraction,
              "split_seed": split_seed}
    if checkpoint is not None:
        _warn_if_changed(checkpoint, config)
    history = History()
    rank, ranks = (0, 1) if comm is None else (comm.rank, comm.size)
    params = {"epochs": epochs, "steps": len(batches), "verbose": 0 if rank else verbose, "fit": config,
              "history": history, "rank": rank, "ranks": ranks}
    cbs = CallbackList([history, *user_callbacks], model, params)
    every = log_every or (max(1, len(batches) // 20) if verbose == 1 else None)
    rollback = model.snapshot(training=True) if train.reads_lazily or (val is not None and val.reads_lazily) else None
    model.stop_training = False
    model.history = history
    cbs.on_train_begin()
    if checkpoint is not None:
        checkpoint.load_callback_states(cbs.callbacks, model)
        checkpoint.restore(model)
        history.epoch, history.history = checkpoint.history["epoch"], checkpoint.history["history"]
        if checkpoint.epoch >= epochs:
            _checks.warn(f"{checkpoint.path} has already trained {checkpoint.epoch} epochs and fit() was asked for "
                         f"{epochs} in all: nothing left to train (raise epochs to continue)", UserWarning)
    if replicas is not None:
        replicas.resume(config, checkpoint)
    guard = _Guard(model, check_batches=train.reads_lazily, source=train, deferred=replicas is not None)
    try:
        for epoch in range(checkpoint.epoch if checkpoint else 0, epochs):
            if replicas is not None:
                replicas.begin_epoch(epoch, batches)
            cbs.on_epoch_begin(epoch)
            try:
                logs = _run_epoch(model, batches, cbs, epoch, guard, every, class_table, interrupted, replicas)
            except _NonFinite as bad:
                _stop_on_nonfinite(model, bad, guard, cbs, len(batches))
                break
            if replicas is not None:
                replicas.end_epoch(epoch)
            if val is not None:
                val_logs = _evaluate(model, val, max(batch_size, 1024), comm)
                logs.update({f"val_{k}": v for k, v in val_logs.items()})
            logs["lr"] = _last_learning_rate(model.optimizer)
            cbs.on_epoch_end(epoch, logs)
            cbs.on_epoch_complete(epoch, logs)
            if replicas is not None:  # also waits for rank 0's checkpoint to be written
                model.stop_training = replicas.any(model.stop_training)
            if model.stop_training:
                break
            if interrupted():
                raise KeyboardInterrupt
    except _data.StreamError:
        cbs.on_train_end()  # first: EarlyStopping may put its best weights back, the rollback then undoes them too
        if rollback is not None:
            model.restore(rollback)
        raise
    except BaseException:  # Ctrl-C, a callback's error...: the steps done are kept, never non-finite weights
        guard.keep_finite()
        raise
    cbs.on_train_end()
    if replicas is not None:  # also waits for rank 0's files: every rank returns once they are written
        replicas.end_training()
    return history


def evaluate(model, x, y=None, *, batch_size=1024, sample_weight=None, steps=None, distributed=None) -> dict:
    """Mean loss and metrics over (x, y) as ``{"loss": float, "accuracy": float, ...}``; nothing changes.

    Takes what ``fit`` takes; ``steps``: batches to read from an iterable of batches without a length. Metrics are
    computed on exactly what ``predict`` returns; lazily read batches holding NaN or inf raise StreamError.
    ``distributed``: as in ``fit``: each rank evaluates its share of each batch, and every rank returns the values
    over all the data (the parameters must be the same on every rank: RankMismatchError otherwise).
    """
    _require_compiled(model, "evaluate()")
    _data.positive_int(batch_size, "batch_size")
    source = _data.adapt(x, y, sample_weight, steps=steps, targets=True)
    _check_model_fits(model, source)
    comm = _communicator(distributed, model)
    if comm is not None:
        comm.agree(_model_config(model), "the model (layers, loss, optimizer, metrics)")
        comm.agree((_shape_of(source), batch_size), "the data of evaluate() (kind, rows, features, y shape and dtype, "
                                                    "sample weights, steps) and its batch_size")
    model.build(source.width)
    if comm is not None:
        comm.check_identical(model.parameter_buffer.values, "the parameters in evaluate()")
    return _evaluate(model, source, batch_size, comm)


# -- checks (no side effects) -------------------------------------------------------------------------------------
def _require_compiled(model, what):
    if model.loss is None:
        raise RuntimeError(f"{what} needs a compiled model: call compile(loss=..., optimizer=...) first")


def _non_negative_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_verbose(verbose):
    if isinstance(verbose, bool) or verbose not in (0, 1, 2):
        raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}")


def _check_model_fits(model, source, width=None):
    """Input width and targets of ``source`` against the model (unbuilt models: against their layers)."""
    prefix = f"{source.prefix} " if getattr(source, "prefix", "") else ""
    if width is not None and source.width != width:
        raise ValueError(f"{prefix}x has {source.width} features but x has {width}")
    model.check_input_dim(source.width, f"{prefix}x")
    targets = source.first_targets()
    values = isinstance(source, _data.ArrayAdapter) or is_host_data(targets) or model.device.host_memory
    model.check_targets(targets, source.width, f"{prefix}y", values=values)


def _class_weights(class_weight, loss, out_dim):
    """``class_weight`` checked: a host list of per-class weights, or None."""
    if class_weight is None:
        return None
    if not isinstance(class_weight, dict):
        raise TypeError(f"class_weight must be a dict {{class: weight}}, got {type(class_weight).__name__}")
    n = loss.classes(out_dim)
    if n is None:
        raise ValueError("class_weight needs a classification loss (sparse_categorical_crossentropy, "
                         f"categorical_crossentropy, or binary_crossentropy with one output), got {loss.name}")
    table = [1.0] * n
    for label, weight in class_weight.items():
        if isinstance(label, bool) or not hasattr(label, "__index__") or not 0 <= label < n:
            raise ValueError(f"class_weight keys must be class indices in [0, {n}), got {label!r}")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 <= weight < math.inf:
            raise ValueError(f"class_weight[{label}] must be a finite number >= 0, got {weight!r}")
        table[int(label)] = float(weight)
    return table


def _check_training_rows(model, source, batch_size, fraction, ranks=1):
    """Every training batch of in-memory or sliced data has the rows the model's layers need in training
    (BatchNormalization: 2), so a batch of 1 row left over at the end of an epoch fails now, not mid-training.
    ``ranks`` > 1 (data-parallel): each rank's non-empty share of every global batch (:func:`distributed.split_rows`)
    must have them, since each rank runs the layers on its share alone."""
    need = model.min_training_rows
    if need <= 1 or source.n is None:
        return
    n = _data.split_sizes(source.n, fraction, _split_labels(model, source))[0] if fraction else source.n
    last = n % batch_size or batch_size
    layer = next((layer for layer in model.layers if layer.min_training_rows == need), None)
    if min(n, last) < need:
        raise ValueError(f"batch_size={batch_size} splits the {n} training rows into batches the last of which has "
                         f"{min(n, last)} row(s), but layer {layer.name!r} ({type(layer).__name__}) needs at least "
                         f"{need} rows per training batch: choose another batch_size (or drop {min(n, last)} "
                         "row(s))")
    if ranks > 1:
        for rows in sorted({min(n, batch_size), last}):
            share = max(rows // ranks, 1)  # the smallest non-empty share (a rank may get none of a short batch)
            if share < need:
                raise ValueError(
                    f"batch_size={batch_size} on {ranks} ranks splits a global batch of {rows} rows into shares as "
                    f"small as {share} row(s), but layer {layer.name!r} ({type(layer).__name__}) needs at least "
                    f"{need} rows per training batch on each rank (each rank normalizes its own share): choose a "
                    f"batch_size whose batches, the last included, have at least {need * ranks} rows")


def _check_monitors(model, callbacks, validation):
    """Every log key a built-in callback reads will exist (before training: a typo fails now, not after an
    epoch). With a callback of the user's own in the list, which may add keys to the logs, nothing is assumed."""
    if any(type(cb).__module__ != CallbackList.__module__ for cb in callbacks):
        return
    keys = ["loss", *(m.name for m in model.metrics)]
    keys += [f"val_{k}" for k in keys if validation] + ["lr"]
    for cb in callbacks:
        cb.check_logs(keys)


def _warn_if_changed(checkpoint, config):
    for key in ("batch_size", "shuffle", "validation_split"):
        if key in checkpoint.fit and checkpoint.fit[key] != config[key]:
            _checks.warn(f"resuming from {checkpoint.path} with {key}={config[key]!r}, but it was trained with "
                         f"{checkpoint.fit[key]!r}: training will not continue exactly as an uninterrupted run would",
                         UserWarning)


# -- the loops --------------------------------------------------------------------------------------------------
def _batches(model, source, batch_size, shuffle=False, comm=None):
    """Device batches of ``source``; with ``comm``, this rank's rows of each (global) batch."""
    part = None if comm is None else (lambda rows: _distributed.split_rows(rows, comm.rank, comm.size))
    return _data.Batches(source, batch_size=batch_size, shuffle=shuffle, rng=model.rng, device=model.device,
                         dtype=model.dtype, y_dtype=model.loss.target_kind(),
                         check_targets=lambda y, name="y", values=True: model.check_targets(y, None, name, values),
                         part=part)


def _split_validation(model, source, fraction, seed):
    """Hold out ``fraction`` of the rows (stratified by class for classification) as validation data."""
    train_rows, val_rows = _data.split_rows(source.n, fraction, _split_labels(model, source), seed)
    val = source.take(val_rows)
    val.prefix = "validation"
    return source.take(train_rows), val


def _split_labels(model, source):
    """Host class labels of ``source.y`` that a validation split is stratified by, or None (a regression loss)."""
    width, y = model.output_width(source.width), source.y
    if model.loss.classes(width) is None:
        return None
    return to_numpy(model.loss.class_labels(y, width, array_api_compat.array_namespace(y)))


def _run_epoch(model, batches, cbs, epoch, guard, log_every, class_table, interrupted, replicas=None) -> dict:
    """One pass; loss and metric sums stay on the device, read at the end (and every ``log_every`` steps)."""
    totals = _Totals(model, guard, None if replicas is None else replicas.comm)
    xp, table = model.xp, class_table
    for step, (xb, yb, wb) in enumerate(batches):
        if table is not None:
            w = xp.take(table, model.loss.class_labels(yb, model.output_dim, xp), axis=0)
            wb = w if wb is None else wb * w
        guard.check_batch(xb, yb, wb, epoch, step)
        if replicas is None:
            loss, out = model.compute_gradients(xb, yb, wb)
        else:  # this rank's rows of the global batch; the gradient summed over ranks
            loss, out = replicas.compute_gradients(xb, yb, wb)
        guard.check_loss(loss, epoch, step)
        model.apply_gradients()
        totals.add(loss, out, yb)
        cbs.on_batch_end(step, loss)
        if interrupted():
            raise KeyboardInterrupt
        if log_every and (step + 1) % log_every == 0:
            cbs.on_log(step, totals.logs())
            guard.passed(epoch, step + 1)
    logs = totals.logs()
    guard.passed(epoch + 1, 0)
    return logs


def _last_learning_rate(optimizer) -> float:
    """The rate of the latest step (the next step's before any): a host float, no device read."""
    rate = optimizer.last_learning_rate
    return optimizer.learning_rate if rate is None else rate


def _evaluate(model, source, batch_size, comm=None) -> dict:
    totals = _Totals(model, _Guard(model, check_batches=source.reads_lazily, training=False, source=source,
                                   deferred=comm is not None), comm)
    for step, (xb, yb, wb) in enumerate(_batches(model, source, batch_size, comm=comm)):
        totals.guard.check_batch(xb, yb, wb, 0, step)
        if xb.shape[0]:  # a rank's share of a short last batch may be empty
            loss, out = model.test_step(xb, yb, wb)
            totals.add(loss, out, yb)
    return totals.logs()


# -- totals and the NaN guard -------------------------------------------------------------------------------------
class _Totals:
    """Sums of the batch losses (times batch size) and metric sums, kept on the device until :meth:`logs` reads them
    once, together with the guard's flags; with ``comm``, summed over ranks (flags: their worst value) there."""

    def __init__(self, model, guard, comm=None):
        self.xp, self.metrics, self.guard, self.comm = model.xp, model.metrics, guard, comm
        self.device, self.dtype = model.device, model.dtype
        self.loss, self.sums, self.n = None, [None] * len(model.metrics), 0

    def add(self, loss, out, y):
        """Add a batch: its mean ``loss`` (0-d) and outputs; ``out`` None: a rank's empty share of a batch."""
        if out is None:
            return
        nb = out.shape[0]
        self.loss = loss * nb if self.loss is None else self.loss + loss * nb
        for i, metric in enumerate(self.metrics):
            s = metric.batch_sum(out, y, self.xp)
            self.sums[i] = s if self.sums[i] is None else self.sums[i] + s
        self.n += nb

    def logs(self) -> dict:
        """Means so far, read back from the device in one transfer (the guard's flags ride along).

        Data-parallel: one sum over ranks of the sums and counts, one minimum of the flags, so every rank logs the
        same values and the guard decides the same way everywhere."""
        xp, n = self.xp, self.n
        sums = [self.device.zeros((), self.dtype) if s is None else s for s in (self.loss, *self.sums)]  # None: no rows
        flags = self.guard.flags()
        values = to_numpy(xp.stack([xp.astype(s, sums[0].dtype) for s in (*sums, *flags)]))
        if self.comm is not None:
            k = len(sums)
            *totals, n = self.comm.allreduce_host([*values[:k].tolist(), n])
            values = [*totals, *(self.comm.allreduce_host(values[k:], "min") if flags else [])]
        if flags:
            self.guard.verify([float(v) for v in values[-len(flags):]])
            values = values[:-len(flags)]
        return {name: float(s) / n for name, s in zip(["loss", *(m.name for m in self.metrics)], values)}


class _NonFinite(Exception):
    """Raised inside fit's loop at the first NaN/inf loss or weights; ``value`` is None when only known on the
    device."""

    def __init__(self, epoch, step, value=None, weights=False):
        super().__init__(epoch, step, value)
        self.epoch, self.step, self.value, self.weights = epoch, step, value, weights


class _Guard:
    """Stops training at the first NaN/inf loss and never lets non-finite weights out of fit; checks lazily read
    batches for NaN/inf (they raise StreamError, and fit puts the model back).

    In host memory each step's loss (and batch) is read before its update, so a bad step never reaches the weights.
    On other devices nothing is read per step: flags accumulate on the device and ride along with the periodic read
    of the running loss (:class:`_Totals`), together with a check that the weights are finite (on every device: an
    update can overflow while the loss is finite). Each read that finds everything finite takes a snapshot, on the
    host too; a failure puts the last snapshot back. ``training=False`` (evaluation) checks batches only.
    ``deferred``: track on the device even in host memory (data-parallel training: the flags are reduced over ranks
    with the totals, so every rank stops at the same step).
    """

    def __init__(self, model, check_batches, training=True, source=None, deferred=False):
        self.model, self.check_batches, self.training = model, check_batches, training
        self.names = _field_names(source)
        self.host = model.device.host_memory and not deferred
        self.saved = None
        self.passed(0, 0)

    def passed(self, epoch, step):
        """A read found everything finite up to ``step`` of ``epoch`` (0-based): snapshot and restart the flags."""
        xp, dev = self.model.xp, self.model.device
        if self.training:
            self.saved = self.model.snapshot(training=True)
            self.saved.label = "the start of training" if epoch == step == 0 else (
                f"the end of epoch {epoch}" if step == 0 else f"step {step} of epoch {epoch + 1}")
        self.epoch, self.since = epoch, step
        if not self.host:
            ok, steps = xp.logical_not(dev.zeros((), "bool")), dev.zeros((), "int64")
            self.batch = {field: (ok, steps) for field in _FIELDS}
            self.loss_ok, self.loss_steps = ok, steps

    def check_batch(self, xb, yb, wb, epoch, step):
        """Check (host memory) or track (device) that a lazily read batch is finite."""
        if not self.check_batches:
            return
        xp = self.model.xp
        for field, a in zip(_FIELDS, (xb, yb, wb)):
            finite = _all_finite(xp, a)
            if finite is None:
                continue
            if self.host:
                if not bool(finite):
                    raise _data.StreamError(self._bad_batch(epoch, step, field))
                continue
            ok, steps = self.batch[field]  # leading finite steps since the last read, counted on the device
            ok = xp.logical_and(ok, finite)
            self.batch[field] = ok, steps + xp.astype(ok, xp.int64)

    def check_loss(self, loss, epoch, step):
        """Before the update of ``step``: raise at once on the host, track on the device."""
        xp = self.model.xp
        if self.host:
            value = float(loss)
            if not math.isfinite(value):
                raise _NonFinite(epoch, step, value)
            return
        self.loss_ok = xp.logical_and(self.loss_ok, xp.isfinite(loss))
        self.loss_steps = self.loss_steps + xp.astype(self.loss_ok, xp.int64)

    def flags(self) -> tuple:
        """Device values to read with the totals: batch and loss flags (devices), weights finite (training)."""
        out = []
        if not self.host:
            out += [f for field in _FIELDS for f in self.batch[field]] if self.check_batches else []
            out += [self.loss_ok, self.loss_steps] if self.training else []
        if self.training:
            out.append(_state_finite(self.model))
        return tuple(out)

    def _bad_batch(self, epoch, step, field) -> str:
        where = f" in epoch {epoch + 1}" if self.training else ""
        undo = " (fit() puts the model back as it was before the call)" if self.training else ""
        return f"batch {step} of {self.names[field]}{where} holds NaN or inf: clean or impute the data first{undo}"

    def verify(self, values):
        values = list(values)
        if not self.host and self.check_batches:
            found = [(int(values[2 * i + 1]), field) for i, field in enumerate(_FIELDS) if not values[2 * i]]
            values = values[2 * len(_FIELDS):]
            if found:
                steps, field = min(found)
                raise _data.StreamError(self._bad_batch(self.epoch, self.since + steps, field))
        if not self.host and self.training:
            (ok, steps), values = values[:2], values[2:]
            if not ok:
                raise _NonFinite(self.epoch, self.since + int(steps))
        if self.training and not values[0]:
            raise _NonFinite(self.epoch, self.since, weights=True)

    def keep_finite(self) -> None:
        """On the way out of an interrupted or failed fit: unless the weights are finite, put the last good
        snapshot back (with a warning). One read; nothing is raised from here."""
        if not self.training:
            return
        try:
            finite = bool(_state_finite(self.model))
            if not finite:
                self.model.restore(self.saved)
        except Exception:  # noqa: BLE001 - the device may be what failed; the original error is the one to see
            return
        if not finite:
            _checks.warn(f"the weights or the optimizer state were NaN or inf when training stopped; the model "
                         f"keeps the weights from {self.saved.label}", RuntimeWarning)

    def recover(self) -> str:
        """Make the weights finite again; say which weights the model now holds."""
        model = self.model
        if self.host and bool(_state_finite(model)):
            return "the weights from before that step"
        model.restore(self.saved)
        return f"the weights from {self.saved.label}"


_FIELDS = ("x", "y", "sample_weight")


def _state_finite(model):
    """0-d device bool: the weights, the non-trainable state and the optimizer's slots are all finite (no host
    read). An Adam ``v`` that overflowed to inf leaves the weights finite but frozen: training state gone bad."""
    xp = model.xp
    ok = model.parameter_buffer.all_finite()
    for slot in (model.optimizer.state.values() if model.optimizer is not None else ()):
        ok = xp.logical_and(ok, model.device.all_finite(slot))
    return ok


def _all_finite(xp, a):
    """0-d device bool: ``a`` holds no NaN or inf; None for None or a non-float array (nothing to check)."""
    if a is None or not xp.isdtype(a.dtype, "real floating"):
        return None
    return xp.all(xp.isfinite(a))


def _field_names(source) -> dict:
    """``{"x": "validation x (Sliceable)", ...}``: each field of a data source as error messages name it."""
    prefix = getattr(source, "prefix", "") or ""
    names = {}
    for field in _FIELDS:
        origin = source.source if isinstance(source, _data.StreamAdapter) else getattr(source, field, None)
        label = f"{prefix} {field}" if prefix else field
        names[field] = label if origin is None else f"{label} ({type(origin).__name__})"
    return names


def _stop_on_nonfinite(model, bad, guard, cbs, steps):
    """Put the last finite weights back, then raise FloatingPointError unless a callback stops training."""
    kept = guard.recover()
    if bad.weights:
        what = (f"the weights or the optimizer state became NaN or inf during epoch {bad.epoch + 1} (an update or "
                "a gradient overflowed)")
    else:
        value = "NaN or inf" if bad.value is None else ("NaN" if math.isnan(bad.value) else str(bad.value))
        what = f"the loss became {value} at epoch {bad.epoch + 1}, step {bad.step + 1} of {steps}"
    message = (f"{what}; training stopped and the model keeps {kept}. Likely causes: a learning rate too high (try "
               "one 10x lower), inputs that are not scaled (standardize each feature to mean 0 and std 1), NaN or inf "
               "in y, or a loss or activation that overflows. callbacks=[TerminateOnNaN()] stops without raising.")
    cbs.on_nonfinite_loss(bad.epoch, bad.step)
    if not model.stop_training:
        raise FloatingPointError(message)
    _checks.warn(message, RuntimeWarning)


# -- data-parallel training ---------------------------------------------------------------------------------------
def _communicator(distributed, model):
    """The communicator of a data-parallel run, or None: ``distributed`` None, or a group of one process."""
    if distributed is None:
        return None
    comm = _distributed.get_communicator(distributed)
    if comm.size == 1:
        return None
    comm.check_device(model.device)
    return comm


def _model_config(model) -> dict:
    """``model.get_config()``; with a learning rate given as a plain callable (no config), its layers and names."""
    try:
        return model.get_config()
    except ValueError:
        return {"layers": [layer.get_config() for layer in model.layers], "input_dim": model.input_dim,
                "dtype": model.dtype, "loss": model.loss.get_config(), "optimizer": type(model.optimizer).__name__,
                "metrics": [m.get_config() for m in model.metrics]}


def _shape_of(source):
    """What every rank's data must share: kind, rows, features, y's shape and dtype, weights, steps, block size."""
    if source is None:
        return None
    y = source.first_targets()
    stream = isinstance(source, _data.StreamAdapter)
    weights = source.first[2] if stream else source.sample_weight
    return (type(source).__name__, source.n, source.width, tuple(y.shape[1:]), dtype_name(y.dtype),
            weights is not None, source.n_steps if stream else None, getattr(source, "block_size", None))


def _agree(comm, model, train, val, checkpoint, arguments):
    """RankMismatchError on every rank, before anything changes, unless every rank trains the same model on data of
    the same shapes with the same arguments."""
    opt = model.optimizer
    comm.agree(_model_config(model), "the model (layers, loss, optimizer, metrics)")
    comm.agree((model.backend, model.built, opt.iterations, sorted(opt.state)),
               "the model's backend, whether it is built, and its optimizer's steps and slots")
    comm.agree(_shape_of(train), "the training data (kind, rows, features, y shape and dtype, sample weights, steps, "
                                 "block size)")
    comm.agree(_shape_of(val), "the validation data")
    comm.agree(arguments, "the arguments of fit() (epochs, batch_size, shuffle, validation_split, class_weight, "
                          "log_every)")
    comm.agree(None if checkpoint is None else (checkpoint.epoch, checkpoint.step), "the checkpoint (epoch, step)")


class _Replicas:
    """This process's part in data-parallel training over ``comm`` (two or more ranks): the hooks of fit's loop.

    :meth:`replicate` copies rank 0's model to every rank, so each holds the same weights and draws the same
    shuffles. Each step, the mean gradient of this rank's rows, weighted by their share of the global batch, is
    summed over ranks in one all-reduce of the flat gradient buffer: the global batch's mean gradient, the same on
    every rank. At each epoch's end the running statistics are averaged and the parameters' checksums compared.
    """

    def __init__(self, comm, model):
        self.comm, self.model = comm, model
        self.batches = self.dropout_seed = None

    def replicate(self) -> "_Replicas":
        """Copy rank 0's parameters, state, optimizer state and random generator states to every rank."""
        model, comm = self.model, self.comm
        buffer, slots = model.parameter_buffer, model.optimizer.state
        for a in (buffer.values, buffer.state, *(slots[k] for k in sorted(slots))):
            if a.shape[0]:
                comm.broadcast_(a)
        model.set_random_state(comm.broadcast_object(model.random_state()))
        return self

    def resume(self, config, checkpoint):
        """Before the first epoch (a checkpoint, if any, restored on every rank): the run's dropout seed (kept in
        checkpoints, so a resumed run draws the same masks), then the parameters must be the same everywhere."""
        seed = checkpoint.fit.get("dropout_seed") if checkpoint is not None else None
        self.dropout_seed = _distributed.derive_seed(self.model.rng.bit_generator.state) if seed is None else seed
        config["dropout_seed"] = self.dropout_seed
        what = f"the parameters restored from {checkpoint.path}" if checkpoint is not None else "the initial parameters"
        self.comm.check_identical(self.model.parameter_buffer.values, what)

    def begin_epoch(self, epoch, batches):
        """Each rank its own dropout masks in ``epoch``, from (dropout seed, epoch, rank): the same after a resume."""
        self.batches = batches
        self.model.seed_dropout(_distributed.derive_seed(self.dropout_seed, epoch, self.comm.rank))

    def compute_gradients(self, xb, yb, wb):
        """``model.compute_gradients`` on this rank's rows of the step's global batch, weighted by their share of it,
        then one all-reduce: every rank holds the global batch's mean gradient. A rank without rows in a short batch
        adds zeros (``out`` is then None)."""
        model, n = self.model, xb.shape[0]
        grads = model.parameter_buffer.grads
        if self.batches.stream:  # each rank's own batches, of any length: one more (small) collective
            total = int(self.comm.allreduce_host([n])[0])
        else:
            total = self.batches.batch_rows.popleft()  # the rows of this step's global batch
        if n:
            loss, out = model.compute_gradients(xb, yb, wb)
            if n != total:
                grads *= n / total
        else:
            grads[...] = 0
            loss, out = model.device.zeros((), model.dtype), None
        self.comm.allreduce_(grads)
        return loss, out

    def end_epoch(self, epoch):
        """Average the running statistics (normalization layers) over ranks, then compare the parameters'
        checksums: RankMismatchError on every rank if they differ (a missed update is an error, never drift)."""
        buffer = self.model.parameter_buffer
        if buffer.state.shape[0]:
            self.comm.allreduce_(buffer.state)
            buffer.state *= 1.0 / self.comm.size
        self.comm.check_identical(buffer.values, f"the parameters after epoch {epoch + 1}")

    def end_training(self):
        """After the callbacks' ``on_train_end``: the parameters must still be the same on every rank (a callback
        given on some ranks only, ``EarlyStopping(restore_best_weights=True)`` say, may have changed them there)."""
        self.comm.check_identical(
            self.model.parameter_buffer.values,
            "the parameters at the end of fit() (after the callbacks' on_train_end; a callback that changes the "
            "weights, such as EarlyStopping(restore_best_weights=True), must be given on every rank)")

    def any(self, flag) -> bool:
        """``flag`` on any rank (a callback that stopped training on one rank only stops every rank)."""
        return bool(self.comm.allreduce_host([int(bool(flag))], "max")[0])
