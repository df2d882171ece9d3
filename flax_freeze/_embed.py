"""``nnx.Embed`` with partly frozen rows: a lookup that reads the trainable rows directly.

Reading a :class:`~flax_freeze.PartlyFrozen` table gives the whole table, and
the gradient of a lookup into it is the whole table's (a zero table with the
batch's rows scatter-added in, summed across devices whole under
``jax.jit``), of which the trainable rows are then taken. An ``nnx.Embed``
whose table has trainable rows instead looks each token up in the frozen
table and, for the trainable ones, in the trainable rows, and ``attend``
computes the trainable rows' logits apart: the gradient is computed for those
rows only, and only they are summed across devices.
The module gets a subclass of its class that does this (as ``isinstance``
sees it, still its class) while it holds such a table; it falls back to its
own lookup otherwise.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ._nnx_compat import in_transformation
from ._part import PartlyFrozen, row_maps
from ._swap import is_made, set_class, subclass

#: The aware subclass made for each class of embedding module.
_AWARE: dict[type, type] = {}


def _rows_lookup(self: Any, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
    """Embeds ``inputs``: frozen rows from the frozen table, trainable ones from their part."""
    part = self.embedding
    plain = type(self)._ff_plain
    if (
        not isinstance(part, PartlyFrozen)
        or part.axis != 0
        or out_sharding is not None
        or self.num_embeddings == 1
    ):
        return plain.__call__(self, inputs, out_sharding=out_sharding)
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
        raise ValueError("Input type must be an integer or unsigned integer.")
    frozen, trainable, index = part.parts()
    frozen, trainable = self.promote_dtype((frozen, trainable), dtype=self.dtype, inexact=False)
    rows, pos = row_maps(index, frozen.shape[0], 1, 0)
    is_trainable = jnp.take(rows, inputs, axis=0, mode="fill", fill_value=False)
    at = jnp.take(pos, inputs, axis=0, mode="fill", fill_value=0)
    picked = jnp.take(trainable, at, axis=0)
    return jnp.where(is_trainable[..., None], picked, jnp.take(frozen, inputs, axis=0))


def _rows_attend(self: Any, query: jax.Array, out_sharding: Any = None) -> jax.Array:
    """Logits against every row: the frozen table's, with the trainable rows' put in their place."""
    part = self.embedding
    plain = type(self)._ff_plain
    if not isinstance(part, PartlyFrozen) or part.axis != 0 or out_sharding is not None:
        return plain.attend(self, query, out_sharding=out_sharding)
    frozen, trainable, index = part.parts()
    query, frozen, trainable = self.promote_dtype((query, frozen, trainable), dtype=self.dtype)
    logits = jnp.dot(query, frozen.T)
    trained = jnp.dot(query, trainable.T).astype(logits.dtype)
    return logits.at[..., index].set(trained, indices_are_sorted=True, unique_indices=True)


def _aware_class(cls: type) -> type:
    namespace = {
        "__call__": _rows_lookup,
        "attend": _rows_attend,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
    }
    return subclass(_AWARE, cls, cls.__name__, namespace)


def sync_embed_class(module: Any) -> None:
    """Gives an ``nnx.Embed`` the lookup that matches its table; other nodes: nothing.

    An embedding whose table has trainable rows (along axis 0) gets the aware
    class, one whose table is whole gets its own class back; only outside JAX
    transformations, where a class change reaches the caller (the aware class
    falls back to the plain lookup, so staying is harmless). A subclass of
    ``nnx.Embed`` with its own ``__call__`` or ``attend`` keeps them.
    """
    if not isinstance(module, nnx.Embed) or in_transformation():
        return
    cls = type(module)
    aware = is_made(_AWARE, cls)
    plain = cls._ff_plain if aware else cls  # type: ignore[attr-defined]
    if plain.__call__ is not nnx.Embed.__call__ or plain.attend is not nnx.Embed.attend:
        return
    table = vars(module).get("embedding")
    wants = isinstance(table, PartlyFrozen) and table.axis == 0
    if wants and not aware:
        set_class(module, _aware_class(cls))
    elif aware and not wants:
        set_class(module, plain)
