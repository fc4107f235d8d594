"""Name lookup shared by activations, losses, optimizers, metrics and layers: spec (name, config or object) -> object;
and the config-object protocol of the small named classes (activations, initializers, regularizers, schedules).

Only turns user specs into instances; holds no math.
"""

from __future__ import annotations


def resolve(kind: str, table: dict, spec, base: type, aliases: dict | None = None, key: str = "name"):
    """``spec`` as an instance of ``base``: an instance, a subclass, a name in ``table`` or a config dict.

    Unknown names and bad arguments raise ValueError naming the ``kind``, the choices and what was given.
    """
    if isinstance(spec, base):
        return spec
    if isinstance(spec, type) and issubclass(spec, base):
        return spec()
    if isinstance(spec, str):
        config = {key: spec}
    elif isinstance(spec, dict):
        config = dict(spec)
    else:
        raise TypeError(f"{kind} must be a name, a config dict or a {base.__name__}, got {type(spec).__name__}")
    name = config.pop(key, None)
    if isinstance(name, str):
        name = (aliases or {}).get(name.lower(), name.lower())
    if name not in table:
        shown = spec if isinstance(spec, str) else name
        raise ValueError(f"unknown {kind} {shown!r}; expected one of {sorted(table)}")
    try:
        return table[name](**config)
    except TypeError as exc:
        raise ValueError(f"bad arguments for {kind} {name!r}: {config!r} ({exc})") from exc


class Configurable:
    """What the small named classes share: ``get_config()`` (``{"name": ..., **constructor arguments}``) gives the
    repr and equality (same class, same config); instances stay hashable by identity."""

    def get_config(self) -> dict:
        return {"name": self.name}

    def __repr__(self):
        try:
            args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "name")
        except NotImplementedError:
            args = "..."
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    __hash__ = object.__hash__
