"""Linen support: frozen initializers, freezing by path on variable dicts, a TrainState.

Linen state is a dict of collections (``{"params": ..., "batch_stats": ...}``). A
frozen Linen parameter is stored in a :class:`FrozenBox`, a
``flax.core.meta.AxisMetadata`` box: modules still see the plain array, and
``ff.grad``/:func:`grad` give it no gradient. On a variables dict only
``params`` is ever trained; ``batch_stats``, ``cache`` and the
``frozen_params`` collection (where ``nnx.bridge.ToLinen`` puts
``ff.FrozenParam`` variables) never are.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import flax.linen as nn
    >>> import flax_freeze as ff
    >>> from flax_freeze import linen as ffl
    >>> net = nn.Sequential([nn.Dense(4), nn.Dense(2)])
    >>> params = net.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    >>> params = ffl.freeze(params, ff.PathRegex("layers_0/.*"))
    >>> state = ffl.TrainState.create(apply_fn=net.apply, params=params, tx=optax.adam(0.1))
    >>> loss = lambda p: (state.apply_fn({"params": p}, jnp.ones((1, 3))) ** 2).sum()
    >>> grads = ff.grad(loss)(state.params)
    >>> grads["layers_0"]
    {'bias': None, 'kernel': None}
    >>> state = state.apply_gradients(grads=grads)
    >>> state = state.unfreeze(ff.PathRegex("layers_0/.*"))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import jax
from flax import nnx
from flax.core import meta
from flax.training import train_state

from ._boxes import PARAMS, FrozenBox, frozen, is_frozen_box, is_variables_dict, strip_frozen
from ._filters import PathRegex, matched_nothing, path_str
from ._grad import trainable_tree
from ._grad import value_and_grad as _ff_value_and_grad
from ._optimizer import apply_updates, migrate_opt_state
from ._retype import freeze as _ff_freeze
from ._retype import is_raw_trainable
from ._variables import FrozenParam

__all__ = [
    "FrozenBox",
    "TrainState",
    "freeze",
    "frozen",
    "grad",
    "to_nnx",
    "unfreeze",
    "value_and_grad",
]

Predicate = Callable[[tuple[Any, ...], Any], bool]


def _predicate(filter: Any) -> Predicate:
    if filter is None:
        return lambda path, x: True
    if isinstance(filter, str):
        filter = PathRegex(filter)
    if not callable(filter):
        raise TypeError(
            f"`filter` must be ff.PathRegex, a regex string or a callable "
            f"(path, value) -> bool, got {filter!r}."
        )
    return cast(Predicate, filter)


def _is_param_leaf(x: Any) -> bool:
    """A trainable or frozen Linen parameter: an inexact array, possibly boxed."""
    return (
        is_raw_trainable(meta.unbox(x))
        if isinstance(x, meta.AxisMetadata)
        else (is_raw_trainable(x))
    )


def _rebox(
    func: str, tree: Any, filter: Any, missing_ok: bool, change: Callable[[Any], Any]
) -> Any:
    """Applies ``change`` to the parameters of ``tree`` that ``filter`` selects."""
    pred = _predicate(filter)
    variables = is_variables_dict(tree)
    paths: list[tuple[Any, ...]] = []
    matched = False

    def visit(key_path: Any, x: Any) -> Any:
        nonlocal matched
        path = nnx.graphlib.jax_to_nnx_path(key_path)
        if variables and path[:1] != (PARAMS,):
            return x  # only params are ever boxed or unboxed
        if not _is_param_leaf(x):
            return x
        paths.append(path)
        if not pred(path, x):
            return x
        matched = True
        return change(x)

    out = jax.tree_util.tree_map_with_path(
        visit, tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata)
    )
    if not matched and not missing_ok:
        raise matched_nothing(func, filter, tree, sorted(paths, key=path_str))
    return out


def freeze(tree: Any, filter: Any = None, *, missing_ok: bool = False) -> Any:
    """Returns a new params or variables dict with the selected parameters frozen.

    Each selected parameter gets a :class:`FrozenBox` (no array is copied);
    already-frozen ones stay as they are. Other boxes (``nn.Partitioned``)
    are kept, inside the frozen box.

    Args:
        tree: a Linen params dict, or a whole variables dict (then paths start
            with ``params/`` and only ``params`` is touched).
        filter: :class:`flax_freeze.PathRegex` (or a regex string) over the
            ``'/'``-joined path in ``tree``, or a callable ``(path, value) -> bool``.
            Defaults to every parameter.
        missing_ok: allow a filter that selects no parameter.

    Returns:
        The new dict.

    Raises:
        ValueError: if ``filter`` selects no parameter and ``missing_ok`` is False.
        TypeError: if ``filter`` is not a filter.
    """

    def box(x: Any) -> Any:
        return x if is_frozen_box(x) else FrozenBox(x)

    return _rebox("freeze", tree, filter, missing_ok, box)


def unfreeze(tree: Any, filter: Any = None, *, missing_ok: bool = False) -> Any:
    """Returns a new params or variables dict with the selected parameters trainable.

    The :class:`FrozenBox` of each selected parameter is removed (other boxes
    stay). On a variables dict only ``params`` is touched: ``batch_stats``,
    ``cache`` and ``frozen_params`` never become trainable.

    Args:
        tree: a Linen params dict or a whole variables dict.
        filter: :class:`flax_freeze.PathRegex` (or a regex string) over the
            ``'/'``-joined path in ``tree``, or a callable ``(path, value) -> bool``.
            Defaults to every parameter.
        missing_ok: allow a filter that selects no parameter.

    Returns:
        The new dict.

    Raises:
        ValueError: if ``filter`` selects no parameter and ``missing_ok`` is False.
        TypeError: if ``filter`` is not a filter.
    """
    return _rebox("unfreeze", tree, filter, missing_ok, strip_frozen)


def _check_variables(args: tuple[Any, ...], nums: tuple[int, ...]) -> None:
    for i in nums:
        if i < len(args) and not is_variables_dict(args[i]):
            raise TypeError(
                f"`argnums` names argument {i}, which is not a Linen variables dict "
                f"(a mapping with a 'params' collection): got {type(args[i]).__name__}. "
                "For a params dict alone use ff.grad."
            )


def value_and_grad(
    f: Callable[..., Any], argnums: int | tuple[int, ...] = 0, *, has_aux: bool = False
) -> Callable[..., Any]:
    """Like :func:`grad`, returning ``(value, grads)``.

    Args:
        f: function of whole Linen variables dicts; returns a scalar (or
            ``(scalar, aux)``).
        argnums: position, or tuple of positions, of the variables dicts.
        has_aux: whether ``f`` returns ``(loss, aux)``.

    Returns:
        A function returning ``(loss, grads)`` or ``((loss, aux), grads)``.
    """
    wrt = PathRegex(f"{PARAMS}/.*")
    inner = _ff_value_and_grad(f, argnums, wrt=wrt, has_aux=has_aux)
    nums = (argnums,) if isinstance(argnums, int) else argnums

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _check_variables(args, tuple(nums))
        value, grads = inner(*args, **kwargs)
        if isinstance(argnums, int):
            return value, {PARAMS: grads[PARAMS]}
        return value, tuple({PARAMS: g[PARAMS]} for g in grads)

    return wrapper


def grad(
    f: Callable[..., Any], argnums: int | tuple[int, ...] = 0, *, has_aux: bool = False
) -> Callable[..., Any]:
    """Gradient with respect to the trainable ``params`` of whole Linen variables dicts.

    Only unboxed inexact leaves of the ``params`` collection are
    differentiated; frozen boxes, ``batch_stats``, ``cache``, ``frozen_params``
    and every other collection enter as constants and pass through untouched,
    so no gradient is ever built for them.

    Args:
        f: function of whole Linen variables dicts; returns a scalar (or
            ``(scalar, aux)``).
        argnums: position, or tuple of positions, of the variables dicts.
        has_aux: whether ``f`` returns ``(loss, aux)``.

    Returns:
        A function returning ``{"params": mirror}`` for each differentiated
        dict: the params dict with a gradient at each trainable leaf and
        ``None`` at frozen ones (``(grads, aux)`` with ``has_aux``).

    Raises:
        TypeError: if an argument named by ``argnums`` is not a variables dict.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import flax.linen as nn
        >>> import flax_freeze as ff
        >>> from flax_freeze import linen as ffl
        >>> variables = nn.Dense(2).init(jax.random.key(0), jnp.ones((1, 3)))
        >>> variables = ffl.freeze(variables, ff.PathRegex("params/kernel"))
        >>> g = ffl.grad(lambda v: nn.Dense(2).apply(v, jnp.ones((1, 3))).sum())(variables)
        >>> g["params"]["kernel"], g["params"]["bias"].tolist()
        (None, [1.0, 1.0])
    """
    inner = value_and_grad(f, argnums, has_aux=has_aux)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        value, grads = inner(*args, **kwargs)
        return (grads, value[1]) if has_aux else grads

    return wrapper


class TrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` that follows freezing.

    ``params`` keeps its frozen boxes, so ``apply_fn({"params": state.params})``
    works unchanged. Optimizer state exists only for trainable leaves;
    :meth:`freeze`/:meth:`unfreeze` migrate it (moments kept for parameters
    that stay trainable, fresh state for newly trainable ones, see
    ``ff.Optimizer`` for shared step counts). :meth:`apply_gradients` takes the
    ``None``-mirror gradients of ``ff.grad``/:func:`grad` and never moves a
    frozen parameter, weight decay included. No fields are added, so
    subclasses may add their own (``batch_stats: Any``) as in Flax's examples.
    """

    @classmethod
    def create(cls, *, apply_fn: Any, params: Any, tx: Any, **kwargs: Any) -> TrainState:
        """Creates a state with optimizer state for the trainable parameters only.

        Args:
            apply_fn: usually ``module.apply``.
            params: the (possibly partly frozen) params dict.
            tx: an optax transformation.
            **kwargs: further fields of a subclass, e.g. ``batch_stats``.

        Returns:
            The new state at step 0.
        """
        opt_state = tx.init(trainable_tree(params))
        return cls(
            step=0,
            apply_fn=apply_fn,
            params=params,
            tx=tx,
            opt_state=opt_state,
            **kwargs,
        )

    def apply_gradients(self, *, grads: Any, **kwargs: Any) -> TrainState:
        """One optimizer step; ``None`` entries (frozen leaves) are skipped.

        Args:
            grads: gradients mirroring ``params`` (``ff.grad`` on the params
                dict), or ``{"params": mirror}`` from :func:`grad`.
            **kwargs: other fields to replace, e.g. ``batch_stats``.

        Returns:
            The updated state.
        """
        if (
            isinstance(grads, Mapping)
            and set(grads) == {PARAMS}
            and not (isinstance(self.params, Mapping) and set(self.params) == {PARAMS})
        ):
            grads = grads[PARAMS]
        updates, new_opt_state = self.tx.update(grads, self.opt_state, trainable_tree(self.params))
        new_params = apply_updates(self.params, updates)
        return self.replace(
            step=self.step + 1, params=new_params, opt_state=new_opt_state, **kwargs
        )

    def _with_params(self, params: Any) -> TrainState:
        opt_state = migrate_opt_state(self.tx, self.opt_state, trainable_tree(params))
        return self.replace(params=params, opt_state=opt_state)

    def freeze(self, filter: Any = None, *, missing_ok: bool = False) -> TrainState:
        """Returns the state with the selected parameters frozen and optimizer state migrated.

        Args:
            filter: as for :func:`freeze`, over paths of the params dict.
            missing_ok: allow a filter that selects no parameter.

        Returns:
            The new state.
        """
        return self._with_params(freeze(self.params, filter, missing_ok=missing_ok))

    def unfreeze(self, filter: Any = None, *, missing_ok: bool = False) -> TrainState:
        """Returns the state with the selected parameters trainable and optimizer state migrated.

        Args:
            filter: as for :func:`unfreeze`, over paths of the params dict.
            missing_ok: allow a filter that selects no parameter.

        Returns:
            The new state.
        """
        return self._with_params(unfreeze(self.params, filter, missing_ok=missing_ok))


class _ToNNXWithFrozen(nnx.bridge.ToNNX):
    """``nnx.bridge.ToNNX`` whose frozen parameters reach Linen in ``params``.

    ``ToNNX`` files each variable under the Linen collection of its type, and
    ``ff.FrozenParam``'s is ``frozen_params``; the wrapped Linen module looks
    its parameters up in ``params``. For the length of a call, each frozen
    parameter is shown to Linen as an ``nnx.Param`` view of the same array
    (boxed again by ``FrozenBox``); the ``FrozenParam`` objects stay in place.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        swapped: list[tuple[Any, Any, Any, Any]] = []

        def show_as_params(container: Any, items: Any, set_item: Callable[..., None]) -> None:
            for key, value in items:
                if isinstance(value, FrozenParam):
                    view = nnx.Param.from_metadata(value.get_raw_value(), value.get_metadata())
                    set_item(container, key, view)
                    swapped.append((container, key, value, set_item))
                elif isinstance(value, dict):
                    show_as_params(value, list(value.items()), _set_dict_item)

        attrs = [
            (k, v) for k, v in vars(self).items() if not k.startswith(("to_nnx__", "_pytree__"))
        ]
        show_as_params(self, attrs, setattr)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            for container, key, frozen, set_item in reversed(swapped):
                set_item(container, key, frozen)


def _set_dict_item(container: dict[Any, Any], key: Any, value: Any) -> None:
    container[key] = value


def _from_frozen_box(path: tuple[Any, ...], v: Any) -> bool:
    del path
    return isinstance(v, nnx.Param) and v.get_metadata().get("linen_meta_type") is FrozenBox


def to_nnx(node: Any) -> Any:
    """Re-types the parameters that came from Linen frozen boxes as ``ff.FrozenParam``.

    ``nnx.bridge.ToNNX`` turns a boxed Linen parameter into an ``nnx.Param``
    that remembers its box type in the ``linen_meta_type`` metadata entry.
    Call this after lazy initialisation to freeze exactly those, in place.
    Every ``ToNNX`` wrapper in ``node`` keeps working: it hands its frozen
    parameters to the Linen module in the ``params`` collection.

    Args:
        node: an NNX module, e.g. ``nnx.bridge.ToNNX(...)`` after ``lazy_init``,
            or a module holding such wrappers.

    Returns:
        ``node``, with every parameter boxed by :class:`FrozenBox` now frozen.

    Example:
        >>> import jax.numpy as jnp
        >>> import flax.linen as nn
        >>> from flax import nnx
        >>> from flax_freeze import linen as ffl
        >>> dense = nn.Dense(2, kernel_init=ffl.frozen(nn.initializers.lecun_normal()))
        >>> model = nnx.bridge.ToNNX(dense, rngs=nnx.Rngs(0))
        >>> model = nnx.bridge.lazy_init(model, jnp.ones((1, 3)))
        >>> model = ffl.to_nnx(model)
        >>> type(model.kernel).__name__, type(model.bias).__name__
        ('FrozenParam', 'Param')
        >>> model(jnp.ones((1, 3))).shape
        (1, 2)
    """
    for _, x in nnx.iter_graph(node, graph=True):
        if type(x) is nnx.bridge.ToNNX:
            x.__class__ = _ToNNXWithFrozen
    return _ff_freeze(node, _from_frozen_box, missing_ok=True)
