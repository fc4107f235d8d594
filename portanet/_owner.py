"""One object, one owner: layers, optimizers and callbacks bound to a model refuse a second, live model.

Holds a weak reference only, so an object whose first model is gone may be reused.
"""

from __future__ import annotations

import weakref

__all__ = ["Owned"]


class Owned:
    """Mixin: :meth:`attach` binds the object to one model and raises when another live model already has it."""

    _owner_ref = None

    def attach(self, model, what: str) -> None:
        """Bind to ``model``; ``what`` names the object in the error (e.g. "layer 'dense_0'")."""
        owner = None if self._owner_ref is None else self._owner_ref()
        if owner is not None and owner is not model:
            raise ValueError(f"{what} already belongs to another model; an instance can serve one model only "
                             f"(its weights or state would be shared silently): create a new one for this model")
        self._owner_ref = weakref.ref(model)

    def detach(self) -> None:
        self._owner_ref = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_owner_ref", None)  # a weak reference cannot be copied or pickled; the copy's owner re-attaches
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
