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
import numpy as np
from flax import linen, nnx
from flax.core import meta
from flax.nnx import filterlib
from flax.training import train_state

from ._boxes import PARAMS, FrozenBox, frozen, is_frozen_box, is_variables_dict, strip_frozen
from ._bridge import bridge_variables, from_frozen_box, make_aware
from ._filters import (
    Filter,
    PathRegex,
    check_arity,
    is_nothing,
    listing,
    matched_nothing,
    path_str,
    short_repr,
)
from ._grad import grad_general, trainable_tree
from ._nnx_compat import is_graph_node, jax_to_nnx_path
from ._optimizer import apply_updates, migrate_opt_state
from ._retype import freeze as _ff_freeze
from ._retype import is_raw_trainable
from ._variables import Trainable

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


def _selects_by_type(filter: Any) -> bool:
    """Whether an NNX filter looks at variable types or tags, which Linen arrays lack."""
    if isinstance(filter, type) or filter is Trainable:
        return True
    if isinstance(filter, filterlib.OfType | filterlib.WithTag):
        return True
    if isinstance(filter, filterlib.Any | filterlib.All):
        return any(_selects_by_type(p) for p in filter.predicates)
    if isinstance(filter, filterlib.Not):
        return _selects_by_type(filter.predicate)
    return False


def _predicate(filter: Any) -> Predicate:
    if filter is None:
        return lambda path, x: True
    if isinstance(filter, str):
        filter = PathRegex(filter)
    if _selects_by_type(filter):
        raise TypeError(
            f"`filter` {short_repr(filter)} is an NNX filter that selects variables by type "
            "or tag, but Linen params are plain arrays (frozen ones in ffl.FrozenBox), so "
            "it cannot select them. Select Linen parameters by path: "
            "ff.PathRegex('Dense_0/.*'), a regex string such as 'Dense_0/.*', or a "
            "callable (path, value) -> bool."
        )
    if not callable(filter):
        raise TypeError(
            f"`filter` must be ff.PathRegex, a regex string or a callable "
            f"(path, value) -> bool, got {short_repr(filter)}."
        )
    check_arity(filter, "filter", "value")
    return cast(Predicate, filter)


def _check_tree(func: str, tree: Any) -> None:
    """Raises a clear error for a ``tree`` that is not a Linen params or variables dict."""
    if isinstance(tree, Mapping):
        return
    if isinstance(tree, train_state.TrainState):
        hint = (
            f"For a TrainState call state.{func}(filter), which also migrates the optimizer state."
        )
    elif is_graph_node(tree) or isinstance(tree, nnx.Variable):
        hint = f"For NNX modules use ff.{func}(model, filter)."
    elif isinstance(tree, linen.Module):
        hint = "A Linen module holds no parameters: pass module.init(key, x)['params']."
    else:
        hint = "Pass module.init(key, x)['params'] or the whole variables dict."
    raise TypeError(
        f"`tree` passed to ffl.{func}() must be a Linen params or variables dict, got "
        f"{short_repr(tree)}. {hint}"
    )


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
    _check_tree(func, tree)
    if is_nothing(filter):
        return tree
    pred = _predicate(filter)
    variables = is_variables_dict(tree)
    paths: list[tuple[Any, ...]] = []
    matched = False

    def visit(key_path: Any, x: Any) -> Any:
        nonlocal matched
        path = jax_to_nnx_path(key_path)
        if isinstance(x, nnx.Variable) or is_graph_node(x):
            raise TypeError(
                f"`tree` passed to ffl.{func}() holds an NNX {type(x).__name__} at "
                f"{path_str(path) or '(root)'}: ffl.{func} works on Linen params dicts. "
                f"For NNX modules and variables use ff.{func}(node, filter)."
            )
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
        visit,
        tree,
        is_leaf=lambda x: isinstance(x, meta.AxisMetadata | nnx.Variable) or is_graph_node(x),
    )
    if not matched and not missing_ok:
        raise matched_nothing(f"ffl.{func}", filter, tree, sorted(paths, key=path_str))
    return out


def freeze(tree: Any, filter: Filter = None, *, missing_ok: bool = False) -> Any:
    """Returns a new params or variables dict with the selected parameters frozen.

    Each selected parameter gets a :class:`FrozenBox` (no array is copied);
    already-frozen ones stay as they are. Other boxes (``nn.Partitioned``)
    are kept, inside the frozen box.

    Args:
        tree: a Linen params dict, or a whole variables dict (then paths start
            with ``params/`` and only ``params`` is touched).
        filter: :class:`flax_freeze.PathRegex` (or a plain string, which means
            the same, as in ``ff.freeze``) over the ``'/'``-joined path in
            ``tree``, or a callable ``(path, value) -> bool``. Defaults to every
            parameter; ``nnx.Nothing`` selects nothing and returns ``tree`` itself.
        missing_ok: allow a filter that selects no parameter.

    Returns:
        The new dict.

    Raises:
        ValueError: if ``filter`` selects no parameter and ``missing_ok`` is False.
        TypeError: if ``filter`` is not a path filter (an NNX type filter such as
            ``nnx.Param`` or ``ff.Trainable`` cannot select plain Linen arrays), or
            ``tree`` is not a Linen dict (an NNX module: use ``ff.freeze``; a
            ``TrainState``: use its ``freeze`` method).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import flax.linen as nn
        >>> from flax_freeze import linen as ffl
        >>> params = nn.Dense(2).init(jax.random.key(0), jnp.ones((1, 3)))["params"]
        >>> type(ffl.freeze(params, "kernel")["kernel"]).__name__
        'FrozenBox'
    """

    def box(x: Any) -> Any:
        return x if is_frozen_box(x) else FrozenBox(x)

    return _rebox("freeze", tree, filter, missing_ok, box)


def unfreeze(tree: Any, filter: Filter = None, *, missing_ok: bool = False) -> Any:
    """Returns a new params or variables dict with the selected parameters trainable.

    The :class:`FrozenBox` of each selected parameter is removed (other boxes
    stay). On a variables dict only ``params`` is touched: ``batch_stats``,
    ``cache`` and ``frozen_params`` never become trainable.

    Args:
        tree: a Linen params dict or a whole variables dict.
        filter: :class:`flax_freeze.PathRegex` (or a plain string, which means
            the same, as in ``ff.freeze``) over the ``'/'``-joined path in
            ``tree``, or a callable ``(path, value) -> bool``. Defaults to every
            parameter; ``nnx.Nothing`` selects nothing and returns ``tree`` itself.
        missing_ok: allow a filter that selects no parameter.

    Returns:
        The new dict.

    Raises:
        ValueError: if ``filter`` selects no parameter and ``missing_ok`` is False.
        TypeError: if ``filter`` is not a path filter or ``tree`` is not a Linen
            dict, as for :func:`freeze`.
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

    Raises:
        TypeError: as for :func:`grad`.
        ValueError: if ``argnums`` names a position the call did not pass.
    """
    wrt = PathRegex(f"{PARAMS}/.*")
    # A fully frozen params collection is a legitimate empty selection here.
    inner = grad_general(f, argnums, wrt, has_aux, return_value=True, require_match=False)
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
        TypeError: if ``f`` is not callable, ``argnums`` or ``has_aux`` is
            malformed, an argument named by ``argnums`` is not a variables dict, or
            ``f`` returns a tuple without ``has_aux`` (or no pair with it).
        ValueError: if ``argnums`` names a position the call did not pass.

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


#: Linen collections other than ``params``: a "params" dict holding one of these
#: beside ``params`` is a whole variables dict passed by mistake.
_OTHER_COLLECTIONS = frozenset(
    {"batch_stats", "cache", "intermediates", "frozen_params", "perturbations", "losses"}
)


def _check_tx(tx: Any) -> None:
    if callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None)):
        return
    hint = " Call the factory: optax.adam(1e-3), not optax.adam." if callable(tx) else ""
    raise TypeError(
        f"`tx` must be an optax GradientTransformation such as optax.adam(1e-3), "
        f"got {short_repr(tx)}.{hint}"
    )


def _check_params(params: Any) -> None:
    if is_graph_node(params) or isinstance(params, nnx.Variable):
        raise TypeError(
            f"`params` is an NNX {type(params).__name__}; ffl.TrainState holds Linen "
            "params dicts. For NNX models use ff.Optimizer(model, tx)."
        )
    if params is None or isinstance(params, linen.Module | train_state.TrainState):
        raise TypeError(
            f"`params` must be a Linen params dict, got {short_repr(params)}. Pass "
            "module.init(key, x)['params']."
        )
    if is_variables_dict(params) and _OTHER_COLLECTIONS & set(params):
        raise ValueError(
            f"`params` looks like a whole variables dict (collections "
            f"{sorted(map(str, params))}): only the params collection is trained. Pass "
            "variables['params'], and keep the other collections in a field of a subclass "
            "(batch_stats: Any), as in Flax's examples."
        )


def _flat(tree: Any) -> dict[str, Any]:
    """``'/'``-joined path -> leaf, stopping at ``None`` and at Linen boxes."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: x is None or isinstance(x, meta.AxisMetadata)
    )
    return {path_str(jax_to_nnx_path(kp)): v for kp, v in leaves}


_MISSING = object()


def _lookup(flat: dict[str, Any], path: str) -> Any:
    """The entry at ``path``, or at the nearest ancestor that is a leaf (``None``)."""
    parts = path.split("/")
    for end in range(len(parts), 0, -1):
        found = flat.get("/".join(parts[:end]), _MISSING)
        if found is not _MISSING:
            return found
    return _MISSING


def _shape_changes(grads: Any, expected: Any) -> list[str]:
    """Paths where a gradient's shape differs from its parameter's (same structures)."""
    flat_g, flat_e = _flat(grads), _flat(expected)
    bad = []
    for path, e in flat_e.items():
        g = flat_g.get(path)
        if e is None or g is None:
            continue
        g_shapes = [np.shape(x) for x in jax.tree.leaves(g)]
        e_shapes = [np.shape(x) for x in jax.tree.leaves(e)]
        if g_shapes != e_shapes:
            got = g_shapes[0] if len(g_shapes) == 1 else g_shapes
            want = e_shapes[0] if len(e_shapes) == 1 else e_shapes
            bad.append(f"{path or '(root)'} (gradient {got}, parameter {want})")
    return bad


def _grads_error(params: Any, grads: Any, expected: Any) -> Exception | None:
    """What is wrong with ``grads`` for ``params`` (``expected``: their trainable tree)."""
    if grads is None or isinstance(grads, nnx.State) or is_graph_node(grads):
        return TypeError(
            f"`grads` must mirror the Linen params dict, got {short_repr(grads)}. Compute "
            "them with ff.grad(loss)(state.params) (or ffl.grad on a variables dict)."
        )
    same = jax.tree.structure(grads) == jax.tree.structure(expected)
    if same:
        # The common case: a cheap per-leaf shape check, nothing more.
        g_leaves, e_leaves = jax.tree.leaves(grads), jax.tree.leaves(expected)
        if all(np.shape(g) == np.shape(e) for g, e in zip(g_leaves, e_leaves, strict=True)):
            return None
        bad = _shape_changes(grads, expected)
        return ValueError(
            f"`grads` has the wrong shape at {listing(bad)}: each gradient must have its "
            "parameter's shape. Compute them with ff.grad(loss)(state.params)."
        )
    if is_variables_dict(grads) and not is_variables_dict(params):
        return ValueError(
            f"`grads` is the gradient of a whole variables dict (collections "
            f"{sorted(map(str, grads))}): pass grads['params'], or use ffl.grad, which "
            "differentiates only params."
        )
    flat_g, flat_e, flat_p = _flat(grads), _flat(expected), _flat(params)
    at_frozen, no_grad, missing = [], [], []
    for path, e in flat_e.items():
        g = _lookup(flat_g, path)
        if g is _MISSING:
            missing.append(path)
        elif e is None and g is not None:
            at_frozen.append(path)
        elif e is not None and g is None:
            no_grad.append(path)
    unexpected = [path for path in flat_g if _lookup(flat_e, path) is _MISSING]
    parts = []
    if at_frozen:
        frozen = all(is_frozen_box(flat_p.get(p)) for p in at_frozen)
        what = "frozen parameter(s)" if frozen else "parameter(s) that are not trained"
        parts.append(
            f"`grads` has a gradient at {what} {listing(at_frozen)}: use ff.grad / ffl.grad, "
            "which returns None at frozen leaves (jax.grad differentiates frozen parameters "
            "too). Gradients computed before state.freeze(...) must be computed again."
        )
    if no_grad:
        parts.append(
            f"`grads` has no gradient (None) at trainable parameter(s) {listing(no_grad)}: "
            "were they computed before state.unfreeze(...)? Compute them again from the "
            "current state.params."
        )
    if missing or unexpected:
        found = [f"missing {listing(missing)}"] if missing else []
        found += [f"unexpected {listing(unexpected)}"] if unexpected else []
        parts.append(
            f"`grads` does not mirror the params: {', '.join(found)}. Pass the gradients "
            "of state.params, e.g. ff.grad(loss)(state.params)."
        )
    if not parts:
        parts.append(
            "`grads` does not have the pytree structure of the trainable params (container "
            "types differ, e.g. FrozenDict against dict). Compute them with "
            "ff.grad(loss)(state.params)."
        )
    return ValueError(" ".join(parts))


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

        Raises:
            TypeError: if ``tx`` is not an optax transformation (``optax.adam``
                not called, a learning rate), or ``params`` is not a Linen params
                dict (``None``, an NNX module: use ``ff.Optimizer``).
            ValueError: if ``params`` is a whole variables dict with other
                collections (``batch_stats``): pass ``variables["params"]``.
        """
        _check_tx(tx)
        _check_params(params)
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

        ``grads`` is checked against ``params`` first (its structure, and each
        gradient's shape: cheap, and done once per trace under ``jax.jit``).

        Args:
            grads: gradients mirroring ``params`` (``ff.grad`` on the params
                dict), or ``{"params": mirror}`` from :func:`grad`.
            **kwargs: other fields to replace, e.g. ``batch_stats``.

        Returns:
            The updated state.

        Raises:
            ValueError: if ``grads`` has a gradient at a frozen parameter (full
                ``jax.grad`` gradients, or gradients computed before
                :meth:`freeze`), ``None`` at a trainable one (computed before
                :meth:`unfreeze`), other paths or shapes than ``params``, or if
                ``opt_state`` was made for another set of trainable parameters
                (``params`` re-frozen with ``replace`` instead of :meth:`freeze`).
            TypeError: if ``grads`` is not a pytree of gradients (``None``, an
                ``nnx.State``).
        """
        if (
            isinstance(grads, Mapping)
            and set(grads) == {PARAMS}
            and not (isinstance(self.params, Mapping) and set(self.params) == {PARAMS})
        ):
            grads = grads[PARAMS]
        expected = trainable_tree(self.params)
        error = _grads_error(self.params, grads, expected)
        if error is not None:
            raise error
        try:
            updates, new_opt_state = self.tx.update(grads, self.opt_state, expected)
        except (TypeError, ValueError) as err:
            stale = _stale_opt_state(self.tx, self.opt_state, expected)
            if stale is None:
                raise
            raise stale from err
        new_params = apply_updates(self.params, updates)
        return self.replace(
            step=self.step + 1, params=new_params, opt_state=new_opt_state, **kwargs
        )

    def _with_params(self, params: Any) -> TrainState:
        opt_state = migrate_opt_state(
            self.tx, self.opt_state, trainable_tree(params), old_params=trainable_tree(self.params)
        )
        return self.replace(params=params, opt_state=opt_state)

    def freeze(self, filter: Filter = None, *, missing_ok: bool = False) -> TrainState:
        """Returns the state with the selected parameters frozen and optimizer state migrated.

        Args:
            filter: as for :func:`freeze`, over paths of the params dict.
            missing_ok: allow a filter that selects no parameter.

        Returns:
            The new state.

        Raises:
            ValueError: if ``filter`` selects no parameter and ``missing_ok`` is False.
            TypeError: if ``filter`` is not a path filter, as for :func:`freeze`.
        """
        return self._with_params(freeze(self.params, filter, missing_ok=missing_ok))

    def unfreeze(self, filter: Filter = None, *, missing_ok: bool = False) -> TrainState:
        """Returns the state with the selected parameters trainable and optimizer state migrated.

        Args:
            filter: as for :func:`unfreeze`, over paths of the params dict.
            missing_ok: allow a filter that selects no parameter.

        Returns:
            The new state.

        Raises:
            ValueError: if ``filter`` selects no parameter and ``missing_ok`` is False.
            TypeError: if ``filter`` is not a path filter, as for :func:`unfreeze`.
        """
        return self._with_params(unfreeze(self.params, filter, missing_ok=missing_ok))


def _stale_opt_state(tx: Any, opt_state: Any, expected: Any) -> ValueError | None:
    """The error for an ``opt_state`` made for another set of trainable parameters."""
    try:
        fresh = jax.eval_shape(tx.init, expected)
    except Exception:  # the optimizer cannot say: keep the original error
        return None
    if jax.tree.structure(fresh) == jax.tree.structure(opt_state):
        return None
    return ValueError(
        "`opt_state` does not match the trainable parameters: it was made for another set "
        "of trainable parameters. Change which parameters are frozen with "
        "state.freeze(...) / state.unfreeze(...), which migrate the optimizer state, not "
        "with state.replace(params=ffl.freeze(...))."
    )


def to_nnx(node: Any) -> Any:
    """Re-types the parameters that came from Linen frozen boxes as ``ff.FrozenParam``.

    ``nnx.bridge.ToNNX`` turns a boxed Linen parameter into an ``nnx.Param``
    that remembers its box type in the ``linen_meta_type`` metadata entry.
    Call this after lazy initialisation to freeze exactly those, in place;
    called before ``lazy_init``, the wrappers freeze them as they create them.

    Nothing else is needed for a bridged model to keep working: ``ff.freeze``,
    ``ff.unfreeze``, ``ff.freezing`` and ``ff.checkpoint.restore`` give each
    ``ToNNX`` wrapper they put a frozen parameter in a class that hands it to
    the Linen module in the ``params`` collection (see the bridge guide).

    Args:
        node: an NNX module, e.g. ``nnx.bridge.ToNNX(...)`` after ``lazy_init``,
            or a module holding such wrappers.

    Returns:
        ``node``, with every parameter boxed by :class:`FrozenBox` now frozen.

    Raises:
        TypeError: if ``node`` holds no NNX module (a Linen module or params
            dict: wrap the module in ``nnx.bridge.ToNNX`` first).
        ValueError: if called inside a JAX transformation on a wrapper whose
            class has to change (call it eagerly).

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
    if isinstance(node, linen.Module) or not any(
        is_graph_node(x) for _, x in nnx.iter_graph(node, graph=True)
    ):
        raise TypeError(
            f"`node` must be an NNX module holding nnx.bridge.ToNNX wrappers, got "
            f"{short_repr(node)}. Wrap a Linen module first: model = "
            "nnx.bridge.ToNNX(module, rngs=nnx.Rngs(0)); nnx.bridge.lazy_init(model, x); "
            "then ffl.to_nnx(model)."
        )
    for path, x in nnx.iter_graph(node, graph=True):
        if isinstance(x, nnx.bridge.ToNNX) and not list(bridge_variables(x)):
            make_aware(x, path)  # not initialised yet: freeze as lazy_init creates
    return _ff_freeze(node, lambda _path, v: from_frozen_box(v), missing_ok=True)
