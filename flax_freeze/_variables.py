"""The frozen variable type, the parameter types, and the filters for parameters."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

import jax.numpy as jnp
from flax import nnx

from ._filters import short_repr

A = TypeVar("A")
V = TypeVar("V", bound=type)

#: Metadata key under which a frozen parameter remembers its trainable type
#: (for example ``nnx.LoRAParam``) so that ``unfreeze`` can restore it.
PARAM_TYPE_KEY = "param_type"

#: Metadata key under which a frozen parameter remembers that it was a bare
#: pytree leaf before :func:`flax_freeze.freeze` wrapped it: ``unfreeze`` gives
#: the bare value back. One declared frozen (``FrozenParam(x)``) has no such
#: entry and becomes ``nnx.Param``.
FROM_LEAF_KEY = "frozen_from_leaf"

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


#: Variable types declared trainable parameters besides ``nnx.Param``, in the
#: order they were registered (see :func:`register_param_type`).
_registered: tuple[type[nnx.Variable[Any]], ...] = ()


def param_types() -> tuple[type[nnx.Variable[Any]], ...]:
    """``nnx.Param`` and every type declared with :func:`register_param_type`."""
    return (nnx.Param, *_registered)


def is_param(x: Any) -> bool:
    """Whether ``x`` is a trainable parameter variable: ``nnx.Param`` or a registered type."""
    return isinstance(x, param_types()) and not isinstance(x, FrozenParam)


def is_any_param(x: Any) -> bool:
    """Whether ``x`` is a parameter variable, trainable or frozen."""
    return is_param(x) or isinstance(x, FrozenParam)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def parameter_base(cls: type) -> type:
    """The class to register for ``cls``: its base just below ``nnx.Variable``.

    For GPJax's ``PositiveReal`` (``PositiveReal -> Parameter -> nnx.Variable``)
    that is ``Parameter``, which covers its siblings too.
    """
    base = cls
    for ancestor in cls.__mro__:
        if ancestor is nnx.Variable:
            break
        if isinstance(ancestor, type) and issubclass(ancestor, nnx.Variable):
            base = ancestor
    return base


def unregistered_hint(variables: Iterable[Any]) -> str:
    """Advice naming other libraries' variable types that look like unregistered parameters.

    A variable counts when its type is not one of Flax's own (nor
    ``FrozenParam``), is not registered, and it holds an inexact array or float:
    GPJax's ``PositiveReal`` before ``ff.register_param_type(Parameter)``, say.
    Returns an empty string when there is none.
    """
    found: dict[str, set[str]] = {}  # base to register -> the types seen below it
    for v in variables:
        if not isinstance(v, nnx.Variable) or is_any_param(v):
            continue
        cls = type(v)
        if cls.__module__.split(".")[0] == "flax":
            continue
        value = v.get_raw_value()
        inexact = isinstance(value, float) or (
            hasattr(value, "dtype") and jnp.issubdtype(value.dtype, jnp.inexact)
        )
        if inexact:
            found.setdefault(_qualname(parameter_base(cls)), set()).add(cls.__name__)
    if not found:
        return ""
    seen = "; ".join(f"{', '.join(sorted(found[base]))} (a {base})" for base in sorted(found))
    return (
        f"It holds variables of floats whose types are not parameters to flax_freeze: "
        f"{seen}. If they are parameters, declare their type once with "
        f"ff.register_param_type({sorted(found)[0]})."
    )


def register_param_type(cls: V) -> V:
    """Declares another ``nnx.Variable`` type (and its subclasses) a trainable parameter.

    Some libraries define their own parameter type as a sibling of
    ``nnx.Param``: GPJax's NNX releases (0.9 to 0.13) define
    ``gpjax.parameters.Parameter(nnx.Variable)``, with ``PositiveReal``,
    ``Real`` and others below it. Unregistered, such a variable is state to
    flax_freeze, like ``nnx.BatchStat``: :func:`freeze` finds no parameter in
    it, :func:`grad` gives it no gradient. Once registered, :data:`Trainable`
    and :data:`AnyParam` select it, so :func:`freeze`, :func:`unfreeze`,
    :func:`grad`, :class:`Optimizer`, :func:`summary` and checkpoints treat it
    as a parameter, and :func:`unfreeze` gives a frozen one its original type
    (``PositiveReal``) back with its metadata.

    Registration is global and lasts for the process; registering a type twice,
    or registering ``nnx.Param`` or a subclass of it, changes nothing. Plain
    Flax is not affected: ``nnx.grad`` and ``nnx.Optimizer(wrt=nnx.Param)``
    still select ``nnx.Param`` only; pass ``wrt=ff.Trainable`` to them.

    Args:
        cls: the variable type, a subclass of ``nnx.Variable``. Its subclasses
            are parameters too: register a library's base class.

    Returns:
        ``cls`` itself, so this works as a class decorator.

    Raises:
        TypeError: if ``cls`` is not a class (an instance, say) or not a
            subclass of ``nnx.Variable``.
        ValueError: if ``cls`` is :class:`FrozenParam` (or a subclass),
            ``nnx.Variable`` itself, or one of Flax's own non-parameter types
            (``nnx.BatchStat``, ``nnx.Cache``, RNG state...): each would make
            frozen weights or other state trainable.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import flax_freeze as ff
        >>> @ff.register_param_type
        ... class Weight(nnx.Variable):
        ...     pass
        >>> class Scale(nnx.Module):
        ...     def __init__(self):
        ...         self.w = Weight(jnp.ones(2))
        ...         self.b = ff.FrozenParam(jnp.zeros(2))
        ...         self.count = nnx.BatchStat(jnp.zeros(()))
        ...     def __call__(self, x):
        ...         return x * self.w + self.b
        >>> model = Scale()
        >>> sorted(nnx.state(model, ff.Trainable)), sorted(nnx.state(model, ff.AnyParam))
        (['w'], ['b', 'w'])
        >>> grads = ff.grad(lambda m: m(jnp.full(2, 3.0)).sum())(model)
        >>> type(grads["w"]).__name__, grads["w"][...].tolist()
        ('Weight', [3.0, 3.0])
    """
    global _registered
    _check_param_type(cls)
    if not issubclass(cls, nnx.Param) and cls not in _registered:
        _registered = (*_registered, cast(type[nnx.Variable[Any]], cls))
    return cls


def _check_param_type(cls: Any) -> None:
    """Raises the errors of :func:`register_param_type` for a type that cannot be registered."""
    if not isinstance(cls, type):
        hint = (
            f" Pass its class: ff.register_param_type(type(v)), here {type(cls).__name__}."
            if isinstance(cls, nnx.Variable)
            else ""
        )
        raise TypeError(
            "`cls` must be an nnx.Variable subclass (the parameter type to declare, e.g. "
            f"gpjax.parameters.Parameter), got {short_repr(cls)}.{hint}"
        )
    if not issubclass(cls, nnx.Variable):
        raise TypeError(
            f"`cls` {cls.__qualname__} is not an nnx.Variable subclass: only variable types "
            "hold the parameters of NNX modules. Register the library's variable class; a "
            "bare array in a pytree needs no registration (inexact arrays are trainable)."
        )
    if issubclass(cls, FrozenParam):
        raise ValueError(
            f"`cls` {cls.__qualname__} is the frozen type (ff.FrozenParam): it cannot also "
            "be a trainable parameter type. Register the library's trainable parameter "
            "class; ff.AnyParam already selects frozen parameters."
        )
    if issubclass(cls, nnx.Param) or cls in _registered:
        return
    if issubclass(FrozenParam, cls):
        raise ValueError(
            f"`cls` {_qualname(cls)} is the base of every variable (batch statistics, RNG "
            "state, ff.FrozenParam): declaring it a parameter would train all of them. "
            "Register the library's own parameter class, e.g. gpjax.parameters.Parameter."
        )
    if cls.__module__.split(".")[0] == "flax":
        raise ValueError(
            f"`cls` {_qualname(cls)} is one of Flax's own variable types, which are not "
            "parameters (batch statistics, caches, RNG state, intermediates): declaring it "
            "a parameter would train that state. Flax's parameters are nnx.Param and its "
            "subclasses, which need no registration."
        )


class _TrainableFilter:
    """Selects trainable parameters: ``nnx.Param``, its subclasses and registered types."""

    def __call__(self, path: tuple[Any, ...], x: Any) -> bool:
        del path
        return is_param(x)

    def __repr__(self) -> str:
        return "Trainable"


class _AnyParamFilter:
    """Selects every parameter: trainable (``Trainable``) or frozen (``FrozenParam``)."""

    def __call__(self, path: tuple[Any, ...], x: Any) -> bool:
        del path
        return is_any_param(x)

    def __repr__(self) -> str:
        return "AnyParam"


#: NNX filter that selects trainable parameters: ``nnx.Param`` and every
#: subclass of it (``nnx.LoRAParam`` included) and the types declared with
#: :func:`register_param_type`, never a :class:`FrozenParam`.
#: Use it wherever Flax takes a filter: ``nnx.state(model, ff.Trainable)``.
Trainable = _TrainableFilter()

#: NNX filter that selects every parameter, trainable or frozen:
#: :data:`Trainable` or :class:`FrozenParam`. Use it where code selected
#: ``nnx.Param`` to mean "all the weights" (a parameter norm, sharding rules,
#: an export), which a frozen weight no longer is:
#: ``nnx.state(model, ff.AnyParam)``.
AnyParam = _AnyParamFilter()
