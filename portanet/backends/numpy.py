"""NumPy: the host device, and the in-place NumPy kernels for the hot spots of a training step.

Each kernel mirrors a portable computation in layers, activations, losses or optimizers and is compared with it in
the tests; the portable math stays the reference. Knows nothing of layers or activations: kernels go by name.
"""

from __future__ import annotations

import array_api_compat
import numpy as np

from .base import Device

__all__ = ["NumpyDevice", "Kernels"]

_NARROW = 64  # rows up to this wide are reduced column by column


class Kernels:
    """Kernels over a NumPy-compatible module ``mod`` (NumPy; CuPy subclasses it): ``out=`` ufuncs and matmul into
    views. Arguments are arrays of ``mod`` of one float dtype; Python scalars keep that dtype (NEP 50).
    """

    def __init__(self, mod):
        self.mod = mod
        self._zero_rows = {}

    def activate_(self, kernel, z):
        """The activation named ``kernel`` ("relu", "softmax": ``ActivationFunction.kernel``) written over ``z``
        (batch, units), which the caller owns; None when there is no kernel of that name (or ``kernel`` is None)."""
        if kernel == "relu":
            return self.relu_(z)
        if kernel == "softmax":
            return self.softmax_(z)
        return None

    def activation_grad(self, kernel, grad, a):
        """dL/dz from dL/da and the output ``a`` of the activation named ``kernel`` (a new array); None when there is
        no kernel for its derivative (only "relu" has one: softmax's derivative is fused into the loss)."""
        return self.relu_grad(grad, a) if kernel == "relu" else None

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
        mod.subtract(z, self._row_max(z)[:, None], out=z)
        mod.exp(z, out=z)
        return mod.divide(z, self._row_sum(z)[:, None], out=z)

    def _row_max(self, z):
        """Maximum of each row of ``z`` (batch, k) -> (batch,)."""
        return self._row_reduce(self.mod.maximum, z)

    def _row_sum(self, z):
        """Sum of each row of ``z`` (batch, k) -> (batch,)."""
        return self._row_reduce(self.mod.add, z)

    def _row_reduce(self, ufunc, z):
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

    def sparse_softmax_crossentropy(self, z, probs, labels):
        """Per-sample cross-entropy (batch,) and its gradient ``probs - onehot(labels)`` (batch, classes, a new
        array) from logits ``z``, ``probs = softmax(z)`` as :meth:`softmax_` computes it, and integer ``labels``
        (batch,); ``z`` and ``probs`` are left as they are. The twin of
        ``SparseCategoricalCrossentropy.per_sample_logits``.

        The loss is ``log(sum(exp(z - m))) - (z[label] - m)`` with ``m`` the row maximum. Where ``z`` is largest
        ``exp(z - m)`` is exactly 1, so the probability there is ``1 / sum(exp(z - m))``: the log-sum-exp is
        ``-log(probs[argmax])``, with no second pass of ``exp`` (and one ``argmax`` instead of two row maxima).
        """
        mod = self.mod
        rows, labels = mod.arange(z.shape[0]), labels.reshape(-1)
        top = z.argmax(axis=1)
        per = z[rows, top]                       # m
        per -= z[rows, labels]                   # m - z[label] >= 0, rounded once, as the portable s = z - m is
        per -= mod.log(probs[rows, top])         # + log(sum(exp(z - m)))
        grad = probs.copy()
        grad[rows, labels] -= 1.0
        return per, grad

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


_KERNELS = Kernels(np)


class NumpyDevice(Device):
    """The host: NumPy arrays, device "cpu". Memory maps and Python sequences are host data it reads as views."""

    library = "numpy"
    modules = ("numpy", "builtins")
    aliases = ("np",)
    serves = ("cpu",)
    has_device_objects = False
    holds_host_data = True

    @classmethod
    def resolve(cls, device, namespace=None):
        if not (isinstance(device, str) and device.lower() == "cpu"):
            raise ValueError(f"the numpy backend only has device 'cpu', got device={device!r}")
        return cls(array_api_compat.array_namespace(np.empty(0)), None, "cpu")

    @classmethod
    def array_to_numpy(cls, x):
        return np.asarray(x)

    @classmethod
    def take_rows(cls, a, rows):
        return a[rows]

    @property
    def host_memory(self):
        return True

    def owns(self, x):
        # a memmap or other subclass is not owned: asarray gives a plain view of it
        return type(x) is np.ndarray or isinstance(x, np.generic)

    def _from_sibling(self, x):
        return np.asarray(x)

    def _duplicate(self, a):
        return np.array(a, copy=True)

    def _upload(self, host):
        return host

    def _make_kernels(self):
        return _KERNELS
