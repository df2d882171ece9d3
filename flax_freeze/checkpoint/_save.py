"""Saving: building the state item and the flags of a node, and writing them safely."""

from __future__ import annotations

import itertools
import os
import uuid
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from .._filters import path_str
from .._optimizer import Optimizer
from .._variables import PARAM_TYPE_KEY, TRAINED_DTYPE_KEY, FrozenParam
from .._walk import (
    Key,
    is_key,
    is_tree_leaf,
    join,
    key_impl,
    shape_dtype,
    status,
    walk,
)
from ._adapter import Fingerprint, saved_value, select
from ._checksum import checksum
from ._common import FLAGS, MARK, STATE, _insert, _qualname
from ._files import protected, unexpected_entries
from ._flags import FORMAT, Flags, show
from ._layout import _absolute, _is_item, _locate, _top_keys
from ._lock import NEW, OLD, SaveLock, leftovers, new_dir, old_dir
from ._opt_state import model_of

_barriers = itertools.count()


def _build(
    node: Any, save_id: str, only: Any = None, fingerprint: Fingerprint = "values"
) -> tuple[dict[str, Any], Flags]:
    """The ``state`` dict and the flags of ``node`` for the save ``save_id``.

    With ``only``, the state holds what :func:`~._adapter.select` stores, and
    the flags the fingerprint of the rest; flags and types cover every path.
    """
    walked = walk(node)
    entries = walked.entries
    optimizers = [(p, o) for p, o in walked.optimizers if isinstance(o, Optimizer)]
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
    base: dict[str, tuple[tuple[int, ...], str, str | None]] = {}
    stored = entries
    if only is not None:
        stored, base = select(walked, only, fingerprint)
    state: dict[str, Any] = {}
    seen: dict[str, Key] = {}
    for entry in stored:
        key = entry.key
        dotted = ".".join(key)  # orbax names stored arrays by their '.'-joined path
        if dotted in seen:
            raise ValueError(
                f"`node` has two entries stored under the same name {dotted!r}: "
                f"{seen[dotted]!r} and {key!r} (keys are stringified and '.'-joined by orbax). "
                "Rename one of them."
            )
        seen[dotted] = key
        _insert(state, key, saved_value(entry))
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
        for e in stored
        if isinstance(e.value, jax.Array) and is_key(e.value.dtype)
    }
    trained = {
        path_str(path): tuple(
            tuple(k if isinstance(k, str | int) else str(k) for k in p) for p in opt.trained_paths
        )
        for path, opt in optimizers
    }
    owners = {path_str(path): model_of(opt.trained_paths, entries) for path, opt in optimizers}
    initial = {
        path_str(path): tuple(
            tuple(k if isinstance(k, str | int) else str(k) for k in p) for p in opt.initial_paths
        )
        for path, opt in optimizers
    }
    arrays = {}
    checksums = {}
    for entry in stored:
        saved = saved_value(entry)
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
        {name: owner for name, owner in owners.items() if owner is not None},
        base,
        initial,
    )
    return state, flags


def save_args(
    node: Any, *, only: Any = None, fingerprint: Fingerprint = "values"
) -> ocp.args.Composite:
    """The ``args`` for ``ocp.CheckpointManager.save`` that store ``node`` with its flags.

    Keep-N-latest, step numbering, best-metric retention and async saving work
    as usual: the manager sees an ordinary Composite of a PyTree item
    (``state``) and a JSON item (``flags``). Restore with :func:`restore_args`,
    or with :func:`restore` on a step's directory.

    Args:
        node: what to save, as for :func:`save`.
        only: as for :func:`save`: an adapter checkpoint of what it selects.
        fingerprint: as for :func:`save`.

    Returns:
        ``ocp.args.Composite(state=ocp.args.PyTreeSave(...), flags=ocp.args.JsonSave(...))``.

    Raises:
        ValueError: if ``node`` holds no arrays, is abstract, or has keys that
            collide once stringified; if ``only`` selects nothing.
        TypeError: if a variable of ``node`` holds something other than an array,
            or ``only`` is not a filter.

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
    return _save_args(node, uuid.uuid4().hex, only, fingerprint)


def _save_args(
    node: Any, save_id: str, only: Any = None, fingerprint: Fingerprint = "values"
) -> ocp.args.Composite:
    state, flags = _build(node, save_id, only, fingerprint)
    mark: dict[str, Any] = {MARK: {"format": FORMAT, "save_id": save_id}}
    return ocp.args.Composite(
        **{
            STATE: ocp.args.PyTreeSave(state, custom_metadata=mark),
            FLAGS: ocp.args.JsonSave(flags.to_json()),
        }
    )


def save(
    directory: str | epath.PathLike,
    node: Any,
    *,
    force: bool = False,
    only: Any = None,
    fingerprint: Fingerprint = "values",
) -> None:
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

    **Adapter checkpoints.** With ``only`` (an NNX filter: ``ff.Trainable``
    for what was trained, ``nnx.LoRAParam`` for adapters, a path regex), only
    the variables it selects are stored, and with them the optimizer state
    that goes with them: the state of the selected parameters and the shared
    state (step counts), so that training resumes from base + adapter. The
    flags still cover every path (what was frozen and trainable, the types),
    and of each path left out the flags record a fingerprint: its shape,
    dtype and a CRC-32 of its content (the same checksum as of the stored
    arrays, 1.4-4 GB/s on one CPU core; ``fingerprint="shapes"`` skips it
    for a huge base). Left out unchecked are RNG state, which training
    advances, and the optimizer state of parameters not selected, which
    starts afresh on restore. :func:`restore` puts the adapter onto a
    concrete base and refuses a base that differs from this fingerprint. A
    Linen parameter is shown to the filter as an ``nnx.Param`` when trainable
    and an ``ff.FrozenParam`` in an ``ffl.FrozenBox``, so ``ff.Trainable`` and
    path filters select Linen parameters as well.

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
        only: store only what this filter selects (an adapter checkpoint);
            None stores everything.
        fingerprint: for an adapter checkpoint, ``"values"`` records a
            checksum of each array left out, so that a restore onto another
            base with the same shapes is refused; ``"shapes"`` records paths,
            shapes and dtypes only.

    Raises:
        ValueError: if ``directory`` exists and ``force`` is False; if it is
            not a checkpoint, or is a protected directory, and ``force`` is
            True; if another save to it is in progress; if ``node`` holds no
            arrays, is abstract, or has keys that collide once stringified; if
            ``only`` selects nothing, or ``fingerprint`` is not one of its values.
        TypeError: if a variable of ``node`` holds something other than an
            array, or ``only`` is not a filter.

    Example:
        >>> import os, tempfile
        >>> from flax import nnx
        >>> import flax_freeze as ff
        >>> model = ff.freeze(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), ff.PathRegex("kernel"))
        >>> directory = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> ff.checkpoint.save(directory, model)
        >>> sorted(ff.checkpoint.read_flags(directory).frozen)
        ['kernel']

        An adapter checkpoint of what was trained, restored onto the base:

        >>> adapter = os.path.join(tempfile.mkdtemp(), "adapter")
        >>> ff.checkpoint.save(adapter, model, only=ff.Trainable)
        >>> flags = ff.checkpoint.read_flags(adapter)
        >>> sorted(flags.arrays), sorted(flags.base)
        (['bias'], ['kernel'])
        >>> base = nnx.Linear(2, 3, rngs=nnx.Rngs(0))  # the same base weights
        >>> base = ff.checkpoint.restore(adapter, base)
        >>> type(base.kernel).__name__
        'FrozenParam'
    """
    path = _absolute(directory)
    save_id = _agreed_id()
    args = _save_args(node, save_id, only, fingerprint)
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
