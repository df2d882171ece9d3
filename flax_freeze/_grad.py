"""grad / value_and_grad that differentiate only the trainable state."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx

from ._boxes import is_frozen_marker
from ._filters import (
    Filter,
    Path,
    Predicate,
    listing,
    matched_nothing,
    path_str,
    short_repr,
    string_filter_advice,
    to_predicate,
)
from ._nnx_compat import is_graph_node, jax_to_nnx_path, varying_axes
from ._part import reading_varying
from ._retype import collect, is_raw_trainable, selects_leaf
from ._variables import FrozenParam, Trainable, is_any_param, unregistered_hint


class _Leaf(nnx.Param):
    """A bare trainable pytree leaf, wrapped as a parameter for one ``grad`` call."""


def _is_stop(x: Any) -> bool:
    """Leaves of a pytree walk: variables, NNX graph nodes and frozen markers.

    Frozen markers are Linen frozen boxes and other libraries' frozen wrappers
    (``paramax.NonTrainable``): nothing inside them is differentiated.
    """
    return isinstance(x, nnx.Variable) or is_graph_node(x) or is_frozen_marker(x)


def _wrap_leaves(tree: Any, pred: Predicate) -> Any:
    """Wraps the bare trainable leaves of a pytree that ``pred`` selects as ``_Leaf``."""

    def wrap(key_path: Any, x: Any) -> Any:
        if _is_stop(x) or not is_raw_trainable(x):
            return x
        if not selects_leaf(pred, jax_to_nnx_path(key_path), x):
            return x
        return _Leaf(jnp.asarray(x))

    return jax.tree_util.tree_map_with_path(wrap, tree, is_leaf=_is_stop)


def _unwrap_leaves(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: x.get_raw_value() if isinstance(x, _Leaf) else x, tree, is_leaf=_is_stop
    )


def _substate(state: Any, path: Path) -> Any:
    for key in path:
        if not isinstance(state, nnx.State) or key not in state:
            return nnx.State({})
        state = state[key]
    return state


def _mirror(tree: Any, state: nnx.State) -> Any:
    """The pytree ``tree`` with the entries of ``state`` at its trainable leaves, None elsewhere.

    ``state`` is keyed by the NNX paths of ``tree``: a bare leaf gets its raw
    value, a trainable variable the variable, an NNX module its sub-state.
    """

    def entry(key_path: Any, x: Any) -> Any:
        path = jax_to_nnx_path(key_path)
        if isinstance(x, nnx.Variable):
            found = _substate(state, path)
            if not isinstance(found, nnx.Variable):
                return None
            return found.get_raw_value() if isinstance(x, _Leaf) else found
        if is_graph_node(x):
            return _substate(state, path)
        return None

    return jax.tree_util.tree_map_with_path(entry, tree, is_leaf=_is_stop)


def _check_argnums(argnums: Any) -> tuple[int, ...]:
    nums = (argnums,) if isinstance(argnums, int) and not isinstance(argnums, bool) else argnums
    if (
        not isinstance(nums, tuple)
        or not nums
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in nums)
    ):
        hint = ""
        if is_graph_node(argnums) or isinstance(argnums, jax.Array | dict):
            hint = " The arguments go to the returned function: ff.grad(loss_fn)(model, x)."
        raise TypeError(
            "`argnums` must be a non-negative int or a non-empty tuple of them, got "
            f"{short_repr(argnums)}.{hint}"
        )
    if len(set(nums)) != len(nums):
        raise ValueError(f"`argnums` {argnums!r} repeats a position; name each position once.")
    return nums


def _check_f(f: Any, has_aux: Any) -> None:
    if not callable(f):
        raise TypeError(
            f"`f` must be the function to differentiate, got {short_repr(f)}. Pass the "
            "function first and the arguments to the result: ff.grad(loss_fn)(model, x)."
        )
    if not isinstance(has_aux, bool | np.bool_):
        raise TypeError(f"`has_aux` must be True or False, got {short_repr(has_aux)}.")


def _describe(out: Any) -> str:
    if isinstance(out, tuple):
        return f"a tuple of length {len(out)}"
    shape = getattr(out, "shape", None)
    if shape is not None:
        return f"an array of shape {tuple(shape)}"
    return f"a {type(out).__name__}"


def _split_output(out: Any, has_aux: bool) -> tuple[Any, Any]:
    """``(loss, aux)`` from what ``f`` returned, with clear errors for a has_aux mismatch."""
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                "With `has_aux=True`, `f` must return a pair (loss, aux), but it returned "
                f"{_describe(out)}. Return (loss, aux), or pass has_aux=False."
            )
        return out
    if isinstance(out, tuple):
        raise TypeError(
            f"`f` returned {_describe(out)}, not a scalar loss. If it returns "
            "(loss, aux), pass has_aux=True."
        )
    return out, None


def _not_differentiable(diff: nnx.State) -> list[str]:
    """Paths (within their argument) of the selected values that have no gradient."""
    bad = []
    for path, value in nnx.to_flat_state(diff):
        raw = value.get_raw_value() if isinstance(value, nnx.Variable) else value
        if not is_raw_trainable(raw):
            kind = getattr(raw, "dtype", None) or type(raw).__name__
            bad.append(f"{path_str(path[2:]) or '(argument)'} ({kind})")
    return bad


def _selected_nothing(
    func: str, wrt: Any, args: tuple[Any, ...], nums: tuple[int, ...]
) -> ValueError:
    """The error for an explicit ``wrt`` that selects nothing in the differentiated arguments."""
    paths: list[Path] = []
    variables: list[nnx.Variable] = []
    for i in nums:
        sites, raw = collect(args[i])
        variables += [s.variable for s in sites.values()]
        params = [s for s in sites.values() if is_any_param(s.variable)]
        prefix = (i,) if len(nums) > 1 else ()
        paths += [(*prefix, *s.paths[0]) for s in params] + [(*prefix, *p) for p in raw]
    advice = string_filter_advice(wrt) or (unregistered_hint(variables) if not paths else "")
    return matched_nothing(
        func,
        wrt,
        args[nums[0]] if len(nums) == 1 else tuple(args[i] for i in nums),
        sorted(paths, key=str),
        argname="wrt",
        advice=advice,
        escape="",
    )


def _check_some_parameter(args: tuple[Any, ...], nums: tuple[int, ...]) -> None:
    """Raises when the differentiated arguments hold no parameter but look as if they did.

    That is: no ``nnx.Param``, registered type, ``FrozenParam`` or bare
    trainable leaf, but variables of another library's types holding floats
    (GPJax's ``PositiveReal`` before ``ff.register_param_type``). An empty
    gradient there would be a silent wrong result.
    """
    for i in nums:
        sites, raw = collect(args[i])
        variables = [s.variable for s in sites.values()]
        if raw or any(is_any_param(v) for v in variables):
            continue
        hint = unregistered_hint(variables)
        if hint:
            raise ValueError(
                f"`argnums` names argument {i}, a {type(args[i]).__name__}, which holds no "
                f"parameter (nnx.Param or ff.FrozenParam), so ff.grad would return no "
                f"gradient at all. {hint}"
            )


def _variables_by_path(tree: Any) -> dict[Path, nnx.Variable]:
    return {path: x for path, x in nnx.iter_graph(tree, graph=True) if isinstance(x, nnx.Variable)}


def grad_general(
    f: Callable[..., Any],
    argnums: Any,
    wrt: Any,
    has_aux: bool,
    return_value: bool,
    *,
    require_match: bool | None = None,
) -> Callable[..., Any]:
    """``grad``/``value_and_grad``; ``require_match``: an empty selection raises.

    By default it does when the user chose ``wrt`` (a typo selects nothing).
    """
    if require_match is None:
        require_match = wrt is not Trainable
    _check_f(f, has_aux)
    nums = _check_argnums(argnums)
    pred = to_predicate(wrt, "wrt")
    diff_positions = frozenset(nums)
    func = "value_and_grad" if return_value else "grad"

    def is_diff(path: Path, x: Any) -> bool:
        # Paths of the split ``(args, kwargs)`` pair start with (0, position).
        return isinstance(x, _Leaf) or (
            isinstance(x, nnx.Variable)
            and len(path) >= 2
            and path[0] == 0
            and path[1] in diff_positions
            and pred(path[2:], x)
        )

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if max(nums) >= len(args):
            raise ValueError(
                f"`argnums` {argnums!r} names positional argument {max(nums)}, but "
                f"{getattr(f, '__name__', 'the function')} was called with {len(args)} "
                "positional arguments. Pass the differentiated values positionally."
            )
        for i in nums:
            if isinstance(args[i], linen.Module):
                raise TypeError(
                    f"Argument {i} (named by `argnums`) is a Linen module, which holds no "
                    "parameters: differentiate its params dict instead, e.g. "
                    "ff.grad(loss)(variables['params']) or ffl.grad(loss)(variables)."
                )
        pytree_positions = [i for i in nums if not is_graph_node(args[i])]
        originals = args
        # Bare trainable leaves of pytree arguments are wrapped as parameters for the split.
        args = tuple(
            _wrap_leaves(a, pred) if i in pytree_positions else a for i, a in enumerate(args)
        )
        graphdef, diff, rest = nnx.split((args, kwargs), is_diff, ..., graph=True)
        if not diff:
            if require_match:
                raise _selected_nothing(func, wrt, originals, nums)
            _check_some_parameter(originals, nums)
        written: list[Path] = []
        # Under shard_map, partly frozen arrays are read as varying where the batch does.
        axes = frozenset().union(*map(varying_axes, jax.tree.leaves(rest)))

        def pure(diff: nnx.State, rest: nnx.State) -> tuple[Any, tuple[Any, list[Any]]]:
            inner = nnx.merge(graphdef, diff, rest, copy=True)
            variables = list(_variables_by_path(inner).items())
            before = [v.get_raw_value() for _, v in variables]
            inner_args = list(inner[0])
            for i in pytree_positions:
                inner_args[i] = _unwrap_leaves(inner_args[i])
            with reading_varying(axes):
                loss, aux = _split_output(f(*inner_args, **inner[1]), has_aux)
            # State the function wrote (batch statistics, counters) goes out through aux.
            written.clear()
            values = []
            for (path, variable), old in zip(variables, before, strict=True):
                if variable.get_raw_value() is not old:
                    written.append(path)
                    values.append(variable.get_raw_value())
            return loss, (aux, values)

        try:
            (loss, (aux, values)), grads = jax.value_and_grad(pure, has_aux=True)(diff, rest)
        except TypeError as err:
            # JAX checks its inputs before calling ``f``: name the offending variables.
            bad = _not_differentiable(diff)
            if not bad:
                raise
            raise TypeError(
                f"`wrt` selected value(s) that have no gradient: {listing(bad)}. Only "
                "inexact (floating or complex) arrays are differentiated: freeze these "
                "(ff.freeze(model, ff.PathRegex(...))), hold them in a non-Param variable "
                "(nnx.Variable), or narrow `wrt`."
            ) from err
        if written:
            outer = _variables_by_path((args, kwargs))
            for path, value in zip(written, values, strict=True):
                outer[path].set_raw_value(value)

        per_arg = tuple(
            _mirror(args[i], _substate(grads, (0, i)))
            if i in pytree_positions
            else _substate(grads, (0, i))
            for i in nums
        )
        result = per_arg[0] if isinstance(argnums, int) else per_arg
        value = (loss, aux) if has_aux else loss
        if return_value:
            return value, result
        return (result, aux) if has_aux else result

    return wrapper


def grad(
    f: Callable[..., Any],
    argnums: int | tuple[int, ...] = 0,
    *,
    wrt: Filter = Trainable,
    has_aux: bool = False,
) -> Callable[..., Any]:
    """Gradient of ``f`` with respect to the trainable state of its arguments only.

    The state that ``wrt`` selects in the arguments named by ``argnums`` is
    differentiated; everything else (frozen parameters, batch statistics, other
    arguments) enters as a constant, so no gradient is ever built for it —
    whatever the caller does with the result (clipping, logging, all-reduce).
    Works the same in NNX graph mode and tree mode (where plain ``nnx.grad`` and
    ``jax.grad`` would differentiate ``FrozenParam`` too), inside ``nnx.jit``
    or ``jax.jit``. Tied variables are differentiated once.

    State the function writes (``BatchNorm`` statistics in training mode,
    counters) reaches the caller's modules afterwards, as with ``nnx.grad``.
    Replacing a variable object or changing a module's structure inside ``f``
    does not.

    Args:
        f: function to differentiate; returns a scalar (or ``(scalar, aux)``).
        argnums: position, or tuple of positions, of the arguments to differentiate.
        wrt: NNX filter of the variables to differentiate; defaults to
            :data:`Trainable` (``nnx.Param``, its subclasses and the types
            declared with :func:`register_param_type`, never ``FrozenParam``).
        has_aux: whether ``f`` returns ``(loss, aux)``.

    Any pytree is accepted too (NamedTuples, registered or ``flax.struct``
    dataclasses, dicts, lists, nested mixes, NNX modules inside them). There
    the differentiated leaves are inexact (floating or complex) arrays and
    Python floats that ``wrt`` selects (a bare leaf is shown to the filter as
    the ``nnx.Param`` it stands for) and parameter variables; never the
    contents of a ``FrozenParam`` (or any other variable that is not a
    parameter), of a Linen frozen box or of ``paramax.NonTrainable`` (which get
    ``None``), integer or boolean leaves, strings or static data — without
    error.

    Returns:
        A function with ``f``'s arguments that returns the gradients, one entry
        per differentiated argument (a tuple of them when ``argnums`` is a
        tuple; ``(grads, aux)`` with ``has_aux``):

        * an NNX module (or other graph node): an ``nnx.State`` of the ``wrt``
          variables only — what ``nnx.Optimizer.update`` takes;
        * anything else: a mirror of the argument with a gradient at each
          trainable leaf (an ``nnx.Param`` gets an ``nnx.Param`` of its
          gradient, a module inside gets its ``nnx.State``) and ``None`` at
          every other leaf. optax treats ``None`` as an empty subtree:
          initialise with ``tx.init(ff.trainable_tree(tree))`` and apply with
          :func:`apply_updates`.

    Raises:
        TypeError: if ``f`` is not callable, ``has_aux`` not a bool, or ``argnums``
            or ``wrt`` malformed (a class that is not a Variable type, a callable
            that cannot take ``(path, variable)``). When called: if ``f`` returns a
            tuple without ``has_aux`` (or no pair with it), a differentiated
            argument is a Linen module, or ``wrt`` selects a value that has no
            gradient (an integer or string ``nnx.Param``; the message names it).
        ValueError: when called, if ``argnums`` names a position the call did
            not pass, or a ``wrt`` you gave selects nothing in the differentiated
            arguments (a typo; a string filter is a tag, not a path). The default
            ``wrt`` may select nothing: a fully frozen model gets empty gradients;
            but an argument holding no parameter at all, only another library's
            variables of floats (GPJax's ``PositiveReal`` before
            :func:`register_param_type`), raises and names the type to register.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import flax_freeze as ff
        >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
        >>> _ = ff.freeze(model, ff.PathRegex("kernel"))
        >>> grads = ff.grad(lambda m, x: m(x).sum())(model, jnp.ones((4, 2)))
        >>> sorted(grads.keys()), grads["bias"][...].tolist()
        (['bias'], [4.0])
    """
    return grad_general(f, argnums, wrt, has_aux, return_value=False)


def value_and_grad(
    f: Callable[..., Any],
    argnums: int | tuple[int, ...] = 0,
    *,
    wrt: Filter = Trainable,
    has_aux: bool = False,
) -> Callable[..., Any]:
    """Like :func:`grad`, but the function returns ``(value, grads)``.

    Args:
        f: function to differentiate; returns a scalar (or ``(scalar, aux)``).
        argnums: position, or tuple of positions, of the arguments to differentiate.
        wrt: NNX filter of the variables to differentiate; defaults to :data:`Trainable`.
        has_aux: whether ``f`` returns ``(loss, aux)``.

    Returns:
        A function returning ``(loss, grads)``, or ``((loss, aux), grads)`` with
        ``has_aux``; ``grads`` as in :func:`grad`.

    Raises:
        TypeError: as for :func:`grad`.
        ValueError: as for :func:`grad`.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import flax_freeze as ff
        >>> model = ff.freeze(nnx.Linear(2, 1, rngs=nnx.Rngs(0)), ff.PathRegex("kernel"))
        >>> model.bias[...] = jnp.ones(1)
        >>> loss, grads = ff.value_and_grad(lambda m: (m.bias[...] ** 2).sum())(model)
        >>> float(loss), grads["bias"][...].tolist()
        (1.0, [2.0])
    """
    return grad_general(f, argnums, wrt, has_aux, return_value=True)


def _stop_leaf(x: Any) -> Any:
    """``lax.stop_gradient`` of an array or number; other values (strings...) as they are."""
    if isinstance(x, jax.Array):
        # A tracer of a Python number stops to a bare literal (TypedFloat), which a
        # variable cannot index with ``[...]``: keep it an array.
        return jnp.asarray(jax.lax.stop_gradient(x))
    if isinstance(x, np.ndarray | np.generic | int | float | complex):
        return jax.lax.stop_gradient(x)
    return x


def stop_frozen(tree: Any) -> Any:
    """Returns ``tree`` with every frozen value behind ``lax.stop_gradient``.

    Frozen values are the contents of ``FrozenParam`` variables, of Linen
    frozen boxes (``ffl.FrozenBox``) and of other libraries' frozen wrappers
    (``paramax.NonTrainable``, kept as a wrapper so that ``paramax.unwrap``
    still works).

    Plain ``jax.grad`` differentiates a ``FrozenParam`` inside a pytree like any
    other leaf (it is pytree data, so tracers may live in it). Prefer
    :func:`grad`, which never builds those gradients. For code that must call
    ``jax.grad`` itself, call ``stop_frozen`` on the tree *inside* the
    differentiated function: the frozen leaves then get an exact zero gradient
    and nothing upstream of them is differentiated through them.

    Args:
        tree: any pytree, possibly holding ``FrozenParam`` variables.

    Returns:
        The same structure, each ``FrozenParam`` holding ``lax.stop_gradient`` of
        its value (metadata kept); everything else unchanged. A frozen value that
        is not a number or array (a string, ``None``) is kept as it is.

    Example:
        >>> import jax
        >>> import flax_freeze as ff
        >>> tree = {"a": 2.0, "b": ff.FrozenParam(3.0)}
        >>> g = jax.grad(lambda t: (lambda s: s["a"] * s["b"])(ff.stop_frozen(t)))(tree)
        >>> float(g["a"]), float(g["b"][...])
        (3.0, 0.0)
    """

    def stop(x: Any) -> Any:
        if isinstance(x, FrozenParam):
            value = jax.tree.map(_stop_leaf, x.get_raw_value())
            return FrozenParam.from_metadata(value, x.get_metadata())
        if is_frozen_marker(x):
            return jax.tree.map(_stop_leaf, x)
        return x

    return jax.tree.map(
        stop, tree, is_leaf=lambda x: isinstance(x, nnx.Variable) or is_frozen_marker(x)
    )


def trainable_tree(tree: Any, *, wrt: Filter = Trainable) -> Any:
    """The trainable part of a pytree in the shape :func:`grad` returns: what ``tx.init`` takes.

    Args:
        tree: a pytree (dataclasses, NamedTuples, dicts...) holding arrays,
            floats, variables or NNX modules.
        wrt: NNX filter of what is trainable; defaults to :data:`Trainable`.

    Returns:
        A mirror of ``tree`` with each trainable leaf's value (bare floats as
        arrays), each trainable variable, the trainable ``nnx.State`` of each
        module, and ``None`` at every other leaf (in place of a whole
        ``paramax.NonTrainable`` wrapper or Linen frozen box). optax treats
        ``None`` as an empty subtree, so ``tx.init(ff.trainable_tree(tree))``
        holds state for the trainable leaves only.

    Raises:
        TypeError: if ``wrt`` is not a filter.

    Example:
        >>> import optax
        >>> import flax_freeze as ff
        >>> tree = {"a": 2.0, "b": ff.FrozenParam(3.0)}
        >>> ff.trainable_tree(tree)
        {'a': Array(2., dtype=float32, weak_type=True), 'b': None}
        >>> state = optax.adam(0.1).init(ff.trainable_tree(tree))
    """
    pred = to_predicate(wrt, "wrt")
    if is_graph_node(tree):
        return nnx.state(tree, pred, graph=True)
    wrapped = _wrap_leaves(tree, pred)

    def entry(key_path: Any, x: Any) -> Any:
        path = jax_to_nnx_path(key_path)
        if isinstance(x, _Leaf):
            return x.get_raw_value()
        if isinstance(x, nnx.Variable):
            return x if pred(path, x) else None
        if is_graph_node(x):
            return nnx.state(x, pred, graph=True)
        return None

    return jax.tree_util.tree_map_with_path(entry, wrapped, is_leaf=_is_stop)
