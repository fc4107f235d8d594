"""Where arrays live: one :class:`Device` subclass per array library, resolving devices, moving arrays, host RNG.

The only package that knows array libraries by name (each in its own module, imported lazily: importing portanet
imports neither torch nor cupy); layer, loss and optimizer math never imports them. It imports nothing else from
portanet.

- ``base``: the :class:`Device` contract, :class:`RandomSource`, the registry and device-string parsing.
- ``numpy``: :class:`NumpyDevice` and the in-place NumPy :class:`Kernels`.
- ``generic``: any array-API namespace, and array-api-strict (the portable path, no kernels).
- ``torch``: :class:`TorchDevice` (autograd off, inputs detached, generator state exportable).
- ``cupy``: :class:`CupyDevice`, its kernels (opt-in: ``PORTANET_CUPY_KERNELS=1``) and the pinned-memory prefetch.
"""

from __future__ import annotations

from .base import (Device, RandomSource, dtype_name, host_rng, is_host_data, libraries, library_of, move_target,
                   resolve_device, take_rows, to_numpy)
from .numpy import Kernels, NumpyDevice
from .generic import ArrayAPIDevice, ArrayAPIStrictDevice
from .torch import TorchDevice
from .cupy import CupyDevice

__all__ = ["Device", "RandomSource", "Kernels", "resolve_device", "move_target", "to_numpy", "library_of",
           "is_host_data", "host_rng", "dtype_name", "take_rows", "BACKENDS",
           "NumpyDevice", "ArrayAPIDevice", "ArrayAPIStrictDevice", "TorchDevice", "CupyDevice"]

BACKENDS = libraries()  # ("numpy", "array_api_strict", "torch", "cupy"): the registration order above
