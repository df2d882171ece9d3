"""Adapter checkpoints: what ``save(..., only=...)`` stores, the base's fingerprint, its check.

An adapter checkpoint stores the variables a filter selects (``ff.Trainable``,
``nnx.LoRAParam``...) and, with an optimizer, the optimizer state that goes
with them; of everything else, the base, it records a fingerprint: each path
with its shape, dtype and a content checksum. A restore onto a concrete base
checks the base against it before anything changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import jax
import numpy as np
from flax import nnx

from .._filters import is_nothing, short_repr, to_predicate
from .._variables import FrozenParam
from .._walk import (
    Entry,
    Key,
    Walked,
    is_key,
    is_number,
    is_python_number,
    join,
    key_of,
    number_dtype,
    shape_dtype,
    status,
)
from ._checksum import checksum, matches
from ._flags import show

Fingerprint = Literal["values", "shapes"]


def saved_value(entry: Entry) -> Any:
    """The array an entry is stored as: key data for PRNG keys, arrays for numbers."""
    value = entry.value
    if isinstance(value, jax.Array) and is_key(value.dtype):
        return jax.random.key_data(value)
    if is_python_number(value):  # in the dtype JAX computes it in
        return np.asarray(value, number_dtype(value))
    if is_number(value):
        return np.asarray(value)
    return value


def _stand_in(entry: Entry) -> Any:
    """What a filter is shown for an entry: its variable, or a variable of its status.

    A bare value or a Linen parameter in boxes is shown as an ``nnx.Param``
    when trainable, an ``ff.FrozenParam`` when frozen, else an ``nnx.Variable``,
    so that ``ff.Trainable`` and ``ff.FrozenParam`` select Linen parameters too.
    """
    if entry.variable is not None:
        return entry.variable
    kind = {"trainable": nnx.Param, "frozen": FrozenParam}.get(status(entry), nnx.Variable)
    return kind(entry.value)


def _bookkeeping(entry: Entry, walked: Walked) -> bool:
    """Whether an entry is optimizer state: of an NNX optimizer, optax state, a step count."""
    if entry.in_optimizer or entry.opt_field is not None:
        return True
    steps = {(*path, "step") for path, _ in walked.train_states}
    return any(path in steps for path in entry.paths)


def _mirrors(entry: Entry, walked: Walked) -> list[Key]:
    """The tails of parameter paths an optimizer-state entry may stand for (longest first)."""
    tails: list[Key] = []
    if entry.mirror is not None and entry.mirror:
        tails.append(key_of(entry.mirror))
    for opt_path, opt in walked.optimizers:
        prefix = key_of((*opt_path, "opt_state"))
        for key in entry.keys():
            if key[: len(prefix)] == prefix:
                for trained in getattr(opt, "trained_paths", ()):
                    tail = key_of(trained)
                    if tail and key[len(key) - len(tail) :] == tail:
                        tails.append(tail)
    return sorted(set(tails), key=len, reverse=True)


def select(
    walked: Walked, only: Any, fingerprint: Fingerprint
) -> tuple[list[Entry], dict[str, tuple[tuple[int, ...], str, str | None]]]:
    """The entries an adapter checkpoint stores, and the fingerprint of the others.

    Stored: the entries ``only`` selects (a tied variable when any of its
    paths is selected) and the optimizer state that goes with them: state
    that stands for a selected parameter, and shared state (step counts,
    hyperparameters). Optimizer state of parameters not selected is left out
    unchecked (it starts afresh on restore); so is RNG state, which training
    advances. Every other entry left out is fingerprinted by value unless
    ``fingerprint`` is ``"shapes"``.

    Raises:
        ValueError: if ``only`` selects nothing, or ``fingerprint`` is not one
            of its two values.
        TypeError: if ``only`` is not a filter.
    """
    if fingerprint not in ("values", "shapes"):
        raise ValueError(
            f"`fingerprint` must be 'values' (shapes, dtypes and a checksum of each array "
            f"left out) or 'shapes' (no checksums, for a huge base), got {fingerprint!r}."
        )
    pred = to_predicate(only, "only", strings="path")
    entries = walked.entries
    bookkeeping = {id(e) for e in entries if _bookkeeping(e, walked)}
    chosen = {
        id(e)
        for e in entries
        if not is_nothing(only)
        and id(e) not in bookkeeping
        and any(pred(path, _stand_in(e)) for path in e.paths)
    }
    if not chosen:
        paths = sorted(join(e.key) for e in entries if id(e) not in bookkeeping)
        raise ValueError(
            f"`only` {short_repr(only)} selects nothing to save among the node's paths "
            f"{show(paths)}. Pass a filter that selects what was trained, e.g. ff.Trainable, "
            "nnx.LoRAParam or ff.PathRegex('head/.*'), or omit `only` to save everything."
        )
    selected = {e.key for e in entries if id(e) in chosen}
    others = {e.key for e in entries if id(e) not in chosen and id(e) not in bookkeeping}
    stored: list[Entry] = []
    base: dict[str, tuple[tuple[int, ...], str, str | None]] = {}
    for entry in entries:
        check = fingerprint == "values" and not isinstance(entry.variable, nnx.RngState)
        if id(entry) in bookkeeping:
            tails = _mirrors(entry, walked)
            mirrored = [k for k in selected | others if any(_ends(k, t) for t in tails)]
            if not mirrored or any(k in selected for k in mirrored):
                stored.append(entry)
                continue
            check = False  # another parameter's optimizer state: fresh on restore
        elif id(entry) in chosen:
            stored.append(entry)
            continue
        value = saved_value(entry)
        shape, dtype = shape_dtype(value)
        base[join(entry.key)] = (shape, np.dtype(dtype).name, checksum(value) if check else None)
    return stored, base


def _ends(key: Key, tail: Key) -> bool:
    return len(key) >= len(tail) and key[len(key) - len(tail) :] == tail


def check_concrete(entries: Iterable[Entry], where: str) -> None:
    """Raises unless every value of the target is concrete: an adapter needs its base."""
    abstract = [join(e.key) for e in entries if isinstance(e.value, jax.ShapeDtypeStruct)]
    if abstract:
        raise ValueError(
            f"Checkpoint {where!r} is an adapter: it holds only part of a model and is "
            f"restored onto a concrete base, but `target` is abstract at {show(abstract)}. "
            "The base must be concrete: build the model and load its weights (e.g. restore "
            "the base's own checkpoint) first, then restore the adapter onto it."
        )


def check_base(
    base: Mapping[str, tuple[tuple[int, ...], str, str | None]],
    entries: Iterable[Entry],
    stored: Iterable[Key],
    where: str,
) -> list[Entry]:
    """Checks the target's base against an adapter's fingerprint; returns the base entries.

    Raises:
        ValueError: naming the first few paths where the target differs from
            the base the adapter was saved with: paths missing or extra, other
            shapes or dtypes, other values.
    """
    by_name: dict[str, Entry] = {}
    for entry in entries:
        for key in entry.keys():
            by_name.setdefault(join(key), entry)
    stored_names = {join(k) for k in stored}
    differ: list[str] = []
    found: list[Entry] = []
    for name, (shape, dtype, recorded) in sorted(base.items()):
        entry = by_name.get(name)
        if entry is None:
            differ.append(f"{name} (not in the target)")
            continue
        found.append(entry)
        value = saved_value(entry)
        have_shape, have_dtype = shape_dtype(value)
        if have_shape != shape or np.dtype(have_dtype).name != dtype:
            differ.append(
                f"{name} (base {dtype}{list(shape)}, target "
                f"{np.dtype(have_dtype).name}{list(have_shape)})"
            )
        elif recorded is not None and not matches(value, recorded):
            differ.append(f"{name} (other values)")
    known = set(base) | stored_names
    extra = sorted({join(e.key) for e in entries if not known & {join(k) for k in e.keys()}})
    differ += [f"{name} (not in the base)" for name in extra]
    if differ:
        raise ValueError(
            f"Checkpoint {where!r} is an adapter for another base: `target` differs from "
            f"the base it was saved with at {len(differ)} path(s): {show(differ)}. Restore "
            "it onto the model it was trained from (e.g. built from that model's own "
            "checkpoint), or pass check_base=False to apply it anyway."
        )
    return found


def base_keys(base: Mapping[str, Any]) -> dict[Key, tuple[tuple[int, ...], np.dtype[Any]]]:
    """The fingerprint's paths as stored keys, with shape and dtype."""
    return {
        tuple(name.split("/")): (shape, np.dtype(dtype)) for name, (shape, dtype, _) in base.items()
    }
