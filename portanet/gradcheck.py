"""Gradient checking: analytic backprop gradients against central finite differences in float64.

Works on any backend; it is a diagnostic, so it loops over parameter elements (never used in training).
"""

from __future__ import annotations

import math

from .backends import host_rng

__all__ = ["check_gradients", "numerical_gradients"]


def numerical_gradients(model, x, y, eps: float = 1e-6, max_per_param: int | None = 32, seed: int = 0) -> dict:
    """Central-difference gradients ``{name: (indices, values)}`` of the compiled ``model``'s loss on (x, y).

    ``model`` is used as it is (use a float64 model for meaningful numbers); ``max_per_param`` samples that many
    elements of each parameter (None: all of them, two forward passes per element).
    """
    xb, yb, wb = model.prepare_batch(x, y)
    flat = model.parameter_buffer.values
    rng = host_rng(seed)
    result, offset = {}, 0
    for name, param in model.parameters().items():
        size = math.prod(param.shape)
        idx = list(range(size))
        if max_per_param is not None and size > max_per_param:
            idx = sorted(rng.choice(size, max_per_param, replace=False).tolist())
        values = []
        for i in idx:
            original = float(flat[offset + i])
            flat[offset + i] = original + eps
            up = float(model.test_step(xb, yb, wb)[0])
            flat[offset + i] = original - eps
            down = float(model.test_step(xb, yb, wb)[0])
            flat[offset + i] = original
            values.append((up - down) / (2 * eps))
        result[name] = (idx, values)
        offset += size
    return result


def check_gradients(model, x, y, eps: float = 1e-6, max_per_param: int | None = 32, seed: int = 0) -> dict:
    """Worst relative error per parameter between backprop and central differences, computed in float64.

    The error of a parameter is ``|g - n| / max(|g| + |n|, 1e-12)`` over its checked elements, with the norms
    taken over the elements (the usual gradient-check measure); below ~1e-6 the backprop is right.
    ``max_per_param``: elements sampled per parameter (default 32, chosen with ``seed``; None checks every element,
    which takes two forward passes per weight: hours for an MNIST-sized model). Inference mode (``training=False``):
    dropout is off and BatchNormalization uses its moving statistics; the loss includes the layers' regularization
    penalties. The model itself is not modified.
    """
    ref = model.copy(dtype="float64")
    if ref.loss is None:
        raise RuntimeError("check_gradients() needs a compiled model: call compile(loss=...) first")
    if not ref.built:
        x0 = x if hasattr(x, "shape") else list(x)
        ref.build(len(x0[0]))
    _, analytic = ref.loss_and_grads(x, y)
    numeric = numerical_gradients(ref, x, y, eps=eps, max_per_param=max_per_param, seed=seed)
    errors = {}
    for name, (idx, values) in numeric.items():
        flat_grad = ref.xp.reshape(analytic[name], (-1,))
        a = [float(flat_grad[i]) for i in idx]
        diff = math.sqrt(sum((p - q) ** 2 for p, q in zip(a, values)))
        scale = math.sqrt(sum(p * p for p in a)) + math.sqrt(sum(q * q for q in values))
        errors[name] = diff / max(scale, 1e-12)
    return errors
