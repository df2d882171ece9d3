"""Part of an array trainable: ``PartlyFrozen``, ``Rows``, and the ``where=`` of freeze/unfreeze.

A partly frozen array is held as three variables under one pytree node at the
array's place: the trainable elements in a parameter of the array's type
(``trainable``), the whole array in a :class:`FrozenParam` (``frozen``; its
trainable elements are stale), and the positions of the trainable elements
(``index``: rows along ``axis``, or flat positions when ``axis`` is None).
Reading it (``x[...]``, ``jnp.asarray(x)``, arithmetic) gives the whole
array with the trainable elements in place, so a module's code does not
change, while gradients, optimizer state and updates exist for the trainable
elements only: to NNX and to every part of flax_freeze, ``trainable`` is
one more parameter and ``frozen`` one more frozen one.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.core import Tracer

from ._filters import Path, path_str, short_repr
from ._nnx_compat import get_node_impl, varying_axes
from ._variables import FROM_LEAF_KEY, PARAM_TYPE_KEY, FrozenParam

#: Metadata entries that describe how an array is laid out on devices by axis.
SHARDING_KEYS = ("sharding_names", "sharding", "out_sharding")


class TrainableIndex(nnx.Variable[jax.Array]):
    """The positions of the trainable elements of a :class:`PartlyFrozen` array (state)."""


class Rows:
    """Selects whole rows of an array (slices along ``axis``) for ``where=``.

    ``ff.unfreeze(model, "embed/embedding", where=ff.Rows(new_ids))`` makes
    the embeddings of the tokens ``new_ids`` trainable and leaves every other
    row frozen: gradients and optimizer state then hold ``len(new_ids)`` rows.

    Args:
        ids: the row numbers, whole numbers in ``[0, n)`` for an axis of
            length ``n`` (a list, range or integer array; order and repeats
            do not matter).
        axis: the axis the ids count along (0: rows).

    Raises:
        TypeError: if ``ids`` are not whole numbers (a boolean mask is passed
            as ``where=mask`` itself) or ``axis`` is not an int.
        ValueError: if ``ids`` is empty or not one-dimensional.

    Example:
        >>> import flax_freeze as ff
        >>> ff.Rows([3, 1, 3])
        Rows([1, 3], axis=0)
    """

    def __init__(self, ids: Any, *, axis: int = 0) -> None:
        """Checks and sorts the ids; see the class docstring."""
        if isinstance(ids, Tracer):
            raise TypeError(
                "`ids` must be concrete row numbers, got a traced array: choose the rows "
                "outside jax.jit (freeze and unfreeze run eagerly)."
            )
        array = np.asarray(ids)
        if array.dtype == np.bool_:
            raise TypeError(
                f"`ids` must be row numbers, got a boolean array {short_repr(ids)}: pass a "
                "mask as where=mask itself, or its row numbers as ff.Rows(np.flatnonzero(mask))."
            )
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"`ids` must be whole row numbers, got {short_repr(ids)}.")
        if array.ndim != 1 or array.size == 0:
            raise ValueError(
                f"`ids` must be a non-empty list of row numbers, got {short_repr(ids)} "
                f"(shape {array.shape})."
            )
        if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
            raise TypeError(f"`axis` must be an int, got {short_repr(axis)}.")
        self.ids = np.unique(array.astype(np.int64))
        self.axis = int(axis)

    def __repr__(self) -> str:
        """The sorted ids and the axis."""
        return f"Rows({self.ids.tolist()}, axis={self.axis})"


Where = Rows | np.ndarray | jax.Array | Sequence[Any]


def _operator(name: str) -> Callable[..., Any]:
    def method(self: PartlyFrozen, *args: Any) -> Any:
        return getattr(self.get_value(), name)(*args)

    method.__name__ = name
    return method


@jax.tree_util.register_pytree_with_keys_class
class PartlyFrozen:
    """An array of which only some elements train; made by ``freeze``/``unfreeze`` with ``where=``.

    It stands where the array stood (a module attribute, a pytree leaf) and
    reads as the whole array: ``x[...]``, ``jnp.asarray(x)``, ``x.shape``,
    ``x.dtype`` and arithmetic give what the array would, the trainable
    elements in place. It holds three variables, which is what NNX, the
    optimizer and checkpoints see (at ``<path>/trainable``,
    ``<path>/frozen`` and ``<path>/index``):

    - ``trainable``: the trainable elements, a parameter of the array's own
      type: the selected rows (``len(ids)`` slices along ``axis``), or, for
      an element mask, the selected elements in a flat vector (``axis`` None);
    - ``frozen``: the whole array, a :class:`FrozenParam` (its values at
      the trainable positions are stale: reading the whole array puts
      ``trainable`` there);
    - ``index``: the positions of the trainable elements (row numbers along
      ``axis``, or flat positions), sorted.

    So gradients and optimizer state exist for the trainable elements only,
    and the frozen ones stay bit-identical. A read of the whole array gives
    it assembled (rows as a select that a consumer reading a few rows fuses;
    elements as a copy with the trainable ones scattered in), and the
    gradient of what reads it is computed for the whole array first, then its
    trainable elements are taken. An ``nnx.Embed`` whose table has trainable
    rows looks tokens up (and ``attend`` computes logits) in the two parts
    apart instead: its gradient is computed for the trainable rows only.

    Attributes:
        trainable: the parameter of the trainable elements.
        frozen: the frozen parameter holding the whole array.
        index: the positions of the trainable elements.
        axis: the axis of the rows, or None for flat positions.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import flax_freeze as ff
        >>> embed = ff.freeze(nnx.Embed(5, 2, rngs=nnx.Rngs(0)))
        >>> _ = ff.unfreeze(embed, where=ff.Rows([3, 4]))
        >>> type(embed.embedding).__name__, embed.embedding.shape
        ('PartlyFrozen', (5, 2))
        >>> embed.embedding.trainable.shape, embed.embedding.index[...].tolist()
        ((2, 2), [3, 4])
        >>> grads = ff.grad(lambda m: m(jnp.array([0, 4, 4])).sum())(embed)
        >>> grads["embedding"]["trainable"][...].tolist()
        [[0.0, 0.0], [2.0, 2.0]]
    """

    def __init__(
        self,
        trainable: nnx.Variable[Any],
        frozen: FrozenParam[Any],
        index: TrainableIndex,
        axis: int | None,
    ) -> None:
        """Holds the three variables; build one with ``freeze``/``unfreeze`` and ``where=``."""
        self.trainable = trainable
        self.frozen = frozen
        self.index = index
        self.axis = axis

    def tree_flatten_with_keys(self) -> tuple[Any, Any]:
        """The three variables as children; the axis as static data."""
        key = jax.tree_util.GetAttrKey
        children = (
            (key("trainable"), self.trainable),
            (key("frozen"), self.frozen),
            (key("index"), self.index),
        )
        return children, self.axis

    @classmethod
    def tree_unflatten(cls, axis: int | None, children: Sequence[Any]) -> PartlyFrozen:
        """Rebuilds from children (which may be anything a tree map put there)."""
        part = object.__new__(cls)
        part.trainable, part.frozen, part.index = children
        part.axis = axis
        return part

    def get_value(self) -> jax.Array:
        """The whole array, the trainable elements in place."""
        return assemble(*self.parts(), self.axis)

    def parts(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(frozen, trainable, index)`` as arrays, for code that reads them without assembling.

        Inside :func:`~flax_freeze.grad` under ``shard_map``, the two parts are
        cast to vary where the batch does, so that what is summed across
        devices is the trainable part's gradient.
        """
        frozen = jnp.asarray(self.frozen.get_value())
        trainable = jnp.asarray(self.trainable.get_value())
        if _VARYING.get():
            frozen, trainable = _varying(frozen), _varying(trainable)
        return frozen, trainable, jnp.asarray(self.index.get_value())

    def __getitem__(self, key: Any) -> Any:
        """Indexes the whole array (``x[...]`` is all of it)."""
        return self.get_value()[key]

    def __jax_array__(self) -> jax.Array:
        """The whole array, for ``jnp`` functions."""
        return self.get_value()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The whole array as NumPy."""
        del copy
        return np.asarray(self.get_value(), dtype=dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        """The whole array's shape."""
        return tuple(self.frozen.get_raw_value().shape)

    @property
    def dtype(self) -> Any:
        """The whole array's dtype."""
        return self.frozen.get_raw_value().dtype

    @property
    def ndim(self) -> int:
        """The whole array's number of axes."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """The number of elements of the whole array."""
        return int(np.prod(self.shape, dtype=np.int64))

    def __len__(self) -> int:
        """The length of the first axis."""
        return self.shape[0]

    def trainable_mask(self) -> np.ndarray:
        """A boolean array of the whole shape: True at the trainable elements."""
        return _index_mask(np.asarray(self.index.get_value()), self.shape, self.axis)

    def __repr__(self) -> str:
        """Shape, dtype and how many elements train."""
        n = int(np.prod(self.trainable.get_raw_value().shape, dtype=np.int64))
        k = len(self.index.get_raw_value())
        if self.axis is None or self.ndim == 1:
            where = f"{k} element{'s' * (k != 1)}"
        else:
            where = f"{k} row{'s' * (k != 1)} along axis {self.axis}"
        return (
            f"PartlyFrozen(shape={self.shape}, dtype={self.dtype}, trainable {n} of "
            f"{self.size} ({where}))"
        )

    __add__ = _operator("__add__")
    __sub__ = _operator("__sub__")
    __mul__ = _operator("__mul__")
    __matmul__ = _operator("__matmul__")
    __truediv__ = _operator("__truediv__")
    __floordiv__ = _operator("__floordiv__")
    __mod__ = _operator("__mod__")
    __pow__ = _operator("__pow__")
    __radd__ = _operator("__radd__")
    __rsub__ = _operator("__rsub__")
    __rmul__ = _operator("__rmul__")
    __rmatmul__ = _operator("__rmatmul__")
    __rtruediv__ = _operator("__rtruediv__")
    __rfloordiv__ = _operator("__rfloordiv__")
    __rmod__ = _operator("__rmod__")
    __rpow__ = _operator("__rpow__")
    __neg__ = _operator("__neg__")
    __pos__ = _operator("__pos__")
    __abs__ = _operator("__abs__")
    __lt__ = _operator("__lt__")
    __le__ = _operator("__le__")
    __gt__ = _operator("__gt__")
    __ge__ = _operator("__ge__")

    @property
    def T(self) -> jax.Array:  # noqa: N802
        """The whole array, transposed."""
        return self.get_value().T


#: The ``shard_map`` axes along which the batch of the function being differentiated
#: varies (set by :func:`~flax_freeze.grad`); empty elsewhere.
_VARYING: contextvars.ContextVar[frozenset[Any]] = contextvars.ContextVar(
    "flax_freeze_varying", default=frozenset()
)


@contextlib.contextmanager
def reading_varying(axes: frozenset[Any]) -> Iterator[None]:
    """Inside: partly frozen arrays are read as varying along ``axes`` (``shard_map``).

    Under ``shard_map`` with ``check_vma``, a replicated array that meets the
    batch is made varying where it does, and the gradient of that cast is a
    ``psum``. Cast the parts before assembling the whole array, and what is
    summed is the trainable part's gradient, not the whole array's.
    """
    token = _VARYING.set(axes)
    try:
        yield
    finally:
        _VARYING.reset(token)


def _varying(x: jax.Array) -> jax.Array:
    missing = tuple(sorted(_VARYING.get() - varying_axes(x), key=str))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def assemble(frozen: jax.Array, trainable: jax.Array, index: jax.Array, axis: int | None) -> Any:
    """The whole array: ``frozen`` with ``trainable`` at the positions ``index``."""
    frozen = jnp.asarray(frozen)
    trainable = jnp.asarray(trainable).astype(frozen.dtype)
    if axis is None:
        flat = frozen.reshape(-1).at[index]
        flat = flat.set(trainable, indices_are_sorted=True, unique_indices=True)
        return flat.reshape(frozen.shape)
    return _rows(frozen, trainable, index, axis)


def row_maps(index: jax.Array, n: int, ndim: int, axis: int) -> tuple[jax.Array, jax.Array]:
    """Which of the ``n`` rows train (shaped to broadcast along ``axis``), and their positions."""
    shape = [1] * ndim
    shape[axis] = n
    rows = jnp.zeros(n, bool).at[index].set(True, unique_indices=True).reshape(shape)
    k = index.shape[0]
    pos = jnp.zeros(n, jnp.int32).at[index].set(jnp.arange(k, dtype=jnp.int32), unique_indices=True)
    return rows, pos


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _rows(frozen: jax.Array, trainable: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    """``frozen`` with the rows ``index`` (along ``axis``) taken from ``trainable``.

    Written as a select between ``frozen`` and ``trainable`` spread out to
    every row, so that a consumer reading a few rows (an embedding lookup)
    fuses it and never builds the whole array. Its derivative is the scatter
    of ``trainable``'s tangent into ``frozen``'s, whose transpose gathers the
    cotangent's rows ``index`` (rather than summing over every row, as the
    select's own derivative would).
    """
    rows, pos = row_maps(index, frozen.shape[axis], frozen.ndim, axis)
    return jnp.where(rows, jnp.take(trainable, pos, axis=axis, mode="clip"), frozen)


@_rows.defjvp
def _rows_jvp(
    axis: int, primals: tuple[jax.Array, ...], tangents: tuple[Any, ...]
) -> tuple[jax.Array, jax.Array]:
    frozen, trainable, index = primals
    frozen_dot, trainable_dot, _ = tangents
    where = (slice(None),) * axis + (index,)
    out_dot = frozen_dot.at[where].set(trainable_dot, indices_are_sorted=True, unique_indices=True)
    return _rows(frozen, trainable, index, axis), out_dot


def _index_mask(index: np.ndarray, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    if axis is None:
        mask.reshape(-1)[index] = True
    else:
        mask[(slice(None),) * axis + (index,)] = True
    return mask


def check_where(where: Any, func: str) -> None:
    """Raises for a ``where`` that is neither a mask nor :class:`Rows`, before anything changes."""
    if where is None or isinstance(where, Rows):
        return
    if isinstance(where, Tracer):
        raise TypeError(
            f"`where` passed to {func}() must be concrete, got a traced array: choose the "
            f"elements outside jax.jit ({func} runs eagerly, between steps)."
        )
    array = np.asarray(where)
    if array.dtype != np.bool_:
        hint = (
            " For row numbers pass ff.Rows(ids)." if np.issubdtype(array.dtype, np.integer) else ""
        )
        raise TypeError(
            f"`where` passed to {func}() must be a boolean mask broadcastable to each "
            f"selected array, or ff.Rows(ids), got {short_repr(where)}.{hint}"
        )


def where_mask(where: Any, shape: tuple[int, ...], path: Path, func: str) -> np.ndarray:
    """The elements ``where`` selects in an array of ``shape``, as a boolean array of that shape.

    Raises:
        ValueError: naming the array's path, if a mask does not broadcast to
            ``shape`` or rows are out of range.
    """
    name = path_str(path) or "the root"
    if isinstance(where, Rows):
        if not -len(shape) <= where.axis < len(shape):
            raise ValueError(
                f"`where` {where!r} passed to {func}() has an axis out of range for "
                f"{name!r} of shape {shape}."
            )
        axis = where.axis % len(shape)
        n = shape[axis]
        bad = where.ids[(where.ids < 0) | (where.ids >= n)]
        if bad.size:
            raise ValueError(
                f"`where` {where!r} passed to {func}() has rows {bad.tolist()[:8]} out of "
                f"range for {name!r}, which has {n} along axis {axis} (shape {shape})."
            )
        return _index_mask(where.ids, shape, axis)
    mask = np.asarray(where)
    try:
        return np.broadcast_to(mask, shape).copy()
    except ValueError:
        raise ValueError(
            f"`where` passed to {func}() has shape {mask.shape}, which does not broadcast to "
            f"{name!r} of shape {shape}. Pass a mask of that shape (or one that broadcasts "
            "to it), or select arrays of one shape with the filter."
        ) from None


def current_mask(x: Any) -> np.ndarray:
    """The trainable elements of a parameter, a bare leaf or a :class:`PartlyFrozen`."""
    if isinstance(x, PartlyFrozen):
        return x.trainable_mask()
    value = x.get_raw_value() if isinstance(x, nnx.Variable) else x
    shape = tuple(np.shape(value))
    return np.full(shape, not isinstance(x, FrozenParam), dtype=bool)


def _rows_axis(mask: np.ndarray, prefer: int | None) -> int | None:
    """An axis along which ``mask`` selects whole slices (``prefer`` first), or None."""
    axes = list(range(mask.ndim))
    if prefer is not None:
        axes.sort(key=lambda a: a != prefer)
    for axis in axes:
        others = tuple(a for a in range(mask.ndim) if a != axis)
        rows = mask.any(axis=others, keepdims=True)
        if np.array_equal(np.broadcast_to(rows, mask.shape), mask):
            return axis
    return None


def _whole(x: Any) -> tuple[Any, dict[str, Any]]:
    """The whole raw array of ``x`` and the metadata of the parameter it stands for."""
    if isinstance(x, PartlyFrozen):
        metadata = x.frozen.get_metadata()
        return x.get_value(), metadata
    if isinstance(x, nnx.Variable):
        metadata = x.get_metadata()
        if not isinstance(x, FrozenParam):
            metadata[PARAM_TYPE_KEY] = type(x)
        return x.get_raw_value(), metadata
    return x, {FROM_LEAF_KEY: True}


def _take_sharding(array: Any, axis: int | None) -> Any:
    """Where the trainable part of an array on devices goes: its layout, the index axis whole."""
    sharding = getattr(array, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    if axis is None:
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    spec = list(sharding.spec) + [None] * (array.ndim - len(sharding.spec))
    spec[axis] = None
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def _part_metadata(metadata: dict[str, Any], axis: int | None, ndim: int) -> dict[str, Any]:
    """The trainable part's metadata: the array's, without device layout along the index axis."""
    out = {k: v for k, v in metadata.items() if k not in (PARAM_TYPE_KEY, FROM_LEAF_KEY)}
    for key in SHARDING_KEYS:
        names = out.get(key)
        if names is None:
            continue
        if axis is None or not isinstance(names, tuple) or len(names) != ndim:
            del out[key]
        else:
            out[key] = tuple(None if a == axis else n for a, n in enumerate(names))
    return out


def _make(cls: Any, value: Any, metadata: dict[str, Any]) -> Any:
    """A variable of ``cls``: from a variable's full metadata, or built anew from a leaf's."""
    if "hijax" in metadata:
        return cls.from_metadata(value, metadata)
    return cls(value, **metadata)


def _trainable_whole(value: Any, metadata: dict[str, Any], in_module: bool) -> Any:
    """The whole array as a parameter of its trainable type (a bare value for a pytree leaf)."""
    if metadata.get(FROM_LEAF_KEY) and not in_module:
        return value
    param_type = metadata.get(PARAM_TYPE_KEY) or nnx.Param
    clean = {k: v for k, v in metadata.items() if k not in (PARAM_TYPE_KEY, FROM_LEAF_KEY)}
    return _make(param_type, value, clean)


def _new_part(
    value: Any, metadata: dict[str, Any], part: Any, index: Any, axis: int | None
) -> PartlyFrozen:
    """A :class:`PartlyFrozen` of the whole ``value`` with the trainable ``part`` at ``index``."""
    param_type = metadata.get(PARAM_TYPE_KEY) or nnx.Param
    ndim = len(value.shape) if hasattr(value, "shape") else np.ndim(value)  # abstract too
    trainable = _make(param_type, part, _part_metadata(metadata, axis, ndim))
    frozen = _make(FrozenParam, value, dict(metadata))
    return PartlyFrozen(trainable, frozen, TrainableIndex(index), axis)


def rebuild(x: Any, mask: np.ndarray, prefer_axis: int | None, in_module: bool) -> Any:
    """What stands where ``x`` stood once exactly the elements ``mask`` selects are trainable.

    A parameter of ``x``'s trainable type when all are, a :class:`FrozenParam`
    when none is (a bare value again for a pytree leaf made trainable), else a
    :class:`PartlyFrozen` holding rows (along an axis where the mask selects
    whole slices, ``prefer_axis`` first) or flat elements.
    """
    value, metadata = _whole(x)
    if mask.all():
        return _trainable_whole(value, metadata, in_module)
    if not mask.any():
        return x if isinstance(x, FrozenParam) else _make(FrozenParam, value, metadata)
    axis = _rows_axis(mask, prefer_axis) if mask.ndim > 1 else 0
    if axis is None:
        index = np.flatnonzero(mask)
        part = jnp.asarray(value).reshape(-1)[index]
    else:
        others = tuple(a for a in range(mask.ndim) if a != axis)
        index = np.flatnonzero(mask.any(axis=others))
        part = jnp.take(jnp.asarray(value), index, axis=axis)
    sharding = _take_sharding(value, axis)
    if sharding is not None:
        part = jax.device_put(part, sharding)
    return _new_part(value, metadata, part, jnp.asarray(index, jnp.int32), axis)


@dataclass
class Found:
    """A :class:`PartlyFrozen` met in a node: each path to it, and whether it is in a module."""

    part: PartlyFrozen
    paths: list[Path] = field(default_factory=list)
    in_module: bool = False


def find_parts(node: Any) -> dict[int, Found]:
    """Every :class:`PartlyFrozen` in ``node`` (by identity) with each path it is reachable by."""
    found: dict[int, Found] = {}
    seen: set[int] = set()

    def visit(x: Any, path: Path, in_module: bool) -> None:
        if isinstance(x, PartlyFrozen):
            found.setdefault(id(x), Found(x, [], in_module)).paths.append(path)
            return
        if isinstance(x, nnx.Variable):
            return
        impl = get_node_impl(x)
        if impl is None:
            return
        if isinstance(x, nnx.Pytree):
            if id(x) in seen:
                return
            seen.add(id(x))
            items = list(impl.node_dict(x).items())
            in_module = True
        else:
            items = list(impl.flatten(x)[0])
        for key, child in items:
            visit(child, (*path, key), in_module)

    visit(node, (), False)
    return found


def part_variables(parts: dict[int, Found]) -> set[int]:
    """The ids of the variables the parts hold."""
    return {id(v) for f in parts.values() for v in (f.part.trainable, f.part.frozen, f.part.index)}


def _placeholder(like: Any, shape: tuple[int, ...], dtype: Any, sharding: Any) -> Any:
    """Zeros of ``shape`` (abstract when ``like`` is), where a restore writes the saved values."""
    if isinstance(like, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    zeros = jnp.zeros(shape, dtype)
    return zeros if sharding is None else jax.device_put(zeros, sharding)


def part_to_fill(x: Any, axis: int | None, trainable_shape: tuple[int, ...], dtype: Any) -> Any:
    """A :class:`PartlyFrozen` of ``x``'s array with ``trainable_shape``, for a restore to fill.

    Its frozen part holds ``x``'s whole array (or its abstract value), its
    trainable part and index zeros of the saved shapes: the restore writes
    all three.
    """
    if isinstance(x, PartlyFrozen):
        value, metadata = x.frozen.get_raw_value(), x.frozen.get_metadata()
    else:
        value, metadata = _whole(x)
    part = _placeholder(value, trainable_shape, dtype, _take_sharding(value, axis))
    n = trainable_shape[0] if axis is None else trainable_shape[axis]
    index = _placeholder(value, (n,), jnp.int32, _take_sharding(value, None))
    return _new_part(value, metadata, part, index, axis)


def whole_to_fill(part: PartlyFrozen, in_module: bool) -> Any:
    """The whole parameter (trainable, of the array's type) in a part's place, for a restore.

    It holds the frozen part's array, whose trainable positions are stale: the
    restore writes the whole array.
    """
    return _trainable_whole(part.frozen.get_raw_value(), part.frozen.get_metadata(), in_module)


def rows_axis_of(trainable_shape: tuple[int, ...], whole_shape: tuple[int, ...]) -> int | None:
    """The axis of a saved part's rows, from its shapes (None: flat elements).

    A part holds rows along one axis (the one shape where its trainable part
    is shorter) or, for an element mask, a flat vector (a 1-D array's
    elements are its rows along axis 0).
    """
    if len(trainable_shape) != len(whole_shape):
        return None
    pairs = enumerate(zip(trainable_shape, whole_shape, strict=True))
    differ = [axis for axis, (t, w) in pairs if t != w]
    return differ[0] if len(differ) == 1 else None
