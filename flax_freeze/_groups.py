"""Parameter groups: own step counts for parameters that became trainable at a freeze change.

An optax state counts steps once for all parameters (``ScaleByAdamState.count``).
A parameter unfrozen late would meet Adam's bias correction at that shared
count. Here each group of parameters that became trainable together keeps its
own values of the step counts: the transformation runs once per group, on
every gradient (so transforms that look at all gradients at once, such as
``clip_by_global_norm``, still do), with the counts replaced by the group's,
and each parameter takes its update and state from its own group's run. XLA
drops what a run computes for other groups and shares what the runs compute
alike, so the compiled step does about the work of one run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import DictKey, GetAttrKey, SequenceKey

KeyPath = tuple[Any, ...]

#: States whose ``count`` drives a schedule: per group only when asked for.
SCHEDULE_STATES = frozenset(
    {
        "ScaleByScheduleState",
        "InjectHyperparamsState",
        "InjectStatefulHyperparamsState",
        "WrappedScheduleState",
    }
)


def _is_optax_state(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def count_paths(state: Any, schedules: bool) -> list[KeyPath]:
    """Key paths of the step counts of an optax state, as ``tree_flatten_with_path`` gives them.

    A step count is the ``count`` field of an optax state (Adam's, Lion's...);
    the counts of schedules (``scale_by_schedule``, ``inject_hyperparams``)
    only with ``schedules``. Other counters (``MultiSteps``' mini-steps,
    ``apply_if_finite``'s) are not step counts of parameters.
    """
    found: list[KeyPath] = []

    def visit(x: Any, prefix: KeyPath) -> None:
        if _is_optax_state(x):
            fields = x._fields
            if "count" in fields and (schedules or type(x).__name__ not in SCHEDULE_STATES):
                found.append((*prefix, GetAttrKey("count")))
            for name in fields:
                visit(getattr(x, name), (*prefix, GetAttrKey(name)))
        elif isinstance(x, tuple | list):
            for i, child in enumerate(x):
                visit(child, (*prefix, SequenceKey(i)))
        elif isinstance(x, Mapping):
            for key, child in x.items():
                visit(child, (*prefix, DictKey(key)))

    visit(state, ())
    return found


def owner(key_path: KeyPath, param_paths: Mapping[KeyPath, Any]) -> KeyPath | None:
    """The parameter whose key path runs, whole and contiguous, inside ``key_path``.

    The longest such run wins (``mu['enc']['w']`` belongs to ``enc/w``, not to a
    top-level ``w``); among equally long runs, the last one.
    """
    best: KeyPath | None = None
    for i in range(len(key_path)):
        for j in range(len(key_path), i, -1):
            run = key_path[i:j]
            if run in param_paths:
                if best is None or len(run) >= len(best):
                    best = run
                break
    return best


def grouped_update(
    tx: Any,
    grads: Any,
    state: Any,
    params: Any,
    group_of: Mapping[KeyPath, int],
    counts: Sequence[Sequence[Any]],
    count_keys: Sequence[KeyPath],
    factors: Sequence[Any],
    **kwargs: Any,
) -> tuple[Any, Any, list[list[Any]]]:
    """``tx.update`` with each group's own step counts: ``(updates, new_state, new_counts)``.

    Args:
        tx: the optax transformation.
        grads: the gradients (pure arrays), as ``tx.update`` takes them.
        state: the optimizer state (pure arrays).
        params: the parameters (pure arrays).
        group_of: the group of each parameter, by its key path in ``params``.
        counts: for each group, its values of the counts at ``count_keys``.
        count_keys: key paths of the step counts in ``state``.
        factors: for each group, a factor its updates are scaled by (a
            warm-up), or None.
        **kwargs: passed on to ``tx.update``.

    Returns:
        The updates, the new state (each parameter's state from its group's
        run, shared state from the first group's), and each group's new counts.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    at = {k: i for i, (k, _) in enumerate(flat)}
    runs = []
    for values in counts:
        leaves = [leaf for _, leaf in flat]
        for key, value in zip(count_keys, values, strict=True):
            leaves[at[key]] = jnp.asarray(value, jnp.result_type(leaves[at[key]]))
        runs.append(tx.update(grads, jax.tree_util.tree_unflatten(treedef, leaves), params, **kwargs))
    flat_updates = [jax.tree_util.tree_flatten_with_path(u)[0] for u, _ in runs]
    updates = []
    for i, (key, _) in enumerate(flat_updates[0]):
        g = group_of.get(key, 0)
        value = flat_updates[g][i][1]
        if factors[g] is not None and value is not None:
            value = value * factors[g].astype(value.dtype)
        updates.append(value)
    updates_tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(runs[0][0]), updates)
    new_flat = [jax.tree_util.tree_flatten_with_path(s)[0] for _, s in runs]
    new_treedef = jax.tree_util.tree_structure(runs[0][1])
    counted = set(count_keys)
    leaves = []
    for i, (key, _) in enumerate(new_flat[0]):
        param = None if key in counted else owner(key, group_of)
        leaves.append(new_flat[group_of[param] if param is not None else 0][i][1])
    new_state = jax.tree_util.tree_unflatten(new_treedef, leaves)
    new_at = {k: i for i, (k, _) in enumerate(new_flat[0])}
    new_counts = [[run[new_at[key]][1] for key in count_keys] for run in new_flat]
    return updates_tree, new_state, new_counts
