"""The frozen variable type and the filter for trainable parameters."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, TypeVar

from flax import nnx

A = TypeVar("A")

#: Metadata key under which a frozen parameter remembers its trainable type
#: (for example ``nnx.LoRAParam``) so that ``unfreeze`` can restore it.
PARAM_TYPE_KEY = "param_type"

#: Metadata key under which a parameter frozen in a lower precision
#: (``freeze(..., dtype=...)``) remembers the dtype it was trained in.
TRAINED_DTYPE_KEY = "trained_dtype"


def _compare(op: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """A comparison that acts on the variable's value, as ``nnx.Variable.__eq__`` does."""

    def method(self: nnx.Variable, other: Any) -> Any:
        if isinstance(other, nnx.Variable):
            other = other.get_value()
        return op(self.get_value(), other)

    method.__name__ = f"__{op.__name__}__"
    return method


class FrozenParam(nnx.Variable[A]):
    """A parameter that is held fixed: a sibling of ``nnx.Param``, not a subclass.

    Every part of plain Flax that selects ``nnx.Param`` (``nnx.grad``'s default,
    ``nnx.Optimizer(wrt=nnx.Param)``, ``nnx.state(model, nnx.Param)``) skips a
    ``FrozenParam``, exactly as it skips ``nnx.BatchStat``. Its Linen collection
    name is ``"frozen_params"``.

    Declare a parameter frozen from the start with ``FrozenParam(value)``, or
    re-type live parameters with :func:`flax_freeze.freeze`. A parameter frozen
    by ``freeze`` remembers its trainable type (``nnx.Param``,
    ``nnx.LoRAParam``...) in the ``param_type`` metadata entry, and
    ``unfreeze`` gives it back; one declared frozen becomes ``nnx.Param``.

    A ``FrozenParam`` holds a value, never another variable:
    ``FrozenParam(model.kernel)`` would nest the ``nnx.Param`` inside it (and
    lose its ties), so it raises; re-type it in place with ``ff.freeze``.

    Raises:
        TypeError: if the value is itself an ``nnx.Variable``.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import flax_freeze as ff
        >>> scale = ff.FrozenParam(jnp.ones(3))
        >>> isinstance(scale, nnx.Param)
        False
        >>> (scale * 2).tolist()
        [2.0, 2.0, 2.0]
        >>> (scale < 2).tolist()
        [True, True, True]
    """

    def __init__(self, value: Any, **kwargs: Any) -> None:
        """Creates a frozen parameter holding ``value``; see the class docstring."""
        if isinstance(value, nnx.Variable):
            raise TypeError(
                f"`value` is already a variable ({type(value).__name__}): FrozenParam(v) "
                "would nest one variable in another. To freeze a module's parameter in "
                "place, keeping its metadata and ties, use ff.freeze(model, "
                "ff.PathRegex('path/to/param')); to wrap its array, pass v.get_value()."
            )
        super().__init__(value, **kwargs)

    __lt__ = _compare(operator.lt)
    __le__ = _compare(operator.le)
    __gt__ = _compare(operator.gt)
    __ge__ = _compare(operator.ge)
    __ne__ = _compare(operator.ne)


nnx.register_variable_name("frozen_params", FrozenParam)


class _TrainableFilter:
    """Selects trainable parameters: ``nnx.Param`` and its subclasses."""

    def __call__(self, path: tuple[Any, ...], x: Any) -> bool:
        del path
        return isinstance(x, nnx.Param)

    def __repr__(self) -> str:
        return "Trainable"


#: NNX filter that selects trainable parameters: ``nnx.Param`` and every
#: subclass of it (``nnx.LoRAParam`` included), never a :class:`FrozenParam`.
#: Use it wherever Flax takes a filter: ``nnx.state(model, ff.Trainable)``.
Trainable = _TrainableFilter()
