"""Path filters, turning user filters into predicates, and "matched nothing" errors."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

from flax import nnx
from flax.nnx import filterlib

Path = tuple[Any, ...]
Predicate = Callable[[Path, Any], bool]


def path_str(path: Sequence[Any]) -> str:
    """Joins a path's keys with ``'/'``: ``('blocks', 3, 'kernel')`` -> ``'blocks/3/kernel'``."""
    return "/".join(str(key) for key in path)


def short_repr(x: Any, limit: int = 100) -> str:
    """``repr(x)`` on one line, cut to about ``limit`` characters, for error messages."""
    try:
        text = " ".join(repr(x).split())
    except Exception:  # a broken __repr__ must not hide the real error
        text = f"<{type(x).__name__} object>"
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def listing(paths: Sequence[str], limit: int = 8) -> str:
    """Up to ``limit`` paths for an error message, with a count of the rest."""
    shown = ", ".join(paths[:limit]) or "(none)"
    if len(paths) > limit:
        shown += f", ... ({len(paths)} in all)"
    return f"[{shown}]"


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
                f"`pattern` must be a regular expression string, got {short_repr(pattern)}. "
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
        TypeError: naming ``argname`` when the value is not a filter, is a class
            that is not an ``nnx.Variable`` type (it would select nothing), or is
            a callable that cannot take ``(path, variable)``.
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
            f"got {short_repr(filter)}."
        )
    if isinstance(filter, type) and not issubclass(filter, nnx.Variable):
        raise TypeError(
            f"`{argname}` {filter.__name__} is a class but not an nnx.Variable type, so it "
            "would select nothing. Pass a Variable type such as nnx.Param, or a filter "
            "object such as ff.PathRegex('encoder/.*')."
        )
    if isinstance(filter, list | tuple):
        for item in filter:
            to_predicate(item, argname)
    elif callable(filter) and not isinstance(filter, type):
        check_arity(filter, argname)
    return filterlib.to_predicate(cast(filterlib.Filter, filter))


def check_arity(filter: Callable[..., Any], argname: str, second: str = "variable") -> None:
    """Raises a clear error for a callable filter that cannot take ``(path, variable)``."""
    try:
        signature = inspect.signature(filter)
    except (TypeError, ValueError):  # builtins and C callables: nothing to check
        return
    try:
        signature.bind(None, None)
    except TypeError:
        raise TypeError(
            f"`{argname}` {short_repr(filter)} must be callable as (path, {second}) -> bool, "
            f"but its signature is {signature}. Accept both arguments, e.g. "
            f"lambda path, {second}: ..."
        ) from None


def matched_nothing(
    func: str,
    filter: Any,
    node: Any,
    paths: Iterable[Path],
    what: str = "parameter",
    *,
    argname: str = "filter",
    advice: str = "",
    escape: str = "pass missing_ok=True to allow an empty match",
) -> ValueError:
    """Builds the error for a filter that selected nothing, listing some paths to help.

    ``advice`` is a sentence about the likely mistake; ``escape`` says how to
    allow an empty match (empty when there is no way).
    """
    all_paths = [path_str(p) for p in paths]
    # One path per parent first, so that every part of the model shows up in the
    # sample, then the others, up to 12 in all.
    by_parent: dict[str, str] = {}
    for p in all_paths:
        by_parent.setdefault(p.rpartition("/")[0], p)
    first = list(by_parent.values())[:12]
    chosen = set(first)
    rest = [p for p in all_paths if p not in chosen][: 12 - len(first)]
    shown = sorted(first + rest, key=all_paths.index)
    sample = ", ".join(shown)
    if len(all_paths) > len(shown):
        sample += f", ... ({len(all_paths)} in all)"
    check = "Check the filter against these paths"
    return ValueError(
        f"`{argname}` {short_repr(filter)} passed to {func}() matched no {what} of "
        f"{type(node).__name__}. Its {what} paths are: {sample or '(none)'}. "
        + (f"{advice} " if advice else "")
        + (f"{check}, or {escape}." if escape else f"{check}.")
    )


def string_filter_advice(filter: Any) -> str:
    """The hint for an NNX string filter, which is a tag, not a path."""
    if not isinstance(filter, str):
        return ""
    return (
        f"A string filter is an NNX tag (nnx.WithTag), not a path: to select by path "
        f"use ff.PathRegex({filter!r})."
    )
