"""Restoring: :func:`restore`, and the ``args`` for an orbax ``CheckpointManager``."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Literal

import orbax.checkpoint as ocp
from etils import epath

from .._walk import join
from ._common import FLAGS, STATE, T, _one_line
from ._flags import show
from ._layout import _absolute, _being_replaced, _damaged, _identity, _locate, _step_directory
from ._plan import _Plan, _plan
from ._read import _orbax_read, _read

# How often a restore starts again when a save replaces the checkpoint while it reads.
_ATTEMPTS = 5


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


def restore_args(
    source: str | epath.PathLike | ocp.CheckpointManager,
    target: Any,
    *,
    step: int | None = None,
    flags: Literal["checkpoint", "target"] = "checkpoint",
    partial: bool = False,
    verify: bool = True,
    check_base: bool = True,
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
        check_base: as for :func:`restore`.

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
    plan = _plan(layout, target, flags, partial, verify, check_base)
    return RestoreArgs(plan, target, step, verify)


def restore(
    directory: str | epath.PathLike,
    target: T,
    *,
    flags: Literal["checkpoint", "target"] = "checkpoint",
    partial: bool = False,
    verify: bool = True,
    check_base: bool = True,
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

    Partly frozen arrays (``ff.freeze``/``ff.unfreeze`` with ``where=``) are
    split in the target as saved, before the restore, and an array saved
    whole makes a split one whole.

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

    Adapter checkpoints (``save(..., only=...)``) are restored onto
    ``target`` as their base: it must be concrete, built and loaded by any
    means (e.g. from the base's own checkpoint). The saved variables (and
    optimizer state) are put in place, the saved flags apply to every path,
    base included, and the target's other paths are checked against the
    fingerprint the adapter recorded: a base with other paths, shapes, dtypes
    or values is refused, naming the first paths that differ, before anything
    changes. ``check_base=False`` skips that check and leaves every path the
    checkpoint does not hold as it is.

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
        check_base: for an adapter checkpoint, check that ``target`` is the
            base it was saved with (paths, shapes, dtypes and, where
            recorded, content checksums). Ignored for other checkpoints.

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
            two values; for an adapter checkpoint, if ``target`` is abstract
            or (unless ``check_base`` is False) differs from its base; with
            ``flags="target"``, if the checkpoint splits an array into
            trainable and frozen elements (``where=``) otherwise than the target.

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
            plan = _plan(layout, target, flags, partial, verify, check_base)
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
