"""Backend and device resolution, array moves, host RNG."""

import numpy as np
import pytest

import portanet as pn
from portanet import resolve_device, to_numpy
from portanet.backends import dtype_name, host_rng


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
