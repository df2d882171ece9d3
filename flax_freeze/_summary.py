"""Summary: a printable table of trainable and frozen state with counts and bytes."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from ._filters import path_str
from ._part import find_parts
from ._retype import check_node
from ._walk import Entry, status, type_name, walk

STATUSES = ("trainable", "frozen", "state")


@dataclass(frozen=True)
class Row:
    """One value of state: where it is, what it is, whether it trains, and how big.

    Attributes:
        path: the ``'/'``-joined path.
        type: the variable's type (``Param``, ``FrozenParam``, ``BatchStat``),
            the Linen box's (``FrozenBox``, ``Partitioned``), another library's
            frozen wrapper's (``NonTrainable``), or the bare value's (``Array``,
            ``float``, ``int``).
        shape: the array's shape (``()`` for a number).
        dtype: its dtype name; for a value that is no array, its Python type.
        status: ``trainable``, ``frozen`` or ``state`` (``unknown`` in a
            checkpoint without flags).
        count: number of elements. The frozen part of a
            :class:`~flax_freeze.PartlyFrozen` array counts its frozen elements
            only, the trainable part its trainable ones.
        bytes: bytes of the elements; for the frozen part of a
            ``PartlyFrozen`` array, of the whole array it holds.
    """

    path: str
    type: str
    shape: tuple[int, ...]
    dtype: str
    status: str
    count: int
    bytes: int


@dataclass
class Totals:
    """Element counts and bytes per status, for a summary or a checkpoint description.

    Attributes:
        count: elements per status: ``trainable``, ``frozen`` and ``state``
            always, ``unknown`` when some rows have it (a checkpoint without flags).
        bytes: bytes per status, likewise.

    Example:
        >>> import jax.numpy as jnp
        >>> import flax_freeze as ff
        >>> totals = ff.summary({"w": jnp.ones(3), "b": ff.FrozenParam(jnp.ones(2))}).totals
        >>> totals.count, totals.total_count, totals.total_bytes
        ({'trainable': 3, 'frozen': 2, 'state': 0}, 5, 20)
    """

    count: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))

    @classmethod
    def of(cls, rows: Iterable[Row]) -> Totals:
        """The totals of ``rows``."""
        totals = cls()
        for row in rows:
            totals.add(row)
        return totals

    def add(self, row: Row) -> None:
        """Adds one row's count and bytes to its status."""
        self.count[row.status] = self.count.get(row.status, 0) + row.count
        self.bytes[row.status] = self.bytes.get(row.status, 0) + row.bytes

    @property
    def total_count(self) -> int:
        """Elements of every status."""
        return sum(self.count.values())

    @property
    def total_bytes(self) -> int:
        """Bytes of every status."""
        return sum(self.bytes.values())

    def to_json(self) -> dict[str, dict[str, int]]:
        """``{status: {"count", "bytes"}}`` for each status, and ``"total"``."""
        out = {s: {"count": self.count[s], "bytes": self.bytes[s]} for s in self.count}
        out["total"] = {"count": self.total_count, "bytes": self.total_bytes}
        return out

    def line(self) -> str:
        """``trainable 18 (72 B), frozen 40 (160 B)``: each status that has elements.

        Trainable and frozen are always shown.
        """
        return ", ".join(
            f"{s} {self.count[s]:,} ({human_bytes(self.bytes[s])})"
            for s in self.count
            if self.count[s] or s in ("trainable", "frozen")
        )


def _array_like(value: Any) -> bool:
    """An array (PRNG keys and abstract ``ShapeDtypeStruct`` included) or a Python number."""
    return (hasattr(value, "shape") and hasattr(value, "dtype")) or isinstance(
        value, bool | int | float | complex | np.generic
    )


def _size(value: Any) -> tuple[tuple[int, ...], Any, int]:
    """Shape, dtype and element count of an array or a Python number."""
    shape = tuple(getattr(value, "shape", np.shape(value)))
    # Arrays carry their dtype (PRNG keys too: key<fry>); a Python number is
    # counted in the dtype JAX computes it in (float32 unless x64 is enabled).
    dtype = getattr(value, "dtype", None) or jax.dtypes.canonicalize_dtype(np.result_type(value))
    return shape, dtype, math.prod(shape)


def table(rows: Any) -> list[str]:
    """The lines of a table of rows with ``path, type, shape, dtype, status, count, bytes``."""
    header = ("path", "type", "shape", "dtype", "status", "count", "bytes")
    lines = [
        (r.path, r.type, str(r.shape), r.dtype, r.status, f"{r.count:,}", f"{r.bytes:,}")
        for r in rows
    ]
    widths = [max(len(c) for c in col) for col in zip(header, *lines, strict=False)]

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if i >= 5 else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "-" * len(fmt(header))
    return [fmt(header), rule, *(fmt(line) for line in lines), rule]


@dataclass(frozen=True)
class Summary:
    """Trainable, frozen and other state of a node, one row per variable.

    ``print(summary)`` shows the table with totals, and subtotals for each
    top-level child (module or key). Counts are numbers of elements.

    Attributes:
        rows: one ``Row`` per variable (path, type, shape, dtype, status,
            count, bytes; a tied variable once, under its first path), sorted
            by path.
    """

    rows: tuple[Row, ...]

    @property
    def totals(self) -> Totals:
        """Counts and bytes of the whole node, per status."""
        return Totals.of(self.rows)

    @property
    def trainable_count(self) -> int:
        """Number of trainable elements."""
        return self.totals.count["trainable"]

    @property
    def frozen_count(self) -> int:
        """Number of frozen elements."""
        return self.totals.count["frozen"]

    @property
    def trainable_bytes(self) -> int:
        """Bytes of trainable parameters."""
        return self.totals.bytes["trainable"]

    @property
    def frozen_bytes(self) -> int:
        """Bytes of frozen parameters."""
        return self.totals.bytes["frozen"]

    def by_module(self) -> dict[str, Totals]:
        """Totals for each top-level child of the node, keyed by its name."""
        groups: dict[str, Totals] = {}
        for row in self.rows:
            groups.setdefault(row.path.split("/")[0], Totals()).add(row)
        return groups

    def __str__(self) -> str:
        out = table(self.rows)
        for name, totals in [*self.by_module().items(), ("total", self.totals)]:
            out.append(f"{name}: {totals.line()}")
        return "\n".join(out)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} B" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def summary(node: Any) -> Summary:
    """Tabulates the state of ``node``: path, type, shape, dtype, trainable or frozen.

    Each value of state is one row, as in a checkpoint of ``node``
    (:func:`flax_freeze.checkpoint.describe` shows the same rows): every
    variable (a tied one once, under its first path), and outside NNX modules
    every array and number (a Python ``int`` such as a ``TrainState``'s step
    is other state). A bare value's type is its own (``Array``, ``float``,
    ``int``), a Linen parameter's that of its outermost box. The status is
    decided in one place for summaries, checkpoints and re-typing.

    Args:
        node: an NNX module, any pytree holding modules, variables or arrays,
            or a Linen params or variables dict (frozen boxes count as frozen;
            in a variables dict only ``params`` is trainable, ``frozen_params``
            is frozen and every other collection is state), or a
            ``TrainState`` (its params; step, optimizer state and other
            fields are state).

    Parameters of types declared with :func:`register_param_type` are
    trainable like ``nnx.Param``. Inside another library's frozen wrapper
    (``paramax.NonTrainable``) every parameter and inexact leaf is frozen and
    every other value is state; its bare values show the wrapper's type name.

    A variable that holds no array (a string, ``None``) is listed with its
    Python type in the ``dtype`` column and a count of 0; one holding a
    container (a list, a dict) counts the arrays and numbers inside it.

    Returns:
        A :class:`Summary`; print it for the table with totals of elements
        and bytes for trainable, frozen and other state.

    Raises:
        TypeError: if ``node`` cannot hold state: ``None``, a string, a class or a
            Linen module (pass its variables dict instead).

    Example:
        >>> from flax import nnx
        >>> import flax_freeze as ff
        >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)),
        ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
        >>> _ = ff.freeze(model, ff.PathRegex("layers/0/.*"))
        >>> s = ff.summary(model)
        >>> s.trainable_count, s.frozen_count, s.frozen_bytes
        (18, 40, 160)
        >>> print(s)  # doctest: +NORMALIZE_WHITESPACE
        path             type         shape   dtype    status     count  bytes
        ----------------------------------------------------------------------
        layers/0/bias    FrozenParam  (8,)    float32  frozen         8     32
        layers/0/kernel  FrozenParam  (4, 8)  float32  frozen        32    128
        layers/1/bias    Param        (2,)    float32  trainable      2      8
        layers/1/kernel  Param        (8, 2)  float32  trainable     16     64
        ----------------------------------------------------------------------
        layers: trainable 18 (72 B), frozen 40 (160 B)
        total: trainable 18 (72 B), frozen 40 (160 B)
    """
    check_node(
        "summary",
        node,
        "pass its variables dict instead, ff.summary(module.init(key, x)).",
    )
    trained = {id(f.part.frozen): f.part.trainable for f in find_parts(node).values()}
    rows = [
        _entry_row(entry, trained.get(id(entry.variable)))
        for entry in walk(node, empty=True).entries
    ]
    return Summary(tuple(sorted(rows, key=lambda r: r.path)))


def _entry_row(entry: Entry, trained: Any = None) -> Row:
    """The row of one entry of the walk: under its first path, with its status and type.

    ``trained`` is the trainable part when the entry is the frozen part of a
    :class:`PartlyFrozen` array: its elements are not counted as frozen.
    """
    value = entry.value
    if _array_like(value):
        shape, dtype, count = _size(value)
        dtype_name, nbytes = str(dtype), count * dtype.itemsize
    else:
        # Not an array (a string, None, a container): its Python type in the dtype
        # column, and the elements of the arrays or numbers it holds, if any.
        shape, dtype_name, count, nbytes = (), type(value).__name__, 0, 0
        for leaf in jax.tree.leaves(value):
            if _array_like(leaf):
                _, leaf_dtype, leaf_count = _size(leaf)
                count += leaf_count
                nbytes += leaf_count * leaf_dtype.itemsize
    if trained is not None:
        count -= int(np.prod(np.shape(trained.get_raw_value()), dtype=np.int64))
    path = path_str(min(entry.paths, key=path_str))
    return Row(path, type_name(entry), shape, dtype_name, status(entry), count, nbytes)
