"""UnfreezeSchedule: unfreeze (and freeze back) parts of a model at given steps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import _version
from ._filters import Filter, short_repr, to_predicate
from ._retype import freeze, unfreeze


def _plan(changes: Any, argname: str) -> tuple[tuple[int, Any], ...]:
    if changes is None:
        return ()
    if not isinstance(changes, Mapping):
        raise TypeError(
            f"`{argname}` must map steps to filters, e.g. {{100: 'blocks/5/.*'}}, got "
            f"{short_repr(changes)}."
        )
    plan = []
    for step, filter in changes.items():
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(
                f"`{argname}` has the step {short_repr(step)}: steps are whole numbers >= 0, "
                "counted as the training loop counts them (the first step is 0)."
            )
        to_predicate(filter, argname, strings="path")
        plan.append((int(step), filter))
    return tuple(sorted(plan, key=lambda change: change[0]))


class UnfreezeSchedule(nnx.Pytree):
    """Unfreezes parts of a model at given steps, and optionally freezes parts back.

    Call it at the top of every training step with the step's number:
    ``schedule(model, step)`` applies each change due at that step or before
    that has not been applied yet (at one step, freezing comes before
    unfreezing), and returns whether anything changed. :class:`Optimizer` and
    :class:`TrainStep` follow the change by themselves; parameters unfrozen
    after the optimizer was built get step counts of their own (a fresh
    start of Adam's bias correction, and of schedules with
    ``group_schedules=True``).

    The schedule records how far it got in an array, so that saving it with
    the model and optimizer (``ff.checkpoint.save(dir, (model, opt,
    schedule))``) and restoring into a new one resumes a run that unfreezes
    at the same steps: the restored model already has the flags of the
    changes made, and the schedule makes only the later ones.

    Args:
        unfreeze: ``{step: filter}``: what to make trainable at each step (a
            path regex string, ``ff.PathRegex``, or any NNX filter).
        freeze: ``{step: filter}``: what to freeze back at each step.

    Raises:
        TypeError: if ``unfreeze`` or ``freeze`` is not a mapping, or a filter
            is not a filter.
        ValueError: if a step is not a whole number >= 0.

    Example:
        >>> import optax
        >>> from flax import nnx
        >>> import flax_freeze as ff
        >>> model = nnx.Sequential(nnx.Linear(2, 4, rngs=nnx.Rngs(0)),
        ...                        nnx.Linear(4, 1, rngs=nnx.Rngs(1)))
        >>> _ = ff.freeze(model, "layers/0/.*")
        >>> schedule = ff.UnfreezeSchedule({2: "layers/0/.*"})
        >>> [schedule(model, step) for step in range(4)]
        [False, False, True, False]
        >>> type(model.layers[0].kernel).__name__
        'Param'
    """

    def __init__(
        self, unfreeze: Mapping[int, Filter], *, freeze: Mapping[int, Filter] | None = None
    ) -> None:
        """Checks the plan; nothing is applied until the schedule is called."""
        self.unfreezes = _plan(unfreeze, "unfreeze")
        self.freezes = _plan(freeze, "freeze")
        if not self.unfreezes and not self.freezes:
            raise ValueError(
                "`unfreeze` and `freeze` are both empty: the schedule would change nothing. "
                "Pass e.g. ff.UnfreezeSchedule({100: 'blocks/5/.*'})."
            )
        #: The last step whose changes were applied (-1: none yet).
        self.done = nnx.Variable(jnp.asarray(-1, jnp.int32))

    def __call__(self, model: Any, step: int) -> bool:
        """Applies the changes due at ``step`` or before that are not applied yet.

        Args:
            model: the model to change (in place).
            step: the number of the step about to run (0 for the first).

        Returns:
            Whether anything was frozen or unfrozen.

        Raises:
            ValueError: if ``step`` is not a whole number >= 0.
        """
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(
                f"`step` must be the number of the step about to run (0, 1, ...), got "
                f"{short_repr(step)}."
            )
        done = int(self.done[...])
        before = _version.current()
        due = sorted(
            [(s, 0, f) for s, f in self.freezes if done < s <= step]
            + [(s, 1, f) for s, f in self.unfreezes if done < s <= step],
            key=lambda change: change[:2],
        )
        for _, kind, filter in due:
            change = unfreeze if kind else freeze
            change(model, filter, missing_ok=True)
        if step > done:
            self.done[...] = jnp.asarray(step, jnp.int32)
        return _version.current() != before

    def __repr__(self) -> str:
        """The plan: what unfreezes and what freezes at which step."""
        parts = [f"unfreeze={dict(self.unfreezes)!r}"]
        if self.freezes:
            parts.append(f"freeze={dict(self.freezes)!r}")
        return f"UnfreezeSchedule({', '.join(parts)})"
