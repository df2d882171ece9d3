"""Describing a checkpoint from its metadata: one row per stored array, with totals."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from etils import epath

from .._summary import Row, Totals, human_bytes, table
from .._walk import join
from ._layout import _checkpoint_or_step, _locate
from ._read import _read


@dataclass(frozen=True)
class Description:
    """A checkpoint's stored arrays with their flags, read from metadata only.

    ``print(description)`` shows the table with totals; :meth:`to_json` gives
    the same for machines.

    Attributes:
        directory: the checkpoint directory.
        has_flags: whether it has a flags item (False for plain orbax
            checkpoints, whose rows have status ``unknown``).
        rows: one :class:`~flax_freeze.Row` per stored array, sorted by path.
        step: the step of a ``CheckpointManager`` directory it describes;
            None for a checkpoint directory.
    """

    directory: str
    has_flags: bool
    rows: tuple[Row, ...]
    step: int | None = None

    @property
    def totals(self) -> Totals:
        """Element counts and bytes per status, as ``ff.summary(node).totals`` gives them."""
        return Totals.of(self.rows)

    def to_json(self) -> dict[str, Any]:
        """The description as JSON-ready data."""
        return {
            "directory": self.directory,
            "step": self.step,
            "has_flags": self.has_flags,
            "variables": [
                {
                    "path": r.path,
                    "type": r.type,
                    "shape": list(r.shape),
                    "dtype": r.dtype,
                    "status": r.status,
                    "count": r.count,
                    "bytes": r.bytes,
                }
                for r in self.rows
            ],
            "totals": self.totals.to_json(),
        }

    def __str__(self) -> str:
        """The table of rows, then the totals per status."""
        flags = "flax_freeze flags" if self.has_flags else "no flags (plain orbax checkpoint)"
        totals = self.totals
        total = f"total {totals.total_count:,} ({human_bytes(totals.total_bytes)})"
        return "\n".join(
            [f"{self.directory}: {flags}", *table(self.rows), f"{totals.line()}, {total}"]
        )


def describe(directory: str | epath.PathLike, *, step: int | None = None) -> Description:
    """Describes a checkpoint's arrays and flags from its metadata, without reading arrays.

    Its rows and totals are those :func:`flax_freeze.summary` gives for the
    saved node: the same paths, statuses, counts and bytes.

    Args:
        directory: a checkpoint directory (written by :func:`save`, or by
            plain orbax), or a ``CheckpointManager`` directory.
        step: the step of a manager directory to describe; defaults to its
            latest finished step.

    Returns:
        A :class:`Description`; print it for a table of paths, types, shapes,
        dtypes and trainable or frozen, with totals.

    Raises:
        FileNotFoundError: if ``directory`` does not exist.
        ValueError: if ``directory`` is not a checkpoint, or its flags item is
            not valid JSON or names unknown paths; if ``step`` is not a
            finished step of a manager directory.

    Example:
        >>> import pathlib, tempfile
        >>> from flax import nnx
        >>> import flax_freeze as ff
        >>> directory = pathlib.Path(tempfile.mkdtemp()) / "ckpt"
        >>> ff.checkpoint.save(directory, ff.freeze(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), "kernel"))
        >>> print(ff.checkpoint.describe(directory))  # doctest: +ELLIPSIS
        /...ckpt: flax_freeze flags
        path    type         shape   dtype    status     count  bytes
        -------------------------------------------------------------
        bias    Param        (3,)    float32  trainable      3     12
        kernel  FrozenParam  (2, 3)  float32  frozen         6     24
        -------------------------------------------------------------
        trainable 3 (12 B), frozen 6 (24 B), total 9 (36 B)
    """
    path, step = _checkpoint_or_step(directory, step)
    layout = _locate(path)
    stored, flags = _read(layout)
    rows = []
    for key, meta in stored.items():
        if meta.shape is None or meta.dtype is None:
            continue
        name = join(key)
        count = math.prod(meta.shape)
        if flags is None:
            type_name, status = "-", "unknown"
        else:
            type_name = flags.types.get(name, "Array").rpartition(".")[2]
            status = (
                "frozen"
                if name in flags.frozen
                else "trainable"
                if name in flags.trainable
                else "state"
            )
        impl = flags.keys.get(name) if flags else None
        dtype = f"key<{impl}> data ({meta.dtype.name})" if impl else meta.dtype.name
        rows.append(
            Row(name, type_name, meta.shape, dtype, status, count, count * meta.dtype.itemsize)
        )
    rows.sort(key=lambda r: r.path)
    return Description(str(layout.root), flags is not None, tuple(rows), step)
