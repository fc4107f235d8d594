"""Tests for portanet.datasets: IDX parsing, MNIST loading, folder resolution and mirror downloads.
Network use stays on 127.0.0.1: every download test points the mirrors at a local http.server."""

import gzip
import hashlib
import io
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from portanet import datasets
from portanet.datasets import MNIST_FILES, DatasetError, default_data_dir, load_mnist, mnist_dir, read_idx

# From ../shared/data/mnist/README.md: the spec these tests hold the loader to.
README_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _real_mnist_dir():
    candidates = []
    if os.environ.get("PORTANET_DATA"):
        candidates.append(Path(os.environ["PORTANET_DATA"]) / "mnist")
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist")
    for folder in candidates:
        if all((folder / (name + ".gz")).is_file() or (folder / name).is_file() for name in MNIST_FILES):
            return folder
    return None


REAL_DIR = _real_mnist_dir()
needs_real_mnist = pytest.mark.skipif(
    REAL_DIR is None, reason="real MNIST not found in $PORTANET_DATA/mnist nor ../shared/data/mnist"
)


@pytest.fixture(scope="module")
def real_mnist():
    if REAL_DIR is None:
        pytest.skip("real MNIST not found in $PORTANET_DATA/mnist nor ../shared/data/mnist")
    return load_mnist(REAL_DIR, download=False)


@pytest.fixture(autouse=True)
def _local_network_only(monkeypatch):
    # A proxy from the environment must not intercept requests to the local test server.
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


# ---------------------------------------------------------------- helpers

_TYPE_CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


def idx_bytes(array, code=None):
    """Encode an array as IDX: 0x0000, type code, ndim, big-endian uint32 dims, big-endian data."""
    array = np.asarray(array)
    kind = array.dtype.kind + str(array.dtype.itemsize)
    code = _TYPE_CODES[kind] if code is None else code
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def synthetic_raw(n_train=6, n_test=4, seed=0):
    """Small MNIST-shaped files, uncompressed, keyed by the standard names."""
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)),
        "train-labels-idx1-ubyte": idx_bytes(np.arange(n_train, dtype=np.uint8) % 10),
        "t10k-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)),
        "t10k-labels-idx1-ubyte": idx_bytes(np.arange(n_test, dtype=np.uint8)[::-1] % 10),
    }


def write_files(folder, raw, compress=True):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in raw.items():
        if compress:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder


@pytest.fixture
def synthetic(monkeypatch):
    """Synthetic raw files whose checksums the loader accepts in place of real MNIST's."""
    raw = synthetic_raw()
    monkeypatch.setattr(datasets, "_MNIST_SHA256", {k: hashlib.sha256(v).hexdigest() for k, v in raw.items()})
    return raw


def gz_files(raw):
    return {name + ".gz": gzip.compress(data) for name, data in raw.items()}


@pytest.fixture
def serve():
    """start(files) serves {filename: bytes} on 127.0.0.1 and returns (base_url, list of requested paths)."""
    running = []

    def start(files):
        requested = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                requested.append(self.path)
                body = files.get(self.path.rsplit("/", 1)[-1])
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        thread.start()
        running.append((server, thread))
        return f"http://127.0.0.1:{server.server_port}/mnist/", requested

    yield start
    for server, thread in running:
        server.shutdown()
        server.server_close()
        thread.join()


def refused_url():
    """A base URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist/"


def assert_matches_raw(loaded, raw):
    (x_train, y_train), (x_test, y_test) = loaded
    np.testing.assert_array_equal(x_train, read_idx(io.BytesIO(raw["train-images-idx3-ubyte"])))
    np.testing.assert_array_equal(y_train, read_idx(io.BytesIO(raw["train-labels-idx1-ubyte"])))
    np.testing.assert_array_equal(x_test, read_idx(io.BytesIO(raw["t10k-images-idx3-ubyte"])))
    np.testing.assert_array_equal(y_test, read_idx(io.BytesIO(raw["t10k-labels-idx1-ubyte"])))


# ---------------------------------------------------------------- real MNIST


def test_real_mnist_has_standard_shapes_and_dtypes(real_mnist):
    (x_train, y_train), (x_test, y_test) = real_mnist
    assert x_train.shape == (60000, 28, 28) and x_train.dtype == np.uint8
    assert y_train.shape == (60000,) and y_train.dtype == np.uint8
    assert x_test.shape == (10000, 28, 28) and x_test.dtype == np.uint8
    assert y_test.shape == (10000,) and y_test.dtype == np.uint8


def test_real_mnist_label_counts_match_readme(real_mnist):
    (_, y_train), (_, y_test) = real_mnist
    assert np.bincount(y_train, minlength=10).tolist() == TRAIN_COUNTS
    assert np.bincount(y_test, minlength=10).tolist() == TEST_COUNTS


def test_real_mnist_mean_train_pixel_matches_readme(real_mnist):
    (x_train, _), _ = real_mnist
    assert float(x_train.mean(dtype=np.float64)) == pytest.approx(33.318, abs=5e-4)


@needs_real_mnist
@pytest.mark.parametrize("name", MNIST_FILES)
def test_real_mnist_uncompressed_sha256_matches_readme_and_module_table(name):
    path = REAL_DIR / name
    data = path.read_bytes() if path.is_file() else gzip.decompress((REAL_DIR / (name + ".gz")).read_bytes())
    assert hashlib.sha256(data).hexdigest() == README_SHA256[name] == datasets._MNIST_SHA256[name]


@needs_real_mnist
def test_real_mnist_normalized_and_flattened_is_pixels_over_255(real_mnist):
    (x_train, y_train), (x_test, _) = load_mnist(REAL_DIR, download=False, normalize=True, flatten=True)
    assert x_train.shape == (60000, 784) and x_train.dtype == np.float32
    assert x_test.shape == (10000, 784) and x_test.dtype == np.float32
    assert x_train.min() == 0.0 and x_train.max() == 1.0
    expected = real_mnist[0][0].reshape(60000, 784).astype(np.float32) / np.float32(255)
    assert np.array_equal(x_train, expected)
    np.testing.assert_array_equal(y_train, real_mnist[0][1])


# ---------------------------------------------------------------- options on synthetic files


def test_normalize_gives_float32_in_unit_interval_with_255_exactly_one(tmp_path):
    raw = synthetic_raw()
    raw["train-images-idx3-ubyte"] = idx_bytes(np.full((6, 28, 28), 255, dtype=np.uint8))
    (x_train, _), (x_test, _) = load_mnist(write_files(tmp_path, raw), download=False, normalize=True)
    assert x_train.dtype == np.float32 and x_test.dtype == np.float32
    assert x_train.shape == (6, 28, 28)
    assert np.all(x_train == 1.0)
    assert 0.0 <= x_test.min() and x_test.max() <= 1.0


def test_flatten_gives_rows_of_784_in_row_major_order(tmp_path):
    raw = synthetic_raw()
    (x_train, _), (x_test, _) = load_mnist(write_files(tmp_path, raw), download=False, flatten=True)
    assert x_train.shape == (6, 784) and x_test.shape == (4, 784)
    assert x_train.dtype == np.uint8
    np.testing.assert_array_equal(x_train[2], read_idx(io.BytesIO(raw["train-images-idx3-ubyte"]))[2].ravel())


def test_plain_uncompressed_files_are_read(tmp_path):
    raw = synthetic_raw()
    assert_matches_raw(load_mnist(write_files(tmp_path, raw, compress=False), download=False), raw)


def test_plain_file_is_preferred_over_gz_when_both_exist(tmp_path):
    raw = synthetic_raw(seed=1)
    write_files(tmp_path, synthetic_raw(seed=2), compress=True)
    write_files(tmp_path, raw, compress=False)
    assert_matches_raw(load_mnist(tmp_path, download=False), raw)


# ---------------------------------------------------------------- where the files are


def test_default_data_dir_is_portanet_data_when_set(monkeypatch, tmp_path):
    monkeypatch.setenv("PORTANET_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    assert mnist_dir() == tmp_path / "mnist"


def test_default_data_dir_honours_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("PORTANET_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / "portanet"
    assert mnist_dir() == tmp_path / "portanet" / "mnist"


def test_default_data_dir_falls_back_to_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("PORTANET_DATA", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / ".cache" / "portanet"


def test_data_dir_argument_is_the_folder_itself_and_wins_over_portanet_data(monkeypatch, tmp_path):
    monkeypatch.setenv("PORTANET_DATA", str(tmp_path / "elsewhere"))
    assert mnist_dir(tmp_path) == tmp_path


def test_load_mnist_reads_portanet_data_mnist_subfolder(monkeypatch, tmp_path):
    raw = synthetic_raw()
    write_files(tmp_path / "mnist", raw)
    monkeypatch.setenv("PORTANET_DATA", str(tmp_path))
    assert_matches_raw(load_mnist(download=False), raw)


def test_absent_files_without_download_name_files_folder_and_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("PORTANET_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(download=False)
    message = str(info.value)
    assert str(tmp_path / "mnist") in message
    assert "PORTANET_DATA" in message and "download=False" in message
    assert all(name in message for name in MNIST_FILES)


def test_absent_files_in_default_cache_say_how_to_change_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("PORTANET_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="PORTANET_DATA") as info:
        load_mnist(download=False)
    assert str(tmp_path / "portanet" / "mnist") in str(info.value)


def test_mirrors_given_as_one_string_is_rejected(tmp_path):
    with pytest.raises(TypeError, match="mirrors must be a list"):
        load_mnist(tmp_path, mirrors="http://127.0.0.1/")


# ---------------------------------------------------------------- read_idx


@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
def test_read_idx_decodes_every_type_code_to_native_byte_order(tmp_path, dtype):
    array = (np.arange(24).reshape(2, 3, 4) * (-1 if dtype != "u1" else 1)).astype(dtype)
    if dtype.startswith("f"):
        array = array / 3
    path = tmp_path / "x.idx"
    path.write_bytes(idx_bytes(array))
    got = read_idx(path)
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    assert got.shape == (2, 3, 4)
    np.testing.assert_array_equal(got, array)


def test_read_idx_accepts_str_paths_and_plain_or_gzip_file_objects(tmp_path):
    array = np.arange(10, dtype=np.uint8)
    (tmp_path / "a").write_bytes(idx_bytes(array))
    np.testing.assert_array_equal(read_idx(str(tmp_path / "a")), array)
    np.testing.assert_array_equal(read_idx(io.BytesIO(idx_bytes(array))), array)
    np.testing.assert_array_equal(read_idx(io.BytesIO(gzip.compress(idx_bytes(array)))), array)


def test_read_idx_result_is_writable(tmp_path):
    got = read_idx(io.BytesIO(idx_bytes(np.zeros(3, np.uint8))))
    got[0] = 1
    assert got[0] == 1


def test_read_idx_rejects_bad_magic_naming_the_file(tmp_path):
    path = tmp_path / "bad-magic"
    path.write_bytes(b"\x01\x02\x08\x01" + np.asarray([3], ">u4").tobytes() + b"abc")
    with pytest.raises(DatasetError, match="bad IDX magic number 0x01020801") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_rejects_unknown_type_code():
    with pytest.raises(DatasetError, match="bad IDX magic number 0x00000701"):
        read_idx(io.BytesIO(b"\x00\x00\x07\x01" + np.asarray([1], ">u4").tobytes() + b"a"))


def test_read_idx_rejects_a_file_shorter_than_the_magic_number():
    with pytest.raises(DatasetError, match="expected a 4-byte IDX magic number, got 2 bytes"):
        read_idx(io.BytesIO(b"\x00\x00"))


def test_read_idx_rejects_truncated_header():
    with pytest.raises(DatasetError, match=r"header declares 3 dimensions \(12 bytes\), got 4 bytes"):
        read_idx(io.BytesIO(b"\x00\x00\x08\x03" + b"\x00\x00\x00\x05"))


def test_read_idx_rejects_truncated_data_with_expected_and_got_bytes(tmp_path):
    path = tmp_path / "short.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((5, 28, 28), np.uint8))[:-100]))
    with pytest.raises(DatasetError, match=r"truncated.*expected 3920 data bytes, got 3820") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_rejects_extra_trailing_bytes_with_expected_and_got_bytes(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(np.zeros(7, np.uint8)) + b"\x00" * 5)
    with pytest.raises(DatasetError, match=r"extra trailing bytes.*expected 7 data bytes, got 12") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_rejects_absurd_declared_size_without_allocating_it():
    header = b"\x00\x00\x0e\x03" + np.asarray([2**32 - 1] * 3, ">u4").tobytes()
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(io.BytesIO(header + b"\x00" * 8))


@pytest.mark.parametrize("damage", ["flipped", "cut"])
def test_read_idx_rejects_corrupt_gzip_naming_the_file(tmp_path, damage):
    blob = bytearray(gzip.compress(idx_bytes(np.arange(2000, dtype=np.uint8) % 251)))
    if damage == "flipped":
        for i in range(20, len(blob) - 8, 7):
            blob[i] ^= 0xFF
    else:
        blob = blob[: len(blob) // 2]
    path = tmp_path / "broken.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(DatasetError, match="corrupt gzip data") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_corrupt_gzip_error_is_a_value_error(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(100, np.uint8)))[:-4])
    with pytest.raises(ValueError):
        read_idx(path)


# ---------------------------------------------------------------- MNIST-level validation


def test_labels_out_of_range_are_rejected_naming_value_and_index(tmp_path):
    raw = synthetic_raw()
    labels = np.arange(6, dtype=np.uint8)
    labels[4] = 10
    raw["train-labels-idx1-ubyte"] = idx_bytes(labels)
    with pytest.raises(DatasetError, match=r"labels must be in \[0, 9\], got 10 at index 4") as info:
        load_mnist(write_files(tmp_path, raw), download=False)
    assert "train-labels-idx1-ubyte" in str(info.value)


def test_mismatched_image_and_label_counts_are_rejected(tmp_path):
    raw = synthetic_raw()
    raw["t10k-labels-idx1-ubyte"] = idx_bytes(np.zeros(3, np.uint8))
    with pytest.raises(DatasetError, match="holds 4 images but .*t10k-labels-idx1-ubyte.* holds 3 labels"):
        load_mnist(write_files(tmp_path, raw), download=False)


def test_images_file_with_wrong_rank_is_rejected(tmp_path):
    raw = synthetic_raw()
    raw["train-images-idx3-ubyte"] = idx_bytes(np.zeros(6, np.uint8))
    with pytest.raises(DatasetError, match=r"expected uint8 images of shape \(n, rows, cols\), got uint8 \(6,\)"):
        load_mnist(write_files(tmp_path, raw), download=False)


def test_truncated_file_in_data_dir_is_reported_by_load_mnist(tmp_path):
    raw = synthetic_raw()
    raw["t10k-images-idx3-ubyte"] = raw["t10k-images-idx3-ubyte"][:-1]
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte.gz: truncated"):
        load_mnist(write_files(tmp_path, raw), download=False)


# ---------------------------------------------------------------- downloads from local mirrors


def test_download_falls_back_to_next_mirror_after_404(tmp_path, synthetic, serve):
    empty, empty_requests = serve({})
    good, good_requests = serve(gz_files(synthetic))
    assert_matches_raw(load_mnist(tmp_path, mirrors=[empty, good]), synthetic)
    assert len(empty_requests) == 4 and len(good_requests) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(name + ".gz" for name in MNIST_FILES)


def test_download_falls_back_to_next_mirror_after_connection_refused(tmp_path, synthetic, serve):
    good, requests = serve(gz_files(synthetic))
    assert_matches_raw(load_mnist(tmp_path, mirrors=[refused_url(), good]), synthetic)
    assert len(requests) == 4


@pytest.mark.parametrize("corruption", ["other content", "not gzip"])
def test_download_falls_back_to_next_mirror_after_bad_file(tmp_path, synthetic, serve, corruption):
    bad_files = gz_files(synthetic)
    name = "train-images-idx3-ubyte.gz"
    if corruption == "other content":
        bad_files[name] = gzip.compress(synthetic_raw(seed=99)["train-images-idx3-ubyte"])
    else:
        bad_files[name] = b"<html>not found</html>"
    bad, bad_requests = serve(bad_files)
    good, good_requests = serve(gz_files(synthetic))
    assert_matches_raw(load_mnist(tmp_path, mirrors=[bad, good]), synthetic)
    # Only the file that failed verification came from the second mirror.
    assert len(bad_requests) == 4
    assert good_requests == ["/mnist/" + name]


def test_all_mirrors_failing_raises_with_each_mirror_reason_and_leaves_nothing(tmp_path, synthetic, serve):
    empty, _ = serve({})
    corrupt_files = gz_files(synthetic)
    corrupt_files["train-images-idx3-ubyte.gz"] = gzip.compress(b"junk")
    corrupt, _ = serve(corrupt_files)
    refused = refused_url()
    folder = tmp_path / "cache" / "mnist"
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(folder, mirrors=[empty, corrupt, refused])
    message = str(info.value)
    assert "Every mirror failed for train-images-idx3-ubyte.gz" in message
    assert f"{empty}train-images-idx3-ubyte.gz: HTTP 404" in message
    assert f"{corrupt}train-images-idx3-ubyte.gz: checksum mismatch: expected sha256" in message
    assert f"{refused}train-images-idx3-ubyte.gz: " in message and "refused" in message.lower()
    assert str(folder) in message and "PORTANET_DATA" in message
    assert list(folder.iterdir()) == []


def test_no_mirrors_at_all_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no mirrors given"):
        load_mnist(tmp_path, mirrors=[])


def test_second_load_reads_the_cache_without_any_request(tmp_path, synthetic, serve, monkeypatch):
    url, requests = serve(gz_files(synthetic))
    monkeypatch.setenv("PORTANET_DATA", str(tmp_path))
    first = load_mnist(mirrors=[url])
    assert len(requests) == 4
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(n + ".gz" for n in MNIST_FILES)
    second = load_mnist(mirrors=[url])
    assert len(requests) == 4
    assert_matches_raw(second, synthetic)
    assert_matches_raw(first, synthetic)


def test_only_missing_files_are_downloaded(tmp_path, synthetic, serve):
    write_files(tmp_path, {k: v for k, v in synthetic.items() if "train" in k})
    url, requests = serve(gz_files(synthetic))
    assert_matches_raw(load_mnist(tmp_path, mirrors=[url]), synthetic)
    assert sorted(requests) == ["/mnist/t10k-images-idx3-ubyte.gz", "/mnist/t10k-labels-idx1-ubyte.gz"]


def test_cache_write_goes_through_a_temp_file_and_os_replace(tmp_path, synthetic, serve, monkeypatch):
    url, _ = serve(gz_files(synthetic))
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        assert Path(src).parent == Path(dst).parent and not Path(dst).exists()
        replaced.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(datasets.os, "replace", spy)
    load_mnist(tmp_path, mirrors=[url])
    assert sorted(replaced) == sorted(n + ".gz" for n in MNIST_FILES)


def test_failed_cache_write_leaves_neither_partial_nor_temp_file(tmp_path, synthetic, serve, monkeypatch):
    url, _ = serve(gz_files(synthetic))

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datasets.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        load_mnist(tmp_path, mirrors=[url])
    assert list(tmp_path.iterdir()) == []


@needs_real_mnist
def test_real_mnist_downloads_through_local_mirror_with_real_checksums(tmp_path, serve, real_mnist):
    files = {}
    for name in MNIST_FILES:
        plain = REAL_DIR / name
        files[name + ".gz"] = (
            gzip.compress(plain.read_bytes()) if plain.is_file() else (REAL_DIR / (name + ".gz")).read_bytes()
        )
    url, requests = serve(files)
    (x_train, y_train), (x_test, y_test) = load_mnist(tmp_path, mirrors=[url])
    assert len(requests) == 4
    np.testing.assert_array_equal(x_train, real_mnist[0][0])
    np.testing.assert_array_equal(y_test, real_mnist[1][1])
