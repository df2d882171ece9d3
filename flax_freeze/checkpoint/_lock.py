"""One saver at a time per checkpoint path, and the names of a save's temporary directories.

A save to ``dir`` holds an exclusive lock on the file ``dir.flax-freeze-lock``
beside it for as long as it runs, and removes the file when it is done. A
second save to the same path while the first runs fails at once with the
first one's process id, host and start time. The lock is an ``flock`` on a
local file system: the operating system releases it when its process dies,
so a killed save never blocks the next one. A lock file left by a killed
save is taken over and removed by the next save.

Each save writes into ``dir.flax-freeze-new-<save id>`` and moves the
checkpoint it replaces to ``dir.flax-freeze-old-<save id>``: names unique to
the save, so two savers never touch each other's directories.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from types import TracebackType

from etils import epath

from ._files import is_local

NEW = ".flax-freeze-new"
OLD = ".flax-freeze-old"
LOCK = ".flax-freeze-lock"


def sibling(path: epath.Path, suffix: str) -> epath.Path:
    """``path`` with ``suffix`` added to its name, in the same directory."""
    return path.parent / f"{path.name}{suffix}"


def new_dir(path: epath.Path, save_id: str) -> epath.Path:
    """Where the save ``save_id`` writes before it moves the checkpoint into place."""
    return sibling(path, f"{NEW}-{save_id}")


def old_dir(path: epath.Path, save_id: str) -> epath.Path:
    """Where the save ``save_id`` moves the checkpoint it replaces."""
    return sibling(path, f"{OLD}-{save_id}")


def leftovers(path: epath.Path, suffix: str) -> list[epath.Path]:
    """Directories that earlier saves to ``path`` left with that suffix, newest first."""
    found = [p for p in path.parent.glob(f"{path.name}{suffix}*") if p.is_dir()]
    return sorted(found, key=lambda p: p.stat().mtime, reverse=True)


class SaveLock:
    """The exclusive lock of the saves to one checkpoint path (a context manager)."""

    def __init__(self, path: epath.Path) -> None:
        """Makes the lock of ``path``; :meth:`acquire` or ``with`` takes it."""
        self.file = sibling(path, LOCK)
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock, or raises at once if another save holds it.

        Raises:
            ValueError: if another process (or thread) is saving to the same path.
        """
        if not is_local(self.file):
            return
        while True:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ValueError(
                    f"Another save to `directory` {str(self.path)!r} is in progress "
                    f"({holder}). Only one save to a path runs at a time: wait for it to "
                    "finish, or save to another directory. Nothing was changed."
                ) from None
            # The holder before us may have removed the file after we opened it:
            # then we hold a lock on a file nobody else sees, and must start again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.file))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        holder = f"process {os.getpid()} on {socket.gethostname()}, started {started}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Removes the lock file and releases the lock (nothing if not held)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.file)
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing releases the flock
        self._fd = None

    def __enter__(self) -> SaveLock:
        """Takes the lock."""
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Releases the lock."""
        self.release()
