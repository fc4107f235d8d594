"""Test helpers: compare results with references *and* check they live in the expected namespace and device.

Used by portanet's own suite; handy for users testing custom layers too.
"""

from __future__ import annotations

import numpy as np

from .backends import Device, dtype_name, library_of, to_numpy

__all__ = ["assert_close", "assert_on_device", "tolerance"]

_RTOL = {"float16": 1e-3, "float32": 1e-5, "float64": 1e-10}


def tolerance(dtype) -> float:
    """Default relative tolerance for a dtype (float32 1e-5, float64 1e-10)."""
    return _RTOL.get(dtype_name(dtype), 0.0)


def assert_on_device(actual, device: Device) -> None:
    """``actual`` is an array of ``device``'s namespace on ``device`` (not NumPy computed behind its back)."""
    if not device.owns(actual):
        raise AssertionError(f"result lives in {library_of(actual)} ({type(actual).__name__}) "
                             f"but was expected on {device.name} ({device.backend})")


def assert_close(actual, expected, *, device: Device | None = None, rtol: float | None = None, atol: float | None = None,
                 err_msg: str = "") -> None:
    """Compare ``actual`` with ``expected`` (any library) with dtype-scaled tolerances.

    With ``device``, also assert that ``actual`` is on that device, in that namespace.
    """
    if device is not None:
        assert_on_device(actual, device)
    a, e = to_numpy(actual), to_numpy(expected)
    if rtol is None:
        rtol = max(tolerance(a.dtype), tolerance(e.dtype)) if a.dtype.kind == "f" else 0.0
    if atol is None:
        atol = rtol
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=err_msg)
