"""Describing a checkpoint from its metadata: one row per stored array, with totals."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from etils import epath

from .._summary import Row, Totals, human_bytes, table
from .._walk import join
from ._flags import Flags
from ._layout import _checkpoint_or_step, _locate
from ._parts import frozen_counts
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
        base: for an adapter checkpoint (``save(..., only=...)``), one row per
            path it does not hold and expects from a base, with the flags it
            was saved with; empty for other checkpoints.
        fingerprint: for each path of ``base``, the content checksum it
            expects (None where values are not compared).
    """

    directory: str
    has_flags: bool
    rows: tuple[Row, ...]
    step: int | None = None
    base: tuple[Row, ...] = ()
    fingerprint: Mapping[str, str | None] = field(default_factory=dict)

    @property
    def is_adapter(self) -> bool:
        """Whether the checkpoint holds only part of a node and expects the rest from a base."""
        return bool(self.base)

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
            "variables": [_row_json(r) for r in self.rows],
            "totals": self.totals.to_json(),
            "adapter": self.is_adapter,
            "base": [{**_row_json(r), "checksum": self.fingerprint.get(r.path)} for r in self.base],
            "base_totals": Totals.of(self.base).to_json(),
        }

    def __str__(self) -> str:
        """The table of rows, then the totals per status."""
        flags = "flax_freeze flags" if self.has_flags else "no flags (plain orbax checkpoint)"
        totals = self.totals
        total = f"total {totals.total_count:,} ({human_bytes(totals.total_bytes)})"
        if self.is_adapter:
            flags += (
                f"; an adapter: holds {len(self.rows)} path(s), expects {len(self.base)} "
                "from a base"
            )
        lines = [f"{self.directory}: {flags}", *table(self.rows), f"{totals.line()}, {total}"]
        if self.is_adapter:
            base = Totals.of(self.base)
            lines += [
                "",
                "expected from a base (its fingerprint):",
                *_with_checksums(table(self.base), self.base, self.fingerprint),
                f"{base.line()}, total {base.total_count:,} ({human_bytes(base.total_bytes)})",
            ]
        return "\n".join(lines)


def _row_json(row: Row) -> dict[str, Any]:
    return {
        "path": row.path,
        "type": row.type,
        "shape": list(row.shape),
        "dtype": row.dtype,
        "status": row.status,
        "count": row.count,
        "bytes": row.bytes,
    }


def _with_checksums(
    lines: list[str], rows: tuple[Row, ...], fingerprint: Mapping[str, str | None]
) -> list[str]:
    """A table's lines with a checksum column after the last."""
    width = len(lines[0])
    cells = ["checksum", *(fingerprint.get(r.path) or "-" for r in rows)]
    out = [lines[0].ljust(width) + "  " + cells[0]]
    out.append("-" * (width + 2 + max(map(len, cells))))
    out += [
        line.ljust(width) + "  " + cell for line, cell in zip(lines[2:-1], cells[1:], strict=True)
    ]
    out.append(out[1])
    return out


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
    trained_elsewhere = frozen_counts(flags, stored)  # the frozen parts of partly frozen arrays
    for key, meta in stored.items():
        if meta.shape is None or meta.dtype is None:
            continue
        name = join(key)
        count = math.prod(meta.shape)
        nbytes = count * meta.dtype.itemsize
        count -= trained_elsewhere.get(key, 0)
        if flags is None:
            type_name, status = "-", "unknown"
        else:
            type_name = flags.types.get(name, "Array").rpartition(".")[2]
            status = _status(flags, name)
        impl = flags.keys.get(name) if flags else None
        dtype = f"key<{impl}> data ({meta.dtype.name})" if impl else meta.dtype.name
        rows.append(Row(name, type_name, meta.shape, dtype, status, count, nbytes))
    rows.sort(key=lambda r: r.path)
    base = []
    for name, (shape, dtype, _) in sorted(flags.base.items() if flags else ()):
        assert flags is not None
        count = math.prod(shape)
        base.append(
            Row(
                name,
                flags.types.get(name, "Array").rpartition(".")[2],
                shape,
                dtype,
                _status(flags, name),
                count,
                count * np.dtype(dtype).itemsize,
            )
        )
    fingerprint = {name: spec[2] for name, spec in flags.base.items()} if flags else {}
    return Description(
        str(layout.root), flags is not None, tuple(rows), step, tuple(base), fingerprint
    )


def _status(flags: Flags, name: str) -> str:
    if name in flags.frozen:
        return "frozen"
    return "trainable" if name in flags.trainable else "state"
