"""How a restore target is re-typed to the saved flags, worked out before anything changes."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flax import nnx

from .._boxes import FrozenBox, is_frozen_box, strip_frozen
from .._filters import Path
from .._retype import frozen_leaf
from .._variables import PARAM_TYPE_KEY, FrozenParam, is_any_param, is_param
from .._walk import Entry, Key, is_inexact, join, walk
from ._common import _param_class, _qualname
from ._flags import Flags
from ._read import _candidates, _Stored


def _box_changes(
    node: Any,
    to_box: Collection[Path],
    to_unbox: Collection[Path],
    to_param: Collection[Path] = (),
) -> dict[Path, Any]:
    """Replacements (for ``replace``) that re-type the values of ``node`` at those paths.

    ``to_box``: into an ``ffl.FrozenBox`` (around their other boxes);
    ``to_unbox``: out of it (their other boxes kept); ``to_param``: bare
    pytree leaves into an ``ff.FrozenParam``.
    """
    new_at: dict[Path, Any] = {}
    for entry in walk(node).entries:
        if entry.variable is not None:
            continue
        path = entry.paths[0]
        if path in to_box:
            new_at[path] = FrozenBox(entry.box if entry.box is not None else entry.value)
        elif path in to_unbox and entry.box is not None:
            new_at[path] = strip_frozen(entry.box)
        elif path in to_param:
            new_at[path] = frozen_leaf(entry.value)
    return new_at


@dataclass
class _Retype:
    """How the target changes to take the saved flags, worked out before anything changes."""

    to_freeze: set[int] = field(default_factory=set)  # Param variables, by id
    to_unfreeze: set[int] = field(default_factory=set)  # FrozenParam variables, by id
    to_bare: set[int] = field(default_factory=set)  # of those, the ones saved as bare leaves
    param_types: dict[int, type] = field(default_factory=dict)  # by variable id
    trained_dtypes: dict[Key, np.dtype[Any] | None] = field(default_factory=dict)  # by entry key
    to_box: set[Path] = field(default_factory=set)  # Linen values to put in an ffl.FrozenBox
    to_unbox: set[Path] = field(default_factory=set)  # Linen boxes to take it off
    to_param: set[Path] = field(default_factory=set)  # bare leaves to hold in an ff.FrozenParam
    # Saved frozen, but in the target a variable that is not a parameter (an
    # unregistered type): it cannot take the flag.
    not_params: list[tuple[str, nnx.Variable]] = field(default_factory=list)


def _plan_retype(saved: Flags, entries: list[Entry], stored: Mapping[Key, _Stored]) -> _Retype:
    """How each entry of the target that the checkpoint holds changes to take the saved flags."""
    retype = _Retype()
    for entry in entries:
        candidates = _candidates(entry, stored)
        if not candidates or entry.marker is not None:
            continue  # inside another library's frozen wrapper: frozen by it, never re-typed
        name, variable = join(candidates[0]), entry.variable
        if name in saved.frozen:
            trained_dtype = saved.trained_dtypes.get(name)
            retype.trained_dtypes[entry.key] = np.dtype(trained_dtype) if trained_dtype else None
        if variable is None:
            _plan_retype_value(retype, saved, entry, name)
            continue
        has_type = PARAM_TYPE_KEY in variable.get_metadata()
        if name in saved.frozen and not is_any_param(variable):
            retype.not_params.append((name, variable))
        if name in saved.frozen:
            if is_param(variable):
                retype.to_freeze.add(id(variable))
            elif isinstance(variable, FrozenParam) and not has_type:
                cls = _param_class(saved.param_types.get(name))
                if cls is not None and cls is not nnx.Param:
                    retype.param_types[id(variable)] = cls
        elif name in saved.trainable and isinstance(variable, FrozenParam):
            retype.to_unfreeze.add(id(variable))
            if name not in saved.types and not entry.in_module:
                retype.to_bare.add(id(variable))  # saved as a bare leaf: unfrozen to one
            cls = _param_class(saved.types.get(name))
            if not has_type and cls is not None and (cls is not nnx.Param or not entry.in_module):
                retype.param_types[id(variable)] = cls
    return retype


def _plan_retype_value(retype: _Retype, saved: Flags, entry: Entry, name: str) -> None:
    """How a bare value or a Linen box chain changes to take its saved flag.

    Only parameters change: values outside NNX modules (whose state is their
    variables) and outside Linen state collections. A Linen parameter is
    frozen by an ``ffl.FrozenBox``, and so is a bare value the checkpoint held
    in boxes; any other bare value by an ``ff.FrozenParam``.
    """
    if entry.in_module or entry.linen in ("state", "frozen") or entry.opt_field is not None:
        return
    path = entry.paths[0]
    if entry.box is not None and is_frozen_box(entry.box):
        if name in saved.trainable:
            retype.to_unbox.add(path)
    elif name in saved.frozen and is_inexact(entry.value):
        linen = entry.box is not None or entry.linen == "params"
        if linen or saved.types.get(name) not in (None, _qualname(FrozenParam)):
            retype.to_box.add(path)
        else:
            retype.to_param.add(path)
