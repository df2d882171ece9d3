"""Summary: a printable table of trainable and frozen state with counts and bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.core import meta
from flax.training import train_state

from ._boxes import PARAMS, is_foreign_frozen, is_frozen_box, is_variables_dict
from ._compat import get_node_impl, jax_to_nnx_path
from ._filters import Path, path_str
from ._retype import check_node, collect, is_raw_trainable
from ._variables import FrozenParam, is_param

STATUSES = ("trainable", "frozen", "state")


@dataclass(frozen=True)
class Row:
    """One variable: where it is, what it is, and how big."""

    path: str
    type: str
    shape: tuple[int, ...]
    dtype: str
    status: str
    count: int
    bytes: int


@dataclass
class Totals:
    """Element counts and bytes per status (trainable, frozen, other state)."""

    count: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))

    def add(self, row: Row) -> None:
        """Adds one row's count and bytes to its status."""
        self.count[row.status] += row.count
        self.bytes[row.status] += row.bytes


def _status(x: Any) -> str:
    if is_param(x):
        return "trainable"
    if isinstance(x, FrozenParam):
        return "frozen"
    if isinstance(x, nnx.Variable):
        return "state"
    return "trainable"  # a bare inexact leaf of a pytree


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


def _row(path: str, x: Any, type_name: str | None = None, status: str | None = None) -> Row:
    value = x.get_raw_value() if isinstance(x, nnx.Variable) else x
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
    return Row(
        path,
        type_name or type(x).__name__,
        shape,
        dtype_name,
        status or _status(x),
        count,
        nbytes,
    )


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
        totals = Totals()
        for row in self.rows:
            totals.add(row)
        return totals

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
            parts = [
                f"{status} {totals.count[status]:,} ({human_bytes(totals.bytes[status])})"
                for status in STATUSES
                if totals.count[status] or status != "state"
            ]
            out.append(f"{name}: " + ", ".join(parts))
        return "\n".join(out)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} B" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def summary(node: Any) -> Summary:
    """Tabulates every variable of ``node``: path, type, shape, dtype, trainable or frozen.

    Args:
        node: an NNX module, any pytree holding modules, variables or arrays,
            or a Linen params or variables dict (frozen boxes count as frozen;
            in a variables dict only ``params`` is trainable, ``frozen_params``
            is frozen and every other collection is state), or a
            ``TrainState`` (its params; step, optimizer state and other
            fields are state).

    Parameters of types declared with :func:`register_param_type` are
    trainable like ``nnx.Param``. Inside another library's frozen wrapper
    (``paramax.NonTrainable``) every inexact leaf and every variable is
    frozen; its rows show the wrapper's type name.

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
    if is_variables_dict(node):
        rows = []
        for collection, tree in node.items():
            status = {PARAMS: None, "frozen_params": "frozen"}.get(collection, "state")
            rows += _rows(tree, (collection,), status, collection)
    elif isinstance(node, train_state.TrainState):
        # Only the params train; the step, optimizer state and extra fields are state.
        rows = _rows(node.params, (PARAMS,), None, "Array")
        for name, value in vars(node).items():
            if name not in (PARAMS, "apply_fn", "tx"):
                rows += _rows(value, (name,), "state", "Array")
    else:
        rows = _rows(node, (), None, "Array")
    return Summary(tuple(sorted(rows, key=lambda r: r.path)))


def _rows(node: Any, prefix: tuple[Any, ...], status: str | None, bare: str) -> list[Row]:
    """Rows of one tree: variables, frozen markers and bare inexact leaves.

    ``status`` overrides the status of bare leaves (a Linen collection other
    than ``params``); ``bare`` is the type shown for them.
    """
    boxes: dict[Any, Any] = {}
    sites, raw = collect(node, boxes)
    markers = _foreign_markers(node)

    def marked(path: Path) -> bool:
        return any(path[: len(m)] == m for m in markers)

    rows = [
        _row(path_str((*prefix, *min(s.paths, key=path_str))), s.variable)
        for s in sites.values()
        if not all(marked(p) for p in s.paths)
    ]
    for path, box in boxes.items():
        if not marked(path):
            rows.append(
                _row(path_str((*prefix, *path)), meta.unbox(box), type(box).__name__, "frozen")
            )
    for path, x in raw.items():
        if not marked(path):
            rows.append(_row(path_str((*prefix, *path)), x, bare, status or "trainable"))
    for path, marker in markers.items():
        rows += _marker_rows((*prefix, *path), marker)
    return rows


def _foreign_markers(node: Any) -> dict[Path, Any]:
    """Other libraries' frozen wrappers (``paramax.NonTrainable``) outside NNX modules, by path.

    Inside a module only variables are state, as in ``collect``.
    """
    found: dict[Path, Any] = {}

    def visit(x: Any, path: Path, ancestors: set[int]) -> None:
        if is_foreign_frozen(x):
            found[path] = x
            return
        if isinstance(x, nnx.Variable | nnx.Pytree) or is_frozen_box(x):
            return
        impl = get_node_impl(x)
        if impl is None or id(x) in ancestors:
            return
        ancestors.add(id(x))
        for key, child in impl.node_dict(x).items():
            visit(child, (*path, key), ancestors)
        ancestors.discard(id(x))

    visit(node, (), set())
    return found


def _marker_rows(path: Path, marker: Any) -> list[Row]:
    """Frozen rows for what a foreign wrapper holds: its variables and inexact leaves."""
    kind = type(marker).__name__
    leaves = jax.tree_util.tree_leaves_with_path(
        marker, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    rows = []
    for key_path, x in leaves:
        where = path_str((*path, *jax_to_nnx_path(key_path)))
        if isinstance(x, nnx.Variable):
            rows.append(_row(where, x, status="frozen"))
        elif is_raw_trainable(x):
            rows.append(_row(where, x, kind, "frozen"))
    return rows
