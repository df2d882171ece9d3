"""freeze / unfreeze / freezing: tie-preserving, zero-copy re-typing of variables."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx

from . import _version
from ._batch_stats import freeze_stats, unfreeze_stats
from ._boxes import is_frozen_box
from ._bridge import check_bridge_retype, sync_bridge_class
from ._embed import sync_embed_class
from ._filters import (
    Filter,
    Path,
    Predicate,
    is_nothing,
    listing,
    matched_nothing,
    path_str,
    path_string_advice,
    short_repr,
    to_predicate,
)
from ._nnx_compat import PytreeNodeImpl, get_node_impl, jax_to_nnx_path
from ._part import (
    Found,
    PartlyFrozen,
    Rows,
    check_where,
    current_mask,
    find_parts,
    part_variables,
    rebuild,
)
from ._part import where_mask as where_mask
from ._qwix import check_qwix
from ._variables import (
    FROM_LEAF_KEY,
    PARAM_TYPE_KEY,
    TRAINED_DTYPE_KEY,
    FrozenParam,
    Trainable,
    is_any_param,
    is_param,
    param_types,
    unregistered_hint,
)
from ._walk import is_raw_trainable as is_raw_trainable
from ._walk import walk

N = TypeVar("N")


def selects_leaf(pred: Predicate, path: Path, x: Any) -> bool:
    """Whether a filter selects a bare trainable leaf, shown as the ``nnx.Param`` it stands for."""
    return bool(pred(path, nnx.Param(x)))


@dataclass
class _Site:
    """A variable met while walking a node: every path it is reachable by."""

    variable: nnx.Variable
    paths: list[Path] = field(default_factory=list)
    in_module: bool = False


def collect(
    node: Any, boxes: dict[Path, Any] | None = None
) -> tuple[dict[int, _Site], dict[Path, Any]]:
    """The variables and bare trainable leaves of ``node``, as :func:`walk` finds them.

    Variables are keyed by identity and carry *every* path they are reachable by
    (a tied variable has several). Bare leaves are only collected outside NNX
    modules (inside a module only variables are state), keyed by the path of the
    leaf (inside a box that is not frozen, such as ``nn.Partitioned``, the path
    goes on into the box). Frozen markers (Linen frozen boxes,
    ``paramax.NonTrainable``) are not looked into; they are put in ``boxes``
    when given.
    """
    sites: dict[int, _Site] = {}
    raw: dict[Path, Any] = {}
    for entry in walk(node, empty=True).entries:
        if entry.marker is not None or (entry.box is not None and is_frozen_box(entry.box)):
            if boxes is not None:
                path, marker = entry.marker or (entry.paths[0], entry.box)
                boxes.setdefault(path, marker)
        elif entry.variable is not None:
            sites[id(entry.variable)] = _Site(entry.variable, entry.paths, entry.in_module)
        elif not entry.in_module and is_raw_trainable(entry.value):
            path = entry.paths[0]
            if entry.box is not None:  # the path on into the box, as NNX's walk goes
                [(inner, _)] = jax.tree_util.tree_flatten_with_path(entry.box)[0]
                path = (*path, *jax_to_nnx_path(inner))
            raw[path] = entry.value
    return sites, raw


def replace(
    node: N,
    new_variables: dict[int, Any],
    new_leaves: dict[Path, Any],
) -> N:
    """Puts replacements on every edge that holds an old variable or sits at a replaced path.

    ``new_variables`` maps old variables (by identity) to their replacements;
    ``new_leaves`` maps paths to what goes there: a leaf, or a whole subtree
    (a Linen box chain, an optimizer state).

    NNX objects (modules, ``nnx.List``, ``nnx.Dict``) are changed in place by
    ``setattr``, as are lists and dicts inside them; containers outside modules
    and immutable ones (tuples, dataclasses) are rebuilt and put on their
    parent. Returns the node, or its rebuilt copy when it is an immutable pytree.

    An ``nnx.bridge.ToNNX`` module gets the class that matches what it then
    holds (one holding a ``FrozenParam`` hands it to Linen in ``params``).

    Raises:
        ValueError: inside a JAX transformation, if a plain ``nnx.bridge.ToNNX``
            would get a frozen parameter (its class change could not leave the
            transformation); nothing is changed then.
    """
    if any(isinstance(v, FrozenParam) for v in new_variables.values()):
        check_bridge_retype(node, lambda v: isinstance(new_variables.get(id(v)), FrozenParam))
    if new_variables or new_leaves:
        _version.bump()
    seen: set[int] = set()

    def visit(x: Any, path: Path, in_module: bool) -> Any:
        if isinstance(x, nnx.Variable):
            return new_variables.get(id(x), x)
        if isinstance(x, PartlyFrozen) and id(x) in new_variables:
            return new_variables[id(x)]
        if path in new_leaves:
            return new_leaves[path]
        impl = get_node_impl(x)
        if impl is None:
            return x
        if isinstance(x, nnx.Pytree):
            if id(x) in seen:
                return x
            seen.add(id(x))
            for key, child in impl.node_dict(x).items():
                new = visit(child, (*path, key), True)
                if new is not child:
                    setattr(x, str(key), new)
            sync_bridge_class(x)
            sync_embed_class(x)
            return x
        children, aux = impl.flatten(x)
        new_children = [(key, visit(child, (*path, key), in_module)) for key, child in children]
        changed = [
            (key, new)
            for (key, old), (_, new) in zip(children, new_children, strict=True)
            if new is not old
        ]
        if not changed:
            return x
        if in_module and isinstance(impl, PytreeNodeImpl) and impl.set_key is not None:
            for key, new in changed:
                impl.set_key(x, key, new)
            return x
        return impl.unflatten(new_children, aux)  # type: ignore[arg-type]

    return visit(node, (), False)


def _cast(value: Any, dtype: np.dtype) -> Any:
    """``value`` in ``dtype``; an abstract value (``nnx.eval_shape``) stays abstract."""
    if isinstance(value, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(value.shape, dtype, sharding=value.sharding)
    return jnp.asarray(value).astype(dtype)


def _stored(value: Any, metadata: dict[str, Any], dtype: np.dtype | None) -> Any:
    """The value to keep frozen: cast to ``dtype``, noting the trained dtype in ``metadata``."""
    if dtype is None or np.dtype(jnp.result_type(value)) == dtype:
        return value
    metadata[TRAINED_DTYPE_KEY] = np.dtype(jnp.result_type(value))
    return _cast(value, dtype)


def _frozen_copy(variable: nnx.Variable, dtype: np.dtype | None) -> FrozenParam:
    """``variable`` frozen (kept in ``dtype`` if given); a frozen one keeps its parameter type."""
    metadata = variable.get_metadata()
    if not isinstance(variable, FrozenParam):
        metadata[PARAM_TYPE_KEY] = type(variable)
    value = _stored(variable.get_raw_value(), metadata, dtype)
    return FrozenParam.from_metadata(value, metadata)  # type: ignore[return-value]


def frozen_leaf(x: Any, dtype: np.dtype | None = None) -> FrozenParam:
    """The ``FrozenParam`` that ``freeze`` puts at a bare pytree leaf; ``unfreeze`` undoes it."""
    metadata: dict[str, Any] = {FROM_LEAF_KEY: True}
    value = _stored(x, metadata, dtype)
    return FrozenParam(value, **metadata)


def _trainable_copy(variable: nnx.Variable, in_module: bool) -> Any:
    metadata = variable.get_metadata()
    param_type = metadata.pop(PARAM_TYPE_KEY, None)
    value = variable.get_raw_value()
    trained_dtype = metadata.pop(TRAINED_DTYPE_KEY, None)
    if trained_dtype is not None:
        value = _cast(value, trained_dtype)
    if metadata.pop(FROM_LEAF_KEY, False) and not in_module:
        return value  # a bare pytree leaf frozen by freeze()
    return (param_type or nnx.Param).from_metadata(value, metadata)


def _check_dtype(dtype: Any) -> np.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, jax.Array | np.ndarray | np.generic):
        raise TypeError(
            f"`dtype` must be a floating dtype such as jnp.bfloat16, got an array "
            f"{short_repr(dtype)}. Pass a dtype, e.g. dtype=x.dtype."
        )
    try:
        checked = np.dtype(dtype)
    except TypeError as err:
        raise TypeError(
            f"`dtype` must be a floating dtype such as jnp.bfloat16, got {short_repr(dtype)}."
        ) from err
    if not jnp.issubdtype(checked, jnp.inexact):
        raise TypeError(
            f"`dtype` must be a floating dtype such as jnp.bfloat16, got {short_repr(dtype)}: "
            "frozen parameters keep real or complex values."
        )
    return checked


def check_node(func: str, node: Any, linen_hint: str = "") -> None:
    """Raises a clear error for a ``node`` that can never hold parameters.

    Cheap: only the node's own type is looked at. ``linen_hint`` says what to
    pass instead of a Linen module.
    """
    hint = ""
    if node is None or isinstance(node, str | bytes):
        hint = "Pass the model (an NNX module) or a pytree holding modules or arrays."
    elif isinstance(node, type):
        hint = "Pass an instance, e.g. nnx.Linear(2, 3, rngs=nnx.Rngs(0)), not the class."
    elif isinstance(node, linen.Module):
        hint = "A Linen module holds no parameters: " + (
            linen_hint
            or "freeze its params dict with ffl.freeze(variables['params'], filter) "
            "(from flax_freeze import linen as ffl)."
        )
    if hint:
        raise TypeError(
            f"`node` passed to {func}() must be an NNX module or a pytree of modules, "
            f"variables or arrays, got {short_repr(node)}. {hint}"
        )


def _matches(pred: Predicate, site: _Site) -> bool:
    return any(pred(path, site.variable) for path in site.paths)


def _advice(
    func: str,
    node: Any,
    filter: Any,
    params: list[nnx.Variable],
    boxes: list[Any],
    paths: list[str],
    variables: list[nnx.Variable],
) -> str:
    """A sentence on the likely mistake behind a filter that matched nothing.

    ``params`` are the node's parameters (variables and bare leaves, as
    ``nnx.Param``), ``paths`` their ``'/'``-joined paths, ``boxes`` its frozen
    markers and ``variables`` all its variables.
    """
    if not params and any(is_frozen_box(b) for b in boxes):
        return (
            "It holds Linen frozen parameters (ffl.FrozenBox): use ffl.freeze / "
            "ffl.unfreeze on Linen params dicts."
        )
    if not params and boxes:
        names = ", ".join(sorted({type(b).__name__ for b in boxes}))
        return (
            f"It holds only other libraries' frozen wrappers ({names}), which freeze and "
            "unfreeze leave as they are: unwrap them with that library."
        )
    hint = unregistered_hint(variables)
    if not params and hint:
        return hint
    if not params and isinstance(node, nnx.Optimizer):
        return (
            "An nnx.Optimizer holds no model parameters: freeze the model itself "
            "(ff.Optimizer follows the change)."
        )
    if not params:
        return (
            "It holds no parameter at all: no nnx.Param or FrozenParam, and no inexact "
            "array or float leaf (integers, booleans and strings are never parameters)."
        )
    if isinstance(filter, str):
        return path_string_advice(filter, paths)
    if filter is None:
        which = "trainable" if func == "freeze" else "frozen"
        return (
            f"None selects nothing as an NNX filter: omit the filter to {func} every "
            f"{which} parameter, or pass nnx.Nothing to change nothing on purpose."
        )
    is_type = isinstance(filter, type)
    if func == "freeze" and is_type and issubclass(filter, FrozenParam):
        return (
            "The filter selects which trainable parameters to freeze; FrozenParam "
            "selects parameters that are frozen already."
        )
    if func == "unfreeze" and (
        filter is Trainable or (is_type and issubclass(filter, param_types()))
    ):
        return (
            "The filter selects which frozen parameters to make trainable; nnx.Param and "
            "ff.Trainable select trainable ones (a frozen parameter is a FrozenParam): "
            "select by path with ff.PathRegex, or pass no filter to unfreeze all."
        )
    if func == "unfreeze" and not any(isinstance(v, FrozenParam) for v in params):
        return "None of its parameters is frozen."
    return ""


@dataclass
class _Chosen:
    """What a filter selects: variables, bare pytree leaves and partly frozen arrays."""

    sites: dict[int, _Site] = field(default_factory=dict)
    leaves: dict[Path, Any] = field(default_factory=dict)
    parts: dict[int, Found] = field(default_factory=dict)


def _part_matches(pred: Predicate, found: Found) -> bool:
    """A partly frozen array is selected when its trainable or its frozen part is, at its path."""
    part = found.part
    return any(pred(path, part.trainable) or pred(path, part.frozen) for path in found.paths)


def _select(func: str, node: Any, filter: Any, missing_ok: bool) -> _Chosen:
    """Returns the parameters, bare leaves and partly frozen arrays ``filter`` selects in ``node``.

    A tied variable is selected when the filter matches any of its paths. A bare
    trainable leaf is shown to the filter as the ``nnx.Param`` it stands for. A
    :class:`PartlyFrozen` array is one unit at its own path: the filter sees its
    trainable part and its frozen part there, and selects it if it selects either.
    """
    check_node(func, node)
    pred = to_predicate(filter, strings="path")
    if is_nothing(filter):
        return _Chosen()
    boxes: dict[Path, Any] = {}
    sites, raw = collect(node, boxes)
    found_parts = find_parts(node)
    inner = part_variables(found_parts)
    params = {k: s for k, s in sites.items() if is_any_param(s.variable) and k not in inner}
    chosen = _Chosen(
        {k: s for k, s in params.items() if _matches(pred, s)},
        {p: x for p, x in raw.items() if selects_leaf(pred, p, x)},
        {k: f for k, f in found_parts.items() if _part_matches(pred, f)},
    )
    if chosen.sites or chosen.leaves or chosen.parts:
        return chosen
    if isinstance(filter, str):
        _check_not_a_tag(func, filter, params)
    if not missing_ok:
        part_paths = [f.paths[0] for f in found_parts.values()]
        all_paths = sorted([s.paths[0] for s in params.values()] + list(raw) + part_paths, key=str)
        found = [s.variable for s in params.values()] + [nnx.Param(x) for x in raw.values()]
        joined = [path_str(p) for p in all_paths]
        variables = [s.variable for s in sites.values()]
        advice = _advice(func, node, filter, found, list(boxes.values()), joined, variables)
        raise matched_nothing(func, filter, node, all_paths, advice=advice)
    return chosen


def _check_not_a_tag(func: str, filter: str, params: dict[int, _Site]) -> None:
    """Raises when a string that selects no path is the NNX tag of some parameters.

    A plain string is a path regex in ``freeze``/``unfreeze``; one that was
    meant as a tag would otherwise select nothing, silently with ``missing_ok``.
    """
    tagged = sorted(
        path_str(site.paths[0])
        for site in params.values()
        if site.variable.get_metadata().get("tag") == filter
    )
    if tagged:
        raise ValueError(
            f"`filter` {filter!r} passed to {func}() is a path regex (a plain string always is "
            f"in flax_freeze) and matches no path, but {len(tagged)} parameter(s) carry the NNX "
            f"tag {filter!r}: {listing(tagged)}. To select them by tag pass "
            f"nnx.WithTag({filter!r}); to select by path pass a pattern such as "
            f"ff.PathRegex({tagged[0]!r})."
        )


def _partial(func: str, chosen: _Chosen, where: Any) -> tuple[dict[int, Any], dict[Path, Any]]:
    """What replaces each selected array once ``where``'s elements are frozen or made trainable.

    ``freeze`` takes the elements ``where`` selects out of each array's
    trainable elements, ``unfreeze`` adds them; an array whose trainable
    elements do not change is left as it is.
    """

    def change(x: Any, path: Path, in_module: bool) -> Any:
        metadata = x.get_metadata() if isinstance(x, nnx.Variable) else {}
        if TRAINED_DTYPE_KEY in metadata:
            raise ValueError(
                f"`where` cannot select part of {path_str(path)!r}, which was frozen in "
                f"{np.dtype(x.get_raw_value().dtype).name}: unfreeze it whole first "
                f"(ff.unfreeze(node, {path_str(path)!r})), then freeze part of it."
            )
        now = current_mask(x)
        selected = where_mask(where, now.shape, path, func)
        after = now & ~selected if func == "freeze" else now | selected
        if np.array_equal(after, now):
            return x
        prefer = x.axis if isinstance(x, PartlyFrozen) else None
        if isinstance(where, Rows) and now.ndim:
            prefer = where.axis % now.ndim
        return rebuild(x, after, prefer, in_module)

    new_variables: dict[int, Any] = {}
    for k, s in chosen.sites.items():
        if (new := change(s.variable, s.paths[0], s.in_module)) is not s.variable:
            new_variables[k] = new
    for k, f in chosen.parts.items():
        if (new := change(f.part, f.paths[0], f.in_module)) is not f.part:
            new_variables[k] = new
    new_leaves = {}
    for path, x in chosen.leaves.items():
        if (new := change(x, path, False)) is not x:
            new_leaves[path] = new
    return new_variables, new_leaves


def freeze(
    node: N,
    filter: Filter = Trainable,
    *,
    missing_ok: bool = False,
    dtype: Any = None,
    batch_stats: bool = False,
    where: Any = None,
) -> N:
    """Makes the parameters that ``filter`` selects frozen, in place.

    Each selected ``nnx.Param`` (or subclass, such as ``nnx.LoRAParam``) is
    replaced by a :class:`FrozenParam` that holds the *same* array object and
    every metadata entry (sharding included), plus ``param_type`` recording the
    original type. A variable shared by several modules stays one object, and
    is selected when the filter matches any of its paths. Variables in
    ``nnx.List``, ``nnx.Dict`` and ``nnx.data`` lists and tuples are reached too.

    Freezing is not eval mode: only parameters are re-typed. Batch statistics,
    RNG state and other variables the filter selects stay as they are, and
    ``BatchNorm``/``Dropout`` keep their training behaviour, as in PyTorch and
    plain Flax. With ``batch_stats=True`` (Keras' choice) each module whose
    parameters are then all frozen and that keeps batch statistics
    (``nnx.BatchNorm``) is put into inference mode instead
    (``use_running_average=True``): it normalises with its running averages
    and stops updating them, and :func:`unfreeze` gives it its mode back once
    one of its parameters trains again. The trade-off: statistics that stay
    fixed match what the frozen layers were trained with, and small batches no
    longer disturb them, but they cannot follow a shift of the data. The mode
    is a static attribute: ``model.train()`` and ``model.eval()`` set it on
    every module, frozen ones too, so call them before freezing.

    On a plain pytree (dataclass, NamedTuple, dict...) trainable leaves (inexact
    arrays and floats) are wrapped in ``FrozenParam`` and a new tree is
    returned, since pytrees are immutable.

    Inside ``nnx.jit`` in graph mode the change reaches the caller's module. In
    a tree-mode trace (``jax.jit``, ``nnx.jit(graph=False)``) only what the
    function returns carries it: freeze eagerly, between steps, instead.

    Bridged Linen modules (``nnx.bridge.ToNNX``) keep working with no extra
    call: a wrapper that gets a frozen parameter switches to a class that
    hands it to the Linen module in ``params`` (and back when none is left).
    That switch happens eagerly, so the first freeze of a wrapper cannot
    happen inside a JAX transformation (it raises there).

    With ``dtype`` (e.g. ``jnp.bfloat16``) the parameters this call freezes
    are kept in that precision to save memory: a new array of the same
    sharding replaces each one, its trained dtype is noted in the
    ``trained_dtype`` metadata entry, and :func:`unfreeze` casts it back. The
    precision lost is not restored. Modules that promote dtypes (``nnx.Linear``
    and the other Flax layers) compute with the frozen weight as before.

    Args:
        node: an NNX module or any pytree holding modules or arrays.
        filter: any NNX filter (a Variable type, ``nnx.PathContains``,
            ``nnx.All``/``Any``/``Not``, a callable ``(path, variable) -> bool``)
            or :class:`PathRegex`. A plain string (alone or in a list) is a path
            regex, as in ``ffl.freeze``: ``"head/.*"`` means
            ``ff.PathRegex("head/.*")``; for an NNX tag pass ``nnx.WithTag(tag)``.
            ``nnx.Nothing`` (or ``False``) selects nothing on purpose: the call
            changes nothing and raises nothing. Defaults to every trainable
            parameter.
        missing_ok: allow a filter that selects no parameter.
        dtype: keep the newly frozen parameters in this floating dtype.
        batch_stats: also put modules whose parameters are all frozen into
            inference mode (their batch statistics frozen).
        where: freeze only these elements of each selected array: a boolean
            mask broadcastable to the array, or :class:`Rows` (``ff.Rows(ids)``:
            whole rows). The array becomes :class:`PartlyFrozen` (or
            ``FrozenParam`` once no element trains); elements frozen already
            stay frozen.

    Returns:
        ``node`` itself (modules change in place), or the rebuilt pytree.

    Raises:
        ValueError: if ``filter`` selects no parameter and ``missing_ok`` is False;
            the message lists the node's parameter paths (all of them up to a
            dozen) and the fix for the likely mistake (a pattern that must match
            the whole path, ``"head/.*"`` for ``"head"``; ``FrozenParam`` selects
            parameters frozen already; Linen params need ``ffl.freeze``). Also,
            whatever ``missing_ok``, if a string selects no path but is the NNX tag
            of some parameters (pass ``nnx.WithTag``), or if a plain
            ``nnx.bridge.ToNNX`` would get a frozen parameter inside a JAX
            transformation.
        TypeError: if ``node`` cannot hold parameters (``None``, a string, a class,
            a Linen module), ``filter`` is not a filter (a class that is not a
            Variable type, a callable that cannot take ``(path, variable)``), or
            ``dtype`` is not a floating dtype (an array is not a dtype).

    Example:
        >>> from flax import nnx
        >>> import flax_freeze as ff
        >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
        ...                        nnx.Linear(3, 1, rngs=nnx.Rngs(1)))
        >>> kernel = model.layers[0].kernel.get_raw_value()
        >>> _ = ff.freeze(model, ff.PathRegex("layers/0/.*"))
        >>> type(model.layers[0].kernel).__name__, type(model.layers[1].kernel).__name__
        ('FrozenParam', 'Param')
        >>> model.layers[0].kernel.get_raw_value() is kernel
        True
        >>> _ = ff.freeze(model, "layers/1/bias")  # a plain string is a path regex
        >>> type(model.layers[1].bias).__name__
        'FrozenParam'
        >>> ff.freeze(model, nnx.Nothing) is model  # nothing, on purpose
        True
    """
    stored_dtype = _check_dtype(dtype)
    if not isinstance(batch_stats, bool):
        raise TypeError(f"`batch_stats` must be True or False, got {short_repr(batch_stats)}.")
    check_where(where, "freeze")
    if where is not None and stored_dtype is not None:
        raise ValueError(
            f"`dtype` {short_repr(dtype)} cannot be combined with `where`: a partly frozen "
            "array keeps one dtype. Freeze the whole array to keep it in another precision."
        )
    chosen = _select("freeze", node, filter, missing_ok)
    check_qwix(node, [(s.variable, s.paths) for s in chosen.sites.values()], filter)
    if where is not None:
        new_variables, new_leaves = _partial("freeze", chosen, where)
    else:
        new_variables: dict[int, Any] = {
            k: _frozen_copy(s.variable, stored_dtype)
            for k, s in chosen.sites.items()
            if is_param(s.variable)
        }
        for k, f in chosen.parts.items():
            whole = rebuild(f.part, np.zeros(f.part.shape, bool), None, f.in_module)
            new_variables[k] = whole if stored_dtype is None else _frozen_copy(whole, stored_dtype)
        new_leaves = {p: frozen_leaf(x, stored_dtype) for p, x in chosen.leaves.items()}
    node = replace(node, new_variables, new_leaves)
    if batch_stats:
        freeze_stats(node)
    return node


def unfreeze(
    node: N, filter: Filter = FrozenParam, *, missing_ok: bool = False, where: Any = None
) -> N:
    """Makes the frozen parameters that ``filter`` selects trainable again, in place.

    Each selected :class:`FrozenParam` becomes the type it had before
    :func:`freeze` (``nnx.LoRAParam`` stays ``nnx.LoRAParam``), or
    ``nnx.Param`` when it was declared frozen, with the same array object and
    metadata. In a plain pytree a leaf that ``freeze`` wrapped becomes the bare
    value again, and a new tree is returned.

    Args:
        node: an NNX module or any pytree holding modules or arrays.
        filter: any NNX filter or :class:`PathRegex`; a plain string is a path
            regex and ``nnx.Nothing`` a no-op, as for :func:`freeze`. Defaults to
            every frozen parameter. Parameters that are already trainable are
            left alone.
        missing_ok: allow a filter that selects no parameter.
        where: make only these elements of each selected array trainable: a
            boolean mask broadcastable to the array, or :class:`Rows`
            (``ff.Rows(ids)``: whole rows). The array becomes
            :class:`PartlyFrozen` (or its parameter type once every element
            trains); elements trainable already stay trainable.

    Returns:
        ``node`` itself (modules change in place), or the rebuilt pytree.

    Raises:
        ValueError: if ``filter`` selects no parameter and ``missing_ok`` is False
            (also when nothing is frozen); the message lists the parameter paths and
            the likely mistake (``nnx.Param`` or ``ff.Trainable`` select trainable
            parameters, never frozen ones). Also for a string that is a tag, not a
            path, as for :func:`freeze`.
        TypeError: if ``node`` cannot hold parameters (``None``, a string, a class,
            a Linen module) or ``filter`` is not a filter.

    Example:
        >>> from flax import nnx
        >>> import flax_freeze as ff
        >>> model = ff.freeze(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
        >>> _ = ff.unfreeze(model, ff.PathRegex("bias"))
        >>> type(model.kernel).__name__, type(model.bias).__name__
        ('FrozenParam', 'Param')
    """
    check_where(where, "unfreeze")
    chosen = _select("unfreeze", node, filter, missing_ok)
    if where is not None:
        new_variables, new_leaves = _partial("unfreeze", chosen, where)
    else:
        new_variables = {
            k: _trainable_copy(s.variable, s.in_module)
            for k, s in chosen.sites.items()
            if isinstance(s.variable, FrozenParam)
        }
        for k, f in chosen.parts.items():
            new_variables[k] = rebuild(f.part, np.ones(f.part.shape, bool), None, f.in_module)
        new_leaves = {}
    node = replace(node, new_variables, new_leaves)
    unfreeze_stats(node)
    return node


@contextlib.contextmanager
def freezing(node: N, filter: Filter = Trainable, *, missing_ok: bool = False) -> Iterator[N]:
    """Context manager: the selected parameters are frozen inside, restored on exit.

    On exit, also when the block raises, exactly the parameters this call froze
    become trainable again, with their original types; parameters that were
    frozen before stay frozen.

    Args:
        node: an NNX module or any pytree holding modules or arrays.
        filter: any NNX filter or :class:`PathRegex`; a plain string is a path
            regex and ``nnx.Nothing`` a no-op, as for :func:`freeze`.
        missing_ok: allow a filter that selects no parameter.

    Yields:
        The frozen node: ``node`` itself for modules, a new tree for pytrees.

    Raises:
        ValueError: if ``filter`` selects no parameter and ``missing_ok`` is False,
            and in the other cases of :func:`freeze`.
        TypeError: if ``node`` cannot hold parameters or ``filter`` is not a filter,
            as for :func:`freeze`.

    Example:
        >>> from flax import nnx
        >>> import flax_freeze as ff
        >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
        >>> with ff.freezing(model, ff.PathRegex("kernel")):
        ...     print(type(model.kernel).__name__)
        FrozenParam
        >>> type(model.kernel).__name__
        'Param'
    """
    before = collect(node)[0]  # holds the old variables, so their ids stay unique
    parts = {path: f.part for f in find_parts(node).values() for path in f.paths}
    frozen = freeze(node, filter, missing_ok=missing_ok)
    created: set[int] = set()
    back: dict[int, PartlyFrozen] = {}  # a partly frozen array frozen whole: it comes back
    for k, s in collect(frozen)[0].items():
        if k in before or not isinstance(s.variable, FrozenParam):
            continue
        part = next((parts[p] for p in s.paths if p in parts), None)
        if part is None:
            created.add(k)
        else:
            back[k] = part
    del before
    try:
        yield frozen
    finally:
        unfreeze(frozen, lambda _path, v: id(v) in created, missing_ok=True)
        if back:
            replace(frozen, dict(back), {})
