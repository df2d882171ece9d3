"""flax_freeze: frozen parameters as a first-class, switchable property of Flax state."""

from . import checkpoint as checkpoint
from ._filters import Filter as Filter
from ._filters import PathRegex as PathRegex
from ._grad import grad as grad
from ._grad import stop_frozen as stop_frozen
from ._grad import trainable_tree as trainable_tree
from ._grad import value_and_grad as value_and_grad
from ._optimizer import Optimizer as Optimizer
from ._optimizer import apply_updates as apply_updates
from ._optimizer import migrate_opt_state as migrate_opt_state
from ._part import PartlyFrozen as PartlyFrozen
from ._part import Rows as Rows
from ._part import TrainableIndex as TrainableIndex
from ._retype import freeze as freeze
from ._retype import freezing as freezing
from ._retype import unfreeze as unfreeze
from ._schedule import UnfreezeSchedule as UnfreezeSchedule
from ._summary import Row as Row
from ._summary import Summary as Summary
from ._summary import Totals as Totals
from ._summary import summary as summary
from ._train_step import TrainStep as TrainStep
from ._variables import AnyParam as AnyParam
from ._variables import FrozenParam as FrozenParam
from ._variables import Trainable as Trainable
from ._variables import register_param_type as register_param_type

__version__ = "0.1.0"

__all__ = [
    "AnyParam",
    "Filter",
    "FrozenParam",
    "Optimizer",
    "PartlyFrozen",
    "PathRegex",
    "Row",
    "Rows",
    "Summary",
    "Totals",
    "TrainStep",
    "UnfreezeSchedule",
    "Trainable",
    "TrainableIndex",
    "apply_updates",
    "checkpoint",
    "freeze",
    "freezing",
    "grad",
    "migrate_opt_state",
    "register_param_type",
    "stop_frozen",
    "summary",
    "trainable_tree",
    "unfreeze",
    "value_and_grad",
]
