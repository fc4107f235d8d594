"""The backend fixture: every backend-dependent test runs on each backend, visible in the ids, skipped with a reason.

Select with ``pytest --backend=NAME`` (repeatable) or ``PORTANET_BACKENDS=numpy,cupy``, NAME a backend or a case id
("torch" runs torch on the CPU and, where torch sees a GPU, "torch-cuda"); unknown names are errors.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import array_api_strict

    array_api_strict.set_array_api_strict_flags(api_version="2025.12")
except ImportError:  # the fixture reports it as a skip reason
    array_api_strict = None

from portanet import resolve_device

def _torch_cuda():
    """torch on the first GPU, float32 matrix products in full precision (no TF32), as the tolerances assume."""
    device = resolve_device("cuda:0", backend="torch")
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return device


# id -> (backend name used for selection, how to build the Device)
CASES = {
    "numpy": ("numpy", lambda: resolve_device("cpu")),
    "array_api_strict": ("array_api_strict", lambda: resolve_device("CPU_DEVICE", backend="array_api_strict")),
    "array_api_strict-device1": ("array_api_strict", lambda: resolve_device("device1", backend="array_api_strict")),
    "torch": ("torch", lambda: resolve_device("cpu", backend="torch")),
    "cupy": ("cupy", lambda: resolve_device("cuda:0")),
    # torch on the GPU: selected by --backend=torch-cuda (or torch); skipped where torch sees no CUDA device
    "torch-cuda": ("torch", _torch_cuda),
}
NAMES = sorted({name for name, _ in CASES.values()})

MNIST_DIR = Path(os.environ.get("PORTANET_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "mnist"


def pytest_addoption(parser):
    parser.addoption("--backend", action="append", default=[], metavar="NAME",
                     help=f"run backend-dependent tests on this backend only (repeatable): one of {NAMES} or a case id "
                          f"from {list(CASES)}")


def _selected(config) -> set:
    chosen = list(config.getoption("--backend"))
    env = os.environ.get("PORTANET_BACKENDS", "")
    chosen += [name.strip() for name in env.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in NAMES and name not in CASES]
    if unknown:
        raise pytest.UsageError(f"unknown backend(s) {unknown}; choose from {NAMES} (or a case id from {list(CASES)})")
    return set(chosen)


def pytest_configure(config):
    config._portanet_backends = _selected(config)
    config.addinivalue_line("markers", "slow: trains on real data (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "backend: takes the device fixture, set on every such test (a GPU run "
                                       "selects them alone with -m backend)")


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", list(CASES), indirect=True)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.backend)


_cache: dict = {}


@pytest.fixture
def device(request):
    """A :class:`portanet.Device` for the case in the test id; skipped with the reason when unavailable."""
    case = request.param
    name, make = CASES[case]
    chosen = request.config._portanet_backends
    if chosen and name not in chosen and case not in chosen:
        pytest.skip(f"backend {case} not selected (--backend / PORTANET_BACKENDS)")
    if case not in _cache:
        try:
            _cache[case] = make()
        except (ImportError, RuntimeError, ValueError) as exc:
            _cache[case] = exc
    if isinstance(_cache[case], Exception):
        pytest.skip(f"backend {case} unavailable: {_cache[case]}")
    return _cache[case]


@pytest.fixture
def xp(device):
    return device.xp


@pytest.fixture(scope="session")
def mnist_dir():
    if not all((MNIST_DIR / f"{stem}.gz").exists() or (MNIST_DIR / stem).exists() for stem in (
            "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")):
        pytest.skip(f"real MNIST not found in {MNIST_DIR} (set PORTANET_DATA to the folder holding mnist/)")
    return MNIST_DIR


@pytest.fixture(scope="session")
def mpiexec() -> list:
    """The command that starts an MPI job (``[path, flags...]``, then ``-n N program``): the mpiexec next to the
    interpreter (the MPI extra installs MPICH's there), else one on PATH; skipped with the reason when absent."""
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip('mpi4py is not installed (pip install "portanet[mpi]")')
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.skip('no mpiexec next to the interpreter or on PATH (pip install "portanet[mpi]" puts MPICH\'s there)')
    version = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=60)
    if "Open MPI" in version.stdout + version.stderr:  # CI machines have 2 cores; Open MPI refuses more ranks
        return [found, "--oversubscribe", "-x", "PYTHONPATH", "-x", "PYTHONUNBUFFERED", "-x", "OMP_NUM_THREADS"]
    return [found]
