"""Subclasses that give a module more behaviour while it holds some state, swapped in place.

A ``ToNNX`` wrapper holding frozen parameters and an ``nnx.Embed`` whose
table has trainable rows each get a subclass of their own class, made once
per class and remembered, which knows its plain class (``_ff_plain``). The
object's class is swapped in place, so every reference to it sees the change.
"""

from __future__ import annotations

from typing import Any

#: The class attribute naming the class a made subclass adds behaviour to.
PLAIN = "_ff_plain"
_MISSING = object()


def subclass(made: dict[type, type], plain: type, name: str, namespace: dict[str, Any]) -> type:
    """The subclass of ``plain`` with ``namespace``, made on first use and kept in ``made``."""
    found = made.get(plain)
    if found is None:
        found = type(name, (plain,), {**namespace, PLAIN: plain})
        made[plain] = found
    return found


def is_made(made: dict[type, type], cls: type) -> bool:
    """Whether ``cls`` is one of the subclasses kept in ``made``."""
    return made.get(cls.__dict__.get(PLAIN, _MISSING)) is cls  # type: ignore[arg-type]


def set_class(obj: Any, cls: type) -> None:
    """Swaps the class of ``obj``, not through a module's ``__setattr__`` (which records it)."""
    object.__setattr__(obj, "__class__", cls)
