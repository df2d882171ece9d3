"""Path filters, turning user filters into predicates, and "matched nothing" errors."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

from flax.nnx import filterlib

Path = tuple[Any, ...]
Predicate = Callable[[Path, Any], bool]


def path_str(path: Sequence[Any]) -> str:
    """Joins a path's keys with ``'/'``: ``('blocks', 3, 'kernel')`` -> ``'blocks/3/kernel'``."""
    return "/".join(str(key) for key in path)


class PathRegex:
    """Filter that matches a variable when a regex fully matches its ``'/'``-joined path.

    The path is the one NNX reports (``nnx.iter_graph``, ``nnx.state``): attribute
    names and list indices from the node you pass, joined with ``'/'``. The whole
    path must match (``re.fullmatch``), so ``"head/.*"`` selects everything under
    ``head`` and ``"head"`` selects nothing but a variable named ``head``.

    Args:
        pattern: a regular expression, e.g. ``"encoder/layers/[0-5]/.*"``.

    Raises:
        TypeError: if ``pattern`` is not a string.
        ValueError: if ``pattern`` is not a valid regular expression.

    Example:
        >>> import flax_freeze as ff
        >>> f = ff.PathRegex("blocks/[0-2]/.*")
        >>> f(("blocks", 1, "kernel"), None), f(("blocks", 3, "kernel"), None)
        (True, False)
    """

    __slots__ = ("pattern", "_regex")

    def __init__(self, pattern: str) -> None:
        """Compiles ``pattern``; see the class docstring."""
        if not isinstance(pattern, str):
            raise TypeError(
                f"`pattern` must be a regular expression string, got {pattern!r}. "
                'Pass e.g. PathRegex("backbone/.*").'
            )
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(
                f"`pattern` {pattern!r} is not a valid regular expression: {err}."
            ) from err
        self.pattern = pattern
        self._regex = regex

    def __call__(self, path: Sequence[Any], x: Any) -> bool:
        """Returns whether the pattern fully matches ``path`` joined with ``'/'``."""
        del x
        return self._regex.fullmatch(path_str(path)) is not None

    def __repr__(self) -> str:
        return f"PathRegex({self.pattern!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PathRegex) and other.pattern == self.pattern

    def __hash__(self) -> int:
        return hash((PathRegex, self.pattern))


def to_predicate(filter: Any, argname: str = "filter") -> Predicate:
    """Turns any NNX filter (or a :class:`PathRegex`) into a ``(path, x) -> bool`` predicate.

    Raises:
        TypeError: naming ``argname`` when the value is not a filter.
    """
    valid = (
        filter is Ellipsis
        or filter is None
        or isinstance(filter, str | type | bool | list | tuple)
        or callable(filter)
    )
    if not valid:
        raise TypeError(
            f"`{argname}` must be an NNX filter (a Variable type, PathContains, "
            f"All/Any/Not, a callable (path, variable) -> bool) or ff.PathRegex, "
            f"got {filter!r}."
        )
    if isinstance(filter, list | tuple):
        for item in filter:
            to_predicate(item, argname)
    return filterlib.to_predicate(cast(filterlib.Filter, filter))


def matched_nothing(
    func: str,
    filter: Any,
    node: Any,
    paths: Iterable[Path],
    what: str = "parameter",
) -> ValueError:
    """Builds the error for a filter that selected nothing, listing some paths to help."""
    all_paths = [path_str(p) for p in paths]
    # One path per parent, so that every part of the model shows up in the sample.
    by_parent: dict[str, str] = {}
    for p in all_paths:
        by_parent.setdefault(p.rpartition("/")[0], p)
    shown = list(by_parent.values())
    sample = ", ".join(shown[:12])
    if len(all_paths) > min(len(shown), 12):
        sample += f", ... ({len(all_paths)} in all)"
    return ValueError(
        f"`filter` {filter!r} passed to {func}() matched no {what} of "
        f"{type(node).__name__}. Its {what} paths are: {sample or '(none)'}. "
        "Check the filter against these paths, or pass missing_ok=True to allow an "
        "empty match."
    )
