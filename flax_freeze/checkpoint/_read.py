"""Reading a checkpoint's metadata and flags (no array data), and reading arrays with orbax."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from .._walk import Entry, Key, join
from ._common import FLAGS, _flatten, _one_line
from ._files import read_json
from ._flags import Flags, show
from ._layout import _damaged, _Layout, _locate, _mark, _state_metadata
from ._quiet import _quiet_failure


@dataclass(frozen=True)
class _Stored:
    shape: tuple[int, ...] | None  # None: not an array
    dtype: np.dtype[Any] | None


def _orbax_metadata(layout: _Layout) -> dict[Key, _Stored]:
    """Shapes and dtypes of the stored arrays from orbax's metadata (opens each array)."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        with _quiet_failure():
            tree = handler.metadata(layout.state_dir).tree
    except Exception as err:  # any failure here means a damaged checkpoint
        found = re.search(r'"([^"]+)/\.zarray"', str(err))
        which = f" of {found.group(1).replace('.', '/')!r}" if found else ""
        raise _damaged(
            layout, f"has array metadata{which} that cannot be read ({_one_line(err)})"
        ) from None
    finally:
        handler.close()
    stored = {}
    for key, meta in _flatten(tree).items():
        shape, dtype = getattr(meta, "shape", None), getattr(meta, "dtype", None)
        if shape is None or dtype is None:
            stored[key] = _Stored(None, None)
        else:
            stored[key] = _Stored(tuple(shape), np.dtype(dtype))
    return stored


def _read_flags_json(layout: _Layout) -> Any:
    where = str(layout.root)
    try:
        return read_json(
            layout.root / FLAGS / "metadata", f"The flags item of checkpoint {where!r}"
        )
    except FileNotFoundError as err:
        raise ValueError(
            f"The flags item of checkpoint {where!r} has no JSON file ({err}). The checkpoint "
            "is damaged; restore its arrays with plain orbax if you need them."
        ) from None
    except ValueError as err:
        raise ValueError(
            f"{err} The checkpoint is damaged; restore its arrays with plain orbax if you "
            "need them."
        ) from None


def _read(layout: _Layout, thorough: bool = True) -> tuple[dict[Key, _Stored], Flags | None]:
    """The stored arrays' shapes and dtypes, and the flags: metadata only, no array data.

    A checkpoint that flax_freeze wrote (its state item carries flax_freeze's
    mark, or its Composite metadata lists a flags item) must have valid flags
    that match its arrays: paths, shapes, dtypes, PRNG key implementations,
    and the save identifier of the state item. ``thorough`` compares shapes
    and dtypes with orbax's metadata of each array (which opens every array);
    otherwise, for flags with checksums, only the paths are compared here and
    the checksums verified on reading stand for the rest (a stored array of
    another shape or dtype than the flags say is read wrong, fails its
    checksum, and :meth:`_Plan.check` then compares thoroughly to say why).
    """
    where = str(layout.root)
    metadata = _state_metadata(layout)
    mark = _mark(metadata)
    data = _read_flags_json(layout) if layout.has_flags else None
    if not layout.has_flags and (mark is not None or layout.flags_listed):
        raise _damaged(
            layout,
            f"was written by flax_freeze but has no {FLAGS!r} item, so its frozen flags are "
            "lost; it is not read as a plain orbax checkpoint (which would make every "
            "parameter trainable)",
        )
    if not layout.has_flags:
        return _orbax_metadata(layout), None
    flags = Flags.from_json(data, where, None)
    names = {
        join(str(k["key"]) for k in leaf["key_metadata"])
        for leaf in metadata["tree_metadata"].values()
    }
    if set(flags.arrays) != names:
        missing, extra = set(flags.arrays) - names, names - set(flags.arrays)
        raise ValueError(
            f"The flags item of checkpoint {where!r} does not list the arrays its state item "
            f"holds: listed but not stored {show(missing)}, stored but not listed "
            f"{show(extra)}. The checkpoint was edited or damaged; restore its arrays with "
            "plain orbax if you need them."
        )
    stored = {
        tuple(name.split("/")): _Stored(shape, np.dtype(dtype))
        for name, (shape, dtype) in flags.arrays.items()
    }
    if thorough or not flags.checksums:
        _check_stored(flags, _orbax_metadata(layout), where)
    _check_keys(flags, {join(k): v for k, v in stored.items()}, where)
    saved_id = mark.get("save_id") if mark is not None else None
    if (flags.save_id is not None or mark is not None) and saved_id != flags.save_id:
        raise ValueError(
            f"Checkpoint {where!r} holds flags and arrays of different saves (save ids "
            f"{flags.save_id!r} and {saved_id!r}): it was assembled from two checkpoints or "
            "damaged. Restore an earlier checkpoint."
        )
    return stored, flags


def _check_stored(flags: Flags, stored: Mapping[Key, _Stored], where: str) -> None:
    """Checks that the shapes and dtypes the flags give are those of the stored arrays."""
    names = {join(k): v for k, v in stored.items()}
    differ = [
        f"{name} (flags {shape} {dtype}, stored {names[name].shape} {names[name].dtype})"
        for name, (shape, dtype) in flags.arrays.items()
        if name not in names
        or names[name].shape != shape
        or names[name].dtype is None
        or names[name].dtype != np.dtype(dtype)
    ]
    if differ:
        raise ValueError(
            f"The flags item of checkpoint {where!r} does not match its stored arrays: "
            f"{show(differ)}. The checkpoint was edited or damaged."
        )


def _check_keys(flags: Flags, stored: Mapping[str, _Stored], where: str) -> None:
    """Checks that each PRNG key the flags name has a known implementation and fits its data."""
    for name, impl in flags.keys.items():
        try:
            data = jax.eval_shape(
                lambda impl=impl: jax.random.key_data(jax.random.key(0, impl=impl))
            )
        except (ValueError, TypeError, KeyError):
            raise ValueError(
                f"The flags item of checkpoint {where!r} names an unknown PRNG key "
                f"implementation {impl!r} for {name!r}. The checkpoint was edited or damaged."
            ) from None
        meta = stored[name]
        n = len(data.shape)
        fits = (
            meta.shape is not None
            and meta.shape[len(meta.shape) - n :] == tuple(data.shape)
            and meta.dtype == np.dtype(data.dtype)
        )
        if not fits:
            raise ValueError(
                f"The flags item of checkpoint {where!r} says {name!r} holds {impl} keys, "
                f"but its stored data ({meta.shape} {meta.dtype}) is not key data of that "
                "implementation. The checkpoint was edited or damaged."
            )


def read_flags(directory: str | epath.PathLike) -> Flags | None:
    """Reads a checkpoint's flags item (JSON only: no array is read).

    Args:
        directory: a checkpoint directory, as :func:`save` writes.

    Returns:
        The :class:`Flags`, or None for a checkpoint without a flags item
        (one written by plain orbax).

    Raises:
        FileNotFoundError: if ``directory`` does not exist.
        ValueError: if ``directory`` is not a checkpoint, or its flags item is
            not valid JSON or names paths that are not stored.

    Example:
        >>> import os, tempfile
        >>> import jax.numpy as jnp
        >>> import flax_freeze as ff
        >>> directory = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> ff.checkpoint.save(directory, {"w": jnp.ones(2), "b": ff.FrozenParam(jnp.zeros(2))})
        >>> flags = ff.checkpoint.read_flags(directory)
        >>> sorted(flags.frozen), sorted(flags.trainable)
        (['b'], ['w'])
    """
    return _read(_locate(directory))[1]


def _orbax_read(layout: _Layout, args: ocp.args.PyTreeRestore) -> Any:
    with _quiet_failure():
        return _orbax_read_now(layout, args)


def _orbax_read_now(layout: _Layout, args: ocp.args.PyTreeRestore) -> Any:
    if layout.item is None:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
            return checkpointer.restore(layout.root, args=args)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        composite = checkpointer.restore(
            layout.root, args=ocp.args.Composite(**{layout.item: args})
        )
    return composite[layout.item]


def _candidates(entry: Entry, stored: Mapping[Key, _Stored]) -> list[Key]:
    """The stored keys of an entry: any of its paths, or that path plus ``value``.

    (Plain orbax checkpoints of ``nnx.state`` store a variable under ``.../value``.)
    """
    return [c for k in entry.keys() for c in (k, (*k, "value")) if c in stored]
