"""Where arrays live: resolving a backend and device into a namespace, moving arrays, host RNG.

The only module that knows which array libraries exist; layer, loss and optimizer math never imports them.
"""

from __future__ import annotations

import importlib
import re
import types

import numpy as np
import array_api_compat

__all__ = ["Device", "resolve_device", "move_target", "take_rows", "to_numpy", "host_rng", "BACKENDS"]

BACKENDS = ("numpy", "array_api_strict", "torch", "cupy")
_DEVICE_FORMS = (
    'accepted devices: "cpu", "cuda", "cuda:N", a cupy.cuda.Device, a torch.device, '
    'or backend=<namespace> with that namespace\'s own device object'
)
_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")


def host_rng(seed=None) -> np.random.Generator:
    """The host random generator every backend draws initial weights and shuffles from."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def _library(x) -> str:
    """Name of the array library that owns ``x`` ("numpy" for host data and Python sequences)."""
    root = type(x).__module__.split(".")[0]
    return {"cupy": "cupy", "torch": "torch", "array_api_strict": "array_api_strict"}.get(root, "numpy" if root in ("numpy", "builtins") else root)


def to_numpy(x) -> np.ndarray:
    """Bring any supported array (NumPy, CuPy, torch, array-api-strict) to host memory as a NumPy array."""
    lib = _library(x)
    if lib == "numpy":
        return np.asarray(x)
    if lib == "cupy":
        return x.get()
    if lib == "torch":
        return x.detach().cpu().numpy()
    if lib == "array_api_strict":
        import array_api_strict as aas

        return np.asarray(x.to_device(aas.Device("CPU_DEVICE")))
    try:
        return np.from_dlpack(x)
    except Exception:  # noqa: BLE001 - last resort for array-API libraries without DLPack on host
        return np.asarray(x)


def take_rows(a, rows: np.ndarray):
    """Rows ``rows`` (host int array) of ``a``, gathered where ``a`` lives: NumPy fancy indexing or ``xp.take``."""
    if isinstance(a, np.ndarray):
        return a[rows]
    xp = array_api_compat.array_namespace(a)
    if _library(a) == "cupy":
        with a.device:
            return xp.take(a, xp.asarray(rows), axis=0)
    return xp.take(a, xp.asarray(rows.astype(np.int64), device=array_api_compat.device(a)), axis=0)


def _import(name, hint=None):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f"backend {name!r} is not installed{hint or ''}") from exc


_CUPY_HINT = ': install it with pip install "portanet[cuda12]" (CUDA 12) or "portanet[cuda13]" (CUDA 13)'


def _cupy_device(index: int):
    cp = _import("cupy", _CUPY_HINT)
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError when no driver or device
        raise RuntimeError(f"device='cuda:{index}' was requested but no CUDA device is visible ({exc})") from exc
    if count == 0:
        raise RuntimeError(f"device='cuda:{index}' was requested but no CUDA device is visible")
    if not 0 <= index < count:
        raise ValueError(f"device index {index} is out of range: {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    return cp.cuda.Device(index)


class Device:
    """An array namespace ``xp`` plus a device on it; knows how to send arrays to itself.

    Build one with :func:`resolve_device`; models, optimizers and data loaders all hold one.
    """

    def __init__(self, backend: str, xp, device, name: str):
        self.backend = backend
        self.xp = xp
        self.device = device
        self.name = name

    @property
    def fast(self):
        """In-place kernels for this backend (:class:`portanet._backend_fast.Fast`), or None: portable math only."""
        if not hasattr(self, "_fast"):
            from ._backend_fast import fast_ops

            self._fast = fast_ops(self)
        return self._fast

    @property
    def host_memory(self) -> bool:
        """True when arrays live in host memory (NumPy, torch "cpu", array-api-strict's CPU device), so reading a
        value back costs no device synchronisation."""
        return self.name in ("cpu", "array_api_strict:CPU_DEVICE")

    def __repr__(self):
        return f"Device({self.name!r})"

    def __eq__(self, other):
        if isinstance(other, str):
            return self.name == other
        return isinstance(other, Device) and self.backend == other.backend and self.name == other.name

    def __hash__(self):
        return hash((self.backend, self.name))

    # -- dtypes -----------------------------------------------------------------
    def dtype(self, dtype):
        """The namespace's dtype for ``"float32"``, ``"float64"``, a NumPy dtype or a namespace dtype."""
        name = dtype_name(dtype)
        return getattr(self.xp, name)

    # -- placement --------------------------------------------------------------
    def scope(self):
        """Context manager making this the current device (CuPy allocates on the current device)."""
        if self.backend == "cupy":
            return self.device
        return _NullScope

    def owns(self, x) -> bool:
        """True when ``x`` is an array of this namespace on this device."""
        if _library(x) != self.backend or not hasattr(x, "shape"):
            return False
        if self.backend == "numpy":  # a memmap or other subclass is not owned: asarray gives a plain view of it
            return type(x) is np.ndarray or isinstance(x, np.generic)
        return _same_device(self.backend, array_api_compat.device(x), self.device)

    def asarray(self, x, dtype=None):
        """``x`` (any supported library, any device, or host data) as an array on this device.

        Arrays already here are returned unchanged (or cast); everything else is moved explicitly.
        """
        dt = None if dtype is None else self.dtype(dtype)
        if self.owns(x):
            return x if dt is None or x.dtype == dt else self.xp.astype(x, dt)
        lib = _library(x)
        if lib == self.backend and lib != "numpy":
            with self.scope():
                moved = array_api_compat.to_device(x, self.device) if lib != "cupy" else self.xp.asarray(x)
            return moved if dt is None or moved.dtype == dt else self.xp.astype(moved, dt)
        if lib in ("cupy", "torch") and self.backend in ("cupy", "torch") and _is_cuda(x) and self.name != "cpu":
            with self.scope():
                moved = self.asarray(self.xp.from_dlpack(x))
            return moved if dt is None or moved.dtype == dt else self.xp.astype(moved, dt)
        return self.from_host(to_numpy(x), dtype)

    def from_host(self, host, dtype=None):
        """Upload a NumPy array (or anything ``numpy.asarray`` takes) to this device."""
        host = np.asarray(host)
        if dtype is not None:
            host = host.astype(dtype_name(dtype), copy=False)
        if self.backend == "numpy":
            return host
        if self.backend == "cupy":
            with self.device:
                return self.xp.asarray(host)
        if self.backend == "torch":
            import torch

            if not host.flags.writeable:  # a read-only memmap: torch cannot share it
                host = host.copy()
            return torch.asarray(np.ascontiguousarray(host), device=self.device)
        return self.xp.asarray(host, device=self.device)

    def upload_batches(self, parts, dtypes, prefetch=None):
        """Yield each tuple of arrays in ``parts`` (host, any library, or None) on this device, cast to ``dtypes``.

        On CuPy, unless ``prefetch`` is False, host batch i+1 is copied into pinned buffers and uploaded on a side
        stream while batch i computes (:mod:`portanet._backend_cuda`); elsewhere each array is moved as it comes
        (a zero-copy view on the host where the source allows).
        """
        if self.backend == "cupy" and prefetch is not False:
            from ._backend_cuda import prefetch_uploads

            yield from prefetch_uploads(self, parts, dtypes)
            return
        for part in parts:
            yield tuple(None if a is None else self.asarray(a, dt) for a, dt in zip(part, dtypes))

    def zeros(self, shape, dtype):
        with self.scope():
            return self.xp.zeros(shape, dtype=self.dtype(dtype), device=self.device)

    def synchronize(self):
        """Wait for queued device work (a no-op on host backends); used by benchmarks."""
        if self.backend == "cupy":
            self.device.synchronize()
        elif self.backend == "torch" and self.name.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)

    def random_source(self, seed: int):
        """A uniform [0, 1) generator on this device for dropout masks, seeded from the host RNG."""
        return _RandomSource(self, seed)


class _NullScope:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NullScope = _NullScope()


class _RandomSource:
    """Uniform random numbers drawn where they are used: NumPy, CuPy and torch draw on the device itself."""

    def __init__(self, device: Device, seed: int):
        self.device = device
        self.seed = int(seed)
        if device.backend == "cupy":
            with device.device:
                self._gen = device.xp.random.default_rng(self.seed)
        elif device.backend == "torch":
            import torch

            self._gen = torch.Generator(device=device.device).manual_seed(self.seed)
        else:
            self._gen = np.random.default_rng(self.seed)

    def uniform(self, shape, dtype):
        dev = self.device
        if dev.backend == "cupy":
            with dev.device:
                return self._gen.random(shape, dtype=dtype_name(dtype))
        if dev.backend == "torch":
            import torch

            return torch.rand(shape, generator=self._gen, dtype=dev.dtype(dtype), device=dev.device)
        return dev.from_host(self._gen.random(shape, dtype=dtype_name(dtype)))

    def get_state(self):
        if isinstance(self._gen, np.random.Generator):
            return self._gen.bit_generator.state
        return None

    def set_state(self, state):
        if state is not None and isinstance(self._gen, np.random.Generator):
            self._gen.bit_generator.state = state


def _is_cuda(x) -> bool:
    dev = array_api_compat.device(x)
    return "cuda" in str(dev).lower() or _library(x) == "cupy"


def _same_device(backend, a, b) -> bool:
    if backend == "torch":
        return a == b or (str(a) == str(b))
    if backend == "cupy":
        return getattr(a, "id", a) == getattr(b, "id", b)
    return a == b


def dtype_name(dtype) -> str:
    """Canonical name ("float32", "float64", ...) for a dtype given as string, NumPy or namespace dtype."""
    if isinstance(dtype, str):
        name = dtype
    else:
        name = str(dtype).rsplit(".", 1)[-1].strip("'>")
        name = {"Float32": "float32", "Float64": "float64"}.get(name, name)
    if name not in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"):
        try:
            name = np.dtype(dtype).name
        except TypeError as exc:
            raise ValueError(f"dtype must be 'float32' or 'float64' (or a dtype object), got {dtype!r}") from exc
    return name


def _namespace_name(backend) -> str:
    if isinstance(backend, str):
        name = backend.lower().replace("-", "_")
        aliases = {"np": "numpy", "strict": "array_api_strict", "cp": "cupy", "pytorch": "torch"}
        name = aliases.get(name, name)
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or an array namespace module, got {backend!r}")
        return name
    mod = getattr(backend, "__name__", "")
    if mod.startswith("array_api_compat."):
        mod = mod.split(".", 1)[1]
    root = mod.split(".")[0]
    if root in BACKENDS:
        return root
    if hasattr(backend, "__array_api_version__"):
        return mod
    raise ValueError(f"backend must be one of {BACKENDS} or an array namespace module, got {backend!r}")


def resolve_device(device="cpu", backend=None) -> Device:
    """Turn what the user said into a :class:`Device`.

    ``device``: "cpu" (NumPy), "cuda" / "cuda:N" (CuPy, or torch with ``backend="torch"``),
    a ``cupy.cuda.Device``, a ``torch.device``, or the namespace's own device object.
    ``backend``: None (chosen from ``device``), a name in :data:`BACKENDS`, or a namespace module.
    """
    if isinstance(device, Device):
        if backend is not None and _namespace_name(backend) != device.backend:
            raise ValueError(f"backend={backend!r} disagrees with device={device!r}")
        return device
    if backend is None:
        backend = _backend_for(device)
    name = _namespace_name(backend)
    if device is None:
        device = "cuda" if name == "cupy" else "cpu"
    if name == "numpy":
        if not (isinstance(device, str) and device.lower() == "cpu"):
            raise ValueError(f"the numpy backend only has device 'cpu', got device={device!r}")
        return Device("numpy", array_api_compat.array_namespace(np.empty(0)), None, "cpu")
    if name == "cupy":
        index = _cuda_index(device)
        dev = _cupy_device(index)
        cp = importlib.import_module("cupy")
        with dev:
            xp = array_api_compat.array_namespace(cp.empty(0))
        return Device("cupy", xp, dev, f"cuda:{index}")
    if name == "torch":
        torch = _import("torch", ': install it with pip install "portanet[torch]"')
        try:
            dev = torch.device(device) if isinstance(device, (str, torch.device)) else torch.device("cuda", int(device))
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"unknown torch device {device!r}; {_DEVICE_FORMS}") from exc
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"device={device!r} was requested but torch sees no CUDA device")
            index = dev.index or 0
            if index >= torch.cuda.device_count():
                raise ValueError(f"device index {index} is out of range: {torch.cuda.device_count()} CUDA device(s) visible")
            dev = torch.device("cuda", index)
        return Device("torch", array_api_compat.array_namespace(torch.empty(0)), dev, str(dev))
    if name == "array_api_strict":
        aas = _import("array_api_strict")
        if isinstance(device, str):
            try:
                device = aas.Device("CPU_DEVICE" if device.lower() == "cpu" else device)
            except ValueError:
                pass
        if device not in aas.__array_namespace_info__().devices():
            raise ValueError(f"unknown array_api_strict device {device!r}; choose from {aas.__array_namespace_info__().devices()}")
        label = f"array_api_strict:{device._device}"
        return Device("array_api_strict", aas, device, label)
    xp = backend if not isinstance(backend, str) else _import(name)
    return Device(name, xp, None if device == "cpu" else device, f"{name}:{device}")


def move_target(current: Device, device=None, backend=None) -> Device:
    """Where ``model.to(device, backend)`` goes from ``current``.

    A backend (name or namespace) given as ``device`` switches library, to that library's default device. A device
    string is read in the current library when it has that device (torch "cpu" / "cuda:1", array_api_strict
    "device2"), so a torch model stays a torch model; otherwise it resolves as in :func:`resolve_device`.
    """
    if backend is None and _names_backend(device):
        device, backend = None, device
    if device is None and backend is None:
        raise ValueError("to() needs a device or a backend, got neither")
    if backend is None and isinstance(device, str) and current.backend in ("torch", "array_api_strict"):
        try:
            return resolve_device(device, current.backend)
        except ValueError:
            pass
    return resolve_device(device, backend)


def _names_backend(x) -> bool:
    if isinstance(x, str):
        try:
            _namespace_name(x)
        except ValueError:
            return False
        return True
    return isinstance(x, types.ModuleType) or hasattr(x, "__array_api_version__")


def _backend_for(device) -> str:
    if isinstance(device, str):
        d = device.lower()
        if d == "cpu":
            return "numpy"
        if _CUDA_RE.match(d):
            return "cupy"
        raise ValueError(f"unknown device {device!r}; {_DEVICE_FORMS}")
    lib = type(device).__module__.split(".")[0]
    if lib in ("cupy", "torch", "array_api_strict"):
        return lib
    if isinstance(device, int):
        return "cupy"
    raise ValueError(f"unknown device {device!r}; {_DEVICE_FORMS}")


def _cuda_index(device) -> int:
    if isinstance(device, int):
        return device
    if isinstance(device, str):
        m = _CUDA_RE.match(device.lower())
        if not m:
            raise ValueError(f"unknown CUDA device {device!r}; {_DEVICE_FORMS}")
        return int(m.group(1) or 0)
    if hasattr(device, "id"):
        return int(device.id)
    raise ValueError(f"unknown CUDA device {device!r}; {_DEVICE_FORMS}")
