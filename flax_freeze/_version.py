"""A process-wide count of freeze changes, for steps that keep a split of a model.

Re-typing variables (:func:`~flax_freeze.freeze`, :func:`~flax_freeze.unfreeze`,
:func:`~flax_freeze.freezing`, a checkpoint restored with its flags) calls
:func:`bump`. A :class:`~flax_freeze.TrainStep` remembers the count its split
of the model saw and splits again when the count has moved: one integer
comparison per call, whichever model changed.
"""

from __future__ import annotations

_changes = 0


def bump() -> None:
    """Records that variables were re-typed somewhere in this process.

    Example:
        >>> from flax_freeze import _version
        >>> before = _version.current()
        >>> _version.bump()
        >>> _version.current() - before
        1
    """
    global _changes
    _changes += 1


def current() -> int:
    """The number of re-typings recorded so far in this process.

    Returns:
        A count that only grows.

    Example:
        >>> from flax_freeze import _version
        >>> _version.current() >= 0
        True
    """
    return _changes
