"""Own step counts for parameters that became trainable after the optimizer was built.

An optax state counts steps once for all parameters (``ScaleByAdamState.count``).
A parameter unfrozen late would meet Adam's bias correction at that shared
count: its first update about ``(1 - b1) / sqrt(1 - b2)`` times the learning
rate. Here such a parameter has counts of its own, and the transformation's
update is computed as if each parameter's counts were its own:

``tx.update`` is traced once and split by partial evaluation into what does
not depend on the step counts (gradients, moments, global norms,
``MultiSteps``' accumulation), computed once for all parameters, and the
small remainder that does (bias corrections and what uses them), evaluated
for each parameter with its own counts and only for its own outputs. The
compiled step does the work of one update plus a few scalar operations per
parameter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import DictKey, GetAttrKey, SequenceKey

from ._nnx_compat import dce_jaxpr, eval_jaxpr, partial_eval_jaxpr

KeyPath = tuple[Any, ...]

#: States whose ``count`` drives a schedule: a parameter's own only when asked for.
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
    ``apply_if_finite``'s) are not counts of a parameter's steps.
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


def update_with_counts(
    tx: Any,
    grads: Any,
    state: Any,
    params: Any,
    counts: Sequence[Sequence[Any] | None],
    count_keys: Sequence[KeyPath],
    factors: Sequence[Any],
    **kwargs: Any,
) -> tuple[Any, Any, list[list[Any] | None]]:
    """``tx.update`` with some parameters' own step counts.

    Args:
        tx: the optax transformation.
        grads: the gradients (pure arrays), as ``tx.update`` takes them.
        state: the optimizer state (pure arrays); its counts are the shared ones.
        params: the parameters (pure arrays).
        counts: for each parameter leaf of ``params`` (in flattening order), its
            own values of the counts at ``count_keys``, or None for the shared ones.
        count_keys: key paths of the step counts in ``state``.
        factors: for each parameter leaf, a factor its update is scaled by (a
            warm-up), or None.
        **kwargs: passed on to ``tx.update``.

    Returns:
        The updates, the new state (its counts the shared ones, advanced), and
        for each parameter with counts of its own, its new counts (None for
        the others).
    """
    flat_state, state_def = jax.tree_util.tree_flatten_with_path(state)
    at = {k: i for i, (k, _) in enumerate(flat_state)}
    count_at = [at[k] for k in count_keys]
    counted_at = set(count_at)
    other_at = [i for i in range(len(flat_state)) if i not in counted_at]
    grad_leaves, grad_def = jax.tree_util.tree_flatten(grads)
    flat_params, param_def = jax.tree_util.tree_flatten_with_path(params)
    param_keys = [k for k, _ in flat_params]
    trees: list[Any] = []
    out_keys: list[tuple[str, KeyPath]] = []

    def update(shared: list[Any], others: list[Any], g: list[Any], p: list[Any]) -> list[Any]:
        leaves: list[Any] = [None] * len(flat_state)
        for i, c in zip(count_at, shared, strict=True):
            leaves[i] = c
        for i, o in zip(other_at, others, strict=True):
            leaves[i] = o
        u, s = tx.update(
            jax.tree_util.tree_unflatten(grad_def, g),
            jax.tree_util.tree_unflatten(state_def, leaves),
            jax.tree_util.tree_unflatten(param_def, p),
            **kwargs,
        )
        flat_u = jax.tree_util.tree_flatten_with_path(u)[0]
        flat_s = jax.tree_util.tree_flatten_with_path(s)[0]
        trees[:] = [jax.tree_util.tree_structure(u), jax.tree_util.tree_structure(s)]
        out_keys[:] = [("u", k) for k, _ in flat_u] + [("s", k) for k, _ in flat_s]
        return [v for _, v in flat_u] + [v for _, v in flat_s]

    shared = [flat_state[i][1] for i in count_at]
    others = [flat_state[i][1] for i in other_at]
    param_leaves = [v for _, v in flat_params]
    closed = jax.make_jaxpr(update)(shared, others, grad_leaves, param_leaves)
    unknowns = [True] * len(shared) + [False] * (len(closed.in_avals) - len(shared))
    known, unknown, out_unknown = partial_eval_jaxpr(closed, unknowns)
    known_out = eval_jaxpr(known, *others, *grad_leaves, *param_leaves)
    n_known = out_unknown.count(False)
    known_values, residuals = known_out[:n_known], known_out[n_known:]
    outs: list[Any] = [None] * len(out_keys)
    values = iter(known_values)
    for i, is_unknown in enumerate(out_unknown):
        if not is_unknown:
            outs[i] = next(values)
    # Each unknown output belongs to a parameter (its update, its state) or to no one.
    unknown_at = [i for i, u in enumerate(out_unknown) if u]
    index = {k: n for n, k in enumerate(param_keys)}
    counted = set(count_keys)
    belongs: list[int | None] = []
    count_outputs: list[int] = []
    for j, i in enumerate(unknown_at):
        kind, key = out_keys[i]
        if kind == "s" and key in counted:
            count_outputs.append(j)
            belongs.append(None)
        elif kind == "u":
            belongs.append(index.get(key))
        else:
            mine = owner(key, index)
            belongs.append(index[mine] if mine is not None else None)

    def evaluate(wanted: set[int], with_counts: Sequence[Any]) -> dict[int, Any]:
        used = [j in wanted for j in range(len(unknown_at))]
        if not any(used):
            return {}
        jaxpr = dce_jaxpr(unknown, used)
        return dict(zip(sorted(wanted), eval_jaxpr(jaxpr, *residuals, *with_counts), strict=True))

    own = [n for n, c in enumerate(counts) if c is not None]
    common = {j for j, b in enumerate(belongs) if b is None or counts[b] is None}
    for j, value in evaluate(common | set(count_outputs), shared).items():
        outs[unknown_at[j]] = value
    new_counts: list[list[Any] | None] = [None] * len(counts)
    for n in own:
        mine = {j for j, b in enumerate(belongs) if b == n}
        got = evaluate(mine | set(count_outputs), counts[n] or ())
        for j in mine:
            outs[unknown_at[j]] = got[j]
        new_counts[n] = [got[j] for j in count_outputs]
    n_updates = trees[0].num_leaves
    updates = outs[:n_updates]
    for n, factor in enumerate(factors):
        if factor is not None and updates[n] is not None:
            updates[n] = updates[n] * jnp.asarray(factor, updates[n].dtype)
    return (
        jax.tree_util.tree_unflatten(trees[0], updates),
        jax.tree_util.tree_unflatten(trees[1], outs[n_updates:]),
        new_counts,
    )
