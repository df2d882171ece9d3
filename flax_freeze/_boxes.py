"""Frozen markers in pytrees: the Linen box around a parameter, and other libraries' wrappers."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import jax
from flax import struct
from flax.core import meta

from ._filters import short_repr

A = TypeVar("A")
B = TypeVar("B")

#: Linen collection that holds trainable parameters; on a variables dict it is
#: the only collection that is ever trained.
PARAMS = "params"


class FrozenBox(struct.PyTreeNode, meta.AxisMetadata[A], Generic[A]):
    """Marks a Linen parameter frozen: a ``flax.core.meta.AxisMetadata`` box.

    Linen modules see the plain array (``self.param`` unboxes), so a frozen
    params dict applies unchanged. ``ff.grad`` and ``ffl.grad`` treat a box
    like a ``FrozenParam``: no gradient, ``None`` in the mirror. It composes
    with ``nn.with_partitioning`` in either order: outside a ``Partitioned``
    box it forwards ``get_partition_spec``/``get_sharding`` and axis changes
    (``nn.scan``/``nn.vmap``) to it.

    Attributes:
        value: the boxed array (or an inner box such as ``nn.Partitioned``).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax_freeze import linen as ffl
        >>> box = ffl.FrozenBox(jnp.ones(2))
        >>> box.unbox().tolist()
        [1.0, 1.0]
    """

    value: Any

    def unbox(self) -> A:
        """Returns the boxed value (one level: it may itself be a box)."""
        return self.value

    def replace_boxed(self, val: B) -> FrozenBox[B]:
        """Returns a frozen box around ``val``."""
        return FrozenBox(val)

    def add_axis(self, index: int, params: dict[Any, Any]) -> FrozenBox[A]:
        """Forwards an added axis to an inner box; nothing to track here."""
        if isinstance(self.value, meta.AxisMetadata):
            return FrozenBox(self.value.add_axis(index, params))
        return self

    def remove_axis(self, index: int, params: dict[Any, Any]) -> FrozenBox[A]:
        """Forwards a removed axis to an inner box; nothing to track here."""
        if isinstance(self.value, meta.AxisMetadata):
            return FrozenBox(self.value.remove_axis(index, params))
        return self

    def get_partition_spec(self) -> jax.sharding.PartitionSpec:
        """The inner box's partition spec, or replicated for a bare array."""
        inner = getattr(self.value, "get_partition_spec", None)
        return inner() if inner is not None else jax.sharding.PartitionSpec()

    def get_sharding(self, mesh: jax.sharding.Mesh) -> jax.sharding.Sharding:
        """The inner box's sharding on ``mesh``, or replicated for a bare array."""
        inner = getattr(self.value, "get_sharding", None)
        if inner is not None:
            return inner(mesh)
        return jax.sharding.NamedSharding(mesh, self.get_partition_spec())

    def to_nnx_metadata(self) -> dict[str, Any]:
        """Metadata for ``nnx.bridge``: the inner box's, plus a note of its type."""
        inner = self.value
        if isinstance(inner, meta.AxisMetadata) and hasattr(inner, "to_nnx_metadata"):
            return {**inner.to_nnx_metadata(), "frozen_inner_type": type(inner)}  # type: ignore[attr-defined]
        return {"value": inner}

    @classmethod
    def from_nnx_metadata(cls, metadata: dict[str, Any]) -> FrozenBox[Any]:
        """Rebuilds the box (and its inner box) from ``nnx.bridge`` metadata."""
        metadata = dict(metadata)
        inner_type = metadata.pop("frozen_inner_type", None)
        if inner_type is not None:
            return cls(inner_type.from_nnx_metadata(metadata))
        return cls(metadata["value"])


def is_frozen_box(x: Any) -> bool:
    """Whether ``x`` is a Linen box chain that holds a :class:`FrozenBox` anywhere."""
    while isinstance(x, meta.AxisMetadata):
        if isinstance(x, FrozenBox):
            return True
        x = x.unbox()
    return False


#: Other libraries' wrappers that mark a pytree node frozen, as ``(module, class
#: name)``. A class is looked up only once its module is imported (nothing can be
#: an instance of it before), so none of these libraries is required.
FOREIGN_FROZEN: tuple[tuple[str, str], ...] = (("paramax", "NonTrainable"),)


def foreign_frozen_types() -> tuple[type, ...]:
    """The classes of :data:`FOREIGN_FROZEN` whose modules are imported."""
    found = []
    for module_name, class_name in FOREIGN_FROZEN:
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def is_foreign_frozen(x: Any) -> bool:
    """Whether ``x`` is another library's frozen wrapper, e.g. ``paramax.NonTrainable``.

    Everything inside it is frozen: no gradient, no optimizer state, counted
    frozen; it is kept as it is, so the library's own unwrapping still works.
    """
    types = foreign_frozen_types()
    return bool(types) and isinstance(x, types)


def is_frozen_marker(x: Any) -> bool:
    """Whether ``x`` marks a frozen pytree node: a Linen frozen box chain or a foreign wrapper."""
    return is_frozen_box(x) or is_foreign_frozen(x)


def strip_frozen(x: Any) -> Any:
    """Removes every :class:`FrozenBox` from a box chain, keeping the other boxes."""
    if isinstance(x, FrozenBox):
        return strip_frozen(x.value)
    if isinstance(x, meta.AxisMetadata):
        return x.replace_boxed(strip_frozen(x.unbox()))
    return x


def frozen(init: Callable[..., Any]) -> Callable[..., FrozenBox[Any]]:
    """Wraps a Linen initializer so the parameter it makes is stored frozen.

    Args:
        init: an initializer, e.g. ``nn.initializers.lecun_normal()``, possibly
            already wrapped by ``nn.with_partitioning`` (either order works).

    Returns:
        An initializer returning ``FrozenBox(init(...))``.

    Raises:
        TypeError: if ``init`` is not callable; when the parameter is created, if
            ``init`` returned a function (an initializer factory such as
            ``nn.initializers.lecun_normal`` passed without calling it).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import flax.linen as nn
        >>> from flax_freeze import linen as ffl
        >>> dense = nn.Dense(3, kernel_init=ffl.frozen(nn.initializers.lecun_normal()))
        >>> variables = dense.init(jax.random.key(0), jnp.ones((1, 2)))
        >>> type(variables["params"]["kernel"]).__name__
        'FrozenBox'
    """
    if not callable(init):
        raise TypeError(
            f"`init` must be an initializer function, e.g. nn.initializers.lecun_normal(), "
            f"got {short_repr(init)}. To start from given values use "
            "lambda *_: jnp.asarray(values)."
        )

    def frozen_init(*args: Any, **kwargs: Any) -> FrozenBox[Any]:
        value = init(*args, **kwargs)
        if callable(value) and not isinstance(value, jax.Array | meta.AxisMetadata):
            raise TypeError(
                f"`init` {short_repr(init)} returned a function, not an array: it is an "
                "initializer factory. Call it first: ffl.frozen(nn.initializers.lecun_normal())."
            )
        return FrozenBox(value)

    return frozen_init


def is_variables_dict(x: Any) -> bool:
    """Whether ``x`` looks like a Linen variables dict: a mapping with a ``params`` mapping."""
    return isinstance(x, Mapping) and isinstance(x.get(PARAMS), Mapping)
