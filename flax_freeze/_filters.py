"""Path filters, turning user filters into predicates, and "matched nothing" errors."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, TypeAlias, cast

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
    r"""Filter that matches a variable when a regex fully matches its joined path.

    The path is the one NNX reports (``nnx.iter_graph``, ``nnx.state``): attribute
    names and list indices from the node you pass, joined with ``sep``. The whole
    path must match (``re.fullmatch``), so ``"head/.*"`` selects everything under
    ``head`` and ``"head"`` selects nothing but a variable named ``head``.

    In ``ff.freeze``, ``ff.unfreeze``, ``ff.freezing`` and their Linen
    counterparts a plain string filter means the same: ``ff.freeze(model,
    "head/.*")`` is ``ff.freeze(model, ff.PathRegex("head/.*"))``.

    Args:
        pattern: a regular expression, e.g. ``"encoder/layers/[0-5]/.*"``, or one
            compiled with ``re.compile`` (its flags, e.g. ``re.IGNORECASE``, apply).
        sep: the string the path's keys are joined with, e.g. ``"."`` for
            patterns written as ``r"encoder\.layers\.[0-5]\..*"``.

    Raises:
        TypeError: if ``pattern`` is neither a string nor a compiled ``str``
            pattern, or ``sep`` is not a string.
        ValueError: if ``pattern`` is not a valid regular expression, or ``sep``
            is empty.

    Example:
        >>> import re
        >>> import flax_freeze as ff
        >>> f = ff.PathRegex("blocks/[0-2]/.*")
        >>> f(("blocks", 1, "kernel"), None), f(("blocks", 3, "kernel"), None)
        (True, False)
        >>> ff.PathRegex(r"blocks\.1\..*", sep=".")(("blocks", 1, "kernel"), None)
        True
        >>> ff.PathRegex(re.compile("HEAD/.*", re.IGNORECASE))(("head", "bias"), None)
        True
    """

    __slots__ = ("pattern", "sep", "regex")

    def __init__(self, pattern: str | re.Pattern[str], *, sep: str = "/") -> None:
        """Compiles ``pattern``; see the class docstring."""
        if isinstance(pattern, re.Pattern):
            if not isinstance(pattern.pattern, str):
                raise TypeError(
                    f"`pattern` must match text, got a bytes pattern {short_repr(pattern)}. "
                    f"Compile a str pattern, e.g. re.compile({pattern.pattern.decode()!r})."
                )
            regex = pattern
        elif isinstance(pattern, str):
            try:
                regex = re.compile(pattern)
            except re.error as err:
                raise ValueError(
                    f"`pattern` {pattern!r} is not a valid regular expression: {err}."
                ) from err
        else:
            raise TypeError(
                f"`pattern` must be a regular expression string, got {short_repr(pattern)}. "
                'Pass e.g. PathRegex("backbone/.*"), or a pattern compiled with re.compile.'
            )
        if not isinstance(sep, str):
            raise TypeError(f'`sep` must be a string such as "/" or ".", got {short_repr(sep)}.')
        if not sep:
            raise ValueError(
                '`sep` must not be empty: keys joined with "" run together. Pass e.g. '
                'sep="/" (the default) or sep=".".'
            )
        #: The regular expression's text.
        self.pattern: str = regex.pattern
        #: The string the path's keys are joined with.
        self.sep = sep
        #: The compiled expression, flags included.
        self.regex: re.Pattern[str] = regex

    def join(self, path: Sequence[Any]) -> str:
        """``path``'s keys joined with :attr:`sep`, as the pattern sees them."""
        return self.sep.join(str(key) for key in path)

    def __call__(self, path: Sequence[Any], x: Any) -> bool:
        """Returns whether the pattern fully matches ``path`` joined with :attr:`sep`."""
        del x
        return self.regex.fullmatch(self.join(path)) is not None

    def _key(self) -> tuple[str, int, str]:
        return (self.pattern, self.regex.flags, self.sep)

    def __repr__(self) -> str:
        default_flags = re.compile(self.pattern).flags
        shown = repr(self.regex) if self.regex.flags != default_flags else repr(self.pattern)
        return f"PathRegex({shown}{'' if self.sep == '/' else f', sep={self.sep!r}'})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PathRegex) and other._key() == self._key()

    def __hash__(self) -> int:
        return hash((PathRegex, self._key()))


Filter: TypeAlias = filterlib.Filter | PathRegex | re.Pattern[str]
"""What selects variables: any NNX filter or a path regex.

An NNX filter is a variable type (``nnx.Param``, ``ff.FrozenParam``), a
predicate ``(path, variable) -> bool``, ``nnx.All``/``nnx.Any``/``nnx.Not``
or ``nnx.PathContains`` of filters, ``True``/``False``/``...``/``None``, or
a tuple or list of filters (any of them). A :class:`PathRegex`, a compiled
``re.Pattern`` or, in flax_freeze's functions, a plain string selects by
path (NNX reads a plain string as a tag).
"""


def is_nothing(filter: Any) -> bool:
    """Whether ``filter`` selects nothing on purpose: ``nnx.Nothing`` or ``False``.

    ``nnx.Nothing`` counts both as an instance and as the class itself.

    Such a filter makes ``freeze``/``unfreeze`` a no-op instead of a "matched
    nothing" error (openpi's default freeze filter is ``nnx.Nothing``).
    """
    return filter is False or filter is filterlib.Nothing or isinstance(filter, filterlib.Nothing)


def to_predicate(
    filter: Any, argname: str = "filter", *, strings: Literal["tag", "path"] = "tag"
) -> Predicate:
    """Turns any NNX filter (or a :class:`PathRegex`) into a ``(path, x) -> bool`` predicate.

    Args:
        filter: the user's filter.
        argname: the argument's name, for error messages.
        strings: what a plain string means, at the top level or as an item of a
            list or tuple: an NNX tag (``nnx.WithTag``, NNX's own meaning) or a
            path regex (:class:`PathRegex`, what ``freeze``/``unfreeze`` use).
            Strings inside ``nnx.All``/``Any``/``Not`` are NNX's: tags.

    Raises:
        TypeError: naming ``argname`` when the value is not a filter, is a class
            that is not an ``nnx.Variable`` type (it would select nothing), or is
            a callable that cannot take ``(path, variable)``.
        ValueError: if a string meant as a path is not a valid regular expression.
    """
    if filter is filterlib.Nothing:  # the class, as openpi passes it: NNX selects nothing too
        return filterlib.Nothing()
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
    if strings == "path":
        if isinstance(filter, str):
            return PathRegex(filter)
        if isinstance(filter, list | tuple):
            filter = type(filter)(PathRegex(f) if isinstance(f, str) else f for f in filter)
    if isinstance(filter, list | tuple):
        for item in filter:
            to_predicate(item, argname, strings=strings)
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


#: A "matched nothing" error lists every path up to this many, a sample beyond.
MAX_LISTED = 12


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
    """Builds the error for a filter that selected nothing, listing the paths to help.

    Up to :data:`MAX_LISTED` paths are all listed; beyond, a sample with one
    path per parent first (so every part of the model shows up) and the count.
    Paths are joined as the filter sees them (a :class:`PathRegex`'s ``sep``).

    ``advice`` is a sentence about the likely mistake; without one, a
    :class:`PathRegex` that would match with a usual correction (``head`` ->
    ``head/.*``) gets that correction named. ``escape`` says how to allow an
    empty match (empty when there is no way).
    """
    sep = filter.sep if isinstance(filter, PathRegex) else "/"
    all_paths = [sep.join(str(key) for key in p) for p in paths]
    by_parent: dict[str, str] = {}
    for p in all_paths:
        by_parent.setdefault(p.rpartition(sep)[0], p)
    first = list(by_parent.values())[:MAX_LISTED]
    chosen = set(first)
    rest = [p for p in all_paths if p not in chosen][: MAX_LISTED - len(first)]
    order = {p: i for i, p in enumerate(all_paths)}
    shown = sorted(first + rest, key=order.__getitem__)
    sample = ", ".join(shown)
    if len(all_paths) > len(shown):
        sample += f", ... ({len(all_paths)} in all)"
    if not advice and isinstance(filter, PathRegex):
        advice = regex_correction(filter, all_paths)
    check = "Check the filter against these paths"
    return ValueError(
        f"`{argname}` {short_repr(filter)} passed to {func}() matched no {what} of "
        f"{type(node).__name__}. Its {what} paths are: {sample or '(none)'}. "
        + (f"{advice} " if advice else "")
        + (f"{check}, or {escape}." if escape else f"{check}.")
    )


def _corrections(pattern: str, sep: str) -> list[str]:
    """Usual fixes of a path pattern: its subtree, a last key, a key anywhere, a substring."""
    p = f"(?:{pattern})" if "|" in pattern else pattern
    s = re.escape(sep)
    return [f"{p}{s}.*", f".*{s}{p}", f".*{s}{p}{s}.*", f".*{p}.*"]


def regex_correction(filter: PathRegex | str, paths: Sequence[str]) -> str:
    """A sentence naming the corrected pattern that selects some of ``paths``, or ``""``.

    ``filter`` is a :class:`PathRegex`, or a plain string meant as one (the
    correction is then shown as a string too).
    """
    regex = filter if isinstance(filter, PathRegex) else PathRegex(filter)
    for candidate in _corrections(regex.pattern, regex.sep):
        try:
            fixed = PathRegex(re.compile(candidate, regex.regex.flags), sep=regex.sep)
        except (re.error, ValueError):
            continue
        matches = [p for p in paths if fixed.regex.fullmatch(p)]
        if matches:
            shown = repr(fixed) if isinstance(filter, PathRegex) else repr(candidate)
            return (
                f"The pattern must match the whole path (re.fullmatch): {shown} would "
                f"select {len(matches)} of them ({', '.join(matches[:4])}"
                f"{', ...' if len(matches) > 4 else ''})."
            )
    return ""


def string_filter_advice(filter: Any) -> str:
    """The hint for an NNX string filter, which is a tag, not a path."""
    if not isinstance(filter, str):
        return ""
    return (
        f"A string filter is an NNX tag (nnx.WithTag), not a path: to select by path "
        f"use ff.PathRegex({filter!r})."
    )


def path_string_advice(filter: str, paths: Sequence[str]) -> str:
    """The hint for a plain string that, as a path regex, selected nothing."""
    return " ".join(
        part
        for part in (
            f"A plain string is a path regex here, as ff.PathRegex({filter!r}); to select "
            f"by NNX tag pass nnx.WithTag({filter!r}).",
            regex_correction(filter, paths),
        )
        if part
    )
