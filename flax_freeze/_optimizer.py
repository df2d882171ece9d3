"""Optimizer that follows freeze/unfreeze, and optimizer-state migration."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.core import Tracer

from ._counts import count_paths, update_with_counts
from ._counts import owner as _owner
from ._filters import Filter, Path, path_str
from ._nnx_compat import OptArray, in_update_context, is_node, jax_to_nnx_path, to_opt_state
from ._variables import FrozenParam, Trainable

M = TypeVar("M")
KeyPath = tuple[Any, ...]
Transform = optax.GradientTransformation | optax.MultiSteps


def _paths(state: nnx.State) -> tuple[Path, ...]:
    return tuple(sorted((path for path, _ in nnx.to_flat_state(state)), key=path_str))


def _short(x: Any, limit: int = 200) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _leaves(tree: Any) -> dict[KeyPath, Any]:
    """Key path -> array of every leaf (``nnx`` variables unwrapped, ``None`` skipped)."""
    return dict(jax.tree_util.tree_flatten_with_path(nnx.as_pure(tree))[0])


def _kind(x: Any) -> tuple[tuple[int, ...], Any]:
    return tuple(np.shape(x)), jnp.result_type(x)


def _grown(x: Any) -> jax.ShapeDtypeStruct:
    shape = np.shape(x)
    return jax.ShapeDtypeStruct(tuple(d + 1 for d in shape) if shape else (2,), _kind(x)[1])


def _independent(tx: Transform, params: Any, fresh: Mapping[KeyPath, Any]) -> set[KeyPath]:
    """Key paths of the state leaves whose shape does not depend on the parameters.

    ``tx.init`` is traced (never run) on a probe of the parameters with every
    dimension one larger (scalars as shape ``(2,)``); a leaf that keeps its key
    path, shape and dtype is shared state: a step count, a hyperparameter. If
    ``tx`` cannot take the probe, the scalar leaves count as shared.
    """
    try:
        probe = _leaves(jax.eval_shape(tx.init, jax.tree.map(_grown, nnx.as_pure(params))))
    except Exception:  # any failure of a foreign init on a probe: fall back
        return {k for k, v in fresh.items() if np.shape(v) == ()}
    return {k for k, v in fresh.items() if k in probe and _kind(probe[k]) == _kind(v)}


# What jax.tree.map raises when two trees differ (optax maps labels/masks onto params).
_STRUCTURE_ERRORS = (
    "pytree structure error",
    "Dict key mismatch",
    "Tuple arity mismatch",
    "List arity mismatch",
    "Custom node type mismatch",
)


def _labels_error(tx: Transform, params: Any, err: ValueError) -> ValueError | None:
    """The clear error for ``tx.init`` rejecting the tree of ``params``, if that is ``err``."""
    if not any(s in str(err) for s in _STRUCTURE_ERRORS):
        return None
    paths = [jax.tree_util.keystr(k) for k in _leaves(params)]
    return ValueError(
        f"`tx` cannot build optimizer state for the trainable parameters "
        f"{_short(paths)}: their tree does not match one that `tx` holds. "
        "optax.multi_transform and optax.masked given a *pytree* of labels or "
        "masks (built for one parameter tree) fail once freeze/unfreeze change "
        "the trainable tree. Pass a callable label/mask function instead, e.g. "
        "optax.multi_transform(transforms, lambda params: jax.tree.map(label_of, "
        f"params)), which follows freeze changes. Got tx={_short(tx)}."
    )


def _init(tx: Transform, params: Any) -> Any:
    """``tx.init(params)``, with a clear error where labels or masks are tied to one tree."""
    try:
        return tx.init(params)
    except ValueError as err:
        clear = _labels_error(tx, params, err)
        if clear is None:
            raise
        raise clear from err


def _kept(
    tx: Transform, fresh: Any, old_state: Any, params: Any, old_params: Any | None
) -> set[KeyPath]:
    """Key paths of the fresh state leaves that take their value from ``old_state``."""
    new, old, now = _leaves(fresh), _leaves(old_state), _leaves(params)
    now.pop((), None)  # a bare array as the whole tree names nothing
    before = None if old_params is None else _leaves(old_params)
    if before is not None:
        before.pop((), None)
    same_set = before is not None and {k: _kind(v) for k, v in before.items()} == {
        k: _kind(v) for k, v in now.items()
    }
    independent: set[KeyPath] | None = None
    kept = set()
    for key_path, leaf in new.items():
        if key_path not in old or _kind(old[key_path]) != _kind(leaf):
            continue
        owner = _owner(key_path, now)
        if owner is not None:  # a parameter's own state: kept if it was trained before too
            if before is None or (owner in before and _kind(before[owner]) == _kind(now[owner])):
                kept.add(key_path)
            continue
        if same_set:
            kept.add(key_path)
            continue
        if independent is None:
            independent = _independent(tx, params, new)
        if key_path in independent:
            kept.add(key_path)
    return kept


def _take(fresh: Any, old_state: Any, kept: set[KeyPath]) -> Any:
    """``fresh`` with the leaves at ``kept`` taken from ``old_state`` (variables in place)."""
    previous = _leaves(old_state)

    def pick(key_path: KeyPath, leaf: Any) -> Any:
        if key_path not in kept:
            return leaf
        if isinstance(leaf, nnx.Variable):
            leaf.set_raw_value(previous[key_path])
            return leaf
        return previous[key_path]

    return jax.tree_util.tree_map_with_path(
        pick, fresh, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def migrate_opt_state(
    tx: Transform, old_state: Any, params: Any, *, old_params: Any | None = None
) -> Any:
    """Builds optimizer state for ``params``, keeping ``old_state`` where it is known to fit.

    A fresh ``tx.init(params)`` gives the new structure and initial values. A
    leaf of it takes its value from ``old_state`` (same key path, shape and
    dtype) only in two cases:

    - its key path names a parameter of ``params`` (holds that parameter's key
      path, e.g. ``mu['layers'][0]['kernel']``), and ``old_state`` has the
      same leaf, so the parameter was trained before too: Adam moments,
      accumulated gradients of ``optax.MultiSteps``, schedule-free ``z``;
    - its shape does not depend on the parameters at all (tried on a probe
      with other shapes): shared step counts, injected hyperparameters,
      ``MultiSteps``' mini-step counter.

    Every other leaf keeps its fresh value: state of newly trainable
    parameters, and state that cannot be attributed to one parameter, such as
    the single flat vector of ``optax.flatten`` (fresh for *all* parameters,
    also those that stayed trainable). A parameter's state is never handed to
    another one. State of parameters no longer trained is dropped.

    Args:
        tx: the optax transformation (or ``optax.MultiSteps``).
        old_state: the current optimizer state (``OptState`` variables, or a
            plain pytree).
        params: the parameters to be trained from now on: an ``nnx.State`` (the
            state comes back as ``OptState`` variables) or a plain pytree with
            ``None`` at frozen leaves (the state comes back as plain arrays).
        old_params: the parameters ``old_state`` was built for, in the same
            form, if known. Then state of a parameter is kept only if it is in
            both (same shape and dtype), and state that cannot be attributed
            is kept too when the trained set did not change at all.

    Returns:
        The new optimizer state.

    Raises:
        ValueError: if ``tx.init`` rejects the tree of ``params``, as
            ``optax.multi_transform``/``optax.masked`` do with a pytree of
            labels or masks built for another tree: pass a callable.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from flax_freeze import migrate_opt_state
        >>> tx = optax.flatten(optax.adam(0.1))
        >>> params = {"a": jnp.ones(2), "b": None}
        >>> state = tx.init(params)
        >>> _, state = tx.update({"a": jnp.ones(2), "b": None}, state, params)
        >>> new = migrate_opt_state(tx, state, {"a": None, "b": jnp.ones(2)})
        >>> int(new[0].count), new[0].mu.tolist()  # b does not get a's moments
        (1, [0.0, 0.0])
    """
    fresh = _init(tx, params)
    kept = _kept(tx, fresh, old_state, params, old_params)
    if isinstance(params, nnx.State):
        fresh = to_opt_state(fresh)
    return _take(fresh, old_state, kept)


def _tracing_without_graph_updates(params: nnx.State) -> bool:
    """Whether new optimizer state made here would be lost: a trace with no NNX graph updates."""
    tracing = any(isinstance(x, Tracer) for x in jax.tree.leaves(params))
    return tracing and not in_update_context()


class Optimizer(nnx.Optimizer[M]):
    """An ``nnx.Optimizer`` that follows freeze and unfreeze.

    It holds optimizer state only for the parameters ``wrt`` selects *now*.
    When :func:`freeze`/:func:`unfreeze` change that set (eagerly or inside
    ``nnx.jit``), the next :meth:`update` migrates the state first: state of
    parameters that stayed trainable is kept untouched (Adam moments, the step
    count), newly trainable parameters get fresh ``tx.init`` state, and frozen
    ones hold none. Frozen parameters are never updated, by any transform —
    weight decay included — so they stay bit-identical.

    Under ``nnx.jit`` a freeze change costs at most two retraces: the step that
    migrates, then the step that sees the new state structure. Where a step
    cannot carry new state out (tree mode: ``jax.jit``, ``nnx.jit(graph=False)``;
    ``nnx.cached_partial``), call :meth:`migrate` eagerly after the change;
    ``update`` raises a ``ValueError`` saying so rather than lose the state.

    Step counts: a parameter that becomes trainable after the optimizer was
    built gets step counts of its own (``own_counts``), starting from zero, so
    that its updates have the dynamics of a fresh start: Adam's bias
    correction of step 1 (a first update of about the learning rate per
    element, not ``(1 - b1) / sqrt(1 - b2)`` times it, 3.16 for the defaults,
    as with the shared count), and with ``group_schedules=True`` its own
    position in learning-rate schedules. Parameters that stay trainable keep
    theirs and move exactly as without the change; the parameters trainable
    when the optimizer was built share the optimizer state's counts. The
    transformation still sees every gradient at once (``clip_by_global_norm``
    clips by one global norm, ``MultiSteps`` accumulates one window): its
    update is traced once and only the few scalar operations that use the
    counts are repeated per parameter. With ``warmup_steps`` the updates of
    such a parameter also ramp up linearly over its first steps.
    :class:`UnfreezeSchedule` unfreezes parts of a model at given steps. A
    parameter trainable when the optimizer was built, frozen and made
    trainable again, goes back to the shared counts.

    State that cannot be attributed to one parameter by its key path, and that
    depends on the parameters, restarts from ``tx.init`` at a freeze change
    (see :func:`migrate_opt_state`): with ``optax.flatten`` that is the whole
    flat state, also for parameters that stayed trainable. One parameter's
    state is never handed to another.

    ``optax.MultiSteps``: accumulated gradients are kept per parameter, and the
    mini-step counter runs on. After a freeze change in the middle of a window,
    parameters that stayed trainable keep what they accumulated, and at the end
    of the window each of their mini-step gradients counts exactly once. A
    newly trainable parameter starts from zero: its first update averages its
    gradients since the change over the whole window (zeros for the mini-steps
    before it). A parameter frozen in the middle of a window drops what it had
    accumulated, unapplied.

    Args:
        model: the NNX module to optimize (or a list/dict of modules).
        tx: an optax transformation, ``GradientTransformationExtraArgs``
            included, or an ``optax.MultiSteps``.
        wrt: NNX filter of the trained variables; defaults to :data:`Trainable`.
        group_schedules: give parameters unfrozen later their own position in
            the learning-rate schedules of ``tx`` too (``scale_by_schedule``,
            ``inject_hyperparams``): each then starts its schedule, a warm-up
            say, from its own first step.
        warmup_steps: ramp the updates of a parameter unfrozen later up from
            ``1 / warmup_steps`` to 1 over its first ``warmup_steps`` steps
            (0: no warm-up).

    Raises:
        TypeError: if ``model`` is not an NNX graph node, ``tx`` is not an
            optax transformation, or ``group_schedules`` is not a bool.
        ValueError: if ``warmup_steps`` is not a whole number >= 0; if
            ``tx.init`` rejects the tree of trainable parameters, as
            ``optax.multi_transform``/``optax.masked`` do with a pytree of
            labels or masks built for another tree (also raised by
            :meth:`update` after a freeze change): pass a callable instead.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from flax import nnx
        >>> import flax_freeze as ff
        >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
        >>> opt = ff.Optimizer(model, optax.adam(0.1))
        >>> loss = lambda m: (m(jnp.ones((1, 2))) ** 2).sum()
        >>> _ = ff.freeze(model, ff.PathRegex("kernel"))
        >>> kernel = model.kernel[...]
        >>> _ = opt.update(model, ff.grad(loss)(model))
        >>> bool((model.kernel[...] == kernel).all()), sorted(opt.opt_state[0].mu.keys())
        (True, ['bias'])
    """

    def __init__(
        self,
        model: M,
        tx: Transform,
        *,
        wrt: Filter = Trainable,
        group_schedules: bool = False,
        warmup_steps: int = 0,
    ) -> None:
        """Builds optimizer state for the parameters ``wrt`` selects in ``model``."""
        if not isinstance(group_schedules, bool):
            raise TypeError(
                f"`group_schedules` must be True or False, got {_short(group_schedules)}."
            )
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(
                f"`warmup_steps` must be a whole number of steps >= 0, got "
                f"{_short(warmup_steps)}. Pass e.g. warmup_steps=100, or 0 for no warm-up."
            )
        if model is None or not is_node(model) or isinstance(model, Transform):
            raise TypeError(
                f"`model` must be an NNX module (or a list/dict of them), got {_short(model)}. "
                "Pass the model first and the optax transformation second: "
                "ff.Optimizer(model, optax.adamw(1e-3))."
            )
        if not isinstance(tx, optax.GradientTransformation | optax.MultiSteps):
            raise TypeError(
                f"`tx` must be an optax.GradientTransformation (or optax.MultiSteps), "
                f"got {_short(tx)}. Pass e.g. optax.adamw(1e-3)."
            )
        try:
            # nnx.Optimizer only calls tx.init/tx.update, which MultiSteps has too.
            super().__init__(model, tx, wrt=wrt, graph=True)  # pyright: ignore[reportArgumentType]
        except ValueError as err:
            clear = _labels_error(tx, nnx.state(model, cast(Any, wrt), graph=True), err)
            if clear is None:
                raise
            raise clear from err
        self.trained_paths = _paths(nnx.state(model, cast(Any, wrt), graph=True))
        self.group_schedules = group_schedules
        self.warmup_steps = warmup_steps
        #: The parameters trainable when the optimizer was built: they share the
        #: step counts of the optimizer state.
        self.initial_paths = self.trained_paths
        #: The trainable parameters that were not (sorted), and for each its own
        #: step count since it became trainable and its own values of the counts.
        self.own_paths: tuple[Path, ...] = ()
        self.own_counts = nnx.List([])

    def migrate(self, model: M) -> bool:
        """Brings the optimizer state in line with the parameters ``wrt`` selects now.

        :meth:`update` does this by itself in eager code and inside ``nnx.jit``
        in graph mode. Call it eagerly after ``freeze``/``unfreeze`` when the
        training step runs where new optimizer state cannot reach the caller:
        ``jax.jit`` or ``nnx.jit(graph=False)`` (tree mode), or a function built
        with ``nnx.cached_partial`` (rebuild that after migrating).

        Args:
            model: the module this optimizer was built for.

        Returns:
            Whether the state changed.

        Raises:
            ValueError: if ``tx`` cannot build state for the new trainable tree
                (labels or masks given as a pytree: pass a callable).
        """
        params = nnx.state(model, self.wrt, graph=True)
        paths = _paths(params)
        if paths == self.trained_paths:
            return False
        self._migrate(params, paths)
        return True

    def _count_keys(self, state: Any) -> list[Any]:
        return count_paths(state, self.group_schedules)

    def _migrate(self, params: nnx.State, paths: tuple[Path, ...]) -> None:
        kept = {p: c for p, c in zip(self.own_paths, self.own_counts, strict=True)}
        state = migrate_opt_state(self.tx, self.opt_state, params)
        initial = set(self.initial_paths)
        own = tuple(p for p in paths if p not in initial)
        counts = []
        if own:
            fresh = _leaves(_init(self.tx, params))
            zero = jnp.zeros((), jnp.int32)
            keys = self._count_keys(state)
            start = jnp.stack([zero, *(jnp.asarray(fresh[k], jnp.int32) for k in keys)])
            for path in own:  # each a buffer of its own: a step donates them one by one
                counts.append(kept[path] if path in kept else OptArray(jnp.array(start)))
        self.opt_state = nnx.data(state)
        self.trained_paths = paths
        self.own_paths = own
        self.own_counts = nnx.List(counts)

    def _counted_update(self, model: M, grads: Any, **kwargs: Any) -> Any:
        """``nnx.Optimizer.update`` with the own step counts of parameters trained since."""
        params = nnx.as_pure(nnx.state(model, self.wrt, graph=True))
        grad_arrays = nnx.as_pure(nnx.state(grads, self.wrt, graph=True))
        keys = self._count_keys(self.opt_state)
        own = {p: c for p, c in zip(self.own_paths, self.own_counts, strict=True)}
        variables = [own.get(tuple(jax_to_nnx_path(k))) for k in _leaves(params)]
        values = [v[...] if v is not None else None for v in variables]
        counts = [list(v[1:]) if v is not None else None for v in values]
        factors = [
            jnp.minimum(1.0, (v[0] + 1) / self.warmup_steps)
            if v is not None and self.warmup_steps > 0
            else None
            for v in values
        ]
        updates, new_state, new_counts = update_with_counts(
            self.tx, grad_arrays, nnx.as_pure(self.opt_state), params, counts, keys, factors,
            **kwargs,
        )  # fmt: skip
        nnx.update(model, optax.apply_updates(params, updates))
        nnx.update(self.opt_state, nnx.state(new_state, graph=True))
        for variable, value, new in zip(variables, values, new_counts, strict=True):
            if variable is not None and value is not None and new is not None:
                variable[...] = jnp.stack([value[0] + 1, *(jnp.asarray(c, jnp.int32) for c in new)])
        self.step[...] += 1
        return updates

    def update(self, model: M, grads: Any, /, **kwargs: Any) -> Any:
        """Applies ``grads`` to ``model``, first migrating state after a freeze change.

        Args:
            model: the module this optimizer was built for.
            grads: gradients of the trainable state, as :func:`grad` returns them.
            **kwargs: passed on to ``tx.update`` (``GradientTransformationExtraArgs``).

        Returns:
            The updates applied, as ``nnx.Optimizer.update`` returns them.

        Raises:
            ValueError: if ``grads`` do not cover exactly the trainable parameters,
                e.g. gradients computed before a freeze change; or if the trainable
                set changed and this trace cannot carry new state out (call
                :meth:`migrate` first); or if ``tx`` cannot build state for the new
                trainable tree (labels or masks given as a pytree: pass a callable).
        """
        params = nnx.state(model, self.wrt, graph=True)
        paths = _paths(params)
        if paths != self.trained_paths:
            if _tracing_without_graph_updates(params):
                raise ValueError(
                    "The trainable set of `model` changed since the optimizer state was "
                    "built, and this trace cannot carry new optimizer state out (tree mode: "
                    "jax.jit, nnx.jit(graph=False), nnx.cached_partial). Call "
                    "opt.migrate(model) eagerly after freeze/unfreeze, before the next step."
                )
            self._migrate(params, paths)
        grad_paths = _paths(nnx.state(grads, self.wrt, graph=True))
        if grad_paths != paths:
            extra = sorted(set(grad_paths) - set(paths), key=path_str)
            missing = sorted(set(paths) - set(grad_paths), key=path_str)
            raise ValueError(
                "`grads` do not match the model's trainable parameters: "
                f"not trainable: {[path_str(p) for p in extra][:8]}, "
                f"without a gradient: {[path_str(p) for p in missing][:8]}. "
                "Compute the gradients with ff.grad after the last freeze/unfreeze."
            )
        if self.own_paths:
            return self._counted_update(model, grads, **kwargs)
        return super().update(model, grads, **kwargs)


def apply_updates(tree: Any, updates: Any) -> Any:
    """Applies optax ``updates`` to a pytree, skipping the ``None`` entries.

    ``updates`` has the shape :func:`grad` returns for a pytree: a value at each
    trainable leaf and ``None`` at every other one (frozen values, integers,
    static data), which are returned unchanged. Like ``optax.apply_updates``,
    each result keeps its parameter's dtype. A frozen value is never changed:
    an update at an ``ff.FrozenParam`` is an error.

    Args:
        tree: the pytree of parameters.
        updates: the updates from ``tx.update``, mirroring ``tree`` with ``None``.

    Returns:
        A new tree of ``tree``'s structure with the updates added.

    Raises:
        ValueError: if ``updates`` does not mirror ``tree``, has a value at a
            frozen parameter, or one of another shape than its parameter.

    Example:
        >>> import flax_freeze as ff
        >>> tree = {"a": 1.0, "b": ff.FrozenParam(3.0), "n": 4}
        >>> new = ff.apply_updates(tree, {"a": 0.5, "b": None, "n": None})
        >>> float(new["a"]), new["b"] is tree["b"], new["n"]
        (1.5, True, 4)
    """

    def add(key_path: Any, update: Any, param: Any) -> Any:
        if isinstance(update, nnx.Variable):
            update = update.get_raw_value()
        if update is None:
            return param
        where = path_str(jax_to_nnx_path(key_path)) or "the root"
        if isinstance(param, FrozenParam):
            raise ValueError(
                f"`updates` has a value at {where!r}, which is frozen (ff.FrozenParam): frozen "
                "values are never updated. Compute the gradients with ff.grad, which gives "
                "None at frozen leaves, and pass them through tx.update."
            )
        value = param.get_raw_value() if isinstance(param, nnx.Variable) else param
        if np.shape(update) != np.shape(value):
            raise ValueError(
                f"`updates` at {where!r} has shape {np.shape(update)}, but the parameter has "
                f"shape {np.shape(value)}. Pass the updates tx.update returned for this tree."
            )
        new = jnp.asarray(value + update).astype(jnp.result_type(value))
        if isinstance(param, nnx.Variable):
            return type(param).from_metadata(new, param.get_metadata())
        return new

    def is_leaf(x: Any) -> bool:
        return x is None or isinstance(x, nnx.Variable)

    try:
        return jax.tree_util.tree_map_with_path(add, updates, tree, is_leaf=is_leaf)
    except (ValueError, TypeError) as err:
        if "`updates`" in str(err):
            raise
        structures = (jax.tree.structure(x, is_leaf=is_leaf) for x in (updates, tree))
        raise ValueError(
            "`updates` does not mirror `tree`: updates {}, tree {}. Pass the updates that "
            "tx.update returned for gradients from ff.grad(f)(tree): a value at each trainable "
            "leaf and None elsewhere.".format(*(_short(s, 300) for s in structures))
        ) from None
