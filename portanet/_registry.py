"""Name lookup shared by activations, losses, optimizers, metrics and layers: spec (name, config or object) -> object.

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
