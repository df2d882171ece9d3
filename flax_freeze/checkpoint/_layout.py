"""Finding a checkpoint: its directories and items, a manager's steps, and its identity on disk."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from ._common import FLAGS, MARK, STATE
from ._files import check_tree, is_local, read_json
from ._lock import NEW, OLD, leftovers


def _absolute(directory: str | epath.PathLike) -> epath.Path:
    """``directory`` as an absolute path (orbax refuses relative ones)."""
    path = epath.Path(directory)
    return path if path.is_absolute() else epath.Path(os.path.abspath(path))


@dataclass(frozen=True)
class _Layout:
    """Where a checkpoint keeps its arrays and flags."""

    root: epath.Path
    item: str | None  # the Composite item of the arrays; None: ``root`` is a PyTree checkpoint
    has_flags: bool  # it has a flags item directory
    flags_listed: bool  # its _CHECKPOINT_METADATA names a flags item

    @property
    def state_dir(self) -> epath.Path:
        return self.root / self.item if self.item else self.root


def _locate(directory: str | epath.PathLike, argname: str = "directory") -> _Layout:
    path = _absolute(directory)
    if not path.exists():
        moved = leftovers(path, OLD)
        hint = (
            f" A save with force=True was interrupted between two renames: the previous "
            f"checkpoint is complete at {str(moved[0])!r}; rename it to {path.name!r} (the "
            "next save to this path does it by itself)."
            if moved
            else ""
        )
        raise FileNotFoundError(f"`{argname}` {str(path)!r} does not exist.{hint}")
    if not path.is_dir():
        raise ValueError(f"`{argname}` {str(path)!r} is a file, not a checkpoint directory.")
    if ocp.step.TMP_DIR_SUFFIX in path.name or NEW in path.name:
        raise ValueError(
            f"`{argname}` {str(path)!r} is an unfinished checkpoint: its save did not "
            "complete. Restore the previous checkpoint instead."
        )
    layout = None
    if (path / "_METADATA").exists():
        layout = _Layout(path, None, False, False)
    else:
        for item in (STATE, "default"):
            if (path / item / "_METADATA").exists():
                has_flags = item == STATE and (path / FLAGS).exists()
                layout = _Layout(path, item, has_flags, False)
                break
    if layout is None:
        steps = sorted(ocp.step.checkpoint_steps(path))
        hint = (
            f" It is a CheckpointManager directory with steps {steps[-5:]}: pass one step's "
            f"directory, or use ff.checkpoint.restore_args with the manager."
            if steps
            else ""
        )
        raise ValueError(
            f"`{argname}` {str(path)!r} is not an orbax checkpoint: it has neither a "
            f"{STATE!r} item (as ff.checkpoint.save writes) nor an orbax _METADATA file "
            f"(as ocp.StandardCheckpointer writes).{hint}"
        )
    check_tree(path)
    listed = False
    if layout.item is not None and (path / "_CHECKPOINT_METADATA").exists():
        meta = read_json(path / "_CHECKPOINT_METADATA", f"The metadata of checkpoint {str(path)!r}")
        handlers = meta.get("item_handlers") if isinstance(meta, dict) else None
        listed = isinstance(handlers, dict) and FLAGS in handlers
    return _Layout(path, layout.item, layout.has_flags, listed)


def _damaged(layout: _Layout, problem: str) -> ValueError:
    return ValueError(
        f"Checkpoint {str(layout.root)!r} {problem}. The checkpoint is damaged or incomplete; "
        "restore an earlier one."
    )


def _state_metadata(layout: _Layout) -> dict[str, Any]:
    """The state item's orbax ``_METADATA`` (JSON), checked for the entries read here."""
    data = read_json(
        layout.state_dir / "_METADATA", f"The array metadata of checkpoint {str(layout.root)!r}"
    )
    tree = data.get("tree_metadata") if isinstance(data, dict) else None
    if not isinstance(tree, dict) or not all(
        isinstance(leaf, dict)
        and isinstance(leaf.get("key_metadata"), list)
        and leaf["key_metadata"]
        and all(isinstance(k, dict) and "key" in k for k in leaf["key_metadata"])
        for leaf in tree.values()
    ):
        raise _damaged(layout, "has malformed array metadata (its state item's _METADATA file)")
    return data


def _tree_metadata(layout: _Layout) -> dict[str, Any]:
    return _state_metadata(layout)["tree_metadata"]


def _mark(metadata: Mapping[str, Any]) -> dict[str, Any] | None:
    """The flax_freeze mark in a state item's metadata: ``{"format", "save_id"}``, or None."""
    custom = metadata.get("custom_metadata")
    mark = custom.get(MARK) if isinstance(custom, dict) else None
    return mark if isinstance(mark, dict) else None


def _is_item(path: epath.Path) -> bool:
    """Whether ``path`` is an item of a Composite checkpoint (it has orbax metadata)."""
    return any((path / name).exists() for name in ("_METADATA", "metadata", "commit_success.txt"))


def _top_keys(layout: _Layout) -> set[str]:
    """The top-level keys of a PyTree checkpoint's tree (directories without OCDBT)."""
    tree = _tree_metadata(layout)
    return {str(leaf["key_metadata"][0]["key"]) for leaf in tree.values()}


def _step_directory(
    root: epath.Path, step: int | None, argname: str = "source"
) -> tuple[epath.Path, int]:
    """The directory of a finished step of a CheckpointManager directory (default: the latest)."""
    root = _absolute(root)
    paths = {
        ocp.step.step_from_checkpoint_name(p.name): p for p in ocp.step.checkpoint_steps_paths(root)
    }
    if not paths:
        raise ValueError(
            f"`{argname}` {str(root)!r} is a CheckpointManager directory with no finished step."
        )
    if step is None:
        step = max(paths)
    if step not in paths:
        raise ValueError(
            f"`step` {step!r} is not a finished step of {str(root)!r}; its steps are "
            f"{sorted(paths)[-8:]}."
        )
    return paths[step], step


def _checkpoint_or_step(
    directory: str | epath.PathLike, step: int | None, argname: str = "directory"
) -> tuple[epath.Path, int | None]:
    """``directory`` itself when it is a checkpoint, else a step of the manager directory it is.

    A manager directory gives ``step``, or its latest finished step.
    """
    path = _absolute(directory)
    if step is None:
        try:
            _locate(path, argname)
        except ValueError:
            if not ocp.step.checkpoint_steps(path):
                raise
        else:
            return path, None
    return _step_directory(path, step, argname)


def _identity(path: epath.Path) -> tuple[int, ...] | None:
    """What tells one checkpoint directory at ``path`` from the next one saved there.

    A forced save puts a new directory in place by renaming: a different inode,
    or at least a different change time. None where it cannot be told (the
    path is missing, or not on a local file system).
    """
    if not is_local(path):
        return None
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_ctime_ns)


def _being_replaced(path: epath.Path, identity: tuple[int, ...] | None) -> bool:
    """Whether a failed read may be a save replacing ``path`` meanwhile (then read again)."""
    if identity is None:  # it was missing: between the two renames of a forced save?
        return bool(leftovers(path, NEW) or leftovers(path, OLD)) or path.exists()
    return _identity(path) != identity
