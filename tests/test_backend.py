"""Backend and device resolution, array moves, host RNG, the Device contract and the backends package's shape."""

import ast
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import portanet as pn
from portanet import resolve_device, to_numpy
from portanet.backends import BACKENDS, dtype_name, host_rng, is_host_data, library_of, take_rows


def test_cpu_resolves_to_numpy():
    dev = resolve_device("cpu")
    assert dev.backend == "numpy" and dev == "cpu"
    assert isinstance(dev.asarray([1.0, 2.0], "float32"), np.ndarray)


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu:0", "", "cuda-1"])
def test_unknown_device_string_lists_accepted_forms(bad):
    with pytest.raises(ValueError, match="accepted devices.*cuda:N"):
        resolve_device(bad)


def test_unknown_backend_name_is_an_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_device("cpu", backend="tensorflow")


def test_numpy_backend_has_only_cpu():
    with pytest.raises(ValueError, match="only has device 'cpu'"):
        resolve_device("cuda:0", backend="numpy")


def test_cuda_without_cupy_or_device_says_how_to_fix():
    try:
        import cupy  # noqa: F401
        has_cupy = True
    except ImportError:
        has_cupy = False
    if has_cupy:
        pytest.skip("cupy is installed; the missing-cupy message cannot be shown")
    with pytest.raises(ImportError, match=r'pip install "portanet\[cuda12\]"'):
        pn.Model(device="cuda")


def test_array_api_strict_unknown_device_is_an_error():
    pytest.importorskip("array_api_strict")
    with pytest.raises(ValueError, match="unknown array_api_strict device"):
        resolve_device("device9", backend="array_api_strict")


def test_backend_given_as_module():
    aas = pytest.importorskip("array_api_strict")
    dev = resolve_device(aas.Device("device1"), backend=aas)
    assert dev.backend == "array_api_strict" and dev.device == aas.Device("device1")


@pytest.mark.parametrize("dtype", ["float32", "float64", np.float32, np.dtype("float64")])
def test_dtype_names_are_canonical(dtype):
    assert dtype_name(dtype) in ("float32", "float64")


def test_host_rng_is_deterministic():
    assert np.array_equal(host_rng(3).random(5), host_rng(3).random(5))


def test_moves_host_data_to_device_and_back(device):
    host = np.arange(12, dtype=np.float64).reshape(3, 4)
    on_dev = device.asarray(host, "float32")
    assert device.owns(on_dev)
    assert str(on_dev.dtype).endswith("float32")
    np.testing.assert_array_equal(to_numpy(on_dev), host.astype(np.float32))


def test_arrays_already_on_the_device_are_not_copied(device):
    a = device.asarray(np.ones((2, 2)), "float64")
    assert device.asarray(a) is a


def test_moves_between_array_api_strict_devices():
    aas = pytest.importorskip("array_api_strict")
    d1 = resolve_device("device1", backend=aas)
    d2 = resolve_device("device2", backend=aas)
    a = d1.asarray(np.arange(4.0))
    b = d2.asarray(a)
    assert b.device == aas.Device("device2")
    np.testing.assert_array_equal(to_numpy(b), np.arange(4.0))


def test_moves_from_every_library_to_every_device(device):
    sources = [np.arange(6.0).reshape(2, 3)]
    try:
        import torch

        sources.append(torch.arange(6.0, dtype=torch.float64).reshape(2, 3))
    except ImportError:
        pass
    try:
        import array_api_strict as aas

        sources.append(aas.reshape(aas.arange(6.0, device=aas.Device("device2")), (2, 3)))
    except ImportError:
        pass
    for src in sources:
        moved = device.asarray(src, "float64")
        assert device.owns(moved)
        np.testing.assert_array_equal(to_numpy(moved), np.arange(6.0).reshape(2, 3))


def test_same_seed_gives_same_initial_weights_on_every_backend(device):
    def weights(dev):
        m = pn.Model([pn.Dense(4, "relu"), pn.Dense(3)], device=dev, seed=7, dtype="float64").build(5)
        return {k: to_numpy(v) for k, v in m.parameters().items()}

    reference = weights("cpu")
    for name, value in weights(device).items():
        np.testing.assert_array_equal(value, reference[name])


def test_dropout_random_source_draws_on_the_device(device):
    source = device.random_source(0)
    u = source.uniform((3, 4), "float32")
    assert device.owns(u)
    values = to_numpy(u)
    assert values.shape == (3, 4) and (values >= 0).all() and (values < 1).all()


# -- the Device contract ------------------------------------------------------------------------------------------
def test_a_device_equals_its_name_and_hashes_like_it(device):
    assert device == device.name and hash(device) == hash(device.name)
    assert {device.name: 1}.get(device) == 1 and {device: 1}.get(device.name) == 1
    assert device.portable() in {device} and device.portable() == device


def test_a_model_device_finds_its_name_in_a_dict():
    assert {"cpu": 1}.get(pn.Model(device="cpu").device) == 1


def test_the_registry_names_each_backend_once_and_resolves_its_aliases():
    assert BACKENDS == ("numpy", "array_api_strict", "torch", "cupy")
    for alias, name in (("np", "numpy"), ("strict", "array_api_strict"), ("PyTorch", "torch"), ("array-api-strict",
                                                                                               "array_api_strict")):
        try:
            assert resolve_device("cpu", backend=alias).backend == name
        except ImportError:
            pass


def test_the_registry_recognises_and_downloads_every_backends_arrays(device):
    host = np.arange(12.0).reshape(4, 3)
    a = device.asarray(host, "float64")
    assert library_of(a) == device.backend
    np.testing.assert_array_equal(to_numpy(a), host)
    np.testing.assert_array_equal(device.to_host(a), host)
    rows = take_rows(a, np.array([3, 0, 3]))
    assert device.owns(rows)
    np.testing.assert_array_equal(to_numpy(rows), host[[3, 0, 3]])


def test_python_data_and_memory_maps_are_host_data(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((2, 2)))
    for data in ([1.0, 2.0], 3.0, np.float32(1), np.ones(2), np.load(tmp_path / "x.npy", mmap_mode="r")):
        assert library_of(data) == "numpy" and is_host_data(data)
    torch = pytest.importorskip("torch")
    assert library_of(torch.ones(2)) == "torch" and not is_host_data(torch.ones(2))


def test_copy_never_aliases_its_source(device):
    sources = [np.arange(6.0).reshape(2, 3), device.asarray(np.arange(6.0).reshape(2, 3), "float64")]
    try:
        import torch

        sources.append(torch.arange(6.0, dtype=torch.float64).reshape(2, 3))
    except ImportError:
        pass
    for src in sources:
        kept = to_numpy(src).copy()
        for moved in (device.copy(src), device.asarray(src, copy=True), device.asarray(src, "float64", copy=True)):
            assert device.owns(moved)
            moved[...] = -1.0
            np.testing.assert_array_equal(to_numpy(src), kept)


def test_random_source_state_round_trip_continues_the_stream(device):
    source = device.random_source(5)
    source.uniform((2, 3), "float32")
    state = source.get_state()
    if state is None:
        assert device.backend == "cupy"  # every other backend exports it
        pytest.skip(f"{device.backend} cannot export its generator state")
    state = json.loads(json.dumps(state))  # checkpoints keep it as JSON
    expected = [to_numpy(source.uniform((3, 4), "float32")) for _ in range(2)]
    restored = device.random_source(99)
    restored.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(to_numpy(restored.uniform((3, 4), "float32")), want)


def test_a_random_state_of_another_kind_is_ignored():
    torch = pytest.importorskip("torch")
    numpy_state = resolve_device("cpu").random_source(1).get_state()
    torch_dev = resolve_device("cpu", backend="torch")
    torch_state = torch_dev.random_source(1).get_state()
    for dev, foreign in ((torch_dev, numpy_state), (resolve_device("cpu"), torch_state)):
        kept, ignoring = dev.random_source(7), dev.random_source(7)
        ignoring.set_state(foreign)
        np.testing.assert_array_equal(to_numpy(ignoring.uniform((5,), "float64")), to_numpy(kept.uniform((5,), "float64")))
    assert torch_state["state"] and isinstance(torch_state["state"], str) and torch.is_grad_enabled()


def test_a_random_state_that_is_neither_a_dict_nor_none_is_an_error(device):
    source = device.random_source(0)
    source.set_state(None)  # a generator that could not export its state
    with pytest.raises(ValueError, match="must be a dict or None, got str"):
        source.set_state("evil")


def test_torch_device_detaches_tensors_that_require_grad():
    torch = pytest.importorskip("torch")
    dev = resolve_device("cpu", backend="torch")
    t = torch.arange(6.0, dtype=torch.float32).reshape(2, 3).requires_grad_()
    for out in (dev.asarray(t), dev.asarray(t, "float64"), dev.copy(t), dev.from_host(t), take_rows(t, np.array([1]))):
        assert not out.requires_grad and out.grad_fn is None
    copied = dev.copy(t)
    copied[...] = 0.0
    assert float(t.detach().sum()) == 15.0


def test_torch_scope_turns_autograd_off_and_other_scopes_do_nothing(device):
    torch = pytest.importorskip("torch")
    with device.scope():
        assert torch.is_grad_enabled() == (device.backend != "torch")
    assert torch.is_grad_enabled()


def test_cupy_kernels_are_off_unless_enabled(monkeypatch):
    from portanet.backends.cupy import KERNELS_ENV, CupyDevice

    monkeypatch.delenv(KERNELS_ENV, raising=False)
    assert CupyDevice(None, None, "cuda:0").kernels is None  # decided without importing cupy
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a copy stays a CuPy device: never re-resolved by name (CPU fallback)
        twin = CupyDevice(None, None, "cuda:0").portable()
    assert type(twin) is CupyDevice and twin.name == "cuda:0" and twin.kernels is None


def test_portable_is_the_same_device_without_kernels(device):
    twin = device.portable()
    assert type(twin) is type(device) and twin == device and twin.xp is device.xp and twin.kernels is None
    assert twin.device == device.device


# -- the package's shape ------------------------------------------------------------------------------------------
BACKENDS_DIR = Path(pn.__file__).parent / "backends"


def _portanet_imports(path: Path):
    """Modules of portanet that ``path`` imports, at module level or lazily inside functions."""
    package = ["portanet", *path.parent.relative_to(BACKENDS_DIR.parent).parts]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            names = [a.name for a in node.names] if not node.module else [None]
            for name in names:
                candidate = base + [name] if name else base
                yield ".".join(candidate if name is None or _is_module(candidate) else base)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]):
                if name.split(".")[0] == "portanet":
                    yield name


def _is_module(parts):
    where = BACKENDS_DIR.parents[1].joinpath(*parts)
    return where.with_suffix(".py").exists() or where.is_dir()


def test_backends_import_nothing_else_from_portanet_and_have_no_cycles():
    graph = {}
    for path in BACKENDS_DIR.glob("*.py"):
        name = "portanet.backends" + ("" if path.stem == "__init__" else f".{path.stem}")
        graph[name] = set(_portanet_imports(path))
    outside = {name: deps for name, deps in graph.items() if any(not d.startswith("portanet.backends") for d in deps)}
    assert not outside
    assert graph["portanet.backends.base"] == set()  # the root: every backend module builds on it
    done, active = set(), []

    def visit(node):
        assert node not in active, f"import cycle: {' -> '.join(active + [node])}"
        if node in done:
            return
        active.append(node)
        for dep in graph.get(node, ()):
            if dep != "portanet.backends":  # submodules import siblings, never the package
                visit(dep)
        active.pop()
        done.add(node)

    for node in graph:
        visit(node)
    assert all("portanet.backends" not in deps for name, deps in graph.items() if name != "portanet.backends")


def test_importing_portanet_and_training_on_numpy_imports_neither_torch_nor_cupy():
    code = ("import sys, numpy as np, portanet as pn\n"
            "m = pn.Model([pn.Dense(2, 'softmax')], seed=0).compile('sparse_categorical_crossentropy')\n"
            "m.fit(np.ones((4, 3)), np.array([0, 1, 0, 1]), verbose=0)\n"
            "print(sorted(k for k in ('torch', 'cupy') if k in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
