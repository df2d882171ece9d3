"""Planning a restore: matching target entries with stored arrays, and applying the plan."""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from .._filters import Path, path_str
from .._nnx_compat import OptArray
from .._optimizer import Optimizer, migrate_opt_state
from .._retype import freeze, replace, unfreeze
from .._variables import (
    FROM_LEAF_KEY,
    PARAM_TYPE_KEY,
    TRAINED_DTYPE_KEY,
    FrozenParam,
    unregistered_hint,
)
from .._walk import (
    Entry,
    Key,
    in_box,
    is_key,
    is_python_number,
    is_tree_leaf,
    join,
    key_impl,
    key_of,
    shape_dtype,
    walk,
)
from ._adapter import base_keys, check_concrete
from ._adapter import check_base as check_base_of
from ._checksum import matches
from ._common import T, _describe, _flatten, _insert, _key_data_shape
from ._flags import Flags, show
from ._layout import _Layout
from ._opt_state import (
    _linen_opt_state,
    _opt_params,
    _OptStatePlan,
    _plan_opt_states,
    _rebuild_opt_state,
)
from ._parts import PartPlan, plan_parts
from ._read import _candidates, _read, _Stored
from ._reads import Mismatch, _Read
from ._retype_plan import _box_changes, _plan_retype, _Retype
from ._sharding import _sharding


class PartialRestoreWarning(UserWarning):
    """``restore(..., partial=True)`` left some paths of the target or the checkpoint unused."""


@dataclass
class _Plan:
    """What restoring a checkpoint into a target does, worked out before anything changes.

    Each target entry the checkpoint fills has one :class:`_Read` record, made
    when planning and applied by :meth:`finish`.
    """

    layout: _Layout
    reads: dict[Key, _Read]  # by the key of the target entry it fills
    stored: dict[Key, _Stored]
    retype: _Retype | None  # None: the target keeps its flags
    optimizers: list[tuple[Optimizer[Any], Any, tuple[Path, ...]]]
    # (path, abstract opt_state) of each Linen TrainState whose optimizer
    # state is rebuilt for the parameters trainable when saved.
    linen_states: list[tuple[Path, Any]]
    saved: Flags | None  # the checkpoint's flags (checksums)
    # Each ff.Optimizer's paths trained when built, those with counts of their own,
    # and the variables that take those counts.
    own_counts: list[tuple[Optimizer[Any], tuple[Path, ...], tuple[Path, ...], Any]]
    opt: _OptStatePlan = field(default_factory=lambda: _OptStatePlan())
    parts: PartPlan = field(default_factory=PartPlan)  # the target split as saved

    def _all_reads(self) -> list[_Read]:
        return [*self.reads.values(), *self.opt.fill.values()]

    def keys(self) -> set[Key]:
        """Every stored key read: those of the reads, the other paths of ties, optax fills."""
        return {key for read in self._all_reads() for key in (read.stored, *read.ties)}

    def state_args(self, keys: Collection[Key] | None = None) -> ocp.args.PyTreeRestore:
        """The orbax ``PyTreeRestore`` args that read the planned arrays (or only ``keys``).

        Arrays are read in their stored dtype: checksums are verified on what
        was stored, and :meth:`finish` casts where the plan says so.
        """
        item: dict[str, Any] = {}
        restore_args: dict[str, Any] = {}
        shardings = {k: r.sharding for r in self._all_reads() for k in (r.stored, *r.ties)}
        for key in self.keys() if keys is None else keys:
            stored = self.stored[key]
            assert stored.shape is not None
            assert stored.dtype is not None
            sharding, dtype = shardings[key], stored.dtype
            _insert(item, key, jax.ShapeDtypeStruct(stored.shape, dtype))
            if sharding is None:
                arg = ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
            else:
                arg = ocp.ArrayRestoreArgs(
                    sharding=sharding, global_shape=stored.shape, dtype=dtype
                )
            _insert(restore_args, key, arg)
        return ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True)

    def _retype(self, target: Any) -> Any:
        """Re-types the target to the saved flags; puts in rebuilt Linen optimizer states."""
        node = target
        retype = self.retype
        if retype is not None and retype.param_types:
            variables = {id(e.variable): e.variable for e in walk(target).entries}
            for variable_id, cls in retype.param_types.items():
                variable = variables.get(variable_id)
                if variable is not None:
                    variable.set_metadata(PARAM_TYPE_KEY, cls)
        if retype is not None and retype.to_unfreeze:
            ids = retype.to_unfreeze
            for entry in walk(node).entries:  # the value held frozen in a lower precision
                variable = entry.variable
                if id(variable) in ids and variable is not None:
                    if id(variable) in retype.to_bare:
                        variable.set_metadata(FROM_LEAF_KEY, True)
                    trained_dtype = variable.get_metadata().get(TRAINED_DTYPE_KEY)
                    if trained_dtype is not None:
                        variable.del_metadata(TRAINED_DTYPE_KEY)
                        shape, _ = shape_dtype(entry.value)
                        variable.set_raw_value(jax.ShapeDtypeStruct(shape, trained_dtype))
            node = unfreeze(node, lambda _p, v: id(v) in ids, missing_ok=True)
        if retype is not None and retype.to_freeze:
            ids = retype.to_freeze
            node = freeze(node, lambda _p, v: id(v) in ids, missing_ok=True)
        new_at: dict[Path, Any] = {}
        if retype is not None:
            new_at = _box_changes(node, retype.to_box, retype.to_unbox, retype.to_param)
        for path, state in self.linen_states:
            new_at[(*path, "opt_state")] = state
        return replace(node, {}, new_at) if new_at else node

    def check(self, arrays: Mapping[Key, Any], verify: bool) -> None:
        """Verifies the arrays read against their checksums, and that ties hold one value.

        Raises:
            ValueError: naming the damaged paths, or the tied paths that differ.
        """
        where = str(self.layout.root)
        checksums = self.saved.checksums if self.saved is not None and verify else {}
        damaged = [
            join(key)
            for key, value in arrays.items()
            if join(key) in checksums and not matches(value, checksums[join(key)])
        ]
        if damaged:
            _read(self.layout, thorough=True)  # raises if the flags lie about the arrays
            raise ValueError(
                f"Checkpoint {where!r} is damaged: the arrays at {show(damaged)} do not match "
                "the checksums recorded when they were saved. Restore an earlier checkpoint "
                "(verify=False reads them anyway)."
            )
        for entry_key, read in self.reads.items():
            for other in read.ties:
                if not _equal(arrays[read.stored], arrays[other]):
                    raise _tie_error(where, entry_key, read.stored, other)

    def _value(self, read: _Read, arrays: Mapping[Key, Any]) -> Any:
        """The array a read gives: as stored, cast where the plan says so."""
        value = arrays[read.stored]
        return value if read.dtype == self.stored[read.stored].dtype else value.astype(read.dtype)

    def finish(self, target: T, restored: Mapping[str, Any], verify: bool = True) -> T:
        """Re-types ``target``, rebuilds optimizer states, and fills in the restored arrays."""
        arrays = _flatten(restored)
        self.check(arrays, verify)
        node: Any = target
        if self.parts.new or self.parts.new_at:
            node = replace(node, self.parts.new, self.parts.new_at)
        node = self._retype(node)
        for opt, state, trained in self.optimizers:
            opt.opt_state = nnx.data(state)
            opt.trained_paths = trained
        for opt, initial, own, counts in self.own_counts:
            opt.initial_paths, opt.own_paths, opt.own_counts = initial, own, counts
        trained_dtypes = self.retype.trained_dtypes if self.retype is not None else {}
        new_variables: dict[int, Any] = {}
        new_at: dict[Path, Any] = {}
        for entry in walk(node).entries:  # the entries as re-typed, by the keys planned
            read = self.reads.get(entry.key)
            if read is None:
                continue
            value = _from_stored(entry.value, self._value(read, arrays), read.impl)
            variable = entry.variable
            if variable is None:
                for path in entry.paths:
                    new_at[path] = value if entry.box is None else in_box(entry.box, value)
                continue
            metadata = variable.get_metadata()
            adjust = isinstance(variable, FrozenParam) and entry.key in trained_dtypes
            if adjust:  # the precision it was trained in, as saved
                trained_dtype = trained_dtypes[entry.key]
                metadata.pop(TRAINED_DTYPE_KEY, None)
                if trained_dtype is not None:
                    metadata[TRAINED_DTYPE_KEY] = trained_dtype
            if not entry.in_module:
                new_variables[id(variable)] = type(variable).from_metadata(value, metadata)
                continue
            if adjust:
                variable.set_metadata(metadata)
            variable.set_raw_value(value)
        for path in self.opt.to_none:
            new_at[path] = None
        for path, read in self.opt.fill.items():
            new_at[path] = self._value(read, arrays)
        if new_variables or new_at:
            node = replace(node, new_variables, new_at)
        if self.retype is None and self.linen_states:
            node = self._migrate(node)
        return node  # type: ignore[return-value]

    def _migrate(self, node: Any) -> Any:
        """With the target's flags: each rebuilt Linen optimizer state, migrated to them.

        As ``ffl.TrainState.freeze``/``unfreeze`` do: state kept for the
        parameters trainable both when saved and now, fresh for the others.
        """
        states = dict(walk(node).train_states)
        new_at = {}
        for path, _ in self.linen_states:
            state = states[path]
            params = _opt_params(state, state.params)
            new_at[(*path, "opt_state")] = migrate_opt_state(state.tx, state.opt_state, params)
        return replace(node, {}, new_at)


def _equal(a: Any, b: Any) -> bool:
    """Whether two arrays read from a checkpoint hold the same values (NaNs equal)."""
    if isinstance(a, jax.Array) and isinstance(b, jax.Array):
        return bool(jnp.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True))


def _tie_error(where: str, entry: Key, first: Key, other: Key) -> ValueError:
    return ValueError(
        f"Checkpoint {where!r} holds different values at {join(first)!r} and {join(other)!r}, "
        f"but in `target` they are one tied variable ({join(entry)!r}): restoring would keep "
        "one and drop the other. Restore into a target where they are separate variables, "
        "or untie them in the checkpoint's model before saving."
    )


def _from_stored(target_value: Any, data: Any, impl: str | None) -> Any:
    shape, dtype = shape_dtype(target_value)
    if is_key(dtype) and not is_key(data.dtype):  # orbax gives keys it saved itself as keys
        return jax.random.wrap_key_data(data, impl=impl or key_impl(target_value))
    if isinstance(target_value, bool | int | float):
        return type(target_value)(np.asarray(data).item())
    if isinstance(target_value, np.generic):
        return np.asarray(data)[()]
    return data


def _plan(
    layout: _Layout,
    target: Any,
    flags: str,
    partial: bool,
    verify: bool,
    check_base: bool = True,
) -> _Plan:
    """Works out a restore: reads flags and metadata, checks them, plans the re-typing.

    An adapter checkpoint is planned onto the target as its base: the target
    must be concrete, its paths that the checkpoint does not hold must match
    the base's fingerprint (unless ``check_base`` is False), and the saved
    flags apply to them too.
    """
    if flags not in ("checkpoint", "target"):
        raise ValueError(
            f"`flags` must be 'checkpoint' (re-type the target to the saved flags) or "
            f"'target' (keep the target's), got {flags!r}."
        )
    stored, saved = _read(layout, thorough=not verify)
    where = str(layout.root)
    walked = walk(target)
    entries = [e for e in walked.entries if is_tree_leaf(e.value)]
    if not entries:
        raise ValueError(
            f"`target` holds no arrays to restore into: got {type(target).__name__} "
            f"{target!r:.200}. Pass a module, an optimizer, or a pytree of them or of arrays "
            "(concrete, or abstract from nnx.eval_shape)."
        )
    parts = plan_parts(target, entries, saved, stored)
    if parts.walked and flags == "target":
        changed = sorted(path_str(path) for path, _, _ in parts.walked)
        raise ValueError(
            f"`flags` is 'target', but checkpoint {where!r} splits {show(changed)} into "
            "trainable and frozen elements otherwise than `target` does (ff.freeze/unfreeze "
            "with where=), and the target's split cannot be kept. Restore with "
            "flags='checkpoint', then freeze or unfreeze those elements again."
        )
    entries = parts.entries(entries)
    adapter = saved is not None and saved.is_adapter
    known = stored
    if saved is not None and adapter:
        check_concrete(entries, where)
        base = {k: _Stored(shape, dtype) for k, (shape, dtype) in base_keys(saved.base).items()}
        known = {**base, **stored}
    retype = _plan_retype(saved, entries, known) if saved is not None else None
    if retype is not None and retype.not_params and flags == "checkpoint":
        name, variable = retype.not_params[0]
        raise ValueError(
            f"The checkpoint holds {name!r} frozen, but in `target` it is a "
            f"{type(variable).__name__}, which is not a parameter, so it cannot be frozen. "
            + (
                unregistered_hint([v for _, v in retype.not_params])
                or "Pass a target of the saved model, or flags='target' to keep its own."
            )
        )
    # Optimizers are given the state structure they had when saved.
    rebuilt: list[tuple[Optimizer[Any], Any, tuple[Path, ...]]] = []
    for opt_path, opt in walked.optimizers:
        if not isinstance(opt, Optimizer):
            continue  # a plain nnx.Optimizer records no trained paths: restored as it is
        trained = saved.optimizers.get(path_str(opt_path)) if saved else None
        if trained is None or set(trained) == set(opt.trained_paths):
            continue
        owner = saved.owners.get(path_str(opt_path)) if saved else None
        below = key_of((*opt_path, "opt_state"))
        saved_state = {
            k[len(below) :]: s.shape for k, s in stored.items() if k[: len(below)] == below
        }
        state = _rebuild_opt_state(opt, trained, entries, path_str(opt_path), owner, saved_state)
        prefix = (*opt_path, "opt_state")
        n = len(prefix)
        entries = [e for e in entries if not any(p[:n] == prefix for p in e.paths)]
        entries += walk(state, prefix, in_module=True, in_optimizer=True).entries
        rebuilt.append((opt, state, trained))
    # And the step counts of their own, of the parameters they trained that were not
    # trainable when they were built.
    own_counts: list[tuple[Optimizer[Any], tuple[Path, ...], tuple[Path, ...], Any]] = []
    for opt_path, opt in walked.optimizers:
        name = path_str(opt_path)
        if not isinstance(opt, Optimizer) or saved is None or name not in saved.initial:
            continue
        initial = saved.initial[name]
        own = tuple(p for p in saved.optimizers[name] if p not in set(initial))
        prefix = (*opt_path, "own_counts")
        shapes = [stored.get(key_of((*prefix, i))) for i in range(len(own))]
        counts = nnx.List(
            [
                OptArray(jnp.zeros(s.shape if s and s.shape else (1,), s.dtype if s else jnp.int32))
                for s in shapes
            ]
        )
        n = len(prefix)
        entries = [e for e in entries if not any(p[:n] == prefix for p in e.paths)]
        entries += walk(counts, prefix, in_module=True, in_optimizer=True).entries
        own_counts.append((opt, initial, own, counts))
    # So are Linen train states (with the target's flags, they migrate it afterwards).
    linen_states: list[tuple[Path, Any]] = []
    for ts_path, ts in walked.train_states:
        state = _linen_opt_state(retype, ts_path, ts, entries) if retype else None
        if state is None:
            continue
        prefix = (*ts_path, "opt_state")
        n = len(prefix)
        entries = [e for e in entries if not any(p[:n] == prefix for p in e.paths)]
        entries += walk(state, prefix, linen="state").entries
        linen_states.append((ts_path, state))
    # Match every target entry with a stored array: one read each.
    reads: dict[Key, _Read] = {}
    consumed: set[Key] = set()
    missing: list[Entry] = []
    mismatched: list[Mismatch] = []
    for entry in entries:
        candidates = _candidates(entry, stored)
        if not candidates:
            missing.append(entry)
            continue
        consumed.update(candidates)
        key = candidates[0]
        if len(candidates) > 1:
            _plan_tie(where, entry, candidates, stored, saved)
        impl = saved.keys.get(join(key)) if saved else None
        dtype = _related_dtype(entry, stored[key], saved, join(key), flags)
        problem = None if dtype is not None else _mismatch(entry.value, stored[key], impl)
        if problem:
            mismatched.append(Mismatch(entry, key, problem))
            continue
        dtype = dtype if dtype is not None else stored[key].dtype
        assert dtype is not None
        reads[entry.key] = _Read(key, _sharding(entry), dtype, impl, tuple(candidates[1:]))
    opt = _OptStatePlan()
    if saved is not None:
        missing, mismatched = _plan_opt_states(
            opt, entries, stored, saved, flags, reads, consumed, missing, mismatched
        )
    if saved is not None and adapter:
        # Paths of the base are the target's own: not missing. With check_base=False
        # the target's other paths stay as they are too.
        # A path neither stored nor in the base is named by the base's check.
        missing = []
    unused = [join(k) for k in stored if k not in consumed]
    if mismatched:
        if saved is not None and saved.checksums and verify:
            _read(layout, thorough=True)  # the flags may lie about the stored arrays
        raise ValueError(
            f"Checkpoint {where!r} does not fit `target` ({type(target).__name__}): shapes or "
            f"dtypes differ at {len(mismatched)} path(s): {show(map(str, mismatched))}. Build "
            "the target with the shapes and dtypes it was saved with."
        )
    missing_paths = [join(e.key) for e in missing]
    if missing or unused:
        if not partial:
            raise ValueError(
                f"Checkpoint {where!r} and `target` ({type(target).__name__}) hold different "
                f"paths. Missing from the checkpoint: {show(missing_paths)}; not in the target: "
                f"{show(unused)}. {_tuple_hint(target, stored)}Pass partial=True to restore "
                "the paths that match and leave the rest as they are."
            )
        if not reads:
            raise ValueError(
                f"No path of `target` ({type(target).__name__}) is in checkpoint {where!r}, "
                f"even with partial=True. The target's paths: {show(missing_paths)}; the "
                f"checkpoint's: {show(unused)}."
            )
        abstract = [join(e.key) for e in missing if isinstance(e.value, jax.ShapeDtypeStruct)]
        if abstract:
            raise ValueError(
                f"partial=True would leave abstract values of `target` unfilled at "
                f"{show(abstract)}: checkpoint {where!r} does not hold them. Restore into a "
                "concrete target (built normally), whose values stay where the checkpoint "
                "has none."
            )
        warnings.warn(
            PartialRestoreWarning(
                f"Restored {len(reads)} path(s) from checkpoint {where!r}. Left as they were "
                f"(missing from the checkpoint): {show(missing_paths)}; ignored (not in the "
                f"target): {show(unused)}."
            ),
            stacklevel=3,
        )
    if saved is not None and adapter and check_base:
        check_base_of(saved.base, entries, stored, where)
    return _Plan(
        layout,
        reads,
        stored,
        retype if flags == "checkpoint" else None,
        rebuilt,
        linen_states,
        saved,
        own_counts,
        opt,
        parts,
    )


def _tuple_hint(target: Any, stored: Mapping[Key, _Stored]) -> str:
    """A hint for a saved tuple (``(model, opt)``) restored into something that is no tuple."""
    firsts = {k[0] for k in stored if k}
    if isinstance(target, tuple | list) or not firsts or not all(f.isdigit() for f in firsts):
        return ""
    return (
        f"The checkpoint holds a saved tuple of {max(map(int, firsts)) + 1} (its paths start "
        "with 0/, 1/...): restore into a tuple of the same nodes, e.g. (model, optimizer), "
        "or into (model,) with partial=True. "
    )


def _plan_tie(
    where: str, entry: Entry, keys: list[Key], stored: Mapping[Key, _Stored], saved: Flags | None
) -> None:
    """Refuses, before reading, a tied target variable stored under paths that differ.

    Shapes, dtypes and (where the flags have them) checksums are compared here;
    without checksums, :meth:`_Plan.check` compares the values once read.
    """
    checksums = saved.checksums if saved is not None else {}
    first = keys[0]
    for other in keys[1:]:
        same = stored[first] == stored[other]
        if same and join(first) in checksums and join(other) in checksums:
            same = checksums[join(first)] == checksums[join(other)]
        if not same:
            raise _tie_error(where, entry.key, first, other)


def _related_dtype(
    entry: Entry, stored: _Stored, saved: Flags | None, name: str, flags: str
) -> np.dtype[Any] | None:
    """The dtype to read an array as when it differs from the target's by a frozen precision.

    A parameter frozen in a lower precision (``ff.freeze(..., dtype=...)``) on
    one side and held in the precision it was trained in on the other fits:
    with ``flags="checkpoint"`` the saved dtype is read (the target is re-typed
    to it), with ``flags="target"`` the array is cast to the target's dtype.
    None: no such relation (the dtypes must then be equal).
    """
    shape, dtype = shape_dtype(entry.value)
    if stored.shape != shape or stored.dtype is None or is_key(dtype):
        return None
    dtype = np.dtype(dtype)
    if stored.dtype == dtype:
        return None
    saved_trained = saved.trained_dtypes.get(name) if saved else None
    metadata = entry.variable.get_metadata() if entry.variable is not None else {}
    target_trained = metadata.get(TRAINED_DTYPE_KEY)
    related = (saved_trained is not None and np.dtype(saved_trained) == dtype) or (
        target_trained is not None and np.dtype(target_trained) == stored.dtype
    )
    if not related:
        return None
    return stored.dtype if flags == "checkpoint" and saved is not None else dtype


def _mismatch(value: Any, stored: _Stored, impl: str | None) -> str | None:
    """Why a stored array cannot fill ``value``; None if it can."""
    shape, dtype = shape_dtype(value)
    if is_key(dtype):
        target_impl = key_impl(value)
        expected = _describe(shape, f"key<{target_impl}>")
        data_shape, data_dtype = _key_data_shape(value)
        fits = stored.shape == data_shape and stored.dtype == data_dtype
        if fits and impl in (None, target_impl):
            return None
    else:
        expected = _describe(shape, np.dtype(dtype).name)
        if impl is None and stored.shape == shape and stored.dtype == np.dtype(dtype):
            return None
        # A Python number takes a stored scalar of its kind in any precision
        # (one saved with x64 enabled, or by an earlier version, is float64).
        number = is_python_number(value) and impl is None
        if number and stored.shape == () and stored.dtype is not None:
            if stored.dtype.kind == np.dtype(dtype).kind:
                return None
    if stored.shape is None or stored.dtype is None:
        return f"checkpoint holds no array there, target {expected}"
    if impl is None:
        return f"checkpoint {_describe(stored.shape, stored.dtype.name)}, target {expected}"
    key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl)))
    key_shape = stored.shape[: len(stored.shape) - key_data.ndim]
    return f"checkpoint {_describe(key_shape, f'key<{impl}>')}, target {expected}"
