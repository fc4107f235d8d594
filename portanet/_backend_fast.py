"""Backend fast paths: in-place NumPy and CuPy kernels for the hot spots of a training step.

Each kernel mirrors a portable computation in layers, activations or optimizers and is compared with it in the tests;
the portable math stays the reference. Selected per device by :attr:`portanet.Device.fast` (None: portable only).
"""

from __future__ import annotations

import copy

import numpy as np

from . import activations

__all__ = ["Fast", "fast_ops", "without_fast_paths"]

_NARROW = 64  # rows up to this wide are reduced column by column


class Fast:
    """Kernels over a NumPy-compatible module ``mod`` (NumPy, CuPy): ``out=`` ufuncs and matmul into views.

    Arguments are arrays of ``mod`` of one float dtype; Python scalars keep that dtype (NEP 50).
    """

    def __init__(self, mod):
        self.mod = mod
        self._zero_rows = {}

    def activate_(self, activation, z):
        """``activation.forward(z)`` written over ``z`` (batch, units), which the caller owns, for ReLU and softmax
        (whose derivatives read only the output); None for other activations."""
        if type(activation) is activations.ReLU:
            return self.relu_(z)
        if type(activation) is activations.Softmax:
            return self.softmax_(z)
        return None

    def activation_grad(self, activation, grad, a):
        """dL/dz from dL/da and the output ``a`` for ReLU (a new array); None for other activations."""
        return self.relu_grad(grad, a) if type(activation) is activations.ReLU else None

    def relu_(self, z):
        """max(z, 0) written over ``z`` (batch, units), which the caller owns; returns ``z``."""
        # NumPy's maximum against a scalar takes a slow loop; against a row of zeros it is ~3x faster.
        key = (z.shape[-1], z.dtype)
        zeros = self._zero_rows.get(key)
        if zeros is None:
            zeros = self._zero_rows[key] = self.mod.zeros(key[0], dtype=key[1])
        return self.mod.maximum(z, zeros, out=z)

    def relu_grad(self, grad, a):
        """dL/dz from dL/da and the ReLU output ``a``: ``grad`` where a > 0, else 0 (a new array)."""
        return self.mod.multiply(grad, a > 0)

    def softmax_(self, z):
        """Softmax over the last axis written over ``z`` (batch, classes); returns ``z``."""
        mod = self.mod
        mod.subtract(z, self._row_reduce(mod.maximum, z)[:, None], out=z)
        mod.exp(z, out=z)
        return mod.divide(z, self._row_reduce(mod.add, z)[:, None], out=z)

    def _row_reduce(self, ufunc, z):
        """``ufunc`` (maximum or add) reduced over each row of ``z`` (batch, k) -> (batch,)."""
        if z.shape[1] > _NARROW:
            return ufunc.reduce(z, axis=1)
        out = z[:, 0].copy()  # NumPy reduces short rows one at a time: a loop over k columns is ~5x faster
        for j in range(1, z.shape[1]):
            ufunc(out, z[:, j], out=out)
        return out

    def dense_grads(self, x, grad_z, grad_kernel, grad_bias):
        """Write ``x.T @ grad_z`` into ``grad_kernel`` (in, units) and the column sums of ``grad_z`` into
        ``grad_bias`` (units,) or skip it when None: both are views of the model's flat gradient buffer."""
        self.mod.matmul(x.T, grad_z, out=grad_kernel)
        if grad_bias is not None:
            self.mod.sum(grad_z, axis=0, out=grad_bias)

    def sparse_softmax_crossentropy(self, z, labels):
        """Per-sample cross-entropy (batch,) and its gradient ``softmax(z) - onehot`` (batch, classes) from logits
        ``z`` and integer ``labels`` (batch,): the twin of ``SparseCategoricalCrossentropy.per_sample_logits``."""
        mod = self.mod
        rows, labels = mod.arange(z.shape[0]), labels.reshape(-1)
        e = z - self._row_reduce(mod.maximum, z)[:, None]
        picked = e[rows, labels]
        mod.exp(e, out=e)
        total = self._row_reduce(mod.add, e)
        per = mod.log(total)
        per -= picked
        mod.divide(e, total[:, None], out=e)
        e[rows, labels] -= 1.0
        return per, e

    def adam(self, params, grads, m, v, beta_1, beta_2, step_size, inv_sqrt_bc2, epsilon, scratch=None):
        """One Adam update of the flat ``params`` and moments ``m``, ``v`` (all (n,)), in place; returns the scratch
        array it used, to be passed back next step (a fresh one is made when ``scratch`` does not fit).

        ``step_size`` = lr / (1 - beta_1**t), ``inv_sqrt_bc2`` = 1 / sqrt(1 - beta_2**t).
        """
        if not (isinstance(scratch, type(params)) and scratch.shape == params.shape and scratch.dtype == params.dtype):
            scratch = self.mod.empty_like(params)  # reused: a fresh 2 MB array each step costs page faults
        mod, tmp = self.mod, scratch
        mod.multiply(grads, 1.0 - beta_1, out=tmp)
        mod.multiply(m, beta_1, out=m)
        mod.add(m, tmp, out=m)
        mod.square(grads, out=tmp)
        mod.multiply(tmp, 1.0 - beta_2, out=tmp)
        mod.multiply(v, beta_2, out=v)
        mod.add(v, tmp, out=v)
        # step_size * m / (sqrt(v) * c + eps) == (step_size / c) * m / (sqrt(v) + eps / c): one pass fewer
        mod.sqrt(v, out=tmp)
        mod.add(tmp, epsilon / inv_sqrt_bc2, out=tmp)
        mod.divide(m, tmp, out=tmp)
        mod.multiply(tmp, step_size / inv_sqrt_bc2, out=tmp)
        mod.subtract(params, tmp, out=params)
        return scratch


class _CupyFast(Fast):
    """CuPy: the same kernels, with ReLU backward and the Adam update each one fused elementwise kernel."""

    def __init__(self, cp):
        super().__init__(cp)
        self._relu_grad = cp.ElementwiseKernel("T grad, T a", "T out", "out = a > (T)0 ? grad : (T)0",
                                               "portanet_relu_grad")
        self._adam_kernel = cp.ElementwiseKernel(
            "T grad, T one_minus_b1, T one_minus_b2, T step_size, T inv_sqrt_bc2, T eps", "T param, T m, T v",
            "m += one_minus_b1 * (grad - m); v += one_minus_b2 * (grad * grad - v);"
            " param -= step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps);",
            "portanet_adam")

    def relu_(self, z):
        return self.mod.maximum(z, 0.0, out=z)  # one kernel on the GPU; a cached zero row would pin a device

    def _row_reduce(self, ufunc, z):
        return ufunc.reduce(z, axis=1)  # one kernel, not one per column

    def relu_grad(self, grad, a):
        return self._relu_grad(grad, a)

    def adam(self, params, grads, m, v, beta_1, beta_2, step_size, inv_sqrt_bc2, epsilon, scratch=None):
        self._adam_kernel(grads, 1.0 - beta_1, 1.0 - beta_2, step_size, inv_sqrt_bc2, epsilon, params, m, v)
        return None


_NUMPY = Fast(np)
_cupy_fast = None


def fast_ops(device) -> Fast | None:
    """The fast kernels for a :class:`~portanet.Device`: NumPy and CuPy have them, other backends get None."""
    global _cupy_fast
    if device.backend == "numpy":
        return _NUMPY
    if device.backend == "cupy":
        if _cupy_fast is None:
            import cupy

            _cupy_fast = _CupyFast(cupy)
        return _cupy_fast
    return None


def without_fast_paths(device):
    """A copy of ``device`` (equal to it) whose ``fast`` is None: everything runs the portable path."""
    portable = copy.copy(device)
    portable._fast = None
    return portable
