"""Names and small helpers shared by the checkpoint modules: item names, types, nested dicts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import jax
import numpy as np

from .._variables import param_types
from .._walk import Key, shape_dtype

T = TypeVar("T")


STATE = "state"


FLAGS = "flags"


#: The key of the state item's orbax custom metadata that marks a flax_freeze checkpoint.
MARK = "flax_freeze"


def _describe(shape: tuple[int, ...], dtype: str) -> str:
    return f"{shape} {dtype}"


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _param_class(name: str | None) -> type | None:
    """The parameter type (``nnx.Param``, a subclass, a registered type) of that name, if loaded."""
    todo: list[type] = list(param_types())
    while todo:
        cls = todo.pop()
        if _qualname(cls) == name:
            return cls
        todo.extend(cls.__subclasses__())
    return None


def _key_data_shape(value: Any) -> tuple[tuple[int, ...], np.dtype[Any]]:
    shape, dtype = shape_dtype(value)
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
    return tuple(data.shape), np.dtype(data.dtype)


def _insert(tree: dict[str, Any], key: Key, value: Any) -> None:
    """Puts ``value`` in a nested dict at ``key`` (keys are unique: ``_build`` checks)."""
    for part in key[:-1]:
        tree = tree.setdefault(part, {})
    tree[key[-1]] = value


def _flatten(tree: Any, prefix: Key = ()) -> dict[Key, Any]:
    if isinstance(tree, Mapping):
        out: dict[Key, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, (*prefix, str(k))))
        return out
    if isinstance(tree, list | tuple):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flatten(v, (*prefix, str(i))))
        return out
    return {prefix: tree}


def _one_line(err: BaseException, limit: int = 300) -> str:
    """An exception as one short line: its type and the start of its first line."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
