"""Optimizer that follows freeze/unfreeze, and optimizer-state migration."""

from __future__ import annotations

from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.nnx import graphlib
from flax.nnx.training.optimizer import to_opt_state
from jax.core import Tracer

from ._filters import Path, path_str
from ._variables import Trainable

M = TypeVar("M")


def _paths(state: nnx.State) -> tuple[Path, ...]:
    return tuple(sorted((path for path, _ in nnx.to_flat_state(state)), key=path_str))


def carry_over(fresh: Any, old: Any) -> Any:
    """Returns ``fresh`` with every leaf that ``old`` also has taken from ``old``.

    Leaves match by key path, shape and dtype. ``fresh`` may hold ``nnx``
    variables (their values are replaced in place) or plain arrays; ``old``
    may hold either.
    """
    previous = dict(jax.tree_util.tree_flatten_with_path(nnx.as_pure(old))[0])

    def same_kind(a: Any, b: Any) -> bool:
        return getattr(a, "shape", None) == getattr(b, "shape", None) and getattr(
            a, "dtype", None
        ) == getattr(b, "dtype", None)

    def pick(key_path: Any, leaf: Any) -> Any:
        value = leaf.get_raw_value() if isinstance(leaf, nnx.Variable) else leaf
        if key_path not in previous or not same_kind(previous[key_path], value):
            return leaf
        if isinstance(leaf, nnx.Variable):
            leaf.set_raw_value(previous[key_path])
            return leaf
        return previous[key_path]

    return jax.tree_util.tree_map_with_path(
        pick, fresh, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def migrate_opt_state(tx: optax.GradientTransformation, old_state: Any, params: Any) -> Any:
    """Builds optimizer state for ``params``, reusing ``old_state`` wherever it fits.

    A fresh ``tx.init(params)`` gives the new structure. Every leaf whose key
    path (and shape and dtype) also exists in ``old_state`` takes the old value:
    moments of parameters that stayed trainable, shared step counts,
    injected hyperparameters. Leaves of newly trainable parameters keep their
    fresh initial value; state of parameters no longer trained is dropped.

    Args:
        tx: the optax transformation.
        old_state: the current optimizer state (``OptState`` variables, or a
            plain pytree).
        params: the parameters to be trained from now on: an ``nnx.State`` (the
            state comes back as ``OptState`` variables) or a plain pytree with
            ``None`` at frozen leaves (the state comes back as plain arrays).

    Returns:
        The new optimizer state.
    """
    fresh = tx.init(params)
    if isinstance(params, nnx.State):
        fresh = to_opt_state(fresh)
    return carry_over(fresh, old_state)


def _tracing_without_graph_updates(params: nnx.State) -> bool:
    """Whether new optimizer state made here would be lost: a trace with no NNX graph updates."""
    tracing = any(isinstance(x, Tracer) for x in jax.tree.leaves(params))
    return tracing and not graphlib.GRAPH_CONTEXT.update_context_stacks


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

    Shared step counts: transforms whose count is shared across parameters
    keep counting through a migration. A newly trainable parameter therefore
    meets the schedule at the current step (no warm-up of its own), and Adam's
    bias correction at the current count: with fresh zero moments and a large
    count its first update is about ``(1 - b1) / sqrt(1 - b2)`` times the
    learning rate per element (3.16 for the defaults) instead of 1. Wrap the
    unfrozen phase in a warm-up schedule, or build a new optimizer, where that
    matters.

    Args:
        model: the NNX module to optimize.
        tx: an optax transformation.
        wrt: NNX filter of the trained variables; defaults to :data:`Trainable`.

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

    def __init__(self, model: M, tx: optax.GradientTransformation, *, wrt: Any = Trainable) -> None:
        """Builds optimizer state for the parameters ``wrt`` selects in ``model``."""
        if not isinstance(tx, optax.GradientTransformation):
            raise TypeError(
                f"`tx` must be an optax.GradientTransformation, got {tx!r}. "
                "Pass e.g. optax.adamw(1e-3)."
            )
        super().__init__(model, tx, wrt=wrt, graph=True)
        self.trained_paths = _paths(nnx.state(model, wrt, graph=True))

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
        """
        params = nnx.state(model, self.wrt, graph=True)
        paths = _paths(params)
        if paths == self.trained_paths:
            return False
        self._migrate(params, paths)
        return True

    def _migrate(self, params: nnx.State, paths: tuple[Path, ...]) -> None:
        self.opt_state = nnx.data(migrate_opt_state(self.tx, self.opt_state, params))
        self.trained_paths = paths

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
                :meth:`migrate` first).
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
        return super().update(model, grads, **kwargs)


def apply_updates(tree: Any, updates: Any) -> Any:
    """Applies optax ``updates`` to a pytree, skipping the ``None`` entries.

    ``updates`` has the shape :func:`grad` returns for a pytree: a value at each
    trainable leaf and ``None`` at every other one (frozen values, integers,
    static data), which are returned unchanged. Like ``optax.apply_updates``,
    each result keeps its parameter's dtype.

    Args:
        tree: the pytree of parameters.
        updates: the updates from ``tx.update``, mirroring ``tree`` with ``None``.

    Returns:
        A new tree of ``tree``'s structure with the updates added.

    Example:
        >>> import flax_freeze as ff
        >>> tree = {"a": 1.0, "b": ff.FrozenParam(3.0), "n": 4}
        >>> new = ff.apply_updates(tree, {"a": 0.5, "b": None, "n": None})
        >>> float(new["a"]), new["b"] is tree["b"], new["n"]
        (1.5, True, 4)
    """

    def add(update: Any, param: Any) -> Any:
        if update is None:
            return param
        if isinstance(param, nnx.Variable):
            value = param.get_raw_value()
            new = jnp.asarray(value + update).astype(jnp.result_type(value))
            return type(param).from_metadata(new, param.get_metadata())
        return jnp.asarray(param + update).astype(jnp.result_type(param))

    def is_leaf(x: Any) -> bool:
        return x is None or isinstance(x, nnx.Variable)

    return jax.tree.map(
        lambda u, p: add(u.get_raw_value() if isinstance(u, nnx.Variable) else u, p),
        updates,
        tree,
        is_leaf=is_leaf,
    )
