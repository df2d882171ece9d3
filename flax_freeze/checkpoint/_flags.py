"""The ``flags`` item of a checkpoint: what it records, as JSON, and its validation."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax.numpy as jnp
import numpy as np

from .._filters import Path, path_str
from ._checksum import PATTERN

#: The ``format`` entry of a flags item written by ``ff.checkpoint``.
FORMAT = "flax_freeze.checkpoint"
#: Version 2 adds ``save_id`` and ``checksums``, version 3 ``base`` (adapter checkpoints);
#: checkpoints of earlier versions still restore.
VERSION = 3
_SHOWN = 8
_HEX = re.compile(r"[0-9a-f]{32}")


def show(paths: Iterable[str]) -> str:
    """A sorted list of paths for a message: the first few, then how many in all."""
    items = sorted(set(paths))
    shown = ", ".join(items[:_SHOWN])
    if len(items) > _SHOWN:
        shown += f", ... ({len(items)} in all)"
    return f"[{shown}]"


@dataclass(frozen=True)
class Flags:
    """What a checkpoint's ``flags`` item records. Paths are ``'/'``-joined.

    Attributes:
        frozen: paths of the frozen parameters: ``ff.FrozenParam`` values,
            Linen parameters in an ``ffl.FrozenBox``, and the Linen
            ``frozen_params`` collection.
        trainable: paths of the trainable parameters: ``nnx.Param`` values,
            unboxed Linen parameters, and the inexact leaves of other pytrees.
        types: for each saved variable, the module-qualified name of its type;
            for each Linen parameter in boxes, its outer box's type (e.g.
            ``flax_freeze._boxes.FrozenBox``).
        param_types: for each frozen parameter whose trainable type is not
            ``nnx.Param``, that type's qualified name (e.g. ``nnx.LoRAParam``).
        keys: for each saved PRNG key array, its implementation
            (``"threefry2x32"``); the key data is what is stored.
        optimizers: for each ``ff.Optimizer`` (by its path in the saved node,
            ``""`` for the node itself), the parameter paths it trained.
        arrays: for each stored array, its shape and dtype name, so that a
            restore checks them without opening any array.
        trained_dtypes: for each parameter frozen in a lower precision
            (``ff.freeze(..., dtype=...)``), the dtype it was trained in.
        save_id: a random identifier of the save, also written in the state
            item's metadata, so that a restore reads flags and arrays of one
            save (None in version 1 checkpoints).
        checksums: for each stored array, a checksum of its content (e.g.
            ``"crc32:1c291ca3"``), verified on restore (empty in version 1
            checkpoints).
        owners: for each ``ff.Optimizer`` of ``optimizers``, the path of
            the model it trains in the saved node (``""`` for the node
            itself): the one graph node that holds every parameter the
            optimizer trains, and trains exactly those. Absent when the saved
            node does not hold its model, or holds several that fit, and in
            checkpoints of earlier versions; a restore then finds the model
            in the target the same way.
        base: for an adapter checkpoint (``save(..., only=...)``), the
            fingerprint of what it left out and expects from a base: for each
            path not stored, its shape, dtype and content checksum (None where
            values are not compared: RNG state, optimizer state of parameters
            not saved, and every path of a save with ``fingerprint="shapes"``).
            Empty for a checkpoint of the whole node.
        initial: for each ``ff.Optimizer`` of ``optimizers``, the paths it
            trained when it was built. The others it trains keep step counts
            of their own (``own_counts``). Absent in checkpoints of earlier
            versions: all of them then share the optimizer state's counts.
    """

    frozen: frozenset[str] = frozenset()
    trainable: frozenset[str] = frozenset()
    types: Mapping[str, str] = field(default_factory=dict)
    param_types: Mapping[str, str] = field(default_factory=dict)
    keys: Mapping[str, str] = field(default_factory=dict)
    optimizers: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)
    arrays: Mapping[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    trained_dtypes: Mapping[str, str] = field(default_factory=dict)
    save_id: str | None = None
    checksums: Mapping[str, str] = field(default_factory=dict)
    owners: Mapping[str, str] = field(default_factory=dict)
    base: Mapping[str, tuple[tuple[int, ...], str, str | None]] = field(default_factory=dict)
    initial: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)

    @property
    def is_adapter(self) -> bool:
        """Whether the checkpoint holds only part of a node and expects the rest from a base."""
        return bool(self.base)

    def to_json(self) -> dict[str, Any]:
        """The JSON item, as stored."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "frozen": sorted(self.frozen),
            "trainable": sorted(self.trainable),
            "types": dict(sorted(self.types.items())),
            "param_types": dict(sorted(self.param_types.items())),
            "keys": dict(sorted(self.keys.items())),
            "optimizers": {
                name: [list(path) for path in paths] for name, paths in self.optimizers.items()
            },
            "arrays": {
                name: {"shape": list(shape), "dtype": dtype}
                for name, (shape, dtype) in sorted(self.arrays.items())
            },
            "trained_dtypes": dict(sorted(self.trained_dtypes.items())),
            "save_id": self.save_id,
            "checksums": dict(sorted(self.checksums.items())),
            "owners": dict(sorted(self.owners.items())),
            "initial": {
                name: [list(path) for path in paths] for name, paths in self.initial.items()
            },
            "base": {
                name: {"shape": list(shape), "dtype": dtype, "checksum": checksum}
                for name, (shape, dtype, checksum) in sorted(self.base.items())
            },
        }

    @classmethod
    def from_json(cls, data: Any, where: str, stored: Iterable[str] | None) -> Flags:
        """Validates a flags item read from ``where`` against the stored paths.

        With ``stored`` None, the paths of its ``arrays`` entry are the stored ones.
        """

        def bad(problem: str) -> ValueError:
            return ValueError(
                f"The flags item of checkpoint {where!r} {problem}. It was not written "
                "by ff.checkpoint.save, or was edited or damaged; restore its arrays "
                "with plain orbax (ocp.StandardCheckpointer) if you need them."
            )

        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise bad(f"is not a flax_freeze flags item (format {_get(data, 'format')!r})")
        version = data.get("version")
        if not isinstance(version, int) or version > VERSION or version < 1:
            raise bad(f"has version {version!r}; this flax_freeze reads version {VERSION}")

        def strings(name: str) -> list[str]:
            value = data.get(name, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise bad(f"has a malformed {name!r} entry: {value!r:.200}")
            return value

        def mapping(name: str) -> dict[str, str]:
            value = data.get(name, {})
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                raise bad(f"has a malformed {name!r} entry: {value!r:.200}")
            return value

        def path_lists(entry: str) -> dict[str, tuple[Path, ...]]:
            out: dict[str, tuple[Path, ...]] = {}
            raw = data.get(entry, {})
            if not isinstance(raw, dict):
                raise bad(f"has a malformed {entry!r} entry: {raw!r:.200}")
            for name, paths in raw.items():
                ok = isinstance(paths, list) and all(
                    isinstance(p, list)
                    and all(isinstance(k, str | int) and not isinstance(k, bool) for k in p)
                    for p in paths
                )
                if not ok:
                    raise bad(f"has a malformed {entry!r} entry for {name!r}: {paths!r:.200}")
                out[name] = tuple(sorted((tuple(p) for p in paths), key=path_str))
            return out

        optimizers = path_lists("optimizers")
        initial = path_lists("initial")

        def specs(name: str) -> dict[str, tuple[tuple[int, ...], str, str | None]]:
            raw = data.get(name, {})
            if not isinstance(raw, dict):
                raise bad(f"has a malformed {name!r} entry: {raw!r:.200}")
            out = {}
            for path, spec in raw.items():
                shape = spec.get("shape") if isinstance(spec, dict) else None
                dtype = spec.get("dtype") if isinstance(spec, dict) else None
                checksum = spec.get("checksum") if isinstance(spec, dict) else None
                if (
                    not isinstance(shape, list)
                    or not all(
                        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
                    )
                    or not isinstance(dtype, str)
                    or not _is_dtype(dtype)
                    or not (
                        checksum is None
                        or (isinstance(checksum, str) and PATTERN.fullmatch(checksum))
                    )
                ):
                    raise bad(f"has a malformed {name!r} entry for {path!r}: {spec!r:.200}")
                out[path] = (tuple(shape), dtype, checksum)
            return out

        arrays = {k: (shape, dtype) for k, (shape, dtype, _) in specs("arrays").items()}
        base = specs("base") if version >= 3 else {}
        save_id = data.get("save_id")
        if version >= 2 and not (isinstance(save_id, str) and _HEX.fullmatch(save_id)):
            raise bad(f"has a malformed 'save_id' entry: {save_id!r:.200}")
        checksums = mapping("checksums")
        if version >= 2:
            malformed = {k: v for k, v in checksums.items() if not PATTERN.fullmatch(v)}
            if malformed or set(checksums) != set(arrays):
                raise bad(
                    f"has a malformed 'checksums' entry: it must give a checksum for each "
                    f"stored array ({show(set(checksums) ^ set(arrays) | set(malformed))})"
                )
        flags = cls(
            frozenset(strings("frozen")),
            frozenset(strings("trainable")),
            mapping("types"),
            mapping("param_types"),
            mapping("keys"),
            optimizers,
            arrays,
            mapping("trained_dtypes"),
            save_id if version >= 2 else None,
            checksums,
            mapping("owners"),
            base,
            initial,
        )
        if not set(flags.initial) <= set(optimizers):
            raise bad(
                f"has a malformed 'initial' entry: it names optimizers the 'optimizers' entry "
                f"does not list ({show(set(flags.initial) - set(optimizers))})"
            )
        if not set(flags.owners) <= set(optimizers):
            raise bad(
                f"has a malformed 'owners' entry: it names optimizers the 'optimizers' entry "
                f"does not list ({show(set(flags.owners) - set(optimizers))})"
            )
        bad_dtypes = {k: v for k, v in flags.trained_dtypes.items() if not _is_floating(v)}
        if bad_dtypes:
            raise bad(
                f"has a malformed 'trained_dtypes' entry (parameters are trained in floating "
                f"dtypes): {bad_dtypes!r:.200}"
            )
        stored = set(arrays) if stored is None else set(stored)
        if set(base) & stored:
            raise bad(f"lists stored paths as left out: {show(set(base) & stored)}")
        named = flags.frozen | flags.trainable | set(flags.types)
        unknown = (named - stored - set(base)) | (set(flags.keys) - stored)
        if unknown:
            raise bad(
                f"names paths that are neither in its state item nor in its base: {show(unknown)}"
            )
        for name, entry in (("types", flags.param_types), ("dtypes", flags.trained_dtypes)):
            extra = set(entry) - flags.frozen
            if extra:
                raise bad(f"gives trainable {name} for paths that are not frozen: {show(extra)}")
        if flags.frozen & flags.trainable:
            raise bad(
                f"lists paths as both frozen and trainable: {show(flags.frozen & flags.trainable)}"
            )
        return flags


def _is_dtype(name: str) -> bool:
    try:
        np.dtype(name)
    except TypeError:
        return False
    return True


def _is_floating(name: str) -> bool:
    """A floating dtype: the only kind a parameter can be trained in."""
    return _is_dtype(name) and bool(jnp.issubdtype(np.dtype(name), jnp.floating))


def _get(data: Any, name: str) -> Any:
    return data.get(name) if isinstance(data, dict) else type(data).__name__
