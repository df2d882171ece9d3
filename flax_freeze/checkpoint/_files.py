"""Reading a checkpoint's files safely, and deciding what a save may replace.

A checkpoint directory may be damaged or crafted. Before anything in it is
read, every entry is checked: directories and regular files only; a symbolic
link must stay inside the checkpoint and point at one of those. FIFOs, device
files and sockets are refused (reading them could hang or never end). JSON
files are read with a size limit and parsed with a clear error for bad or
too deeply nested content.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from etils import epath

#: The largest JSON file (flags item, orbax metadata) read from a checkpoint.
MAX_JSON_BYTES = 256 * 2**20

# What orbax writes at the top of a checkpoint directory, besides item directories
# and, without OCDBT, one directory per top-level key of a PyTree checkpoint.
_ORBAX_FILES = {
    "_CHECKPOINT_METADATA",
    "_METADATA",
    "_sharding",
    "array_metadatas",
    "commit_success.txt",
    "d",
    "descriptor",
    "manifest.ocdbt",
}


def is_local(path: epath.Path) -> bool:
    """Whether ``path`` is on a local file system (``os`` calls work on it)."""
    return str(path).startswith("/")


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_tree(root: epath.Path) -> None:
    """Checks that ``root`` holds only directories, regular files and links inside it.

    Raises:
        ValueError: naming the first offending entry and what it is.
    """
    if not is_local(root):
        return
    real_root = os.path.realpath(root)

    def bad(path: str, problem: str) -> ValueError:
        return ValueError(
            f"Checkpoint {str(root)!r} holds {os.path.relpath(path, root)!r}, which is "
            f"{problem}. A checkpoint holds only directories and regular files: it was "
            "damaged or crafted; nothing was read from it."
        )

    for current, dirs, files in os.walk(root, followlinks=False):
        for name in [*dirs, *files]:
            path = os.path.join(current, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                target = os.path.realpath(path)
                if os.path.commonpath([real_root, target]) != real_root:
                    raise bad(path, f"a symbolic link out of the checkpoint (to {target!r})")
                try:
                    mode = os.stat(path).st_mode
                except OSError as err:
                    raise bad(path, f"a broken symbolic link ({err.strerror})") from err
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise bad(path, _kind(mode))


def read_json(path: epath.Path, what: str, limit: int = MAX_JSON_BYTES) -> Any:
    """Reads and parses a JSON file of a checkpoint, with a size limit.

    Args:
        path: the file.
        what: what it is, for messages (e.g. "the flags item of checkpoint '/x'").
        limit: the largest size read, in bytes.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if it is not a regular file, is larger than ``limit``, or is
            not valid (or too deeply nested) JSON.
    """
    if is_local(path):
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{what} is {_kind(info.st_mode)}: {str(path)!r}.")
        if info.st_size > limit:
            raise ValueError(
                f"{what} is {info.st_size:,} bytes, over the limit of {limit:,}: {str(path)!r}."
            )
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    else:
        raw = path.read_bytes()
    if len(raw) > limit:
        raise ValueError(f"{what} is over the limit of {limit:,} bytes: {str(path)!r}.")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError(f"{what} is JSON nested too deeply to read: {str(path)!r}.") from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{what} is not valid JSON ({err}): {str(path)!r}.") from None


def protected(path: epath.Path) -> str | None:
    """Why ``path`` must never be replaced; None if it may be.

    Never replaced: the root, the home directory, the working directory, and
    any directory above them.
    """
    if not is_local(path):
        return None
    real = os.path.realpath(path)
    for name, place in (
        ("the working directory", os.getcwd()),
        ("the home directory", os.path.expanduser("~")),
    ):
        place = os.path.realpath(place)
        if real == place:
            return f"is {name}"
        if os.path.commonpath([real, place]) == real:
            return f"holds {name} ({place!r})"
    if real == os.path.realpath("/"):
        return "is the root directory"
    return None


def unexpected_entries(root: epath.Path, items: set[str], keys: set[str]) -> list[str]:
    """Top-level entries of a checkpoint directory that orbax would not have written.

    Args:
        root: the checkpoint directory.
        items: names of its item directories (Composite checkpoints).
        keys: top-level keys of a PyTree checkpoint (stored as directories without OCDBT).
    """
    known = _ORBAX_FILES | items | keys
    return sorted(
        p.name for p in root.iterdir() if p.name not in known and not p.name.startswith("ocdbt.")
    )
