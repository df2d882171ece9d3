"""Optimizer state across frozen sets: rebuilt for what trained when saved, or reconciled."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
from flax import nnx
from flax.training import train_state

from .._filters import Path, path_str
from .._grad import trainable_tree
from .._nnx_compat import OptArray, OptVariable, jax_to_nnx_path
from .._optimizer import Optimizer
from .._retype import replace
from .._variables import PARAM_TYPE_KEY, TRAINED_DTYPE_KEY
from .._walk import Entry, Key, in_box, join, key_of, shape_dtype, status, walk
from ..linen import TrainState
from ._flags import Flags, show
from ._read import _Stored
from ._reads import Mismatch, _Read
from ._retype_plan import _box_changes, _Retype
from ._sharding import _default_sharding, _sharding, _state_sharding


def _params(entries: list[Entry]) -> dict[Key, Entry]:
    """Every parameter variable outside optimizers (trainable or frozen), by each of its paths."""
    return {
        key_of(path): entry
        for entry in entries
        if not entry.in_optimizer and status(entry) in ("trainable", "frozen")
        if entry.variable is not None
        for path in entry.paths
    }


def _models(trained: tuple[Path, ...], params: Mapping[Key, Entry]) -> list[Key]:
    """The paths of the nodes that hold a parameter at every path ``trained``, sorted.

    When several do, only those whose trainable parameters are exactly
    ``trained`` are kept.
    """
    if not trained:
        return []
    wanted = [key_of(p) for p in trained]
    first, n = wanted[0], len(wanted[0])
    prefixes = {k[: len(k) - n] for k in params if len(k) >= n and k[len(k) - n :] == first}
    found = sorted(p for p in prefixes if all((*p, *w) in params for w in wanted))
    if len(found) > 1:
        found = [p for p in found if _trainable_under(p, params) == set(wanted)] or found
    return found


def _trainable_under(prefix: Key, params: Mapping[Key, Entry]) -> set[Key]:
    """The paths, relative to ``prefix``, of the trainable parameters below it."""
    n = len(prefix)
    return {k[n:] for k, e in params.items() if k[:n] == prefix and status(e) == "trainable"}


def model_of(trained: tuple[Path, ...], entries: list[Entry]) -> str | None:
    """The path of the model an optimizer training ``trained`` belongs to in a saved node.

    That is the one graph node holding a parameter at every trained path (of
    several, the one whose trainable parameters are exactly those). None when
    the node holds no such model, or several that fit.
    """
    found = _models(trained, _params(entries))
    return join(found[0]) if len(found) == 1 else None


def _model_in_target(
    opt: Optimizer[Any],
    trained: tuple[Path, ...],
    params: Mapping[Key, Entry],
    owner: str | None,
    saved_state: Mapping[Key, Any],
) -> Key | None:
    """The path of the model in the target whose parameters an optimizer's state is rebuilt for.

    The model recorded when saved, if the checkpoint names it. Otherwise (a
    checkpoint of an earlier version) the one node of the target holding
    every parameter saved trained; of several, those whose trainable
    parameters are the ones ``opt`` trains now, then those whose parameters
    have the shapes of the saved state (``saved_state``: the shapes stored
    under the optimizer's state, by path below it). None if there is none.

    Raises:
        ValueError: if several nodes fit and their parameters differ.
    """
    if owner is not None:
        return tuple(owner.split("/")) if owner else ()
    found = _models(trained, params)
    if len(found) > 1:
        now = {key_of(p) for p in opt.trained_paths}
        found = [p for p in found if _trainable_under(p, params) == now] or found
    if len(found) > 1:

        def fits(prefix: Key) -> bool:
            """Whether each parameter has saved state of its shape (moments, traces...)."""
            for path in map(key_of, trained):
                shape = shape_dtype(params[(*prefix, *path)].value)[0]
                tails = [s for k, s in saved_state.items() if k[len(k) - len(path) :] == path]
                if shape not in tails:
                    return False
            return True

        found = [p for p in found if fits(p)] or found
    if len(found) > 1:
        shapes = {
            tuple(shape_dtype(params[(*p, *key_of(t))].value) for t in trained) for p in found
        }
        if len(shapes) > 1:
            raise ValueError(
                f"`target` holds several models the optimizer could belong to "
                f"({show(join(p) or '(root)' for p in found)}), with different parameters, and "
                "the checkpoint does not say which. Restore each model with its optimizer "
                "separately, e.g. restore(directory, (model, optimizer), partial=True)."
            )
    return found[0] if found else None


def _rebuild_opt_state(
    opt: Optimizer[Any],
    trained: tuple[Path, ...],
    entries: list[Entry],
    where: str,
    owner: str | None,
    saved_state: Mapping[Key, Any],
) -> Any:
    """Abstract optimizer state for the parameters ``trained``, each leaf with its sharding.

    The parameters are those of the optimizer's model (:func:`_model_in_target`):
    ``owner`` is its path in the saved node, when the checkpoint records it.
    """
    params: list[tuple[Path, nnx.Variable]] = []
    placed: dict[Key, tuple[tuple[int, ...], jax.sharding.Sharding | None]] = {}
    missing = []
    by_key = _params(entries)
    model = _model_in_target(opt, trained, by_key, owner, saved_state)
    for path in trained:
        entry = by_key.get((*model, *key_of(path))) if model is not None else None
        if entry is None:
            missing.append(path_str(path))
            continue
        shape, dtype = shape_dtype(entry.value)
        sharding = _sharding(entry)
        metadata = entry.variable.get_metadata() if entry.variable is not None else {}
        metadata.pop(PARAM_TYPE_KEY, None)
        dtype = metadata.pop(TRAINED_DTYPE_KEY, dtype)  # trained at the dtype it was trained in
        abstract = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        params.append((path, nnx.Param.from_metadata(abstract, metadata)))
        placed[key_of(path)] = (shape, sharding)
    if missing:
        which = f"at {where!r}" if where else "(the target itself)"
        raise ValueError(
            f"The optimizer {which} was saved training {show(path_str(p) for p in trained)}, "
            f"but `target` trains other parameters and holds no {show(missing)} to rebuild its "
            "state from. Restore the optimizer together with its model: "
            "restore(directory, (model, optimizer))."
        )
    state = jax.eval_shape(opt.tx.init, nnx.from_flat_state(params))
    old = {
        key_of(jax_to_nnx_path(kp)): leaf
        for kp, leaf in jax.tree_util.tree_flatten_with_path(nnx.as_pure(opt.opt_state))[0]
    }

    def convert(key_path: Any, x: Any) -> Any:
        value = x.get_raw_value() if isinstance(x, nnx.Variable) else x
        shape = tuple(value.shape)
        key = key_of(jax_to_nnx_path(key_path))
        sharding = _state_sharding(key, shape, placed, old)
        abstract = jax.ShapeDtypeStruct(shape, value.dtype, sharding=sharding)
        if isinstance(x, nnx.Variable):  # as flax's to_opt_state does, without re-sharding
            metadata = x.get_metadata()
            if "optimizer_sharding" in metadata:
                metadata["out_sharding"] = metadata.pop("optimizer_sharding")
            return OptVariable.from_metadata(abstract, metadata)
        return OptArray(abstract)

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return jax.tree_util.tree_map_with_path(convert, state, is_leaf=is_var)


def _opt_params(state: train_state.TrainState, params: Any) -> Any:
    """What ``state.tx.init`` is given for ``params``: only the trainable part for ffl's."""
    return trainable_tree(params) if isinstance(state, TrainState) else params


def _linen_opt_state(
    retype: _Retype, path: Path, state: train_state.TrainState, entries: list[Entry]
) -> Any:
    """Abstract ``opt_state`` of a TrainState for its parameters trainable when saved.

    None when the saved flags train what the target trains. Each leaf is
    placed like its parameter, else like the target's leaf at its path.
    """
    prefix, opt_prefix = (*path, "params"), (*path, "opt_state")
    n, m = len(prefix), len(opt_prefix)
    to_box = {p[n:] for p in retype.to_box if p[:n] == prefix}
    to_unbox = {p[n:] for p in retype.to_unbox if p[:n] == prefix}
    if not to_box and not to_unbox:
        return None
    params = replace(state.params, {}, _box_changes(state.params, to_box, to_unbox))
    fresh = jax.eval_shape(lambda p: state.tx.init(_opt_params(state, p)), params)
    placed = {
        e.key[n:]: (shape_dtype(e.value)[0], _sharding(e))
        for e in entries
        if e.variable is None and e.paths[0][:n] == prefix
    }
    old = {e.key[m:]: e.value for e in entries if e.paths[0][:m] == opt_prefix}
    new_at: dict[Path, Any] = {}
    for entry in walk(fresh).entries:
        shape, dtype = shape_dtype(entry.value)
        sharding = _state_sharding(entry.key, shape, placed, old)
        abstract = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        new_at[entry.paths[0]] = abstract if entry.box is None else in_box(entry.box, abstract)
    return replace(fresh, {}, new_at)


@dataclass
class _OptStatePlan:
    """How plain optax state in the target changes to follow the other side's flags."""

    fill: dict[Path, _Read] = field(default_factory=dict)  # target path -> what to put there
    to_none: set[Path] = field(default_factory=set)  # leaves of parameters saved frozen


def _plan_opt_states(
    opt: _OptStatePlan,
    entries: list[Entry],
    stored: Mapping[Key, _Stored],
    saved: Flags,
    flags: str,
    reads: dict[Key, _Read],
    consumed: set[Key],
    missing: list[Entry],
    mismatched: list[Mismatch],
) -> tuple[list[Entry], list[Mismatch]]:
    """Reconciles plain optax state (``tx.init(ff.trainable_tree(tree))``) across frozen sets.

    Optax state mirrors the trainable parameters (``mu/<param path>``, ``None``
    at frozen ones), so when the checkpoint and the target train different
    sets their paths differ. Each state leaf is matched with its parameter by
    the path below its optax field (the one parameter whose path ends so).
    With ``flags="checkpoint"`` the state takes the saved structure: leaves of
    parameters saved frozen become ``None``, leaves saved for parameters the
    target holds frozen are filled in, and state that belongs to no single
    parameter (``optax.flatten``'s vector) is taken as saved. With
    ``flags="target"`` the target's state (fresh, from ``tx.init``) is kept
    for parameters trainable only in the target and for state that belongs to
    no single parameter, and the saved state of parameters the target holds
    frozen is not read. Returns the entries still missing and the mismatches
    left.
    """
    params = {
        e.key: e for e in entries if e.opt_field is None and status(e) in ("trainable", "frozen")
    }
    target_trainable = {join(k) for k, e in params.items() if status(e) == "trainable"}
    if target_trainable == set(saved.trainable) & {join(k) for k in params}:
        return missing, mismatched

    def owner(mirror: Key) -> Entry | None:
        found = [e for k, e in params.items() if mirror and k[len(k) - len(mirror) :] == mirror]
        return found[0] if len(found) == 1 else None

    still_missing = []
    for entry in missing:
        mirror = entry.mirror
        param = owner(key_of(mirror)) if mirror is not None else None
        frozen_when_saved = param is not None and join(param.key) in saved.frozen
        if not frozen_when_saved:
            still_missing.append(entry)
        elif flags == "checkpoint":
            opt.to_none.add(entry.paths[0])
    fields = {e.opt_field for e in entries if e.opt_field is not None}
    for key in stored:
        if key in consumed:
            continue
        for opt_field in fields:
            base = key_of(opt_field)
            if key[: len(base)] != base:
                continue
            param = owner(key[len(base) :])
            if param is None or status(param) != "frozen" or join(param.key) in saved.frozen:
                continue
            consumed.add(key)
            if flags == "checkpoint":
                path = (*opt_field, *param.paths[0][len(param.paths[0]) - len(key) + len(base) :])
                dtype = stored[key].dtype
                assert dtype is not None
                opt.fill[path] = _Read(key, _sharding(param), dtype)
            break

    def shared(entry: Entry) -> bool:
        """State of no single parameter (a flat vector of all of them, a count)."""
        return entry.mirror is not None and owner(key_of(entry.mirror)) is None

    if flags == "target":  # never hand one parameter's state to another: keep it fresh
        for entry in entries:
            if entry.key in reads and shared(entry) and shape_dtype(entry.value)[0] != ():
                if isinstance(entry.value, jax.ShapeDtypeStruct):
                    raise ValueError(
                        f"`target` optimizer state at {join(entry.key)!r} belongs to no single "
                        "parameter and the checkpoint trained other parameters, so it starts "
                        "fresh, but it is abstract. Build the optimizer state for the target "
                        "with tx.init(ff.trainable_tree(tree)) before restoring into it."
                    )
                del reads[entry.key]
    still_mismatched = []
    for mismatch in mismatched:
        if not shared(mismatch.entry):
            still_mismatched.append(mismatch)
        elif flags == "checkpoint":  # state of no single parameter: taken as saved
            dtype = stored[mismatch.stored].dtype
            assert dtype is not None
            opt.fill[mismatch.entry.paths[0]] = _Read(mismatch.stored, _default_sharding(), dtype)
    return still_missing, still_mismatched
