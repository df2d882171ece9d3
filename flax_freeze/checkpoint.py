"""Orbax checkpoints that keep the frozen flags.

A checkpoint written by :func:`save` (or by ``ocp.CheckpointManager.save`` with
:func:`save_args`) is an orbax Composite checkpoint with two items:

* ``state``: a plain nested dict of arrays keyed by the node's path parts as
  strings (``{"blocks": {"0": {"kernel": ...}}}``). It holds no Variable types
  and no ``value`` level, so plain orbax reads it.
* ``flags``: a JSON item (see :class:`Flags`): the ``'/'``-joined paths of the
  frozen and the trainable parameters, every variable's type, the trainable
  type and dtype of each frozen parameter where they differ from
  ``nnx.Param`` and its stored dtype, the implementation of each PRNG key
  (keys are stored as their key data), each array's shape and dtype and, for
  each ``ff.Optimizer``, the paths it trains.

:func:`restore` reads the flags and the arrays' metadata first (shapes and
dtypes, no array data), checks them against the target, re-types the target to
the saved flags, rebuilds each ``ff.Optimizer``'s state structure for the
parameters it trained when saved, and only then reads the arrays, each onto its
target sharding. Nothing is ever unpickled: orbax reads arrays with
TensorStore, metadata and flags are JSON.

A node is anything NNX can walk: a module, an ``ff.Optimizer``, a pytree
(tuple, dict, dataclass...) of them, or a pytree of arrays and
``ff.FrozenParam`` values. Inside NNX modules the state is every Variable and
array attribute, as ``nnx.state`` sees it; outside them, every array and Python
number leaf.

Plain orbax, both ways:

* A checkpoint of ``nnx.state(model)`` written by plain Flax/orbax (its paths
  end in ``.../value``), or of a pure dict, restores into a model that declares
  ``ff.FrozenParam``: it has no flags item, so the target keeps its flags.
* A flax_freeze checkpoint restores into a plain Flax model with orbax alone::

      abstract = nnx.eval_shape(lambda: Model(nnx.Rngs(0)))
      graphdef, state = nnx.split(abstract)
      pure = ocp.StandardCheckpointer().restore(directory / "state", nnx.to_pure_dict(state))
      nnx.replace_by_pure_dict(state, pure)
      model = nnx.merge(graphdef, state)

  PRNG keys come back as their raw key data there (``jax.random.wrap_key_data``
  makes keys of them again); frozen parameters become whatever the plain model
  declares.

Linen: a variables dict (``{"params": ..., "batch_stats": ...}``), a params
dict and an ``ffl.TrainState`` (with the fields of a subclass, such as
``batch_stats``) are saved by path like other pytrees. A parameter in boxes
(``ffl.FrozenBox``, ``nn.Partitioned``) is stored unboxed under its own path
(``params/Dense_0/kernel``), and is frozen when an ``ffl.FrozenBox`` holds it.
Only ``params`` is trainable: other collections, and a TrainState's step and
optimizer state, are other state. With ``flags="checkpoint"``, a restore puts
``ffl.FrozenBox`` on the target's parameters saved frozen and takes it off
those saved trainable (other boxes stay), and an ``ffl.TrainState`` gets the
optimizer state structure of the parameters trainable when saved.

Several processes (``jax.distributed``) save and restore together: each calls
:func:`save` (or :func:`restore`) with the same arguments, as with orbax.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import math
import os
import re
import sys
import time
import uuid
import warnings
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from flax.training import train_state
from jax.experimental import multihost_utils

from ._boxes import FrozenBox, is_frozen_box, strip_frozen
from ._ckpt_checksum import checksum, matches
from ._ckpt_files import check_tree, is_local, protected, read_json, unexpected_entries
from ._ckpt_flags import FORMAT as FORMAT
from ._ckpt_flags import Flags, show
from ._ckpt_lock import NEW, OLD, SaveLock, leftovers, new_dir, old_dir
from ._compat import OptArray, OptVariable, get_var_pspec, jax_to_nnx_path
from ._filters import Path, path_str
from ._grad import trainable_tree
from ._optimizer import Optimizer, migrate_opt_state
from ._retype import freeze, frozen_leaf, replace, unfreeze
from ._summary import Row as Row
from ._summary import Totals as Totals
from ._summary import human_bytes, table
from ._variables import (
    FROM_LEAF_KEY,
    PARAM_TYPE_KEY,
    TRAINED_DTYPE_KEY,
    FrozenParam,
    is_any_param,
    is_param,
    param_types,
    unregistered_hint,
)
from ._walk import (
    Entry,
    Key,
    in_box,
    is_inexact,
    is_key,
    is_number,
    is_python_number,
    is_tree_leaf,
    join,
    key_impl,
    key_of,
    number_dtype,
    shape_dtype,
    status,
    walk,
)
from .linen import TrainState

__all__ = [
    "FORMAT",
    "Description",
    "Flags",
    "PartialRestoreWarning",
    "RestoreArgs",
    "Row",
    "Totals",
    "describe",
    "read_flags",
    "restore",
    "restore_args",
    "save",
    "save_args",
]

T = TypeVar("T")

STATE = "state"
FLAGS = "flags"
STATUSES = ("trainable", "frozen", "state")
#: The key of the state item's orbax custom metadata that marks a flax_freeze checkpoint.
MARK = "flax_freeze"
_barriers = itertools.count()
# How often a restore starts again when a save replaces the checkpoint while it reads.
_ATTEMPTS = 5


class PartialRestoreWarning(UserWarning):
    """``restore(..., partial=True)`` left some paths of the target or the checkpoint unused."""


# --------------------------------------------------------------------------------------
# Types and shapes


def _describe(shape: tuple[int, ...], dtype: str) -> str:
    return f"{shape} {dtype}"


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _param_class(name: str | None) -> type | None:
    """The parameter type (``nnx.Param``, a subclass, a registered type) of that name, if loaded."""
    todo: list[type] = list(param_types())
    while todo:
        cls = todo.pop()
        if _qualname(cls) == name:
            return cls
        todo.extend(cls.__subclasses__())
    return None


def _key_data_shape(value: Any) -> tuple[tuple[int, ...], np.dtype[Any]]:
    shape, dtype = shape_dtype(value)
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
    return tuple(data.shape), np.dtype(data.dtype)


# --------------------------------------------------------------------------------------
# Building what is saved


def _saved_value(entry: Entry) -> Any:
    value = entry.value
    if isinstance(value, jax.Array) and is_key(value.dtype):
        return jax.random.key_data(value)
    if is_python_number(value):  # in the dtype JAX computes it in
        return np.asarray(value, number_dtype(value))
    if is_number(value):
        return np.asarray(value)
    return value


def _build(node: Any, save_id: str) -> tuple[dict[str, Any], Flags]:
    """The ``state`` dict and the flags of ``node`` for the save ``save_id``."""
    walked = walk(node)
    entries, optimizers = walked.entries, walked.optimizers
    if not entries:
        raise ValueError(
            f"`node` holds no arrays to save: got {type(node).__name__} {node!r:.200}. "
            "Pass a module, an optimizer, or a pytree of them or of arrays."
        )
    if any(not e.key for e in entries):
        raise ValueError(
            f"`node` is a single {type(node).__name__}, with no path to store it under. "
            "Save a container of it, e.g. {'x': node}."
        )
    abstract = [e for e in entries if isinstance(e.value, jax.ShapeDtypeStruct)]
    if abstract:
        raise ValueError(
            f"`node` is abstract (ShapeDtypeStruct values) at "
            f"{show(join(e.key) for e in abstract)}: save needs real arrays. Restore or "
            "build the node before saving it."
        )
    odd = [e for e in entries if not is_tree_leaf(e.value)]
    if odd:
        kinds = sorted({type(e.value).__name__ for e in odd})
        raise TypeError(
            f"`node` holds variables whose values are not arrays ({', '.join(kinds)}) at "
            f"{show(join(e.key) for e in odd)}. Only arrays and numbers can be saved: "
            "hold other values in static attributes."
        )
    slashed = [e for e in entries if any("/" in k for k in e.key)]
    if slashed:
        raise ValueError(
            f"`node` has keys containing '/' at {show(repr(e.key) for e in slashed)}: "
            "checkpoint paths are '/'-joined, so such keys would be ambiguous. Rename them."
        )
    state: dict[str, Any] = {}
    seen: dict[str, Key] = {}
    for entry in entries:
        key = entry.key
        dotted = ".".join(key)  # orbax names stored arrays by their '.'-joined path
        if dotted in seen:
            raise ValueError(
                f"`node` has two entries stored under the same name {dotted!r}: "
                f"{seen[dotted]!r} and {key!r} (keys are stringified and '.'-joined by orbax). "
                "Rename one of them."
            )
        seen[dotted] = key
        _insert(state, key, _saved_value(entry))
    frozen = {join(e.key) for e in entries if status(e) == "frozen"}
    trainable = {join(e.key) for e in entries if status(e) == "trainable"}
    types = {
        join(e.key): _qualname(type(e.variable if e.variable is not None else e.box))
        for e in entries
        if e.variable is not None or e.box is not None
    }
    param_types: dict[str, str] = {}
    for e in entries:
        original = e.variable.get_metadata().get(PARAM_TYPE_KEY) if e.variable is not None else None
        if isinstance(e.variable, FrozenParam) and original not in (None, nnx.Param):
            param_types[join(e.key)] = _qualname(original)
    trained_dtypes: dict[str, str] = {}
    for e in entries:
        trained_dtype = (
            e.variable.get_metadata().get(TRAINED_DTYPE_KEY) if e.variable is not None else None
        )
        if isinstance(e.variable, FrozenParam) and trained_dtype is not None:
            trained_dtypes[join(e.key)] = np.dtype(trained_dtype).name
    keys = {
        join(e.key): key_impl(e.value)
        for e in entries
        if isinstance(e.value, jax.Array) and is_key(e.value.dtype)
    }
    trained = {
        path_str(path): tuple(
            tuple(k if isinstance(k, str | int) else str(k) for k in p) for p in opt.trained_paths
        )
        for path, opt in optimizers
    }
    arrays = {}
    checksums = {}
    for entry in entries:
        saved = _saved_value(entry)
        shape, dtype = shape_dtype(saved)
        arrays[join(entry.key)] = (shape, np.dtype(dtype).name)
        checksums[join(entry.key)] = checksum(saved)
    flags = Flags(
        frozenset(frozen),
        frozenset(trainable),
        types,
        param_types,
        keys,
        trained,
        arrays,
        trained_dtypes,
        save_id,
        checksums,
    )
    return state, flags


def _insert(tree: dict[str, Any], key: Key, value: Any) -> None:
    """Puts ``value`` in a nested dict at ``key`` (keys are unique: ``_build`` checks)."""
    for part in key[:-1]:
        tree = tree.setdefault(part, {})
    tree[key[-1]] = value


def save_args(node: Any) -> ocp.args.Composite:
    """The ``args`` for ``ocp.CheckpointManager.save`` that store ``node`` with its flags.

    Keep-N-latest, step numbering, best-metric retention and async saving work
    as usual: the manager sees an ordinary Composite of a PyTree item
    (``state``) and a JSON item (``flags``). Restore with :func:`restore_args`,
    or with :func:`restore` on a step's directory.

    Args:
        node: what to save, as for :func:`save`.

    Returns:
        ``ocp.args.Composite(state=ocp.args.PyTreeSave(...), flags=ocp.args.JsonSave(...))``.

    Raises:
        ValueError: if ``node`` holds no arrays, is abstract, or has keys that
            collide once stringified.
        TypeError: if a variable of ``node`` holds something other than an array.

    Example:
        >>> import tempfile
        >>> import optax, orbax.checkpoint as ocp
        >>> from flax import nnx
        >>> import flax_freeze as ff
        >>> model = ff.freeze(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), ff.PathRegex("kernel"))
        >>> opt = ff.Optimizer(model, optax.adam(1e-3))
        >>> directory = tempfile.mkdtemp()
        >>> with ocp.CheckpointManager(directory) as mngr:
        ...     _ = mngr.save(0, args=ff.checkpoint.save_args((model, opt)))
        ...     mngr.wait_until_finished()
        ...     args = ff.checkpoint.restore_args(mngr, (model, opt))
        ...     model, opt = args.finish(mngr.restore(args.step, args=args))
        >>> type(model.kernel).__name__, args.step
        ('FrozenParam', 0)
    """
    return _save_args(node, uuid.uuid4().hex)


def _save_args(node: Any, save_id: str) -> ocp.args.Composite:
    state, flags = _build(node, save_id)
    mark: dict[str, Any] = {MARK: {"format": FORMAT, "save_id": save_id}}
    return ocp.args.Composite(
        **{
            STATE: ocp.args.PyTreeSave(state, custom_metadata=mark),
            FLAGS: ocp.args.JsonSave(flags.to_json()),
        }
    )


def save(directory: str | epath.PathLike, node: Any, *, force: bool = False) -> None:
    """Saves ``node``'s arrays by path, and its frozen flags, as an orbax checkpoint.

    ``node`` may be a module, an ``ff.Optimizer`` (its state, step count and
    trained paths), a pytree of them (``save(dir, (model, opt))`` keeps both),
    a pytree of arrays and ``ff.FrozenParam`` values, or Linen state: a
    variables or params dict, an ``ffl.TrainState``. Arrays are stored by path
    whatever their variable type or boxes; the flags go in a JSON item beside
    them (see the module docstring), with a checksum of each array that
    :func:`restore` verifies. Python numbers are stored in the dtype JAX
    computes them in (``float32`` and ``int32`` unless x64 is enabled).

    The write is atomic: orbax writes a temporary directory and renames it.
    With ``force=True`` an existing checkpoint is replaced only once the new
    one is complete: a process killed during the save leaves the old one
    intact at ``directory`` (or, if killed between the two renames, at
    ``directory.flax-freeze-old-<id>``, which the next save or restore puts
    back). ``force=True`` replaces only a checkpoint: a directory that orbax
    did not write (a ``CheckpointManager`` root, a project directory), the
    working directory, the home directory, ``/`` and any directory above them
    are refused, and nothing is touched.

    One save to a path runs at a time: a save holds a lock beside
    ``directory`` (``directory.flax-freeze-lock``, removed when it is done;
    the operating system releases it if the process dies), and a second save
    to the same path while the first runs raises a ``ValueError`` at once,
    without touching anything. Temporary directories are named after the save
    (``directory.flax-freeze-new-<id>``); the leftovers of killed saves are
    removed by the next save to the same path. The lock needs a local file
    system; elsewhere (``gs://``), coordinate savers yourself.

    In a multi-process run (``jax.process_count() > 1``) every process calls
    ``save`` with the same arguments, on a file system they share. Process 0
    alone takes the lock, prepares the directory and, with ``force=True``,
    swaps in the new checkpoint; every process returns once it is in place at
    ``directory``, and every process raises if process 0 could not save.

    Args:
        directory: the checkpoint directory to create (its parent is created
            if needed); a relative path is taken from the working directory.
        node: what to save: concrete arrays, not an abstract node.
        force: replace ``directory`` if it is an existing checkpoint.

    Raises:
        ValueError: if ``directory`` exists and ``force`` is False; if it is
            not a checkpoint, or is a protected directory, and ``force`` is
            True; if another save to it is in progress; if ``node`` holds no
            arrays, is abstract, or has keys that collide once stringified.
        TypeError: if a variable of ``node`` holds something other than an array.

    Example:
        >>> import os, tempfile
        >>> from flax import nnx
        >>> import flax_freeze as ff
        >>> model = ff.freeze(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), ff.PathRegex("kernel"))
        >>> directory = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> ff.checkpoint.save(directory, model)
        >>> sorted(ff.checkpoint.read_flags(directory).frozen)
        ['kernel']
    """
    path = _absolute(directory)
    save_id = _agreed_id()
    args = _save_args(node, save_id)
    # With several processes, process 0 alone takes the lock and changes
    # directories; it tells the others how that went, and they wait at a
    # barrier after each change (orbax's own save has its barriers).
    primary = jax.process_index() == 0
    lock = SaveLock(path)
    error: Exception | None = None
    exists = False
    if primary:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            exists = _prepare(path, force)
        except (ValueError, OSError) as err:
            lock.release()
            error = err
    ok, exists = _from_primary(error is None, exists)
    if error is not None:
        raise error
    if not ok:
        raise ValueError(
            f"Process 0 could not save to `directory` {str(path)!r}: see its error. "
            "Nothing was changed."
        )
    try:
        new, old = new_dir(path, save_id), old_dir(path, save_id)
        target = new if exists else path
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            checkpointer.save(target, args)
        if primary and target == new:
            path.rename(old)
            new.rename(path)
            old.rmtree()
        _barrier("save:replaced")
    finally:
        if primary:
            lock.release()


def _prepare(path: epath.Path, force: bool) -> bool:
    """Gets ``path`` ready for a save holding its lock; returns whether a checkpoint is there.

    Puts back a checkpoint that an interrupted save left moved aside, removes
    the leftovers of killed saves, and checks that an existing ``path`` may be
    replaced.
    """
    moved = leftovers(path, OLD)
    if moved and not path.exists():
        moved[0].rename(path)  # a save was killed between its two renames
        moved = moved[1:]
    for stale in [*leftovers(path, NEW), *moved]:
        stale.rmtree()
    if not path.exists() and not os.path.islink(path):
        return False
    if not force:
        raise ValueError(
            f"`directory` {str(path)!r} already exists. Pass force=True to replace it "
            "(the old checkpoint stays until the new one is complete), or choose a new "
            "directory."
        )
    _check_replaceable(path)
    return True


def _check_replaceable(path: epath.Path) -> None:
    """Raises unless ``path`` is a checkpoint that ``save(..., force=True)`` may replace."""

    def refuse(problem: str) -> ValueError:
        return ValueError(
            f"`directory` {str(path)!r} {problem}. save(..., force=True) replaces only a "
            "checkpoint that flax_freeze or orbax wrote; nothing was changed. Choose another "
            "directory, or remove it yourself."
        )

    why = protected(path)
    if why:
        raise refuse(why)
    if os.path.islink(path):
        raise refuse("is a symbolic link")
    if not path.is_dir():
        raise refuse("is a file, not a checkpoint")
    try:
        layout = _locate(path)
    except ValueError as err:
        raise refuse(f"is not a checkpoint ({err})") from None
    items = {p.name for p in path.iterdir() if p.is_dir() and _is_item(p)}
    keys = set() if layout.item else _top_keys(layout)
    extra = unexpected_entries(path, items, keys)
    if extra:
        raise refuse(f"holds entries that no checkpoint has: {show(extra)}")


def _is_item(path: epath.Path) -> bool:
    """Whether ``path`` is an item of a Composite checkpoint (it has orbax metadata)."""
    return any((path / name).exists() for name in ("_METADATA", "metadata", "commit_success.txt"))


def _top_keys(layout: _Layout) -> set[str]:
    """The top-level keys of a PyTree checkpoint's tree (directories without OCDBT)."""
    tree = _tree_metadata(layout)
    return {str(leaf["key_metadata"][0]["key"]) for leaf in tree.values()}


def _agreed_id() -> str:
    """A random identifier of a save, the same on every process."""
    if jax.process_count() == 1:
        return uuid.uuid4().hex
    words = np.frombuffer(uuid.uuid4().bytes, dtype=np.uint32)
    words = multihost_utils.broadcast_one_to_all(words)
    return np.asarray(words, dtype=np.uint32).tobytes().hex()


def _from_primary(ok: bool, exists: bool) -> tuple[bool, bool]:
    """Process 0's ``ok`` and ``exists``, on every process."""
    if jax.process_count() == 1:
        return ok, exists
    flags = multihost_utils.broadcast_one_to_all(np.array([ok, exists], dtype=np.int32))
    return bool(flags[0]), bool(flags[1])


def _barrier(name: str) -> None:
    """Waits until every process gets here (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(f"flax_freeze:{name}:{next(_barriers)}")


def _absolute(directory: str | epath.PathLike) -> epath.Path:
    """``directory`` as an absolute path (orbax refuses relative ones)."""
    path = epath.Path(directory)
    return path if path.is_absolute() else epath.Path(os.path.abspath(path))


# --------------------------------------------------------------------------------------
# Finding and reading a checkpoint


@dataclass(frozen=True)
class _Layout:
    """Where a checkpoint keeps its arrays and flags."""

    root: epath.Path
    item: str | None  # the Composite item of the arrays; None: ``root`` is a PyTree checkpoint
    has_flags: bool  # it has a flags item directory
    flags_listed: bool  # its _CHECKPOINT_METADATA names a flags item

    @property
    def state_dir(self) -> epath.Path:
        return self.root / self.item if self.item else self.root


def _locate(directory: str | epath.PathLike, argname: str = "directory") -> _Layout:
    path = _absolute(directory)
    if not path.exists():
        moved = leftovers(path, OLD)
        hint = (
            f" A save with force=True was interrupted between two renames: the previous "
            f"checkpoint is complete at {str(moved[0])!r}; rename it to {path.name!r} (the "
            "next save to this path does it by itself)."
            if moved
            else ""
        )
        raise FileNotFoundError(f"`{argname}` {str(path)!r} does not exist.{hint}")
    if not path.is_dir():
        raise ValueError(f"`{argname}` {str(path)!r} is a file, not a checkpoint directory.")
    if ocp.step.TMP_DIR_SUFFIX in path.name or NEW in path.name:
        raise ValueError(
            f"`{argname}` {str(path)!r} is an unfinished checkpoint: its save did not "
            "complete. Restore the previous checkpoint instead."
        )
    layout = None
    if (path / "_METADATA").exists():
        layout = _Layout(path, None, False, False)
    else:
        for item in (STATE, "default"):
            if (path / item / "_METADATA").exists():
                has_flags = item == STATE and (path / FLAGS).exists()
                layout = _Layout(path, item, has_flags, False)
                break
    if layout is None:
        steps = sorted(ocp.step.checkpoint_steps(path))
        hint = (
            f" It is a CheckpointManager directory with steps {steps[-5:]}: pass one step's "
            f"directory, or use ff.checkpoint.restore_args with the manager."
            if steps
            else ""
        )
        raise ValueError(
            f"`{argname}` {str(path)!r} is not an orbax checkpoint: it has neither a "
            f"{STATE!r} item (as ff.checkpoint.save writes) nor an orbax _METADATA file "
            f"(as ocp.StandardCheckpointer writes).{hint}"
        )
    check_tree(path)
    listed = False
    if layout.item is not None and (path / "_CHECKPOINT_METADATA").exists():
        meta = read_json(path / "_CHECKPOINT_METADATA", f"The metadata of checkpoint {str(path)!r}")
        handlers = meta.get("item_handlers") if isinstance(meta, dict) else None
        listed = isinstance(handlers, dict) and FLAGS in handlers
    return _Layout(path, layout.item, layout.has_flags, listed)


def _damaged(layout: _Layout, problem: str) -> ValueError:
    return ValueError(
        f"Checkpoint {str(layout.root)!r} {problem}. The checkpoint is damaged or incomplete; "
        "restore an earlier one."
    )


def _state_metadata(layout: _Layout) -> dict[str, Any]:
    """The state item's orbax ``_METADATA`` (JSON), checked for the entries read here."""
    data = read_json(
        layout.state_dir / "_METADATA", f"The array metadata of checkpoint {str(layout.root)!r}"
    )
    tree = data.get("tree_metadata") if isinstance(data, dict) else None
    if not isinstance(tree, dict) or not all(
        isinstance(leaf, dict)
        and isinstance(leaf.get("key_metadata"), list)
        and leaf["key_metadata"]
        and all(isinstance(k, dict) and "key" in k for k in leaf["key_metadata"])
        for leaf in tree.values()
    ):
        raise _damaged(layout, "has malformed array metadata (its state item's _METADATA file)")
    return data


def _tree_metadata(layout: _Layout) -> dict[str, Any]:
    return _state_metadata(layout)["tree_metadata"]


def _mark(metadata: Mapping[str, Any]) -> dict[str, Any] | None:
    """The flax_freeze mark in a state item's metadata: ``{"format", "save_id"}``, or None."""
    custom = metadata.get("custom_metadata")
    mark = custom.get(MARK) if isinstance(custom, dict) else None
    return mark if isinstance(mark, dict) else None


def _flatten(tree: Any, prefix: Key = ()) -> dict[Key, Any]:
    if isinstance(tree, Mapping):
        out: dict[Key, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, (*prefix, str(k))))
        return out
    if isinstance(tree, list | tuple):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flatten(v, (*prefix, str(i))))
        return out
    return {prefix: tree}


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


def _one_line(err: BaseException, limit: int = 300) -> str:
    """An exception as one short line: its type and the start of its first line."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


# --------------------------------------------------------------------------------------
# Shardings


def _default_sharding() -> jax.sharding.Sharding:
    """Where a fresh array would go: replicated on the mesh in context, else the default device."""
    mesh = jax.sharding.get_mesh()
    if not mesh.empty:
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _concrete_mesh(mesh: Any, where: str) -> jax.sharding.Mesh:
    if isinstance(mesh, jax.sharding.Mesh):
        return mesh
    context = jax.sharding.get_mesh()
    if not context.empty and context.abstract_mesh == mesh:
        return context
    try:
        return jax.make_mesh(mesh.axis_sizes, mesh.axis_names, axis_types=mesh.axis_types)
    except ValueError as err:
        raise ValueError(
            f"`target` places {where} on the abstract mesh {mesh}, and no device mesh of "
            f"that shape can be made here ({err}). Restore inside `with jax.set_mesh(mesh):`."
        ) from err


def _sharding(entry: Entry) -> jax.sharding.Sharding | None:
    """The sharding to restore an entry onto; None restores a NumPy array."""
    value = entry.value
    if isinstance(value, jax.Array):
        return value.sharding
    if not isinstance(value, jax.ShapeDtypeStruct):
        return None
    where = repr(join(entry.key))
    sharding = value.sharding
    variable = entry.variable
    if sharding is None and variable is not None and variable.get_metadata().get("out_sharding"):
        # nnx.eval_shape drops shardings on meshes with Auto axes: rebuild from metadata.
        mesh = variable.get_metadata().get("mesh")
        if mesh is None:
            mesh = jax.sharding.get_mesh()
            if mesh.empty:
                mesh = jax.sharding.get_abstract_mesh()
            if mesh.empty:
                raise ValueError(
                    f"`target` variable {where} is sharded by its metadata "
                    f"(out_sharding={variable.get_metadata()['out_sharding']!r}) but names no "
                    "mesh, and none is in context. Restore inside `with jax.set_mesh(mesh):`."
                )
        spec = get_var_pspec(variable) or jax.sharding.PartitionSpec()
        return jax.sharding.NamedSharding(_concrete_mesh(mesh, where), spec)
    if sharding is None:
        return _default_sharding()
    if isinstance(sharding, jax.sharding.NamedSharding) and not isinstance(
        sharding.mesh, jax.sharding.Mesh
    ):
        mesh = _concrete_mesh(sharding.mesh, where)
        return jax.sharding.NamedSharding(mesh, sharding.spec, memory_kind=sharding.memory_kind)
    return sharding


# --------------------------------------------------------------------------------------
# Restoring


def _find_param(entries: list[Entry], trained: Path) -> Entry | None:
    """The variable outside optimizers whose path ends with ``trained`` (shortest path first)."""
    want, n = key_of(trained), len(trained)
    best: tuple[tuple[int, Key], Entry] | None = None
    for entry in entries:
        if entry.in_optimizer or entry.variable is None:
            continue
        for path in entry.paths:
            if len(path) >= n and key_of(path[len(path) - n :]) == want:
                rank = (len(path), key_of(path))
                if best is None or rank < best[0]:
                    best = (rank, entry)
    return best[1] if best else None


def _state_sharding(
    key: Key,
    shape: tuple[int, ...],
    params: Mapping[Key, tuple[tuple[int, ...], jax.sharding.Sharding | None]],
    old: Mapping[Key, Any],
) -> jax.sharding.Sharding:
    """Where a rebuilt optimizer-state leaf goes: like its parameter, else like the old leaf."""
    for param, (param_shape, sharding) in params.items():
        if key[len(key) - len(param) :] == param and param_shape == shape and sharding:
            return sharding
    previous = old.get(key)
    if isinstance(previous, jax.Array) and previous.shape == shape:
        return previous.sharding
    return _default_sharding()


def _rebuild_opt_state(
    opt: Optimizer[Any], trained: tuple[Path, ...], entries: list[Entry], where: str
) -> Any:
    """Abstract optimizer state for the parameters ``trained``, each leaf with its sharding."""
    params: list[tuple[Path, nnx.Variable]] = []
    placed: dict[Key, tuple[tuple[int, ...], jax.sharding.Sharding | None]] = {}
    missing = []
    for path in trained:
        entry = _find_param(entries, path)
        if entry is None:
            missing.append(path_str(path))
            continue
        shape, dtype = shape_dtype(entry.value)
        sharding = _sharding(entry)
        metadata = entry.variable.get_metadata() if entry.variable is not None else {}
        metadata.pop(PARAM_TYPE_KEY, None)
        dtype = metadata.pop(TRAINED_DTYPE_KEY, dtype)  # trained at the dtype it was trained in
        abstract = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        params.append((path, nnx.Param.from_metadata(abstract, metadata)))
        placed[key_of(path)] = (shape, sharding)
    if missing:
        which = f"at {where!r}" if where else "(the target itself)"
        raise ValueError(
            f"The optimizer {which} was saved training {show(path_str(p) for p in trained)}, "
            f"but `target` trains other parameters and holds no {show(missing)} to rebuild its "
            "state from. Restore the optimizer together with its model: "
            "restore(directory, (model, optimizer))."
        )
    state = jax.eval_shape(opt.tx.init, nnx.from_flat_state(params))
    old = {
        key_of(jax_to_nnx_path(kp)): leaf
        for kp, leaf in jax.tree_util.tree_flatten_with_path(nnx.as_pure(opt.opt_state))[0]
    }

    def convert(key_path: Any, x: Any) -> Any:
        value = x.get_raw_value() if isinstance(x, nnx.Variable) else x
        shape = tuple(value.shape)
        key = key_of(jax_to_nnx_path(key_path))
        sharding = _state_sharding(key, shape, placed, old)
        abstract = jax.ShapeDtypeStruct(shape, value.dtype, sharding=sharding)
        if isinstance(x, nnx.Variable):  # as flax's to_opt_state does, without re-sharding
            metadata = x.get_metadata()
            if "optimizer_sharding" in metadata:
                metadata["out_sharding"] = metadata.pop("optimizer_sharding")
            return OptVariable.from_metadata(abstract, metadata)
        return OptArray(abstract)

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return jax.tree_util.tree_map_with_path(convert, state, is_leaf=is_var)


def _opt_params(state: train_state.TrainState, params: Any) -> Any:
    """What ``state.tx.init`` is given for ``params``: only the trainable part for ffl's."""
    return trainable_tree(params) if isinstance(state, TrainState) else params


def _box_changes(
    node: Any,
    to_box: Collection[Path],
    to_unbox: Collection[Path],
    to_param: Collection[Path] = (),
) -> dict[Path, Any]:
    """Replacements (for ``replace``) that re-type the values of ``node`` at those paths.

    ``to_box``: into an ``ffl.FrozenBox`` (around their other boxes);
    ``to_unbox``: out of it (their other boxes kept); ``to_param``: bare
    pytree leaves into an ``ff.FrozenParam``.
    """
    new_at: dict[Path, Any] = {}
    for entry in walk(node).entries:
        if entry.variable is not None:
            continue
        path = entry.paths[0]
        if path in to_box:
            new_at[path] = FrozenBox(entry.box if entry.box is not None else entry.value)
        elif path in to_unbox and entry.box is not None:
            new_at[path] = strip_frozen(entry.box)
        elif path in to_param:
            new_at[path] = frozen_leaf(entry.value)
    return new_at


@dataclass
class _Retype:
    """How the target changes to take the saved flags, worked out before anything changes."""

    to_freeze: set[int] = field(default_factory=set)  # Param variables, by id
    to_unfreeze: set[int] = field(default_factory=set)  # FrozenParam variables, by id
    to_bare: set[int] = field(default_factory=set)  # of those, the ones saved as bare leaves
    param_types: dict[int, type] = field(default_factory=dict)  # by variable id
    trained_dtypes: dict[Key, np.dtype[Any] | None] = field(default_factory=dict)  # by entry key
    to_box: set[Path] = field(default_factory=set)  # Linen values to put in an ffl.FrozenBox
    to_unbox: set[Path] = field(default_factory=set)  # Linen boxes to take it off
    to_param: set[Path] = field(default_factory=set)  # bare leaves to hold in an ff.FrozenParam
    # Saved frozen, but in the target a variable that is not a parameter (an
    # unregistered type): it cannot take the flag.
    not_params: list[tuple[str, nnx.Variable]] = field(default_factory=list)


def _linen_opt_state(
    retype: _Retype, path: Path, state: train_state.TrainState, entries: list[Entry]
) -> Any:
    """Abstract ``opt_state`` of a TrainState for its parameters trainable when saved.

    None when the saved flags train what the target trains. Each leaf is
    placed like its parameter, else like the target's leaf at its path.
    """
    prefix, opt_prefix = (*path, "params"), (*path, "opt_state")
    n, m = len(prefix), len(opt_prefix)
    to_box = {p[n:] for p in retype.to_box if p[:n] == prefix}
    to_unbox = {p[n:] for p in retype.to_unbox if p[:n] == prefix}
    if not to_box and not to_unbox:
        return None
    params = replace(state.params, {}, _box_changes(state.params, to_box, to_unbox))
    fresh = jax.eval_shape(lambda p: state.tx.init(_opt_params(state, p)), params)
    placed = {
        e.key[n:]: (shape_dtype(e.value)[0], _sharding(e))
        for e in entries
        if e.variable is None and e.paths[0][:n] == prefix
    }
    old = {e.key[m:]: e.value for e in entries if e.paths[0][:m] == opt_prefix}
    new_at: dict[Path, Any] = {}
    for entry in walk(fresh).entries:
        shape, dtype = shape_dtype(entry.value)
        sharding = _state_sharding(entry.key, shape, placed, old)
        abstract = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        new_at[entry.paths[0]] = abstract if entry.box is None else in_box(entry.box, abstract)
    return replace(fresh, {}, new_at)


@dataclass
class _Plan:
    """What restoring a checkpoint into a target does, worked out before anything changes."""

    layout: _Layout
    chosen: dict[Key, Key]  # entry key -> stored key
    stored: dict[Key, _Stored]
    shardings: dict[Key, jax.sharding.Sharding | None]  # by stored key
    impls: dict[Key, str]  # PRNG key implementation by stored key
    dtypes: dict[Key, np.dtype[Any]]  # the dtype to read each stored array as
    retype: _Retype | None  # None: the target keeps its flags
    optimizers: list[tuple[Optimizer[Any], Any, tuple[Path, ...]]]
    # (path, abstract opt_state) of each Linen TrainState whose optimizer
    # state is rebuilt for the parameters trainable when saved.
    linen_states: list[tuple[Path, Any]]
    saved: Flags | None  # the checkpoint's flags (checksums)
    # Tied variables of the target stored under several paths: entry key -> stored keys.
    ties: dict[Key, list[Key]] = field(default_factory=dict)
    opt: _OptStatePlan = field(default_factory=lambda: _OptStatePlan())

    def keys(self) -> set[Key]:
        """Every stored key read: the chosen ones, the other paths of ties, optax fills."""
        return set(self.chosen.values()).union(*self.ties.values(), self.opt.fill.values())

    def state_args(self, keys: Collection[Key] | None = None) -> ocp.args.PyTreeRestore:
        """The orbax ``PyTreeRestore`` args that read the planned arrays (or only ``keys``).

        Arrays are read in their stored dtype: checksums are verified on what
        was stored, and :meth:`finish` casts where the plan says so.
        """
        item: dict[str, Any] = {}
        restore_args: dict[str, Any] = {}
        for key in self.keys() if keys is None else keys:
            stored = self.stored[key]
            assert stored.shape is not None
            assert stored.dtype is not None
            sharding, dtype = self.shardings[key], stored.dtype
            _insert(item, key, jax.ShapeDtypeStruct(stored.shape, dtype))
            if sharding is None:
                arg = ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
            else:
                arg = ocp.ArrayRestoreArgs(
                    sharding=sharding, global_shape=stored.shape, dtype=dtype
                )
            _insert(restore_args, key, arg)
        return ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True)

    def _retype(self, target: Any) -> Any:
        """Re-types the target to the saved flags; puts in rebuilt Linen optimizer states."""
        node = target
        retype = self.retype
        if retype is not None and retype.param_types:
            variables = {id(e.variable): e.variable for e in walk(target).entries}
            for variable_id, cls in retype.param_types.items():
                variable = variables.get(variable_id)
                if variable is not None:
                    variable.set_metadata(PARAM_TYPE_KEY, cls)
        if retype is not None and retype.to_unfreeze:
            ids = retype.to_unfreeze
            for entry in walk(node).entries:  # the value held frozen in a lower precision
                variable = entry.variable
                if id(variable) in ids and variable is not None:
                    if id(variable) in retype.to_bare:
                        variable.set_metadata(FROM_LEAF_KEY, True)
                    trained_dtype = variable.get_metadata().get(TRAINED_DTYPE_KEY)
                    if trained_dtype is not None:
                        variable.del_metadata(TRAINED_DTYPE_KEY)
                        shape, _ = shape_dtype(entry.value)
                        variable.set_raw_value(jax.ShapeDtypeStruct(shape, trained_dtype))
            node = unfreeze(node, lambda _p, v: id(v) in ids, missing_ok=True)
        if retype is not None and retype.to_freeze:
            ids = retype.to_freeze
            node = freeze(node, lambda _p, v: id(v) in ids, missing_ok=True)
        new_at: dict[Path, Any] = {}
        if retype is not None:
            new_at = _box_changes(node, retype.to_box, retype.to_unbox, retype.to_param)
        for path, state in self.linen_states:
            new_at[(*path, "opt_state")] = state
        return replace(node, {}, new_at) if new_at else node

    def check(self, arrays: Mapping[Key, Any], verify: bool) -> None:
        """Verifies the arrays read against their checksums, and that ties hold one value.

        Raises:
            ValueError: naming the damaged paths, or the tied paths that differ.
        """
        where = str(self.layout.root)
        checksums = self.saved.checksums if self.saved is not None and verify else {}
        damaged = [
            join(key)
            for key, value in arrays.items()
            if join(key) in checksums and not matches(value, checksums[join(key)])
        ]
        if damaged:
            _read(self.layout, thorough=True)  # raises if the flags lie about the arrays
            raise ValueError(
                f"Checkpoint {where!r} is damaged: the arrays at {show(damaged)} do not match "
                "the checksums recorded when they were saved. Restore an earlier checkpoint "
                "(verify=False reads them anyway)."
            )
        for entry_key, keys in self.ties.items():
            first = arrays[keys[0]]
            for other in keys[1:]:
                if not _equal(first, arrays[other]):
                    raise _tie_error(where, entry_key, keys[0], other)

    def finish(self, target: T, restored: Mapping[str, Any], verify: bool = True) -> T:
        """Re-types ``target``, rebuilds optimizer states, and fills in the restored arrays."""
        arrays = _flatten(restored)
        self.check(arrays, verify)
        for key, dtype in self.dtypes.items():  # read as stored, then cast where planned
            if key in arrays and dtype != self.stored[key].dtype:
                arrays[key] = arrays[key].astype(dtype)
        node = self._retype(target)
        for opt, state, trained in self.optimizers:
            opt.opt_state = nnx.data(state)
            opt.trained_paths = trained
        trained_dtypes = self.retype.trained_dtypes if self.retype is not None else {}
        new_variables: dict[int, Any] = {}
        new_at: dict[Path, Any] = {}
        for entry in walk(node).entries:
            stored_key = self.chosen.get(entry.key)
            if stored_key is None or stored_key not in arrays:
                continue
            value = _from_stored(entry.value, arrays[stored_key], self.impls.get(stored_key))
            variable = entry.variable
            if variable is None:
                for path in entry.paths:
                    new_at[path] = value if entry.box is None else in_box(entry.box, value)
                continue
            metadata = variable.get_metadata()
            adjust = isinstance(variable, FrozenParam) and entry.key in trained_dtypes
            if adjust:  # the precision it was trained in, as saved
                trained_dtype = trained_dtypes[entry.key]
                metadata.pop(TRAINED_DTYPE_KEY, None)
                if trained_dtype is not None:
                    metadata[TRAINED_DTYPE_KEY] = trained_dtype
            if not entry.in_module:
                new_variables[id(variable)] = type(variable).from_metadata(value, metadata)
                continue
            if adjust:
                variable.set_metadata(metadata)
            variable.set_raw_value(value)
        for path in self.opt.to_none:
            new_at[path] = None
        for path, key in self.opt.fill.items():
            new_at[path] = arrays[key]
        if new_variables or new_at:
            node = replace(node, new_variables, new_at)
        if self.retype is None and self.linen_states:
            node = self._migrate(node)
        return node  # type: ignore[return-value]

    def _migrate(self, node: Any) -> Any:
        """With the target's flags: each rebuilt Linen optimizer state, migrated to them.

        As ``ffl.TrainState.freeze``/``unfreeze`` do: state kept for the
        parameters trainable both when saved and now, fresh for the others.
        """
        states = dict(walk(node).train_states)
        new_at = {}
        for path, _ in self.linen_states:
            state = states[path]
            params = _opt_params(state, state.params)
            new_at[(*path, "opt_state")] = migrate_opt_state(state.tx, state.opt_state, params)
        return replace(node, {}, new_at)


def _equal(a: Any, b: Any) -> bool:
    """Whether two arrays read from a checkpoint hold the same values (NaNs equal)."""
    if isinstance(a, jax.Array) and isinstance(b, jax.Array):
        return bool(jnp.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True))


def _tie_error(where: str, entry: Key, first: Key, other: Key) -> ValueError:
    return ValueError(
        f"Checkpoint {where!r} holds different values at {join(first)!r} and {join(other)!r}, "
        f"but in `target` they are one tied variable ({join(entry)!r}): restoring would keep "
        "one and drop the other. Restore into a target where they are separate variables, "
        "or untie them in the checkpoint's model before saving."
    )


def _from_stored(target_value: Any, data: Any, impl: str | None) -> Any:
    shape, dtype = shape_dtype(target_value)
    if is_key(dtype) and not is_key(data.dtype):  # orbax gives keys it saved itself as keys
        return jax.random.wrap_key_data(data, impl=impl or key_impl(target_value))
    if isinstance(target_value, bool | int | float):
        return type(target_value)(np.asarray(data).item())
    if isinstance(target_value, np.generic):
        return np.asarray(data)[()]
    return data


def _candidates(entry: Entry, stored: Mapping[Key, _Stored]) -> list[Key]:
    """The stored keys of an entry: any of its paths, or that path plus ``value``.

    (Plain orbax checkpoints of ``nnx.state`` store a variable under ``.../value``.)
    """
    return [c for k in entry.keys() for c in (k, (*k, "value")) if c in stored]


def _plan(layout: _Layout, target: Any, flags: str, partial: bool, verify: bool) -> _Plan:
    """Works out a restore: reads flags and metadata, checks them, plans the re-typing."""
    if flags not in ("checkpoint", "target"):
        raise ValueError(
            f"`flags` must be 'checkpoint' (re-type the target to the saved flags) or "
            f"'target' (keep the target's), got {flags!r}."
        )
    stored, saved = _read(layout, thorough=not verify)
    where = str(layout.root)
    walked = walk(target)
    entries = [e for e in walked.entries if is_tree_leaf(e.value)]
    if not entries:
        raise ValueError(
            f"`target` holds no arrays to restore into: got {type(target).__name__} "
            f"{target!r:.200}. Pass a module, an optimizer, or a pytree of them or of arrays "
            "(concrete, or abstract from nnx.eval_shape)."
        )
    retype = _plan_retype(saved, entries, stored) if saved is not None else None
    if retype is not None and retype.not_params and flags == "checkpoint":
        name, variable = retype.not_params[0]
        raise ValueError(
            f"The checkpoint holds {name!r} frozen, but in `target` it is a "
            f"{type(variable).__name__}, which is not a parameter, so it cannot be frozen. "
            + (
                unregistered_hint([v for _, v in retype.not_params])
                or "Pass a target of the saved model, or flags='target' to keep its own."
            )
        )
    # Optimizers are given the state structure they had when saved.
    rebuilt: list[tuple[Optimizer[Any], Any, tuple[Path, ...]]] = []
    for opt_path, opt in walked.optimizers:
        trained = saved.optimizers.get(path_str(opt_path)) if saved else None
        if trained is None or set(trained) == set(opt.trained_paths):
            continue
        state = _rebuild_opt_state(opt, trained, entries, path_str(opt_path))
        prefix = (*opt_path, "opt_state")
        n = len(prefix)
        entries = [e for e in entries if not any(p[:n] == prefix for p in e.paths)]
        entries += walk(state, prefix, in_module=True, in_optimizer=True).entries
        rebuilt.append((opt, state, trained))
    # So are Linen train states (with the target's flags, they migrate it afterwards).
    linen_states: list[tuple[Path, Any]] = []
    for ts_path, ts in walked.train_states:
        state = _linen_opt_state(retype, ts_path, ts, entries) if retype else None
        if state is None:
            continue
        prefix = (*ts_path, "opt_state")
        n = len(prefix)
        entries = [e for e in entries if not any(p[:n] == prefix for p in e.paths)]
        entries += walk(state, prefix, linen="state").entries
        linen_states.append((ts_path, state))
    # Match every target entry with a stored array.
    chosen: dict[Key, Key] = {}
    consumed: set[Key] = set()
    missing: list[Entry] = []
    mismatched: list[str] = []
    shardings: dict[Key, jax.sharding.Sharding | None] = {}
    impls: dict[Key, str] = {}
    dtypes: dict[Key, np.dtype[Any]] = {}
    ties: dict[Key, list[Key]] = {}
    for entry in entries:
        candidates = _candidates(entry, stored)
        if not candidates:
            missing.append(entry)
            continue
        consumed.update(candidates)
        key = candidates[0]
        chosen[entry.key] = key
        if len(candidates) > 1:
            _plan_tie(where, entry, candidates, stored, saved)
            ties[entry.key] = candidates
            for other in candidates[1:]:
                shardings[other] = _sharding(entry)
        impl = saved.keys.get(join(key)) if saved else None
        dtype = _related_dtype(entry, stored[key], saved, join(key), flags)
        problem = None if dtype is not None else _mismatch(entry.value, stored[key], impl)
        if problem:
            mismatched.append(f"{join(key)} ({problem})")
            continue
        dtypes[key] = dtype if dtype is not None else stored[key].dtype  # type: ignore[assignment]
        shardings[key] = _sharding(entry)
        if impl:
            impls[key] = impl
    opt = _OptStatePlan()
    if saved is not None:
        missing, mismatched = _plan_opt_states(
            opt, entries, stored, saved, flags, chosen, consumed, missing, mismatched
        )
        for path, key in opt.fill.items():
            shardings[key] = opt.shardings[path]
            dtypes[key] = stored[key].dtype  # type: ignore[assignment]
    unused = [join(k) for k in stored if k not in consumed]
    if mismatched:
        if saved is not None and saved.checksums and verify:
            _read(layout, thorough=True)  # the flags may lie about the stored arrays
        raise ValueError(
            f"Checkpoint {where!r} does not fit `target` ({type(target).__name__}): shapes or "
            f"dtypes differ at {len(mismatched)} path(s): {show(mismatched)}. Build the target "
            "with the shapes and dtypes it was saved with."
        )
    missing_paths = [join(e.key) for e in missing]
    if missing or unused:
        if not partial:
            raise ValueError(
                f"Checkpoint {where!r} and `target` ({type(target).__name__}) hold different "
                f"paths. Missing from the checkpoint: {show(missing_paths)}; not in the target: "
                f"{show(unused)}. Pass partial=True to restore the paths that match and "
                "leave the rest as they are."
            )
        if not chosen:
            raise ValueError(
                f"No path of `target` ({type(target).__name__}) is in checkpoint {where!r}, "
                f"even with partial=True. The target's paths: {show(missing_paths)}; the "
                f"checkpoint's: {show(unused)}."
            )
        abstract = [join(e.key) for e in missing if isinstance(e.value, jax.ShapeDtypeStruct)]
        if abstract:
            raise ValueError(
                f"partial=True would leave abstract values of `target` unfilled at "
                f"{show(abstract)}: checkpoint {where!r} does not hold them. Restore into a "
                "concrete target (built normally), whose values stay where the checkpoint "
                "has none."
            )
        warnings.warn(
            PartialRestoreWarning(
                f"Restored {len(chosen)} path(s) from checkpoint {where!r}. Left as they were "
                f"(missing from the checkpoint): {show(missing_paths)}; ignored (not in the "
                f"target): {show(unused)}."
            ),
            stacklevel=3,
        )
    return _Plan(
        layout,
        chosen,
        stored,
        shardings,
        impls,
        dtypes,
        retype if flags == "checkpoint" else None,
        rebuilt,
        linen_states,
        saved,
        ties,
        opt,
    )


@dataclass
class _OptStatePlan:
    """How plain optax state in the target changes to follow the other side's flags."""

    fill: dict[Path, Key] = field(default_factory=dict)  # target path -> stored key to put there
    shardings: dict[Path, jax.sharding.Sharding | None] = field(default_factory=dict)
    to_none: set[Path] = field(default_factory=set)  # leaves of parameters saved frozen


def _plan_opt_states(
    opt: _OptStatePlan,
    entries: list[Entry],
    stored: Mapping[Key, _Stored],
    saved: Flags,
    flags: str,
    chosen: dict[Key, Key],
    consumed: set[Key],
    missing: list[Entry],
    mismatched: list[str],
) -> tuple[list[Entry], list[str]]:
    """Reconciles plain optax state (``tx.init(ff.trainable_tree(tree))``) across frozen sets.

    Optax state mirrors the trainable parameters (``mu/<param path>``, ``None``
    at frozen ones), so when the checkpoint and the target train different
    sets their paths differ. Each state leaf is matched with its parameter by
    the path below its optax field (the one parameter whose path ends so).
    With ``flags="checkpoint"`` the state takes the saved structure: leaves of
    parameters saved frozen become ``None``, leaves saved for parameters the
    target holds frozen are filled in, and state that belongs to no single
    parameter (``optax.flatten``'s vector) is taken as saved. With
    ``flags="target"`` the target's state (fresh, from ``tx.init``) is kept
    for parameters trainable only in the target and for state that belongs to
    no single parameter, and the saved state of parameters the target holds
    frozen is not read. Returns the entries still missing and the mismatches
    left.
    """
    params = {
        e.key: e for e in entries if e.opt_field is None and status(e) in ("trainable", "frozen")
    }
    target_trainable = {join(k) for k, e in params.items() if status(e) == "trainable"}
    if target_trainable == set(saved.trainable) & {join(k) for k in params}:
        return missing, mismatched

    def owner(mirror: Key) -> Entry | None:
        found = [e for k, e in params.items() if mirror and k[len(k) - len(mirror) :] == mirror]
        return found[0] if len(found) == 1 else None

    still_missing = []
    for entry in missing:
        mirror = entry.mirror
        param = owner(key_of(mirror)) if mirror is not None else None
        frozen_when_saved = param is not None and join(param.key) in saved.frozen
        if not frozen_when_saved:
            still_missing.append(entry)
        elif flags == "checkpoint":
            opt.to_none.add(entry.paths[0])
    fields = {e.opt_field for e in entries if e.opt_field is not None}
    for key in stored:
        if key in consumed:
            continue
        for opt_field in fields:
            base = key_of(opt_field)
            if key[: len(base)] != base:
                continue
            param = owner(key[len(base) :])
            if param is None or status(param) != "frozen" or join(param.key) in saved.frozen:
                continue
            consumed.add(key)
            if flags == "checkpoint":
                path = (*opt_field, *param.paths[0][len(param.paths[0]) - len(key) + len(base) :])
                opt.fill[path] = key
                opt.shardings[path] = _sharding(param)
            break

    def shared(entry: Entry) -> bool:
        """State of no single parameter (a flat vector of all of them, a count)."""
        return entry.mirror is not None and owner(key_of(entry.mirror)) is None

    if flags == "target":  # never hand one parameter's state to another: keep it fresh
        for entry in entries:
            if entry.key in chosen and shared(entry) and shape_dtype(entry.value)[0] != ():
                if isinstance(entry.value, jax.ShapeDtypeStruct):
                    raise ValueError(
                        f"`target` optimizer state at {join(entry.key)!r} belongs to no single "
                        "parameter and the checkpoint trained other parameters, so it starts "
                        "fresh, but it is abstract. Build the optimizer state for the target "
                        "with tx.init(ff.trainable_tree(tree)) before restoring into it."
                    )
                del chosen[entry.key]
    still_mismatched = []
    by_name = {join(chosen[e.key]): e for e in entries if e.key in chosen}
    for problem in mismatched:
        name = problem.split(" (", 1)[0]
        entry = by_name.get(name)
        if entry is None or not shared(entry):
            still_mismatched.append(problem)
            continue
        del chosen[entry.key]  # state of no single parameter: fresh, or taken as saved
        if flags == "checkpoint":
            key = tuple(name.split("/"))
            opt.fill[entry.paths[0]] = key
            opt.shardings[entry.paths[0]] = _default_sharding()
    return still_missing, still_mismatched


def _plan_tie(
    where: str, entry: Entry, keys: list[Key], stored: Mapping[Key, _Stored], saved: Flags | None
) -> None:
    """Refuses, before reading, a tied target variable stored under paths that differ.

    Shapes, dtypes and (where the flags have them) checksums are compared here;
    without checksums, :meth:`_Plan.check` compares the values once read.
    """
    checksums = saved.checksums if saved is not None else {}
    first = keys[0]
    for other in keys[1:]:
        same = stored[first] == stored[other]
        if same and join(first) in checksums and join(other) in checksums:
            same = checksums[join(first)] == checksums[join(other)]
        if not same:
            raise _tie_error(where, entry.key, first, other)


def _plan_retype(saved: Flags, entries: list[Entry], stored: Mapping[Key, _Stored]) -> _Retype:
    """How each entry of the target that the checkpoint holds changes to take the saved flags."""
    retype = _Retype()
    for entry in entries:
        candidates = _candidates(entry, stored)
        if not candidates or entry.marker is not None:
            continue  # inside another library's frozen wrapper: frozen by it, never re-typed
        name, variable = join(candidates[0]), entry.variable
        if name in saved.frozen:
            trained_dtype = saved.trained_dtypes.get(name)
            retype.trained_dtypes[entry.key] = np.dtype(trained_dtype) if trained_dtype else None
        if variable is None:
            _plan_retype_value(retype, saved, entry, name)
            continue
        has_type = PARAM_TYPE_KEY in variable.get_metadata()
        if name in saved.frozen and not is_any_param(variable):
            retype.not_params.append((name, variable))
        if name in saved.frozen:
            if is_param(variable):
                retype.to_freeze.add(id(variable))
            elif isinstance(variable, FrozenParam) and not has_type:
                cls = _param_class(saved.param_types.get(name))
                if cls is not None and cls is not nnx.Param:
                    retype.param_types[id(variable)] = cls
        elif name in saved.trainable and isinstance(variable, FrozenParam):
            retype.to_unfreeze.add(id(variable))
            if name not in saved.types and not entry.in_module:
                retype.to_bare.add(id(variable))  # saved as a bare leaf: unfrozen to one
            cls = _param_class(saved.types.get(name))
            if not has_type and cls is not None and (cls is not nnx.Param or not entry.in_module):
                retype.param_types[id(variable)] = cls
    return retype


def _plan_retype_value(retype: _Retype, saved: Flags, entry: Entry, name: str) -> None:
    """How a bare value or a Linen box chain changes to take its saved flag.

    Only parameters change: values outside NNX modules (whose state is their
    variables) and outside Linen state collections. A Linen parameter is
    frozen by an ``ffl.FrozenBox``, and so is a bare value the checkpoint held
    in boxes; any other bare value by an ``ff.FrozenParam``.
    """
    if entry.in_module or entry.linen in ("state", "frozen") or entry.opt_field is not None:
        return
    path = entry.paths[0]
    if entry.box is not None and is_frozen_box(entry.box):
        if name in saved.trainable:
            retype.to_unbox.add(path)
    elif name in saved.frozen and is_inexact(entry.value):
        linen = entry.box is not None or entry.linen == "params"
        if linen or saved.types.get(name) not in (None, _qualname(FrozenParam)):
            retype.to_box.add(path)
        else:
            retype.to_param.add(path)


def _related_dtype(
    entry: Entry, stored: _Stored, saved: Flags | None, name: str, flags: str
) -> np.dtype[Any] | None:
    """The dtype to read an array as when it differs from the target's by a frozen precision.

    A parameter frozen in a lower precision (``ff.freeze(..., dtype=...)``) on
    one side and held in the precision it was trained in on the other fits:
    with ``flags="checkpoint"`` the saved dtype is read (the target is re-typed
    to it), with ``flags="target"`` the array is cast to the target's dtype.
    None: no such relation (the dtypes must then be equal).
    """
    shape, dtype = shape_dtype(entry.value)
    if stored.shape != shape or stored.dtype is None or is_key(dtype):
        return None
    dtype = np.dtype(dtype)
    if stored.dtype == dtype:
        return None
    saved_trained = saved.trained_dtypes.get(name) if saved else None
    metadata = entry.variable.get_metadata() if entry.variable is not None else {}
    target_trained = metadata.get(TRAINED_DTYPE_KEY)
    related = (saved_trained is not None and np.dtype(saved_trained) == dtype) or (
        target_trained is not None and np.dtype(target_trained) == stored.dtype
    )
    if not related:
        return None
    return stored.dtype if flags == "checkpoint" and saved is not None else dtype


def _mismatch(value: Any, stored: _Stored, impl: str | None) -> str | None:
    """Why a stored array cannot fill ``value``; None if it can."""
    shape, dtype = shape_dtype(value)
    if is_key(dtype):
        target_impl = key_impl(value)
        expected = _describe(shape, f"key<{target_impl}>")
        data_shape, data_dtype = _key_data_shape(value)
        fits = stored.shape == data_shape and stored.dtype == data_dtype
        if fits and impl in (None, target_impl):
            return None
    else:
        expected = _describe(shape, np.dtype(dtype).name)
        if impl is None and stored.shape == shape and stored.dtype == np.dtype(dtype):
            return None
        # A Python number takes a stored scalar of its kind in any precision
        # (one saved with x64 enabled, or by an earlier version, is float64).
        number = is_python_number(value) and impl is None
        if number and stored.shape == () and stored.dtype is not None:
            if stored.dtype.kind == np.dtype(dtype).kind:
                return None
    if stored.shape is None or stored.dtype is None:
        return f"checkpoint holds no array there, target {expected}"
    if impl is None:
        return f"checkpoint {_describe(stored.shape, stored.dtype.name)}, target {expected}"
    key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl)))
    key_shape = stored.shape[: len(stored.shape) - key_data.ndim]
    return f"checkpoint {_describe(key_shape, f'key<{impl}>')}, target {expected}"


class RestoreArgs(ocp.args.Composite):
    """``args`` for ``ocp.CheckpointManager.restore``, made by :func:`restore_args`.

    Pass it to ``manager.restore(args.step, args=args)``, then hand what that
    returns to :meth:`finish`, which re-types the target, rebuilds optimizer
    states and fills in the arrays.

    Attributes:
        step: the step it was made for (None for a plain directory).
    """

    step: int | None

    def __init__(self, plan: _Plan, target: Any, step: int | None, verify: bool = True) -> None:
        """Holds the plan; use :func:`restore_args` to make one."""
        items: dict[str, Any] = {STATE: plan.state_args()}
        if plan.layout.has_flags:
            items[FLAGS] = ocp.args.JsonRestore()
        super().__init__(**items)
        object.__setattr__(self, "_plan", plan)
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "step", step)
        object.__setattr__(self, "_verify", verify)
        object.__setattr__(self, "_identity", _identity(plan.layout.root))

    def finish(self, restored: Mapping[str, Any]) -> Any:
        """Fills the target from what ``CheckpointManager.restore`` returned.

        Args:
            restored: the Composite that ``manager.restore(step, args=self)`` returned.

        Returns:
            The target, re-typed and filled, as :func:`restore` returns it.

        Raises:
            TypeError: if ``restored`` is not what the manager returned for these args.
            ValueError: if the checkpoint was replaced since these args were made,
                if an array does not match its checksum, or tied paths differ.
        """
        if not isinstance(restored, Mapping) or not isinstance(restored.get(STATE), Mapping):
            raise TypeError(
                f"`restored` must be what manager.restore(args.step, args=args) returned "
                f"(a Composite with a {STATE!r} item), got {type(restored).__name__}."
            )
        if _identity(self._plan.layout.root) != self._identity:
            raise ValueError(
                f"Checkpoint {str(self._plan.layout.root)!r} was replaced by another save "
                "after these args were made: what was read may mix two saves. Make new "
                "args with ff.checkpoint.restore_args and restore again."
            )
        return self._plan.finish(self._target, restored[STATE], self._verify)


def _step_directory(
    root: epath.Path, step: int | None, argname: str = "source"
) -> tuple[epath.Path, int]:
    """The directory of a finished step of a CheckpointManager directory (default: the latest)."""
    root = _absolute(root)
    paths = {
        ocp.step.step_from_checkpoint_name(p.name): p for p in ocp.step.checkpoint_steps_paths(root)
    }
    if not paths:
        raise ValueError(
            f"`{argname}` {str(root)!r} is a CheckpointManager directory with no finished step."
        )
    if step is None:
        step = max(paths)
    if step not in paths:
        raise ValueError(
            f"`step` {step!r} is not a finished step of {str(root)!r}; its steps are "
            f"{sorted(paths)[-8:]}."
        )
    return paths[step], step


def restore_args(
    source: str | epath.PathLike | ocp.CheckpointManager,
    target: Any,
    *,
    step: int | None = None,
    flags: Literal["checkpoint", "target"] = "checkpoint",
    partial: bool = False,
    verify: bool = True,
) -> RestoreArgs:
    """The ``args`` for ``ocp.CheckpointManager.restore`` that restore into ``target`` with flags.

    It reads the step's flags and array metadata (no array data) and checks
    them against ``target``, so every error :func:`restore` raises is raised
    here, before the manager reads anything. ``target`` is not changed until
    :meth:`RestoreArgs.finish`.

    Args:
        source: an ``ocp.CheckpointManager``, or a checkpoint directory (e.g.
            one step's directory) written by :func:`save` or :func:`save_args`.
        target: what to restore into, as for :func:`restore`.
        step: the manager's step to restore; defaults to its latest finished
            step. Ignored for a directory.
        flags: as for :func:`restore`.
        partial: as for :func:`restore`.
        verify: as for :func:`restore`.

    Returns:
        A :class:`RestoreArgs`: ``args.finish(manager.restore(args.step, args=args))``.

    Raises:
        ValueError: if the manager has no finished step or not ``step``; if the
            step is not a Composite checkpoint with a ``state`` item; and as
            :func:`restore` raises.

    Example:
        >>> import tempfile
        >>> import jax.numpy as jnp, orbax.checkpoint as ocp
        >>> import flax_freeze as ff
        >>> tree = {"w": jnp.ones(2), "b": ff.FrozenParam(jnp.zeros(2))}
        >>> with ocp.CheckpointManager(tempfile.mkdtemp()) as mngr:
        ...     _ = mngr.save(5, args=ff.checkpoint.save_args(tree))
        ...     mngr.wait_until_finished()
        ...     args = ff.checkpoint.restore_args(mngr, {"w": jnp.zeros(2), "b": jnp.ones(2)})
        ...     restored = args.finish(mngr.restore(args.step, args=args))
        >>> args.step, type(restored["b"]).__name__, restored["w"].tolist()
        (5, 'FrozenParam', [1.0, 1.0])
    """
    if isinstance(source, ocp.CheckpointManager):
        directory, step = _step_directory(_absolute(source.directory), step)
        argname = "source"
    else:
        directory, step, argname = _absolute(source), None, "source"
    layout = _locate(directory, argname)
    if layout.item != STATE:
        raise ValueError(
            f"`{argname}` {str(directory)!r} is not a Composite checkpoint with a {STATE!r} "
            f"item, so CheckpointManager.restore cannot take these args. Use "
            f"ff.checkpoint.restore({str(directory)!r}, target) instead."
        )
    return RestoreArgs(_plan(layout, target, flags, partial, verify), target, step, verify)


def restore(
    directory: str | epath.PathLike,
    target: T,
    *,
    flags: Literal["checkpoint", "target"] = "checkpoint",
    partial: bool = False,
    verify: bool = True,
) -> T:
    """Restores a checkpoint into ``target``, with its frozen flags.

    ``target`` gives the structure, shapes, dtypes and shardings: a module, an
    ``ff.Optimizer``, a pytree of them (``model, opt = restore(dir, (model,
    opt))``), a pytree of arrays, or Linen state; concrete, or abstract from
    ``nnx.eval_shape`` or ``jax.eval_shape``. Every array is read onto its target's sharding: a
    concrete array's own, an abstract one's ``sharding``, or, where
    ``nnx.eval_shape`` dropped it, the variable's ``out_sharding`` metadata on
    its ``mesh`` (or the mesh in context). An abstract mesh is made concrete
    from the mesh in context, else with ``jax.make_mesh`` over the local devices.

    With ``flags="checkpoint"`` the target is re-typed to the saved flags
    (parameters saved frozen become ``ff.FrozenParam``, the others trainable,
    with their original types); with ``flags="target"`` it keeps its own. A
    checkpoint written by plain orbax has no flags: the target keeps its own.
    Each ``ff.Optimizer`` gets the state structure it had when saved (for the
    parameters it trained then) and the saved values, so training resumes
    bit-exactly; if that set differs from what the model trains now, its next
    update migrates the state as after a ``freeze``. Its state is rebuilt from
    the target's parameters of the same paths: restore an optimizer together
    with its model.

    Linen: with ``flags="checkpoint"`` a parameter saved frozen gets an
    ``ffl.FrozenBox`` and one saved trainable loses it (``nn.Partitioned``
    and other boxes stay), and each ``ffl.TrainState`` gets the ``opt_state``
    structure of the parameters trainable when saved (``tx.init`` of them)
    and the saved values, so it resumes bit-exactly. With ``flags="target"``
    its boxes stay, and the saved ``opt_state`` is migrated to them as
    ``ffl.TrainState.freeze``/``unfreeze`` would (fresh state for parameters
    trainable only now).

    Modules and optimizers (concrete or abstract) are filled in place; pytrees
    are immutable and come back rebuilt. Use the return value.

    Safety: nothing in the target changes until every check has passed. The
    checkpoint's files must be directories and regular files (links only
    within it); its flags must match its stored arrays (paths, shapes, dtypes,
    key implementations) and come from the same save as them; each array read
    must match the checksum recorded when it was saved (``verify=False`` skips
    that); paths tied in the target must hold equal values in the checkpoint.
    A checkpoint that flax_freeze wrote is never read as a plain orbax one: a
    missing or damaged flags item is an error. If another process replaces
    the checkpoint (``save(..., force=True)``) while it is read, the restore
    starts again, so flags and arrays always come from one save.

    Args:
        directory: a checkpoint written by :func:`save`, by
            ``CheckpointManager.save`` with :func:`save_args` (one step's
            directory), or by plain orbax (``ocp.StandardCheckpointer`` or a
            Composite with a ``state`` or ``default`` item). A relative path
            is taken from the working directory.
        target: what to restore into.
        flags: ``"checkpoint"`` or ``"target"``: whose frozen flags win.
        partial: restore the paths that exist in both and leave the rest: the
            target's other values stay as they are, the checkpoint's other
            arrays are not read; a :class:`PartialRestoreWarning` lists both.
            Paths start from the saved node: the model of a ``(model, opt)``
            checkpoint restores into the target ``(model,)``.
        verify: check each array read against the checksum recorded when it
            was saved (checkpoints written by this version of flax_freeze and
            later): one CRC-32 pass over the arrays (see
            ``benchmarks/checkpoint_cost.py``). With ``verify=False`` the
            arrays are read unchecked, and the flags' shapes and dtypes are
            compared with orbax's metadata of each array instead.

    Returns:
        ``target`` filled from the checkpoint.

    Raises:
        FileNotFoundError: if ``directory`` does not exist.
        ValueError: if ``directory`` is not a checkpoint or is unfinished; if
            it holds files other than directories and regular files; if its
            flags item is missing, not valid JSON, or does not match its arrays;
            if an array cannot be read or does not match its checksum; if tied
            paths differ; if shapes or dtypes differ; if paths are missing from
            either side (unless ``partial``); if ``flags`` is not one of the
            two values.

    Example:
        >>> import os, tempfile
        >>> from flax import nnx
        >>> import flax_freeze as ff
        >>> model = ff.freeze(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), ff.PathRegex("kernel"))
        >>> directory = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> ff.checkpoint.save(directory, model)
        >>> abstract = nnx.eval_shape(lambda: nnx.Linear(2, 3, rngs=nnx.Rngs(1)))
        >>> restored = ff.checkpoint.restore(directory, abstract)
        >>> type(restored.kernel).__name__, bool((restored.kernel[...] == model.kernel[...]).all())
        ('FrozenParam', True)

        A Linen ``TrainState`` created with nothing frozen takes the saved flags:

        >>> import jax, jax.numpy as jnp, optax
        >>> import flax.linen as nn
        >>> from flax_freeze import linen as ffl
        >>> net = nn.Dense(3)
        >>> params = net.init(jax.random.key(0), jnp.ones((1, 2)))["params"]
        >>> def state(params):
        ...     return ffl.TrainState.create(apply_fn=net.apply, params=params, tx=optax.adam(0.1))
        >>> directory = os.path.join(tempfile.mkdtemp(), "linen")
        >>> ff.checkpoint.save(directory, state(ffl.freeze(params, "kernel")))
        >>> restored = ff.checkpoint.restore(directory, state(params))
        >>> type(restored.params["kernel"]).__name__, restored.opt_state[0].mu["kernel"]
        ('FrozenBox', None)
    """
    path = _absolute(directory)
    for attempt in range(1, _ATTEMPTS + 1):
        identity = None
        try:
            layout = _locate(path)
            identity = _identity(layout.root)
            plan = _plan(layout, target, flags, partial, verify)
            restored = _read_arrays(plan)
        except (FileNotFoundError, ValueError):
            if attempt < _ATTEMPTS and _being_replaced(path, identity):
                time.sleep(0.02 * attempt)
                continue
            raise
        if _identity(path) == identity:
            return plan.finish(target, restored, verify)
        time.sleep(0.02 * attempt)
    raise ValueError(
        f"Checkpoint {str(path)!r} was replaced by other saves {_ATTEMPTS} times while it was "
        "being read. Restore it when no save to it is running, or restore from a "
        "CheckpointManager step, which is never replaced."
    )


def _identity(path: epath.Path) -> tuple[int, ...] | None:
    """What tells one checkpoint directory at ``path`` from the next one saved there.

    A forced save puts a new directory in place by renaming: a different inode,
    or at least a different change time. None where it cannot be told (the
    path is missing, or not on a local file system).
    """
    if not is_local(path):
        return None
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_ctime_ns)


def _being_replaced(path: epath.Path, identity: tuple[int, ...] | None) -> bool:
    """Whether a failed read may be a save replacing ``path`` meanwhile (then read again)."""
    if identity is None:  # it was missing: between the two renames of a forced save?
        return bool(leftovers(path, NEW) or leftovers(path, OLD)) or path.exists()
    return _identity(path) != identity


def _without_loop_noise(previous: Any) -> Any:
    """An unraisable-exception hook that drops what a failed orbax read leaves behind.

    That is "Event loop is closed", "coroutine ... was never awaited", and errors
    of orbax coroutines collected after the read failed; the rest is passed on.
    """
    if getattr(previous, "drops_loop_noise", False):
        return previous

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        closed = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        unawaited = isinstance(error, RuntimeWarning) and "was never awaited" in str(error)
        code = getattr(unraisable.object, "cr_code", None)  # an orbax coroutine left behind
        orphan = code is not None and "orbax" in code.co_filename
        if not (closed or unawaited or orphan):
            previous(unraisable)

    hook.drops_loop_noise = True  # type: ignore[attr-defined]
    return hook


class _DropOrphanReadErrors(logging.Filter):
    """Drops asyncio's report of a TensorStore read error that no one retrieved.

    When one read of a damaged checkpoint fails, orbax gives up on the others;
    those that fail too are reported by asyncio, when collected, as "Task
    exception was never retrieved" with a traceback. The first failure is
    raised as usual, so these reports only repeat it. Every other record passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        orphan = str(record.msg).partition("\n")[0].endswith("exception was never retrieved")
        return not (orphan and error is not None and "tensorstore" in str(error))


_ORPHAN_FILTER = _DropOrphanReadErrors()


@contextlib.contextmanager
def _quiet_failure() -> Iterator[None]:
    """Keeps a failing orbax read from printing stray tracebacks.

    When TensorStore fails to read a damaged array, orbax closes its event loop
    while other reads are still pending; their completion callbacks then raise
    "Event loop is closed", which Python prints as unraisable exceptions, at
    any time later, and coroutines it left behind warn or fail when collected. The
    error itself is raised as usual. After a failure the hook that drops
    exactly that noise stays installed (every other unraisable exception goes
    to the previous hook).
    """
    previous = sys.unraisablehook
    sys.unraisablehook = _without_loop_noise(previous)
    try:
        yield
    except BaseException:
        # The hook and the filter stay: the pending reads fail later. Coroutines orbax left
        # unawaited are collected now, without their "never awaited" warnings.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            logging.getLogger("asyncio").addFilter(_ORPHAN_FILTER)  # added once, by identity
            gc.collect()
        raise
    sys.unraisablehook = previous


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


def _read_arrays(plan: _Plan) -> Any:
    """Reads the planned arrays; a damaged array is an error naming its path."""
    try:
        return _orbax_read(plan.layout, plan.state_args())
    except Exception as err:  # any failure here is damage below the metadata
        first = _one_line(err)
    if plan.saved is not None:
        _read(plan.layout, thorough=True)  # flags that lie about the arrays: say so
    bad = []
    for key in sorted(plan.keys()):
        try:
            _orbax_read(plan.layout, plan.state_args([key]))
        except Exception:  # noqa: BLE001 - each failing array is named
            bad.append(join(key))
    where = f"at {show(bad)}" if bad else "(no single array fails alone)"
    raise _damaged(plan.layout, f"has arrays that cannot be read {where}: {first}")


# --------------------------------------------------------------------------------------
# Describing a checkpoint


@dataclass(frozen=True)
class Description:
    """A checkpoint's stored arrays with their flags, read from metadata only.

    ``print(description)`` shows the table with totals; :meth:`to_json` gives
    the same for machines.

    Attributes:
        directory: the checkpoint directory.
        has_flags: whether it has a flags item (False for plain orbax
            checkpoints, whose rows have status ``unknown``).
        rows: one :class:`Row` per stored array, sorted by path.
    """

    directory: str
    has_flags: bool
    rows: tuple[Row, ...]

    @property
    def totals(self) -> Totals:
        """Element counts and bytes per status, as ``ff.summary(node).totals`` gives them."""
        return Totals.of(self.rows)

    def to_json(self) -> dict[str, Any]:
        """The description as JSON-ready data."""
        return {
            "directory": self.directory,
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


def describe(directory: str | epath.PathLike) -> Description:
    """Describes a checkpoint's arrays and flags from its metadata, without reading arrays.

    Args:
        directory: a checkpoint directory (written by :func:`save`, or by
            plain orbax).

    Returns:
        A :class:`Description`; print it for a table of paths, types, shapes,
        dtypes and trainable or frozen, with totals.

    Raises:
        FileNotFoundError: if ``directory`` does not exist.
        ValueError: if ``directory`` is not a checkpoint, or its flags item is
            not valid JSON or names unknown paths.

    Example:
        >>> import os, tempfile
        >>> from flax import nnx
        >>> import flax_freeze as ff
        >>> model = ff.freeze(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), ff.PathRegex("kernel"))
        >>> directory = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> ff.checkpoint.save(directory, model)
        >>> print(ff.checkpoint.describe(directory))  # doctest: +ELLIPSIS
        /...ckpt: flax_freeze flags
        path    type         shape   dtype    status     count  bytes
        -------------------------------------------------------------
        bias    Param        (3,)    float32  trainable      3     12
        kernel  FrozenParam  (2, 3)  float32  frozen         6     24
        -------------------------------------------------------------
        trainable 3 (12 B), frozen 6 (24 B), total 9 (36 B)
    """
    layout = _locate(directory)
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
    return Description(
        str(layout.root), flags is not None, tuple(sorted(rows, key=lambda r: r.path))
    )
