"""CuPy-only code (portanet/backends/cupy.py) checked on the CPU, through the stand-ins of tests/cupy_stand_in.py.

No machine of ours has a GPU, so two things are run here against imitations of CuPy written from its source
(v13.6 and v14.2), and on a GPU by ``ci/gpu-check``:

- the fused ``ElementwiseKernel`` bodies, executed with NumPy the way CuPy binds them: the type ``T`` comes from the
  array arguments, and Python float scalars are cast to ``T`` (``_decide_params_type_core``, ``CScalar.apply_dtype``);
- the prefetch's stream protocol, on a simulated GPU whose streams run their work as late as the events allow
  (only when the host or another stream waits for it) or, for the compute stream, at once: either order is one a
  real GPU may take, and each shows a missing event or host wait as a wrong batch (four of the five; the side
  stream's wait before writing fresh device memory would need a model of CuPy's memory pool, which this lacks).
"""

from __future__ import annotations

import contextlib
import sys
import types

import numpy as np
import pytest
from cupy_stand_in import ElementwiseKernel, NumpyAsCupy, SimulatedGPU

from portanet import activations, optimizers
from portanet.backends.cupy import CupyKernels, prefetch_uploads


@pytest.fixture(scope="module")
def kernels():
    return CupyKernels(NumpyAsCupy())


def test_the_stand_in_binds_types_as_cupy_does():
    add = ElementwiseKernel("T x, T s", "T y", "y = x + s", "add")
    out = add(np.ones(3, np.float32), 0.1)
    assert out.dtype == np.float32 and out[0] == np.float32(1) + np.float32(0.1)
    with pytest.raises(TypeError, match="mismatched"):
        add(np.ones(3, np.float32), 0.1, np.empty(3))


def test_cupy_relu_backward_kernel_matches_the_portable_derivative(kernels):
    rng = np.random.default_rng(0)
    grad, z = rng.standard_normal((2, 64, 33)).astype(np.float32)
    z[0, :5] = 0.0
    a = activations.ReLU().forward(z, np)
    out = kernels.relu_grad(grad, a)
    np.testing.assert_array_equal(out, activations.ReLU().backward(grad, None, a, np))
    assert out.dtype == np.float32


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("config", [{"name": "adam", "lr": 0.01}, {"name": "adamw", "lr": 0.01, "weight_decay": 0.1}],
                         ids=["adam", "adamw"])
def test_cupy_adam_kernel_matches_the_portable_step(kernels, config, dtype):
    rng = np.random.default_rng(3)
    p_portable = rng.standard_normal(1000).astype(dtype)
    p_fast = p_portable.copy()
    portable, quick = optimizers.get(dict(config)), optimizers.get(dict(config))
    for _ in range(5):
        g = rng.standard_normal(1000).astype(dtype)
        portable.step(p_portable, g)
        quick.step(p_fast, g, fast=kernels)
    rtol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(p_fast, p_portable, rtol=rtol, atol=rtol)
    for slot in ("m", "v"):
        assert quick.state[slot].dtype == np.dtype(dtype)
        np.testing.assert_allclose(quick.state[slot], portable.state[slot], rtol=rtol, atol=1e-7)


# -- the prefetch on a simulated GPU ------------------------------------------------------------------------------
class _Device:
    def scope(self):
        return contextlib.nullcontext()

    def asarray(self, a, dtype):
        raise AssertionError("host arrays must go through the pinned buffers")


@pytest.fixture(params=["lazy", "compute-eager"])
def gpu(request, monkeypatch):
    fake = SimulatedGPU(request.param)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "cupyx", types.SimpleNamespace(empty_pinned=fake.empty_pinned))
    return fake


def _parts(sizes, width=3):
    """Host batches whose every value says which batch and row it is; each source array is reused by the caller."""
    x = np.empty((max(sizes), width))
    y = np.empty(max(sizes), np.int64)
    start = 0
    for n in sizes:
        x[:n] = np.arange(start * width, (start + n) * width).reshape(n, width)
        y[:n] = np.arange(start, start + n)
        yield x[:n], y[:n]  # the same memory every time: the caller refills it for the next batch
        start += n


def _expected(sizes, width=3):
    start = 0
    for n in sizes:
        yield np.arange(start * width, (start + n) * width).reshape(n, width), np.arange(start, start + n)
        start += n


@pytest.mark.parametrize("sizes", [[4] * 7, [4, 4, 6, 6, 2], [5]], ids=["even", "growing-then-short", "one"])
def test_prefetch_hands_out_every_batch_intact_whatever_order_the_gpu_runs_it_in(gpu, sizes):
    batches = list(prefetch_uploads(_Device(), _parts(sizes), ("float32", "int64")))
    gpu.finish()
    assert len(batches) == len(sizes)
    for (xb, yb), (x, y) in zip(batches, _expected(sizes)):
        assert xb.dtype == np.float32 and yb.dtype == np.int64
        np.testing.assert_array_equal(xb.data, x)
        np.testing.assert_array_equal(yb.data, y)
    assert gpu.pinned_allocations == _pinned_allocations(sizes)


def _pinned_allocations(sizes):
    """Pinned buffers the double buffer needs: per slot (batches alternate), for x and y, one at first and one more
    each time a batch is larger than any that slot held before."""
    capacity, count = [0, 0], 0
    for i, n in enumerate(sizes):
        if n > capacity[i % 2]:
            capacity[i % 2], count = n, count + 1
    return 2 * count


def test_prefetch_waits_for_its_uploads_when_the_consumer_stops_early(gpu):
    it = prefetch_uploads(_Device(), _parts([4] * 5), ("float32", "int64"))
    first = next(it)
    next(it)
    it.close()  # the pinned buffers may be freed now: no queued copy may still read them
    side = gpu.streams[1]
    assert side.ran == len(side.queue)
    gpu.finish()
    np.testing.assert_array_equal(first[1].data, np.arange(4))
