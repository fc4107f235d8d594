"""The device contract (:class:`Device`, :class:`RandomSource`), the registry of backends, device-string parsing.

Imports no array library but NumPy (host memory); each backend module imports its own library lazily.
"""

from __future__ import annotations

import abc
import warnings
import contextlib
import copy as _copy
import re
import types

import array_api_compat
import numpy as np

__all__ = ["Device", "RandomSource", "HostRandomSource", "resolve_device", "move_target", "library_of", "to_numpy",
           "take_rows", "is_host_data", "host_rng", "dtype_name", "parse_device_string", "cuda_index", "libraries",
           "on_cuda", "exporting"]

DEVICE_FORMS = (
    'accepted devices: "cpu", "cuda", "cuda:N", a cupy.cuda.Device, a torch.device, '
    'or backend=<namespace> with that namespace\'s own device object'
)
_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")
_DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged

# The registry, filled as each backend module defines its Device subclass (see Device.__init_subclass__).
_LIBRARIES: dict = {}  # library name -> Device subclass, in registration order
_NAMES: dict = {}      # library name or alias -> Device subclass
_MODULES: dict = {}    # top-level module of the library's array (and device) types -> Device subclass
_SERVES: dict = {}     # "cpu" / "cuda" -> the Device subclass a bare device string resolves to
_FALLBACK: list = []   # [the Device subclass serving array-API namespaces that are not registered]


def host_rng(seed=None) -> np.random.Generator:
    """The host random generator every backend draws initial weights and shuffles from."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


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


# -- device strings: parsed here and nowhere else ----------------------------------------------------------------
def parse_device_string(spec: str) -> tuple:
    """``("cpu", None)`` or ``("cuda", index)`` for "cpu", "cuda", "cuda:N" (any case); ValueError otherwise."""
    d = spec.lower()
    if d == "cpu":
        return "cpu", None
    m = _CUDA_RE.match(d)
    if m:
        return "cuda", int(m.group(1) or 0)
    raise ValueError(f"unknown device {spec!r}; {DEVICE_FORMS}")


def cuda_index(device) -> int:
    """The CUDA device index of "cuda" / "cuda:N", an int, or a device object with ``.id``; ValueError otherwise."""
    if isinstance(device, int):
        return device
    if isinstance(device, str):
        try:
            kind, index = parse_device_string(device)
        except ValueError:
            kind = None
        if kind != "cuda":
            raise ValueError(f"unknown CUDA device {device!r}; {DEVICE_FORMS}")
        return index
    if hasattr(device, "id"):
        return int(device.id)
    raise ValueError(f"unknown CUDA device {device!r}; {DEVICE_FORMS}")


# -- the registry: which backend an object belongs to ------------------------------------------------------------
def _root(obj) -> str:
    return type(obj).__module__.partition(".")[0]


def _class_of(x):
    """The Device subclass serving ``x``'s library (the generic array-API one for unregistered libraries)."""
    return _MODULES.get(_root(x), _FALLBACK[0] if _FALLBACK else None)


def library_of(x) -> str:
    """Name of the array library that owns ``x``: a registered backend name ("numpy" for host data and Python
    sequences), else the top-level module of ``x``'s type."""
    cls = _MODULES.get(_root(x))
    return cls.library if cls is not None else _root(x)


def libraries() -> tuple:
    """Names of the registered backends, in registration order."""
    return tuple(_LIBRARIES)


def is_host_data(x) -> bool:
    """True for NumPy arrays (memory maps included), NumPy scalars and Python data: reading them needs no transfer."""
    return getattr(_MODULES.get(_root(x)), "holds_host_data", False)


def to_numpy(x) -> np.ndarray:
    """Bring any supported array (NumPy, CuPy, torch, array-api-strict, DLPack) to host memory as a NumPy array.

    May share memory with ``x`` where both live in host memory; use ``resolve_device("cpu").copy(x)`` for a copy.
    """
    return _class_of(x).array_to_numpy(x)


def take_rows(a, rows: np.ndarray):
    """Rows ``rows`` (host int array) of ``a``, gathered where ``a`` lives: NumPy fancy indexing or ``xp.take``."""
    return _class_of(a).take_rows(a, rows)


def on_cuda(x) -> bool:
    """True when ``x`` (any library) sits in CUDA memory, as its DLPack device says."""
    try:
        return int(x.__dlpack_device__()[0]) in _DLPACK_CUDA
    except Exception:  # noqa: BLE001 - no DLPack, or a library that refuses to say
        return False


@contextlib.contextmanager
def exporting(x):
    """Yields ``x`` as its library lets it be exported through DLPack (torch: detached from autograd), with that
    library's current device set to ``x``'s until the import is done: a CUDA producer orders its current stream
    before the consumer's on the current device (CuPy's ``__dlpack__(stream=...)``), which must be ``x``'s."""
    cls = _class_of(x)
    with cls.array_scope(x):
        yield cls.released(x)


# -- resolving what the user said --------------------------------------------------------------------------------
def _backend_spec(backend) -> tuple:
    """``(Device subclass, namespace or None, backend name)`` for a backend name, alias or namespace module."""
    if isinstance(backend, str):
        cls = _NAMES.get(backend.lower().replace("-", "_"))
        if cls is None:
            raise ValueError(f"backend must be one of {libraries()} or an array namespace module, got {backend!r}")
        return cls, None, cls.library
    mod = getattr(backend, "__name__", "")
    if mod.startswith("array_api_compat."):
        mod = mod.split(".", 1)[1]
    cls = _LIBRARIES.get(mod.split(".")[0])
    if cls is not None:
        return cls, None, cls.library
    if hasattr(backend, "__array_api_version__") and _FALLBACK:
        return _FALLBACK[0], backend, mod
    raise ValueError(f"backend must be one of {libraries()} or an array namespace module, got {backend!r}")


def _class_for_device(device):
    """The Device subclass a device given without a backend belongs to."""
    if isinstance(device, str):
        return _SERVES[parse_device_string(device)[0]]
    cls = _MODULES.get(_root(device))
    if cls is not None and cls.has_device_objects:
        return cls
    if isinstance(device, int):
        return _SERVES["cuda"]
    raise ValueError(f"unknown device {device!r}; {DEVICE_FORMS}")


def _names_backend(x) -> bool:
    if isinstance(x, str):
        return x.lower().replace("-", "_") in _NAMES
    return isinstance(x, types.ModuleType) or hasattr(x, "__array_api_version__")


def resolve_device(device="cpu", backend=None) -> "Device":
    """Turn what the user said into a :class:`Device`.

    ``device``: "cpu" (NumPy), "cuda" / "cuda:N" (CuPy, or torch with ``backend="torch"``),
    a ``cupy.cuda.Device``, a ``torch.device``, or the namespace's own device object.
    ``backend``: None (chosen from ``device``), a name in :data:`BACKENDS`, or a namespace module.
    Raises ValueError for unknown names and devices, ImportError when the library is missing, RuntimeError when
    no CUDA device is visible.
    """
    if isinstance(device, Device):
        if backend is not None and _backend_spec(backend)[2] != device.backend:
            raise ValueError(f"backend={backend!r} disagrees with device={device!r}")
        return device
    if backend is None:
        cls, namespace = _class_for_device(device), None
    else:
        cls, namespace, _ = _backend_spec(backend)
    return cls.resolve(cls.default_device if device is None else device, namespace)


def move_target(current: "Device", device=None, backend=None) -> "Device":
    """Where ``model.to(device, backend)`` goes from ``current``.

    A backend (name or namespace) given as ``device`` switches library, to that library's default device. A device
    string is read in the current library when it has that device (torch "cpu" / "cuda:1", array_api_strict
    "device2"), so a torch model stays a torch model; otherwise it resolves as in :func:`resolve_device`.
    """
    if backend is None and _names_backend(device):
        device, backend = None, device
    if device is None and backend is None:
        raise ValueError("to() needs a device or a backend, got neither")
    if backend is None and isinstance(device, str) and current.reads_device_strings:
        try:
            return resolve_device(device, current.backend)
        except ValueError:
            pass
    return resolve_device(device, backend)


# -- the contract ------------------------------------------------------------------------------------------------
_UNSET = object()


class Device(abc.ABC):
    """An array namespace ``xp`` plus a device on it; knows how to send arrays to itself.

    Build one with :func:`resolve_device`; models, optimizers and data loaders all hold one. A Device compares
    equal to its name (``device == "cpu"``) and hashes like it. One subclass per library: it declares the library
    (``library``, ``aliases``, the module its arrays come from) and how its arrays reach NumPy, and registers itself.
    """

    library: str | None = None   # registered backend name; None for a base that registers nothing
    modules: tuple = ()          # top-level modules of the types it serves (default: the library's name)
    aliases: tuple = ()          # other backend names accepted for it ("np", "pytorch", ...)
    serves: tuple = ()           # bare device strings ("cpu", "cuda") that resolve to it when no backend is named
    default_device = "cpu"       # its device when only the backend is named
    reads_device_strings = False  # move_target reads a device string in this library first ("device2", "cuda:1")
    has_device_objects = True    # a device object from its module names this library (False for host data)
    holds_host_data = False      # its arrays and Python data are host data (NumPy)
    fallback = False             # serves array-API namespaces nobody registered

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("fallback"):
            _FALLBACK[:] = [cls]
        library = cls.__dict__.get("library")
        if library:
            _LIBRARIES[library] = cls
            for name in (library, *cls.aliases):
                _NAMES[name] = cls
            for module in cls.modules or (library,):
                _MODULES[module] = cls
            for kind in cls.serves:
                _SERVES[kind] = cls

    def __init__(self, xp, device, name: str, backend: str | None = None):
        self.backend = backend or self.library
        self.xp = xp
        self.device = device
        self.name = name
        self._kernels = _UNSET

    # -- per library ----------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def resolve(cls, device, namespace=None) -> "Device":
        """This library's Device for ``device`` (its own device object or a string); ValueError when unknown."""

    @classmethod
    @abc.abstractmethod
    def array_to_numpy(cls, x) -> np.ndarray:
        """Download ``x``, an array of this library on any of its devices, as a NumPy array."""

    @classmethod
    def take_rows(cls, a, rows):
        """Rows ``rows`` (host ints) of ``a``, an array of this library, gathered on ``a``'s device."""
        xp = array_api_compat.array_namespace(a)
        return xp.take(a, xp.asarray(np.asarray(rows, dtype=np.int64), device=array_api_compat.device(a)), axis=0)

    @classmethod
    def released(cls, x):
        """``x`` free of library-side state that stops an export (autograd); the same data."""
        return x

    @classmethod
    def array_scope(cls, x):
        """Context manager making ``x``'s device the library's current one (CuPy); elsewhere it does nothing."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def _upload(self, host: np.ndarray):
        """``host`` (a NumPy array of the final dtype) as an array on this device."""

    # -- identity ---------------------------------------------------------------------
    @property
    def host_memory(self) -> bool:
        """True when arrays live in host memory (NumPy, torch "cpu", array-api-strict's CPU device), so reading a
        value back costs no device synchronisation."""
        return False

    def __repr__(self):
        return f"Device({self.name!r})"

    def __eq__(self, other):
        if isinstance(other, str):
            return self.name == other
        return isinstance(other, Device) and self.backend == other.backend and self.name == other.name

    def __hash__(self):
        return hash(self.name)  # equal to its name, so hashed like it: {"cpu": 1}[device] works

    def __reduce__(self):
        """Pickled by library and name; unpickled with :func:`restore_device` (the CPU where it is missing)."""
        return restore_device, (self.backend, self.name)

    def __copy__(self):
        """A shallow copy in this process: the same library, device and state (``__reduce__`` is for pickles)."""
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        return twin

    @property
    def kernels(self):
        """In-place kernels for this device (:class:`portanet.backends.numpy.Kernels`), or None: portable math only."""
        if self._kernels is _UNSET:
            self._kernels = self._make_kernels()
        return self._kernels

    def _make_kernels(self):
        return None

    def portable(self) -> "Device":
        """An equal device whose ``kernels`` is None: everything runs the portable array-API path."""
        twin = _copy.copy(self)
        twin._kernels = None
        return twin

    # -- dtypes and placement ------------------------------------------------------
    def dtype(self, dtype):
        """The namespace's dtype for ``"float32"``, ``"float64"``, a NumPy dtype or a namespace dtype."""
        return getattr(self.xp, dtype_name(dtype))

    def scope(self):
        """Context manager every model method runs in: CuPy makes its device current (it allocates there), torch
        turns autograd off; elsewhere it does nothing."""
        return contextlib.nullcontext()

    def owns(self, x) -> bool:
        """True when ``x`` is an array of this namespace on this device."""
        return library_of(x) == self.backend and hasattr(x, "shape") and self._holds(x)

    def _holds(self, x) -> bool:
        """``x``, an array of this library, is on this device."""
        return array_api_compat.device(x) == self.device

    def asarray(self, x, dtype=None, copy=None):
        """``x`` (any library, any device, or host data) as an array on this device.

        Arrays already here are returned unchanged (or cast); everything else is moved explicitly. ``copy=True``:
        the result never shares memory with ``x`` (a host-to-host move may otherwise be a view).
        """
        dt = None if dtype is None else self.dtype(dtype)
        if self.owns(x):
            out = self._adopt(x)
        elif library_of(x) == self.backend:
            out = self._from_sibling(x)
        else:
            out = self._from_foreign(x, dtype)
        if dt is not None and out.dtype != dt:
            with self.scope():
                return self.xp.astype(out, dt)  # a new array
        return self._duplicate(out) if copy else out

    def _adopt(self, x):
        """``x``, already on this device, as the library may use it."""
        return x

    def _from_sibling(self, x):
        """``x``, an array of this library on another of its devices, moved here."""
        with self.scope():
            return array_api_compat.to_device(x, self.device)

    def _from_foreign(self, x, dtype):
        """``x``, from another library (or host data), moved here: through the host unless a subclass knows better."""
        return self.from_host(to_numpy(x), dtype)

    def _duplicate(self, a):
        """A copy of ``a`` (on this device) that shares no memory with it."""
        with self.scope():
            return self.xp.asarray(a, copy=True)

    def copy(self, x):
        """``x`` (any library or device) as a new array on this device that never aliases ``x``."""
        return self.asarray(x, copy=True)

    def from_host(self, host, dtype=None):
        """Upload a NumPy array (or anything ``numpy.asarray`` takes; a tensor is detached first) to this device."""
        host = to_numpy(host)
        if dtype is not None:
            host = host.astype(dtype_name(dtype), copy=False)
        return self._upload(host)

    def to_host(self, x) -> np.ndarray:
        """Download ``x``, an array of this device, as a NumPy array (explicitly: the only way off a GPU)."""
        return self.array_to_numpy(x)

    def upload_batches(self, parts, dtypes, prefetch=None):
        """Yield each tuple of arrays in ``parts`` (host, any library, or None) on this device, cast to ``dtypes``.

        Here each array is moved as it comes (a zero-copy view on the host where the source allows); CUDA devices
        overlap uploads with compute unless ``prefetch`` is False.
        """
        for part in parts:
            yield tuple(None if a is None else self.asarray(a, dt) for a, dt in zip(part, dtypes))

    def zeros(self, shape, dtype):
        with self.scope():
            return self.xp.zeros(shape, dtype=self.dtype(dtype), device=self.device)

    def all_finite(self, a):
        """0-d boolean array on this device: ``a`` holds no NaN and no inf (no host read)."""
        xp = self.xp
        return xp.all(xp.isfinite(a))

    def synchronize(self):
        """Wait for queued device work (a no-op on host backends); used by benchmarks."""

    def random_source(self, seed: int) -> "RandomSource":
        """A uniform [0, 1) generator on this device for dropout masks, seeded from the host RNG."""
        return HostRandomSource(self, seed)


def restore_device(backend: str, name: str) -> "Device":
    """The device named ``name`` of library ``backend`` (as a pickled Device recorded it), or NumPy on the CPU, with
    a RuntimeWarning saying so, where that library or device is not available here."""
    spec = name.split(":", 1)[1] if name.startswith(f"{backend}:") else name
    try:
        return resolve_device(spec, backend)
    except (ImportError, RuntimeError, ValueError) as exc:
        warnings.warn(f"{name} ({backend}) is not available here ({exc}); using the CPU (NumPy) instead",
                      RuntimeWarning, stacklevel=2)
        return resolve_device("cpu")


class RandomSource:
    """Uniform [0, 1) numbers for dropout masks, drawn for one device.

    ``get_state()`` is a JSON-able dict (plain dicts, lists, ints, strings) or None where the library cannot export
    it; ``set_state(state)`` restores a state this kind of source exported and ignores the state of another kind of
    generator (another library or device type: the stream then continues from the seed), and None (a generator
    that could not export one). Anything else that is not a dict raises ValueError; a malformed state of this kind
    raises what the library raises.
    """

    def __init__(self, device: Device, seed: int):
        self.device = device
        self.seed = int(seed)

    def uniform(self, shape, dtype):
        raise NotImplementedError

    def get_state(self):
        return None

    def set_state(self, state) -> None:
        check_state(state)


def check_state(state) -> bool:
    """True for a state dict to look into; False for None (nothing was exported); ValueError for anything else."""
    if state is not None and not isinstance(state, dict):
        raise ValueError(f"a random generator state must be a dict or None, got {type(state).__name__}")
    return state is not None


class HostRandomSource(RandomSource):
    """NumPy's generator on the host, each draw uploaded: for devices without a generator of their own."""

    def __init__(self, device: Device, seed: int):
        super().__init__(device, seed)
        self._gen = np.random.default_rng(self.seed)

    def uniform(self, shape, dtype):
        return self.device.from_host(self._gen.random(shape, dtype=dtype_name(dtype)))

    def get_state(self):
        return self._gen.bit_generator.state

    def set_state(self, state) -> None:
        if check_state(state) and state.get("bit_generator") == type(self._gen.bit_generator).__name__:
            self._gen.bit_generator.state = state
