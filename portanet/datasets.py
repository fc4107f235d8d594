"""MNIST on the host: finds, downloads, verifies and parses the IDX files into NumPy arrays.
It must not import an array backend other than NumPy nor touch a device: callers move the arrays."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import logging
import math
import os
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from ._files import write_atomic

__all__ = [
    "MNIST_FILES",
    "MNIST_MIRRORS",
    "DatasetError",
    "default_data_dir",
    "load_mnist",
    "mnist_dir",
    "read_idx",
]

# Base URLs; a file is fetched from base + name + ".gz". Tried in order until one verifies.
MNIST_MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
]
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# SHA-256 of the *uncompressed* content: mirrors re-compress, so their gzip bytes differ.
_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# IDX type codes; multi-byte types are big-endian on disk.
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_TIMEOUT_S = 30
_MAX_DOWNLOAD_BYTES = 64 << 20  # the largest MNIST archive is about 10 MiB
_MAX_RAW_BYTES = 128 << 20  # the largest uncompressed MNIST file is about 45 MiB
_CHUNK = 16 << 20
_log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset file or download is malformed: bad header, wrong size, corrupt gzip, bad checksum."""


def default_data_dir() -> Path:
    """Base data folder: ``$PORTANET_DATA`` if set, else ``$XDG_CACHE_HOME/portanet`` (``~/.cache/portanet``)."""
    return _base_dir()[0]


def mnist_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Folder that holds the four MNIST files: ``data_dir`` itself if given, else ``default_data_dir() / "mnist"``."""
    return _mnist_folder(data_dir)[0]


def read_idx(source) -> np.ndarray:
    """Parse one IDX file, plain or gzip, into a native-endian array of its declared shape.

    source: a path or a binary file object. Raises DatasetError when the magic number is not
    0x0000TTNN with a known type code, when the data bytes differ from what the header declares
    (truncated or extra bytes), or when the gzip stream is corrupt."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return _parse_idx(f, os.fspath(source))
    return _parse_idx(source, str(getattr(source, "name", "<file object>")))


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    normalize: bool = False,
    flatten: bool = False,
    mirrors: list[str] | None = None,
):
    """MNIST as ``(x_train, y_train), (x_test, y_test)`` NumPy arrays on the host.

    x: (n, 28, 28) uint8; float32 in [0, 1] with ``normalize``; (n, 784) with ``flatten``. y: (n,) uint8 in [0, 9].
    Files (plain or .gz) are looked for in ``data_dir``, else ``$PORTANET_DATA/mnist``, else the user cache
    ``~/.cache/portanet/mnist``. Missing ones are downloaded there from ``mirrors`` (default ``MNIST_MIRRORS``)
    and verified by SHA-256 when ``download`` is true; otherwise FileNotFoundError says where to put them."""
    if isinstance(mirrors, (str, bytes)):
        raise TypeError(f"mirrors must be a list of base URLs, got {type(mirrors).__name__} {mirrors!r}")
    folder, origin = _mnist_folder(data_dir)
    paths = {name: _find(folder, name) for name in MNIST_FILES}
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        if not download:
            raise FileNotFoundError(_missing_message(folder, origin, missing) + " Download is off (download=False).")
        paths.update(_download(folder, origin, missing, MNIST_MIRRORS if mirrors is None else list(mirrors)))
    train = _load_pair(paths["train-images-idx3-ubyte"], paths["train-labels-idx1-ubyte"])
    test = _load_pair(paths["t10k-images-idx3-ubyte"], paths["t10k-labels-idx1-ubyte"])
    return tuple((_format(x, normalize, flatten), y) for x, y in (train, test))


def _base_dir() -> tuple[Path, str]:
    env = os.environ.get("PORTANET_DATA")
    if env:
        return Path(env).expanduser(), "from $PORTANET_DATA"
    cache = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
    root = Path(cache) if cache and os.path.isabs(cache) else Path.home() / ".cache"
    return root / "portanet", "the user cache; set PORTANET_DATA to use another folder"


def _mnist_folder(data_dir) -> tuple[Path, str]:
    if data_dir is not None:
        return Path(data_dir).expanduser(), "from data_dir="
    base, origin = _base_dir()
    return base / "mnist", origin


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / (name + ".gz")):  # plain first: no decompression
        if candidate.is_file():
            return candidate
    return None


def _missing_message(folder: Path, origin: str, missing: list[str]) -> str:
    names = ", ".join(f"{name}[.gz]" for name in missing)
    return (
        f"MNIST files missing: {names}. Looked in {folder} ({origin}). "
        f"Put the files there (plain or .gz), pass data_dir= to load_mnist, "
        f"or set PORTANET_DATA to a folder whose mnist/ subfolder holds them."
    )


class _Prepend(io.RawIOBase):
    """A raw stream that yields ``head`` and then the rest of ``stream``: un-reads a sniffed prefix."""

    def __init__(self, head: bytes, stream):
        self._head, self._stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n], self._head = self._head[:n], self._head[n:]
            return n
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _parse_idx(f, name: str) -> np.ndarray:
    head = f.read(2)
    stream = io.BufferedReader(_Prepend(head, f))
    compressed = head == b"\x1f\x8b"
    if compressed:
        stream = gzip.GzipFile(fileobj=stream, mode="rb")
    try:
        return _parse_idx_stream(stream, name)
    except (OSError, EOFError, zlib.error) as e:
        what = "corrupt gzip data" if compressed else "read failed"
        raise DatasetError(f"{name}: {what} ({type(e).__name__}: {e})") from e


def _parse_idx_stream(stream, name: str) -> np.ndarray:
    magic = _read_upto(stream, 4)
    if len(magic) < 4:
        raise DatasetError(f"{name}: expected a 4-byte IDX magic number, got {len(magic)} bytes")
    if magic[:2] != b"\0\0" or magic[2] not in _IDX_DTYPES or magic[3] == 0:
        codes = ", ".join(f"{code:02x}" for code in _IDX_DTYPES)
        raise DatasetError(
            f"{name}: bad IDX magic number 0x{magic.hex()}: expected 0x0000TTNN with type code TT "
            f"in ({codes}) and NN >= 1 dimensions"
        )
    dtype, ndim = _IDX_DTYPES[magic[2]], magic[3]
    dims = _read_upto(stream, 4 * ndim)
    if len(dims) < 4 * ndim:
        raise DatasetError(f"{name}: header declares {ndim} dimensions ({4 * ndim} bytes), got {len(dims)} bytes")
    shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))
    expected = math.prod(shape) * dtype.itemsize
    payload = _read_upto(stream, expected)
    got = len(payload) + _count_rest(stream)
    if got != expected:
        problem = "truncated" if got < expected else "extra trailing bytes"
        raise DatasetError(
            f"{name}: {problem}: header declares shape {shape} of {dtype.name}, "
            f"expected {expected} data bytes, got {got}"
        )
    array = np.frombuffer(payload, dtype=dtype).reshape(shape)
    return array if dtype.isnative else array.astype(dtype.newbyteorder("="))


def _read_upto(stream, n: int) -> bytearray:
    # Grow by chunks so a header that declares absurd sizes cannot allocate them up front.
    buffer = bytearray()
    while len(buffer) < n:
        chunk = stream.read(min(_CHUNK, n - len(buffer)))
        if not chunk:
            break
        buffer += chunk
    return buffer


def _count_rest(stream) -> int:
    count = 0
    while chunk := stream.read(_CHUNK):
        count += len(chunk)
    return count


def _load_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(
            f"{images_path}: expected uint8 images of shape (n, rows, cols), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DatasetError(f"{labels_path}: expected uint8 labels of shape (n,), got {labels.dtype} {labels.shape}")
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise DatasetError(
            f"{labels_path}: labels must be in [0, 9], got {labels[bad[0]]} at index {bad[0]} ({bad.size} out of range)"
        )
    if len(images) != len(labels):
        raise DatasetError(
            f"image/label count mismatch: {images_path} holds {len(images)} images "
            f"but {labels_path} holds {len(labels)} labels"
        )
    return images, labels


def _format(x: np.ndarray, normalize: bool, flatten: bool) -> np.ndarray:
    if flatten:
        x = x.reshape(len(x), -1)
    if normalize:
        x = x.astype(np.float32)
        x /= np.float32(255)  # division, not * (1/255), so that 255 maps to exactly 1.0
    return x


_DOWNLOAD_ERRORS = (OSError, ValueError, EOFError, zlib.error, http.client.HTTPException)


def _download(folder: Path, origin: str, missing: list[str], mirrors: list[str]) -> dict[str, Path]:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise type(e)(
            e.errno,
            f"cannot create the MNIST folder ({origin}): {e.strerror}; "
            f"pass data_dir= or set PORTANET_DATA to a writable folder",
            str(folder),
        ) from e
    found = {}
    for name in missing:
        failures = []
        for base in mirrors:
            url = base.rstrip("/") + "/" + name + ".gz"
            try:
                _log.info("downloading %s", url)
                blob = _fetch(url)
                _verify(blob, name)
            except _DOWNLOAD_ERRORS as e:
                failures.append(f"{url}: {_describe(e)}")
                continue
            path = folder / (name + ".gz")
            write_atomic(path, blob)
            found[name] = path
            break
        else:
            said = "\n  ".join(failures) if failures else "(no mirrors given)"
            raise FileNotFoundError(
                _missing_message(folder, origin, missing) + f"\nEvery mirror failed for {name}.gz:\n  {said}"
            )
    return found


def _fetch(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "portanet"})
    with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
        blob = response.read(_MAX_DOWNLOAD_BYTES + 1)
    if len(blob) > _MAX_DOWNLOAD_BYTES:
        raise DatasetError(f"response larger than {_MAX_DOWNLOAD_BYTES} bytes")
    return blob


def _verify(blob: bytes, name: str) -> None:
    try:
        raw = gzip.GzipFile(fileobj=io.BytesIO(blob), mode="rb").read(_MAX_RAW_BYTES + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"not a valid gzip file ({type(e).__name__}: {e})") from e
    if len(raw) > _MAX_RAW_BYTES:
        raise DatasetError(f"uncompressed content larger than {_MAX_RAW_BYTES} bytes")
    digest = hashlib.sha256(raw).hexdigest()
    if digest != _MNIST_SHA256[name]:
        raise DatasetError(f"checksum mismatch: expected sha256 {_MNIST_SHA256[name]}, got {digest}")


def _describe(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return f"{error.reason}"
    if isinstance(error, DatasetError):
        return str(error)
    return f"{type(error).__name__}: {error}"


