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
  each ``ff.Optimizer``, the paths it trains; for an adapter checkpoint
  (``save(..., only=...)``), the fingerprint of the base it left out.

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

from .._summary import Row, Totals
from ._describe import Description, describe
from ._flags import FORMAT, Flags
from ._plan import PartialRestoreWarning
from ._read import read_flags
from ._restore import RestoreArgs, restore, restore_args
from ._save import save, save_args

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
