"""grad / value_and_grad that differentiate only the trainable state."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from ._filters import Path, to_predicate
from ._variables import Trainable


def _check_argnums(argnums: Any) -> tuple[int, ...]:
    nums = (argnums,) if isinstance(argnums, int) and not isinstance(argnums, bool) else argnums
    if (
        not isinstance(nums, tuple)
        or not nums
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in nums)
    ):
        raise TypeError(
            f"`argnums` must be a non-negative int or a non-empty tuple of them, got {argnums!r}."
        )
    if len(set(nums)) != len(nums):
        raise ValueError(f"`argnums` {argnums!r} repeats a position; name each position once.")
    return nums


def _variables_by_path(tree: Any) -> dict[Path, nnx.Variable]:
    return {path: x for path, x in nnx.iter_graph(tree, graph=True) if isinstance(x, nnx.Variable)}


def _grad_general(
    f: Callable[..., Any], argnums: Any, wrt: Any, has_aux: bool, return_value: bool
) -> Callable[..., Any]:
    nums = _check_argnums(argnums)
    pred = to_predicate(wrt, "wrt")
    diff_positions = frozenset(nums)

    def is_diff(path: Path, x: Any) -> bool:
        # Paths of the split ``(args, kwargs)`` pair start with (0, position).
        return (
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
        graphdef, diff, rest = nnx.split((args, kwargs), is_diff, ..., graph=True)
        written: list[Path] = []

        def pure(diff: nnx.State, rest: nnx.State) -> tuple[Any, tuple[Any, list[Any]]]:
            inner = nnx.merge(graphdef, diff, rest, copy=True)
            variables = list(_variables_by_path(inner).items())
            before = [v.get_raw_value() for _, v in variables]
            out = f(*inner[0], **inner[1])
            if has_aux:
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise TypeError(
                        "With `has_aux=True` the function must return a pair (loss, aux), "
                        f"got {type(out).__name__}."
                    )
                loss, aux = out
            else:
                loss, aux = out, None
            # State the function wrote (batch statistics, counters) goes out through aux.
            written.clear()
            values = []
            for (path, variable), old in zip(variables, before, strict=True):
                if variable.get_raw_value() is not old:
                    written.append(path)
                    values.append(variable.get_raw_value())
            return loss, (aux, values)

        (loss, (aux, values)), grads = jax.value_and_grad(pure, has_aux=True)(diff, rest)
        if written:
            outer = _variables_by_path((args, kwargs))
            for path, value in zip(written, values, strict=True):
                outer[path].set_raw_value(value)

        per_arg = tuple(_arg_grads(grads, i) for i in nums)
        result = per_arg[0] if isinstance(argnums, int) else per_arg
        value = (loss, aux) if has_aux else loss
        if return_value:
            return value, result
        return (result, aux) if has_aux else result

    return wrapper


def _arg_grads(grads: nnx.State, position: int) -> Any:
    args_grads = grads.get(0, None)
    if args_grads is None or position not in args_grads:
        return nnx.State({})
    return args_grads[position]


def grad(
    f: Callable[..., Any],
    argnums: int | tuple[int, ...] = 0,
    *,
    wrt: Any = Trainable,
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
            :data:`Trainable` (``nnx.Param`` and subclasses, never ``FrozenParam``).
        has_aux: whether ``f`` returns ``(loss, aux)``.

    Returns:
        A function with ``f``'s arguments that returns the gradients: for each
        differentiated module an ``nnx.State`` of the ``wrt`` variables only
        (what ``nnx.Optimizer.update`` takes); a tuple of them when ``argnums``
        is a tuple; ``(grads, aux)`` with ``has_aux``.

    Raises:
        TypeError: if ``argnums`` or ``wrt`` is malformed.
        ValueError: if ``argnums`` names a position the call did not pass.

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
    return _grad_general(f, argnums, wrt, has_aux, return_value=False)


def value_and_grad(
    f: Callable[..., Any],
    argnums: int | tuple[int, ...] = 0,
    *,
    wrt: Any = Trainable,
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
        TypeError: if ``argnums`` or ``wrt`` is malformed.
        ValueError: if ``argnums`` names a position the call did not pass.

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
    return _grad_general(f, argnums, wrt, has_aux, return_value=True)
