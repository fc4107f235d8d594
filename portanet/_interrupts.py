"""Ctrl-C (SIGINT) held while training state changes, so an interrupted model is one some training step produced.

Signal handling only: no arrays, no model. Python delivers signals to the main thread between bytecodes; a region
here swaps in a handler that records the signal instead of raising, and raises once the region is done.
"""

from __future__ import annotations

import signal
import threading

try:  # CPython's own functions, without the enum conversion that makes signal.signal/getsignal ~10x slower
    from _signal import getsignal as _get_handler, signal as _set_handler
except ImportError:  # pragma: no cover - other interpreters
    _get_handler, _set_handler = signal.getsignal, signal.signal

__all__ = ["deferred", "update"]

_held = 0       # depth of open regions in the main thread (fit, updates)
_updating = 0   # depth of open update regions: inside one, even a second Ctrl-C waits
_pending: list = []  # SIGINTs received while held


def _hold(signum, frame):
    """Record a Ctrl-C while a region is open; a second one interrupts at once unless an update is running. With
    no region open (a signal that arrived while a region was closing) it acts as Python's default handler."""
    if not _held or (_pending and not _updating):
        raise KeyboardInterrupt
    _pending.append(signum)


def _pending_now() -> bool:
    return bool(_pending)


def _never() -> bool:
    return False


class _Region:
    """A context manager; entering it gives ``pending()``, whether a Ctrl-C is being held."""

    __slots__ = ("is_update", "active", "outer")

    def __init__(self, is_update: bool):
        self.is_update, self.active, self.outer = is_update, False, False

    def __enter__(self):
        global _held, _updating
        if threading.current_thread() is not threading.main_thread():
            return _never  # signals never reach another thread
        if _held == 0:
            if _get_handler(signal.SIGINT) not in (signal.default_int_handler, _hold):
                return _never  # the program's own SIGINT handler: it keeps charge
            _pending.clear()
            _set_handler(signal.SIGINT, _hold)
            self.outer = True
        self.active = True
        _held += 1
        _updating += self.is_update
        return _pending_now

    def __exit__(self, kind, error, trace):
        global _held, _updating
        if not self.active:
            return False
        _updating -= self.is_update
        _held -= 1
        if self.outer:
            _set_handler(signal.SIGINT, signal.default_int_handler)
        if kind is None and self.outer and _pending:  # the region is complete: deliver the Ctrl-C it held
            _pending.clear()
            raise KeyboardInterrupt
        if kind is None and self.is_update and len(_pending) > 1:  # twice during an update inside fit: stop now
            raise KeyboardInterrupt
        return False


def deferred() -> _Region:
    """Context manager for a training loop: a first Ctrl-C is held (the loop polls the ``pending()`` it gives after
    each step and stops there) and raised as KeyboardInterrupt when the region ends, if the loop did not; a second
    one interrupts at once, though never inside an :func:`update`. Only in the main thread, and only while Python's
    default SIGINT handler (or this module's) is installed; elsewhere it does nothing."""
    return _Region(False)


def update() -> _Region:
    """Context manager around a change of training state that must be whole (an optimizer step, a restore): every
    Ctrl-C that arrives inside it is held until it is complete. Outside a training loop it is raised right after;
    inside one a single Ctrl-C stays pending for the loop's next poll, a second is raised right after."""
    return _Region(True)
