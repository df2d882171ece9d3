"""The one walk over a node: its entries, and the one place that decides their status.

Re-typing (:func:`~flax_freeze.freeze`, :func:`~flax_freeze.unfreeze`),
gradients, :func:`~flax_freeze.summary` and checkpoints all see a node
through :func:`walk`, the way NNX walks it. An entry is one value of state:
an NNX variable (with every path it is reachable by), a bare array or number
of a pytree, or a Linen parameter in boxes (``ffl.FrozenBox``,
``nn.Partitioned``...), under the parameter's own path. :func:`status`
says whether an entry is ``trainable``, ``frozen`` or other ``state``, and
:func:`type_name` what to call it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import meta
from flax.training import train_state

from ._boxes import PARAMS, is_foreign_frozen, is_frozen_box, is_variables_dict
from ._filters import Path
from ._nnx_compat import get_node_impl
from ._variables import FrozenParam, is_any_param, is_param

Key = tuple[str, ...]
#: Where an entry sits in Linen state: a ``params`` collection (trainable
#: unless boxed frozen), the ``frozen_params`` collection, or other state
#: (other collections; a TrainState's step, optimizer state and extra fields).
#: None: not in Linen state.
Linen = Literal["params", "frozen", "state"] | None
FROZEN_PARAMS = "frozen_params"


def key_of(path: Iterable[Any]) -> Key:
    """A path with its parts as strings, as stored."""
    return tuple(str(k) for k in path)


def join(key: Iterable[str]) -> str:
    """The ``'/'``-joined name of a path, as the flags record it."""
    return "/".join(key)


def is_number(x: Any) -> bool:
    """A Python or NumPy number (or bool)."""
    if isinstance(x, bool | int | float):
        return True
    return isinstance(x, np.generic) and (
        np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.bool_)
    )


def is_module_leaf(x: Any) -> bool:
    """State inside an NNX module, as ``nnx.state`` sees it: arrays (or their abstract form)."""
    return isinstance(x, jax.Array | np.ndarray | jax.ShapeDtypeStruct)


def is_tree_leaf(x: Any) -> bool:
    """State in a plain pytree: arrays and Python or NumPy numbers."""
    return is_module_leaf(x) or is_number(x)


def is_raw_trainable(x: Any) -> bool:
    """Whether a bare pytree leaf is trainable: an inexact array or a Python float."""
    if isinstance(x, float):
        return True
    if isinstance(x, jax.Array | np.ndarray | np.generic):
        return bool(jnp.issubdtype(x.dtype, jnp.inexact))
    return False


def is_inexact(x: Any) -> bool:
    """Whether a bare value could be trained: an inexact array, concrete or abstract, or a float."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return bool(jnp.issubdtype(x.dtype, jnp.inexact))
    return is_raw_trainable(x)


def is_python_number(x: Any) -> TypeGuard[bool | int | float]:
    """A Python ``bool``, ``int`` or ``float``; not a NumPy scalar (``np.float64`` is a float)."""
    return isinstance(x, bool | int | float) and not isinstance(x, np.generic)


def number_dtype(x: bool | int | float) -> np.dtype[Any]:
    """The dtype JAX computes a Python number in (``float32`` and ``int32`` unless x64 is on)."""
    dtype = np.dtype(jax.dtypes.canonicalize_dtype(np.result_type(x)))
    if dtype.kind == "i" and not np.iinfo(dtype).min <= x <= np.iinfo(dtype).max:
        return np.dtype(np.result_type(x))  # too large for int32: kept exact
    return dtype


def shape_dtype(value: Any) -> tuple[tuple[int, ...], Any]:
    """Shape and dtype of an array, an abstract array or a number."""
    if isinstance(value, jax.Array | np.ndarray | jax.ShapeDtypeStruct):
        return tuple(value.shape), value.dtype
    if is_python_number(value):
        return (), number_dtype(value)
    array = np.asarray(value)
    return tuple(array.shape), array.dtype


def is_key(dtype: Any) -> bool:
    """Whether ``dtype`` is a PRNG key dtype."""
    return jnp.issubdtype(dtype, jax.dtypes.prng_key)


def key_impl(value: Any) -> str:
    """The implementation name of a PRNG key array, concrete or abstract."""
    if isinstance(value, jax.Array):
        return str(jax.random.key_impl(value))
    names: list[str] = []

    def probe(key: jax.Array) -> jax.Array:
        names.append(str(jax.random.key_impl(key)))
        return key

    jax.eval_shape(probe, value)
    return names[0]


def is_box_chain(x: Any) -> bool:
    """A Linen parameter in boxes: ``AxisMetadata`` boxes around one value (an array, mostly)."""
    return isinstance(x, meta.AxisMetadata) and len(jax.tree_util.tree_leaves(x)) == 1


def in_box(box: Any, value: Any) -> Any:
    """The box chain ``box`` holding ``value`` in place of its array; every box is kept.

    It rebuilds the chain from its pytree structure: a box's ``unbox`` may
    compute (``nn.Partitioned`` adds a sharding constraint under a mesh).
    """
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(box), [value])


@dataclass
class Entry:
    """One saved value: a variable (every path it is reachable by), a bare leaf, or boxes."""

    paths: list[Path]
    value: Any  # the array or number; unboxed for a box chain
    variable: nnx.Variable | None = None
    in_module: bool = False
    in_optimizer: bool = False
    box: Any = None  # the Linen box chain that holds ``value``
    linen: Linen = None
    # Inside plain optax state: the path of the field of the innermost optax
    # state node that holds it (``1/0/mu`` for ``1/0/mu/w``); None elsewhere.
    opt_field: Path | None = None
    # Inside a frozen marker that is no box chain of one value (another library's
    # frozen wrapper such as ``paramax.NonTrainable``, or an ``ffl.FrozenBox`` around
    # a subtree): ``(path, marker)`` of the outermost one; None elsewhere.
    marker: tuple[Path, Any] | None = None

    @property
    def mirror(self) -> Path | None:
        """Inside plain optax state, the path below its optax field (``w`` for ``1/0/mu/w``)."""
        if self.opt_field is None:
            return None
        return self.paths[0][len(self.opt_field) :]

    @functools.cached_property
    def path(self) -> Path:
        """The path it is stored under: the least of its paths (read once walked)."""
        return min(self.paths, key=key_of)

    @functools.cached_property
    def key(self) -> Key:
        """``path`` as stored."""
        return key_of(self.path)

    def keys(self) -> list[Key]:
        """Every path, as stored, sorted."""
        return sorted({key_of(p) for p in self.paths})


@dataclass
class Walked:
    """A walked node: its entries, its optimizers and its Linen train states, by path."""

    entries: list[Entry]
    optimizers: list[tuple[Path, nnx.Optimizer[Any]]] = field(default_factory=list)
    train_states: list[tuple[Path, train_state.TrainState]] = field(default_factory=list)


def _child_linen(parent: Any, key: Any, child: Any, linen: Linen) -> Linen:
    """Where a child of ``parent`` sits in Linen state."""
    if isinstance(parent, train_state.TrainState):
        if key != PARAMS:
            return "state"
        return None if is_variables_dict(child) else "params"
    if linen is None and is_variables_dict(parent):
        if key == PARAMS:
            return "params"
        return "frozen" if key == FROZEN_PARAMS else "state"
    return linen


def walk(
    node: Any,
    prefix: Path = (),
    in_module: bool = False,
    in_optimizer: bool = False,
    linen: Linen = None,
    empty: bool = False,
) -> Walked:
    """Walks ``node`` the way NNX does: its entries, optimizers and train states.

    A tied variable is one entry with several paths. Variables holding None
    are skipped unless ``empty``. A Linen box chain is one entry, under the
    path of the box. Inside NNX modules only arrays are entries besides
    variables; elsewhere arrays and Python or NumPy numbers.
    """
    variables: dict[int, Entry] = {}
    leaves: list[Entry] = []
    optimizers: dict[int, tuple[Path, nnx.Optimizer[Any]]] = {}
    states: list[tuple[Path, train_state.TrainState]] = []

    def visit(
        x: Any,
        path: Path,
        ancestors: set[int],
        in_module: bool,
        in_opt: bool,
        linen: Linen,
        opt_field: Path | None = None,
        marker: tuple[Path, Any] | None = None,
    ) -> None:
        if isinstance(x, nnx.Variable):
            value = x.get_raw_value()
            if value is None and not empty:
                return
            entry = variables.setdefault(id(x), Entry([], value, x, marker=marker))
            entry.paths.append(path)
            entry.in_module = entry.in_module or in_module
            entry.in_optimizer = entry.in_optimizer or in_opt
            return
        if is_box_chain(x):
            value = jax.tree_util.tree_leaves(x)[0]
            entry = Entry([path], value, None, in_module, in_opt, x, linen, opt_field, marker)
            leaves.append(entry)
            return
        impl = get_node_impl(x)
        if impl is None:
            if is_module_leaf(x) if in_module else is_tree_leaf(x):
                entry = Entry([path], x, None, in_module, in_opt, None, linen, opt_field, marker)
                leaves.append(entry)
            return
        if id(x) in ancestors:  # a cycle through a parent reference
            return
        if isinstance(x, nnx.Optimizer):
            optimizers.setdefault(id(x), (path, x))
            in_opt = True
        if isinstance(x, train_state.TrainState):
            states.append((path, x))
        if marker is None and (is_foreign_frozen(x) or is_frozen_box(x)):
            # Inside another library's frozen wrapper (paramax.NonTrainable), or a frozen
            # box around a subtree, every parameter is frozen and is never re-typed.
            marker = (path, x)
        ancestors.add(id(x))
        child_in_module = in_module or isinstance(x, nnx.Pytree)
        optax_node = not in_module and is_optax_state(x)
        for key, child in impl.node_dict(x).items():
            child_linen = _child_linen(x, key, child, linen)
            field = (*path, key) if optax_node else opt_field
            visit(
                child, (*path, key), ancestors, child_in_module, in_opt, child_linen, field, marker
            )
        ancestors.discard(id(x))

    visit(node, prefix, set(), in_module, in_optimizer, linen)
    return Walked([*variables.values(), *leaves], list(optimizers.values()), states)


def is_optax_state(x: Any) -> bool:
    """Whether ``x`` is a node of plain optax state (an optax state NamedTuple)."""
    return isinstance(x, tuple) and type(x).__module__.split(".")[0] == "optax"


def status(entry: Entry) -> str:
    """Whether an entry is ``trainable``, ``frozen`` or other ``state``.

    The one place that decides it, for summaries, checkpoints and re-typing.
    Inside a frozen marker (``paramax.NonTrainable``) parameters and inexact
    bare values are frozen. Elsewhere a variable's type decides; a bare value
    decides by where it sits (Linen state collections and plain optax state
    are state), then by its boxes (frozen in an ``ffl.FrozenBox``), then by
    its dtype (inexact values are trainable).
    """
    x = entry.variable
    if entry.marker is not None:
        inexact = x is None and is_inexact(entry.value) and entry.linen != "state"
        return "frozen" if is_any_param(x) or isinstance(x, FrozenParam) or inexact else "state"
    if is_param(x):
        return "trainable"
    if isinstance(x, FrozenParam):
        return "frozen"
    if x is not None or entry.in_module or entry.linen == "state" or entry.opt_field is not None:
        return "state"  # inside a module only parameter variables train
    if entry.linen == "frozen" or (entry.box is not None and is_frozen_box(entry.box)):
        return "frozen"
    return "trainable" if is_inexact(entry.value) else "state"


def type_name(entry: Entry) -> str:
    """What a table calls an entry: its variable's or outermost box's type, else its value's.

    A bare value inside another library's frozen wrapper is named after the
    wrapper (``NonTrainable``); any other bare value after its own type
    (``Array``, ``ndarray``, ``float``, ``int``).
    """
    if entry.variable is not None:
        return type(entry.variable).__name__
    if entry.box is not None:
        return type(entry.box).__name__
    if entry.marker is not None:
        return type(entry.marker[1]).__name__
    if isinstance(entry.value, jax.Array):
        return "Array"
    return type(entry.value).__name__
