"""Keeping a failing orbax read of a damaged checkpoint from printing stray tracebacks."""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Any


def _without_loop_noise(previous: Any) -> Any:
    """An unraisable-exception hook that drops what a failed orbax read leaves behind.

    That is "Event loop is closed", "coroutine ... was never awaited", and errors
    of orbax coroutines collected after the read failed; the rest is passed on.
    """
    if getattr(previous, "drops_loop_noise", False):
        return previous

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        closed = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        unawaited = isinstance(error, RuntimeWarning) and "was never awaited" in str(error)
        code = getattr(unraisable.object, "cr_code", None)  # an orbax coroutine left behind
        orphan = code is not None and "orbax" in code.co_filename
        if not (closed or unawaited or orphan):
            previous(unraisable)

    hook.drops_loop_noise = True  # type: ignore[attr-defined]
    return hook


class _DropOrphanReadErrors(logging.Filter):
    """Drops asyncio's report of a TensorStore read error that no one retrieved.

    When one read of a damaged checkpoint fails, orbax gives up on the others;
    those that fail too are reported by asyncio, when collected, as "Task
    exception was never retrieved" with a traceback. The first failure is
    raised as usual, so these reports only repeat it. Every other record passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        orphan = str(record.msg).partition("\n")[0].endswith("exception was never retrieved")
        return not (orphan and error is not None and "tensorstore" in str(error))


_ORPHAN_FILTER = _DropOrphanReadErrors()


@contextlib.contextmanager
def _quiet_failure() -> Iterator[None]:
    """Keeps a failing orbax read from printing stray tracebacks.

    When TensorStore fails to read a damaged array, orbax closes its event loop
    while other reads are still pending; their completion callbacks then raise
    "Event loop is closed", which Python prints as unraisable exceptions, at
    any time later, and coroutines it left behind warn or fail when collected. The
    error itself is raised as usual. After a failure the hook that drops
    exactly that noise stays installed (every other unraisable exception goes
    to the previous hook). The logging filter that drops asyncio's reports of
    those pending reads is added before the read: orbax may drop its tasks, and
    asyncio report them, before the failure reaches this function.
    """
    previous = sys.unraisablehook
    sys.unraisablehook = _without_loop_noise(previous)
    logging.getLogger("asyncio").addFilter(_ORPHAN_FILTER)  # added once, by identity
    try:
        yield
    except BaseException:
        # The hook and the filter stay: the pending reads fail later. Coroutines orbax left
        # unawaited are collected now, without their "never awaited" warnings.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            gc.collect()
        raise
    sys.unraisablehook = previous
