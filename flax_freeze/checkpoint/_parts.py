"""Partly frozen arrays in checkpoints: a restore target takes the saved partition first.

A :class:`~flax_freeze.PartlyFrozen` array is saved as its three variables
(``<path>/trainable``, ``<path>/frozen``, ``<path>/index``), its index's type
recorded in the flags. Restoring into a target that holds the array whole, or
split another way, first puts a part of the saved shapes in its place (and a
target's part where the checkpoint holds the array whole becomes whole), so
that every path matches; the restore then writes all three variables, the
saved index included. Nothing changes before the plan has passed its checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._filters import Path
from .._part import (
    TrainableIndex,
    find_parts,
    part_to_fill,
    rows_axis_of,
    whole_to_fill,
)
from .._variables import is_any_param
from .._walk import Entry, Key, is_inexact, is_tree_leaf, join, key_of, walk
from ._common import _qualname
from ._flags import Flags
from ._read import _Stored

INDEX_TYPE = _qualname(TrainableIndex)


@dataclass(frozen=True)
class SavedPart:
    """A partly frozen array as saved: the axis of its rows (None: elements), its trainable part."""

    axis: int | None
    shape: tuple[int, ...]
    dtype: Any


def saved_parts(flags: Flags | None, stored: Mapping[Key, _Stored]) -> dict[Key, SavedPart]:
    """The partly frozen arrays a checkpoint holds, by the key of the array."""
    if flags is None:
        return {}
    found = {}
    for key in stored:
        if key[-1:] != ("index",) or flags.types.get(join(key)) != INDEX_TYPE:
            continue
        trainable = stored.get((*key[:-1], "trainable"))
        frozen = stored.get((*key[:-1], "frozen"))
        if trainable is None or frozen is None or trainable.shape is None:
            continue
        assert frozen.shape is not None
        axis = rows_axis_of(trainable.shape, frozen.shape)
        found[key[:-1]] = SavedPart(axis, trainable.shape, trainable.dtype)
    return found


def frozen_counts(flags: Flags | None, stored: Mapping[Key, _Stored]) -> dict[Key, int]:
    """For the frozen part of each saved part, how many of its elements are trainable elsewhere."""
    return {
        (*key, "frozen"): int(np.prod(part.shape, dtype=np.int64))
        for key, part in saved_parts(flags, stored).items()
    }


@dataclass
class PartPlan:
    """What stands in a target's place to take a checkpoint's partition, before it is applied."""

    new: dict[int, Any] = field(default_factory=dict)  # by id of the variable or part replaced
    new_at: dict[Path, Any] = field(default_factory=dict)  # bare pytree leaves replaced
    walked: list[tuple[Path, Any, bool]] = field(default_factory=list)  # (path, new, in_module)

    def entries(self, entries: list[Entry]) -> list[Entry]:
        """The target's entries as they will be: those below a replaced path walked anew."""
        for path, new, in_module in self.walked:
            n = len(path)
            entries = [e for e in entries if not any(p[:n] == path for p in e.paths)]
            walked = walk(new, path, in_module=in_module).entries
            entries += [e for e in walked if is_tree_leaf(e.value)]
        return entries


def plan_parts(
    target: Any, entries: list[Entry], flags: Flags | None, stored: Mapping[Key, _Stored]
) -> PartPlan:
    """How the target's arrays change to be split as saved (and whole where saved whole)."""
    saved = saved_parts(flags, stored)
    found = {key_of(path): f for f in find_parts(target).values() for path in f.paths}
    by_key = {e.key: e for e in entries}
    plan = PartPlan()
    for key, part in saved.items():
        if key in found:
            now = found[key]
            shape = tuple(now.part.trainable.get_raw_value().shape)
            if now.part.axis == part.axis and shape == part.shape:
                continue  # the restore writes its three variables, the saved index included
            new = part_to_fill(now.part, part.axis, part.shape, part.dtype)
            plan.new[id(now.part)] = new
            plan.walked.append((now.paths[0], new, now.in_module))
            continue
        entry = by_key.get(key)
        if entry is None:
            continue  # the restore names it as missing
        if entry.variable is not None and is_any_param(entry.variable):
            new = part_to_fill(entry.variable, part.axis, part.shape, part.dtype)
            plan.new[id(entry.variable)] = new
        elif entry.variable is None and entry.box is None and not entry.in_module:
            if not is_inexact(entry.value):
                continue
            new = part_to_fill(entry.value, part.axis, part.shape, part.dtype)
            plan.new_at[entry.paths[0]] = new
        else:
            continue  # not a parameter: the restore names the mismatch
        plan.walked.append((entry.paths[0], new, entry.in_module))
    for key, now in found.items():
        if key in saved or key not in stored:
            continue
        whole = whole_to_fill(now.part, now.in_module)
        plan.new[id(now.part)] = whole
        plan.walked.append((now.paths[0], whole, now.in_module))
    return plan
