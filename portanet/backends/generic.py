"""The portable path: any array-API namespace (:class:`ArrayAPIDevice`), and array-api-strict, the strict reference
whose ``device1`` stands in for a GPU in tests. No kernels: all math is the array-API code in the math modules.
"""

from __future__ import annotations

import importlib

import numpy as np

from .base import Device

__all__ = ["ArrayAPIDevice", "ArrayAPIStrictDevice"]


class ArrayAPIDevice(Device):
    """Any array-API namespace given as ``backend=<module>``: arrays are created with ``device=`` and moved with
    ``to_device``, and reach NumPy through DLPack (or ``numpy.asarray``)."""

    fallback = True

    @classmethod
    def resolve(cls, device, namespace=None):
        name = namespace.__name__.removeprefix("array_api_compat.")
        return cls(namespace, None if device == "cpu" else device, f"{name}:{device}", backend=name)

    @classmethod
    def array_to_numpy(cls, x):
        try:
            return np.from_dlpack(x)
        except Exception:  # noqa: BLE001 - last resort for array-API libraries without DLPack on host
            return np.asarray(x)

    def _upload(self, host):
        return self.xp.asarray(host, device=self.device)


class ArrayAPIStrictDevice(ArrayAPIDevice):
    """array-api-strict: ``CPU_DEVICE`` ("cpu") and the simulated ``device1`` / ``device2``, where converting to NumPy
    behind the library's back raises, as on a GPU."""

    library = "array_api_strict"
    aliases = ("strict",)
    reads_device_strings = True

    @classmethod
    def resolve(cls, device, namespace=None):
        aas = _import()
        if isinstance(device, str):
            try:
                device = aas.Device("CPU_DEVICE" if device.lower() == "cpu" else device)
            except ValueError:
                pass
        devices = aas.__array_namespace_info__().devices()
        if device not in devices:
            raise ValueError(f"unknown array_api_strict device {device!r}; choose from {devices}")
        return cls(aas, device, f"array_api_strict:{device._device}")

    @classmethod
    def array_to_numpy(cls, x):
        return np.asarray(x.to_device(_import().Device("CPU_DEVICE")))

    @property
    def host_memory(self):
        return self.device == _import().Device("CPU_DEVICE")


def _import():
    try:
        return importlib.import_module("array_api_strict")
    except ImportError as exc:
        raise ImportError("backend 'array_api_strict' is not installed: pip install array-api-strict") from exc
