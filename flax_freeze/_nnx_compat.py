"""The one place that reaches into Flax and JAX internals: a Flax upgrade changes this file.

Everything the package needs from Flax or JAX beyond their public API is
named here, and the other modules import it from here:

- NNX's graph machinery (``flax.nnx.graphlib``): how a node of any pytree
  type lists and sets its children (:func:`get_node_impl`), whether a value
  is a graph node, the NNX path of a JAX key path, ``flatten`` with paths,
  and whether an ``nnx.update`` context is active (:func:`in_update_context`).
- The optimizer state types of ``nnx.Optimizer`` (``OptArray``,
  ``OptVariable``, ``to_opt_state``) and a variable's partition spec
  (``get_var_pspec``).
- Whether JAX is tracing right now (:func:`in_transformation`), and along which
  ``shard_map`` axes a value varies (:func:`varying_axes`).
- Splitting a traced function by partial evaluation, dead-code elimination
  and evaluation of the parts (:func:`partial_eval_jaxpr`, :func:`dce_jaxpr`,
  :func:`eval_jaxpr`), for step counts of a parameter's own.
- Where a variable keeps its value (:func:`raw_slot`) and the bookkeeping
  attribute every NNX object has (:data:`BOOKKEEPING`), for the training
  step's host-time path.

What this relies on holds for Flax 0.12 and JAX 0.10.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.nnx import graphlib
from flax.nnx.graphlib import PytreeNodeImpl, flatten, get_node_impl, is_graph_node, is_node
from flax.nnx.graphlib import jax_to_nnx_path as jax_to_nnx_path
from flax.nnx.spmd import get_var_pspec
from flax.nnx.training.optimizer import OptArray, OptVariable, to_opt_state
from jax._src import core as jax_core
from jax._src.interpreters import partial_eval as pe

__all__ = [
    "BOOKKEEPING",
    "dce_jaxpr",
    "eval_jaxpr",
    "partial_eval_jaxpr",
    "OptArray",
    "OptVariable",
    "PytreeNodeImpl",
    "flatten",
    "get_node_impl",
    "get_var_pspec",
    "in_transformation",
    "in_update_context",
    "is_graph_node",
    "is_node",
    "jax_to_nnx_path",
    "raw_slot",
    "to_opt_state",
    "varying_axes",
]

#: Flax's bookkeeping attribute in every NNX object, which ``nnx.jit`` replaces
#: when it writes back into a module; it says nothing about the module's structure.
BOOKKEEPING = "_pytree__state"


def in_transformation() -> bool:
    """Whether JAX is tracing (``jit``, ``grad``, ``vmap``, ``eval_shape``...) right now.

    Example:
        >>> import jax
        >>> from flax_freeze._nnx_compat import in_transformation
        >>> in_transformation(), jax.jit(lambda x: (x, in_transformation())[0])(1) == 1
        (False, Array(True, dtype=bool, weak_type=True))
    """
    return not jax_core.trace_state_clean()


def in_update_context() -> bool:
    """Whether an NNX update context (``nnx.jit``'s write-back into modules) is active.

    Example:
        >>> from flax_freeze._nnx_compat import in_update_context
        >>> in_update_context()
        False
    """
    return bool(graphlib.GRAPH_CONTEXT.update_context_stacks)


@functools.cache
def raw_slot() -> tuple[Callable[[Any], Any], Callable[[Any, Any], Any]]:
    """How to read and write variables' arrays fast: ``(get(variable), set(variable, array))``.

    ``Variable.set_raw_value`` checks the JAX trace twice per call (about 7 µs
    on a 2-core CPU: a millisecond for a transformer and its optimizer), and
    ``get_raw_value`` is a Python call per variable. A caller that checks once
    that no trace is active may read and write the ``_raw_value`` slot where
    Flax keeps the value, and which Flax itself writes with
    ``object.__setattr__``. The slot is used only if a probe shows that it
    round-trips with the public ``get_raw_value``/``set_raw_value``; otherwise
    the public methods are returned.

    Example:
        >>> import numpy as np
        >>> from flax import nnx
        >>> from flax_freeze._nnx_compat import raw_slot
        >>> get, put = raw_slot()
        >>> v = nnx.Variable(np.zeros(2))
        >>> put(v, np.ones(2))
        >>> v.get_raw_value().tolist(), get(v).tolist()
        ([1.0, 1.0], [1.0, 1.0])
    """
    get = operator.attrgetter("_raw_value")
    put = getattr(getattr(nnx.Variable, "_raw_value", None), "__set__", None)
    if put is not None:
        probe, value, other = nnx.Variable(np.zeros(1)), np.ones(1), np.ones(2)
        try:
            put(probe, value)
            works = probe.get_raw_value() is value and get(probe) is value
            probe.set_raw_value(other)
            works = works and get(probe) is other
        except (AttributeError, TypeError):
            works = False
        if works:
            return get, put
    return nnx.Variable.get_raw_value, nnx.Variable.set_raw_value


def partial_eval_jaxpr(closed: Any, unknowns: list[bool]) -> tuple[Any, Any, list[bool]]:
    """``(known, unknown, out_unknown)``: a closed jaxpr split by data dependence.

    ``known`` takes the known inputs and returns the known outputs, then the
    residuals; ``unknown`` takes the residuals, then the unknown inputs, and
    returns the outputs that depend on them (``out_unknown`` marks which).
    """
    known, unknown, out_unknown, _ = pe.partial_eval_jaxpr_nounits(closed, unknowns, False)
    return known, unknown, out_unknown


def dce_jaxpr(closed: Any, used_outputs: list[bool]) -> Any:
    """A closed jaxpr computing only the ``used_outputs``, taking the same inputs."""
    jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, used_outputs, instantiate=True)
    return jax_core.ClosedJaxpr(jaxpr, closed.consts)


def eval_jaxpr(closed: Any, *args: Any) -> list[Any]:
    """Evaluates a closed jaxpr on ``args`` (traced into whatever is tracing now)."""
    return jax_core.eval_jaxpr(closed.jaxpr, closed.consts, *args)


def varying_axes(x: Any) -> frozenset[Any]:
    """The manual mesh axes (``shard_map``'s) along which ``x`` varies; empty outside.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax_freeze._nnx_compat import varying_axes
        >>> varying_axes(jnp.ones(2))
        frozenset()
    """
    try:
        aval = jax.typeof(x)
    except TypeError:
        return frozenset()
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))
