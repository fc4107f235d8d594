"""The parameter buffer: every trainable parameter of a model in one flat array, its gradient in another, the
non-trainable state (running statistics) in a third; per-layer views of them; snapshots; moving to a device.

It owns storage only: no layer math, no optimizer rule, no knowledge of which array library is underneath.
"""

from __future__ import annotations

import math

__all__ = ["ParameterBuffer", "Snapshot"]


class Snapshot:
    """Copies of a model's mutable training state, taken by :meth:`ParameterBuffer.snapshot`.

    ``values`` / ``state``: copies of the flat buffers (on the device); ``optimizer``: ``state_dict()`` copy or None;
    ``random``: host data (the model's random generator states) or None; ``label``: what the snapshot marks.
    """

    __slots__ = ("values", "state", "optimizer", "random", "label")

    def __init__(self, values, state, optimizer=None, random=None, label=""):
        self.values, self.state, self.optimizer, self.random, self.label = values, state, optimizer, random, label


class ParameterBuffer:
    """Flat storage for the parameters of a list of layers on one device.

    ``layout``: ``[(layer_name, {key: shape}, {key: shape}), ...]`` in model order: each layer's trainable parameters
    (e.g. ``{"kernel": (in, units), "bias": (units,)}``) and its non-trainable state (e.g. BatchNormalization's
    ``{"moving_mean": (units,), ...}``). ``values`` and ``grads`` are (n,) arrays, ``state`` is (m,); every view
    handed out (:meth:`views`, :meth:`parameters`) aliases them, so writing a view writes the buffer and one
    optimizer step over ``values`` updates every layer.
    """

    def __init__(self, device, dtype: str, layout, values, state=None):
        self.device, self.dtype, self.layout = device, dtype, list(layout)
        xp = device.xp
        n, m = self._size(1), self._size(2)
        if tuple(values.shape) != (n,):
            raise ValueError(f"values must have shape ({n},) for this layout, got {tuple(values.shape)}")
        self.values = values
        self.grads = xp.zeros_like(values)
        self.state = state if state is not None else device.zeros((m,), dtype)
        if tuple(self.state.shape) != (m,):
            raise ValueError(f"state must have shape ({m},) for this layout, got {tuple(self.state.shape)}")

    @classmethod
    def from_host(cls, device, dtype: str, layout, values, state=()) -> "ParameterBuffer":
        """A buffer on ``device`` from host pieces (arrays or lists) in buffer order: ``values`` one per parameter,
        ``state`` one per state entry."""
        xp = device.xp

        def flat(pieces):
            parts = [xp.reshape(device.from_host(p, dtype), (-1,)) for p in pieces]
            return xp.concat(parts) if parts else device.zeros((0,), dtype)

        with device.scope():
            return cls(device, dtype, layout, flat(values), flat(state))

    def _size(self, which) -> int:
        return sum(math.prod(shape) for entry in self.layout for shape in entry[which].values())

    def __getstate__(self):
        """Host (NumPy) copies of the values and state, and the device by name: a buffer pickles from any device
        and comes back on it (or on the CPU, with a warning, where it is missing); gradients come back zero."""
        return {"device": self.device, "dtype": self.dtype, "layout": self.layout,
                "values": self.device.to_host(self.values).copy(), "state": self.device.to_host(self.state).copy()}

    def __setstate__(self, state):
        dev = state["device"]
        twin = ParameterBuffer.from_host(dev, state["dtype"], state["layout"], [state["values"]], [state["state"]])
        self.__dict__.update(twin.__dict__)

    # -- names and views ---------------------------------------------------------------------------------------------
    def segments(self, which: str = "values"):
        """``(name, offset, size, shape)`` of every parameter ("values") or state entry ("state"), in buffer order."""
        index, offset = (1 if which == "values" else 2), 0
        for layer, *entries in self.layout:
            for key, shape in entries[index - 1].items():
                size = math.prod(shape)
                yield f"{layer}.{key}", offset, size, tuple(shape)
                offset += size

    def _views(self, flat, which):
        xp, out = self.device.xp, {}
        for name, offset, size, shape in self.segments(which):
            out[name] = xp.reshape(flat[offset:offset + size], shape)
        return out

    def parameters(self) -> dict:
        """``{"dense_0.kernel": view, ...}`` of the values, in buffer order."""
        return self._views(self.values, "values")

    def gradients(self) -> dict:
        """``{"dense_0.kernel": view, ...}`` of the gradient buffer, in buffer order."""
        return self._views(self.grads, "values")

    def states(self) -> dict:
        """``{"batch_normalization_0.moving_mean": view, ...}`` of the non-trainable state, in buffer order."""
        return self._views(self.state, "state")

    def views(self):
        """``{layer_name: (params, grads, state)}``, each a ``{key: view}`` dict, for binding layers."""
        params, grads, states = self.parameters(), self.gradients(), self.states()
        out = {}
        for layer, shapes, state_shapes in self.layout:
            out[layer] = ({k: params[f"{layer}.{k}"] for k in shapes}, {k: grads[f"{layer}.{k}"] for k in shapes},
                          {k: states[f"{layer}.{k}"] for k in state_shapes})
        return out

    def assign(self, values: dict) -> None:
        """Overwrite parameters from ``{name: array}`` (any library or device). Names, shapes and finiteness (no NaN
        or inf) are all checked first, so on error nothing changes: KeyError, ValueError or TypeError naming the
        parameter."""
        if not isinstance(values, dict):
            raise TypeError(f"values must be a dict {{name: array}}, got {type(values).__name__}")
        current, dev = self.parameters(), self.device
        unknown = set(values) - set(current)
        if unknown:
            raise KeyError(f"unknown parameter names {sorted(unknown)}; expected some of {list(current)}")
        moved = {}
        for name, value in values.items():
            arr = dev.asarray(value, self.dtype)
            if tuple(arr.shape) != tuple(current[name].shape):
                raise ValueError(f"parameter {name} must have shape {tuple(current[name].shape)}, got {tuple(arr.shape)}")
            if not bool(dev.xp.all(dev.xp.isfinite(arr))):
                raise ValueError(f"parameter {name} holds NaN or inf; every value must be finite")
            moved[name] = arr
        for name, arr in moved.items():
            current[name][...] = arr

    def mask(self, include) -> object:
        """A (n,) 0/1 array on the device: 1 for the parameters whose name ``include(name)`` accepts (e.g. the
        kernels that weight decay applies to), 0 elsewhere."""
        dev, xp = self.device, self.device.xp
        with dev.scope():
            pieces = [(xp.ones if include(name) else xp.zeros)((size,), dtype=dev.dtype(self.dtype), device=dev.device)
                      for name, _, size, _ in self.segments()]
            return xp.concat(pieces) if pieces else dev.zeros((0,), self.dtype)

    # -- snapshots ---------------------------------------------------------------------------------------------------
    def snapshot(self, optimizer=None, random=None, label: str = "") -> Snapshot:
        """Copies of the values and state (and of ``optimizer``'s state when given) on the device; ``random``:
        host data to keep with them. The one snapshot mechanism: NaN guard, stream rollback, best weights."""
        dev = self.device
        opt = None
        if optimizer is not None:
            state = optimizer.state_dict()
            opt = {**state, "slots": {k: dev.copy(v) for k, v in state["slots"].items()}}
        return Snapshot(dev.copy(self.values), dev.copy(self.state), opt, random, label)

    def restore(self, snapshot: Snapshot, optimizer=None) -> None:
        """Write a snapshot's values and state back (in place: views stay valid); its optimizer state into
        ``optimizer`` when both exist."""
        self.values[...] = snapshot.values
        self.state[...] = snapshot.state
        if optimizer is not None and snapshot.optimizer is not None:
            state = snapshot.optimizer
            optimizer.load_state_dict({**state, "slots": {k: self.device.copy(v) for k, v in state["slots"].items()}})

    def all_finite(self):
        """0-d boolean device array: every value and state entry is finite (no host read)."""
        dev = self.device
        ok = dev.all_finite(self.values)
        return dev.xp.logical_and(ok, dev.all_finite(self.state)) if self.state.shape[0] else ok

    # -- placement ---------------------------------------------------------------------------------------------------
    def to(self, device) -> "ParameterBuffer":
        """A new buffer on ``device`` holding copies of the values and state (never aliasing these); gradients are
        zero."""
        with device.scope():
            values = device.copy(device.asarray(self.values, self.dtype))
            state = device.copy(device.asarray(self.state, self.dtype))
            return ParameterBuffer(device, self.dtype, self.layout, values, state)

    def astype(self, dtype: str) -> "ParameterBuffer":
        """A copy of this buffer in another float dtype on the same device."""
        dev = self.device
        with dev.scope():
            return ParameterBuffer(dev, dtype, self.layout, dev.copy(dev.asarray(self.values, dtype)),
                                   dev.copy(dev.asarray(self.state, dtype)))
