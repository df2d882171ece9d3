"""Batch statistics frozen with the parameters: a BatchNorm runs on its running averages.

``ff.freeze(..., batch_stats=True)`` puts each module whose parameters are
then all frozen and that keeps batch statistics (``nnx.BatchNorm``, or any
module with a ``use_running_average`` attribute and ``nnx.BatchStat``
variables) into inference mode: ``use_running_average=True``, so it
normalises with its running averages and stops updating them. The value it
had is noted in the metadata of its batch statistics, and ``ff.unfreeze``
puts it back once one of the module's parameters is trainable again.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from ._part import PartlyFrozen
from ._variables import FrozenParam, is_any_param

#: Metadata key on a module's batch statistics: its ``use_running_average`` before.
WAS_KEY = "running_average_before_freeze"


def _modules(node: Any) -> list[tuple[Any, list[nnx.Variable[Any]], list[nnx.Variable[Any]]]]:
    """``(module, its parameters, its batch statistics)`` of each module that keeps statistics."""
    found = []
    for _, x in nnx.iter_graph(node, graph=True):
        if not isinstance(x, nnx.Module) or not hasattr(x, "use_running_average"):
            continue
        own = [v for v in vars(x).values() if isinstance(v, nnx.Variable)]
        stats = [v for v in own if isinstance(v, nnx.BatchStat)]
        params = [v for v in own if is_any_param(v) or isinstance(v, FrozenParam)]
        params += [v for v in vars(x).values() if isinstance(v, PartlyFrozen)]  # part trains
        if stats and params:
            found.append((x, params, stats))
    return found


def freeze_stats(node: Any) -> None:
    """Puts each module whose parameters are all frozen into inference mode, noting its mode."""
    for module, params, stats in _modules(node):
        if (
            all(isinstance(p, FrozenParam) for p in params)
            and WAS_KEY not in stats[0].get_metadata()
        ):
            for stat in stats:
                stat.set_metadata(WAS_KEY, module.use_running_average)
            module.use_running_average = True


def unfreeze_stats(node: Any) -> None:
    """Gives each module put into inference mode by a freeze its mode back, once it trains again."""
    for module, params, stats in _modules(node):
        metadata = stats[0].get_metadata()
        if WAS_KEY in metadata and not all(isinstance(p, FrozenParam) for p in params):
            module.use_running_average = metadata[WAS_KEY]
            for stat in stats:
                stat.del_metadata(WAS_KEY)
