"""qwix LoRA / QLoRA: refusing to freeze a base weight that qwix must find as an ``nnx.Param``.

qwix (``qwix.apply_lora_to_model`` with ``qwix.LoraProvider``) adds its adapters
inside the intercepted ``dot_general`` / ``einsum`` / ``conv`` of each matched
module. Each call looks the weight up among the module's ``nnx.Param``
attributes (and its own containers of quantized weights) and adds the
``<name>_lora_a`` / ``<name>_lora_b`` adapters only when it finds it. A
:class:`~flax_freeze.FrozenParam` base is not an ``nnx.Param``: qwix no longer
finds it, and the adapters silently add nothing (their gradient is zero). qwix
offers no option to look elsewhere, so :func:`flax_freeze.freeze` refuses.

A quantized base (QLoRA, ``weight_qtype=...``) is a qwix container that qwix
finds by its own type, whatever the type of the variables inside it: freezing
it trains exactly like leaving it an ``nnx.Param``.

qwix is never imported here: a model that qwix has wrapped exists only once
qwix is imported, so without it the check costs one dictionary lookup.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from flax import nnx

from ._filters import Path, listing, path_str, short_repr
from ._nnx_compat import get_node_impl
from ._variables import PARAM_TYPE_KEY, FrozenParam

#: Attribute that ``qwix.quantize_model`` (behind ``apply_lora_to_model``) sets on
#: every module of the model it wraps.
QWIX_PATH_ATTR = "qwix_path"
#: Suffixes of the two adapter parameters qwix creates next to a base weight.
LORA_SUFFIXES = ("_lora_a", "_lora_b")


def _is_adapter(x: Any) -> bool:
    """Whether ``x`` is a qwix adapter parameter: an ``nnx.LoRAParam``, trainable or frozen."""
    if isinstance(x, nnx.LoRAParam):
        return True
    if isinstance(x, FrozenParam):
        param_type = x.get_metadata().get(PARAM_TYPE_KEY)
        return isinstance(param_type, type) and issubclass(param_type, nnx.LoRAParam)
    return False


def _child(x: Any, key: Any) -> Any:
    """The child of graph node ``x`` at ``key`` (an attribute, index or dict key)."""
    if isinstance(x, list | tuple | dict | nnx.List | nnx.Dict):
        try:
            return x[key]
        except (KeyError, IndexError, TypeError):
            pass
    elif isinstance(x, nnx.Pytree) and isinstance(key, str):
        return getattr(x, key, None)
    impl = get_node_impl(x)  # any other pytree: NNX's own view of its children
    return None if impl is None else impl.node_dict(x).get(key)


def _owner(node: Any, path: Path) -> Any:
    """The object that holds the entry at ``path`` in ``node``."""
    for key in path[:-1]:
        node = _child(node, key)
        if node is None:
            return None
    return node


def is_qwix_lora_base(node: Any, path: Path, variable: nnx.Variable) -> bool:
    """Whether ``variable``, at ``path`` in ``node``, is the base weight of qwix LoRA adapters.

    It is when its module was wrapped by qwix (it carries qwix's ``qwix_path``
    attribute) and holds, next to it under its name ``<name>``, the adapters
    ``<name>_lora_a`` and ``<name>_lora_b`` (``nnx.LoRAParam``, possibly frozen).
    A quantized base (QLoRA) is a qwix container of variables, never a variable
    held by the module directly, so its variables are never bases.

    Args:
        node: the root the path starts from.
        path: a path of ``variable`` in ``node`` (a tuple of keys).
        variable: the variable at that path.

    Returns:
        Whether qwix looks ``variable`` up as an ``nnx.Param`` to apply adapters.
    """
    if not path:
        return False
    module = _owner(node, path)
    if not isinstance(module, nnx.Module):
        return False
    attributes = vars(module)
    name = path[-1]
    return (
        QWIX_PATH_ATTR in attributes
        and isinstance(name, str)
        and attributes.get(name) is variable
        and all(_is_adapter(attributes.get(name + suffix)) for suffix in LORA_SUFFIXES)
    )


def check_qwix(
    node: Any, selected: Iterable[tuple[nnx.Variable, Iterable[Path]]], filter: Any = None
) -> None:
    """Raises if freezing ``selected`` would hide qwix LoRA base weights from qwix.

    Called by :func:`flax_freeze.freeze` with the parameters it is about to
    re-type as :class:`~flax_freeze.FrozenParam`. A selected ``nnx.Param`` that
    is the base weight of qwix adapters (see :func:`is_qwix_lora_base`) would be
    invisible to qwix, whose adapters would then add nothing and get a zero
    gradient, silently. Quantized bases (QLoRA) and every other parameter may
    be frozen. Without qwix imported this returns at once; otherwise it costs a
    few attribute lookups per selected parameter.

    Args:
        node: the node being frozen: an NNX module or a pytree holding modules.
        selected: each variable about to be frozen with its paths in ``node``;
            only ``nnx.Param`` ones count.
        filter: the filter that selected them, shown in the error.

    Raises:
        ValueError: if a selected ``nnx.Param`` is the base weight of qwix LoRA
            adapters; the message names the paths and the way to train the
            adapters alone (``wrt=nnx.LoRAParam``, as tunix does).

    Example:
        >>> from flax import nnx
        >>> import flax_freeze as ff
        >>> from flax_freeze._qwix import check_qwix
        >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
        >>> check_qwix(model, [(model.kernel, [("kernel",)])], ff.Trainable)  # not qwix's
    """
    if "qwix" not in sys.modules:
        return
    bases = sorted(
        {
            path_str(path)
            for variable, paths in selected
            if isinstance(variable, nnx.Param)
            for path in paths
            if is_qwix_lora_base(node, tuple(path), variable)
        }
    )
    if not bases:
        return
    name = bases[0].rsplit("/", 1)[-1]
    raise ValueError(
        f"`filter` {short_repr(filter)} selects {len(bases)} base weight(s) of qwix LoRA "
        f"adapters: {listing(bases)}. qwix (qwix.apply_lora_to_model with "
        "qwix.LoraProvider) finds the weight of each adapted layer among the module's "
        "nnx.Param attributes: a FrozenParam base is invisible to it, and the adapters "
        f"next to it ({name}_lora_a, {name}_lora_b) would silently add nothing (zero "
        "gradient). Leave the base weights nnx.Param and train the adapters alone, as "
        "tunix does: ff.Optimizer(model, tx, wrt=nnx.LoRAParam) with "
        "ff.grad(loss_fn, wrt=nnx.LoRAParam) (or nnx.Optimizer(model, tx, "
        "wrt=nnx.LoRAParam) with nnx.grad(loss_fn, argnums=nnx.DiffState(0, "
        "nnx.LoRAParam))). A quantized base (QLoRA, qwix.LoraProvider(..., "
        "weight_qtype='nf4')) may be frozen."
    )
