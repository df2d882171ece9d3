"""Cost of checkpoints with flags: ff.checkpoint against plain orbax on the same state.

The state is an MLP with its bottom half frozen and its ``ff.Optimizer``
(AdamW: two moments per trained weight), saved together. Plain orbax is what
the Flax docs show: ``ocp.StandardCheckpointer`` saving ``nnx.state((model,
opt))`` (waiting for it to finish), then restoring into the abstract state
(from ``nnx.eval_shape``, with shardings) and ``nnx.merge``. flax_freeze is
``ff.checkpoint.save`` and ``ff.checkpoint.restore`` into the same abstract
``(model, optimizer)``; "fresh" restores into an all-trainable one, which also
re-types the model and rebuilds the optimizer's state structure (plain orbax
cannot restore into that at all); "unverified" restores with ``verify=False``
(no checksums checked), which shows what verifying costs, and "checksums" times
computing the checksum of every array alone (what a save adds for them). Each
round runs every variant once, taking
turns to go first; a ratio is the median over ``--repeats`` rounds of the
ratio within a round, which is robust to a machine whose load drifts. The
target: at most 1.1x plain orbax.

The adapter section times an adapter checkpoint against a full one. The
state is an MLP with an ``nnx.LoRA`` of rank ``--rank`` beside each hidden
layer, everything but the LoRA parameters frozen, and its ``ff.Optimizer``
(AdamW), after one training step. "full" saves all of ``(model, opt)``;
"adapter" saves ``only=nnx.LoRAParam`` (the LoRA parameters and their
optimizer state, with a CRC-32 fingerprint of the base) and restores onto a
concrete base, checking the base against the fingerprint (which recomputes
the base's checksums); "shapes" saves with ``fingerprint="shapes"`` (no
checksums) and so restores with nothing to recompute. Each restores into a
freshly built concrete ``(model, opt)`` (built outside the timer).
"fingerprint" times the CRC-32 of the base's arrays alone. Bytes on disk are
the sizes of the files under each checkpoint; "selected" counts the bytes of
the LoRA parameters and the optimizer state. Orbax compresses arrays (zstd),
so the adapter's overhead over the selected bytes is measured once more with
the selected arrays overwritten by random bytes, which do not compress.

Checkpoints go to ``--dir`` (default: ``/dev/shm`` where it exists), a RAM
disk, so that disk write-back noise does not drown the difference.

    python benchmarks/checkpoint_cost.py [--repeats N] [--dir DIR] [--out FOLDER]
        [--sections flags adapter] [--rank R]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import flax_freeze as ff
from flax_freeze.checkpoint._checksum import checksum

SIZES = {"MLP 4x256": (256, 4), "MLP 8x1024": (1024, 8), "MLP 8x2048": (2048, 8)}
SECTIONS = ("flags", "adapter")
ADAPTER_RANK = 4


class MLP(nnx.Module):
    def __init__(self, width: int, depth: int) -> None:
        rngs = nnx.Rngs(0)
        self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])
        self.head = nnx.Linear(width, 10, rngs=rngs)


def build(width: int, depth: int, frozen: bool) -> tuple[MLP, ff.Optimizer]:
    model = MLP(width, depth)
    if frozen:
        half = "|".join(str(i) for i in range(depth // 2))
        ff.freeze(model, ff.PathRegex(rf"layers/({half})/.*"))
    return model, ff.Optimizer(model, optax.adamw(1e-3, weight_decay=0.1))


def plain_save(path: Path, node: Any) -> None:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, nnx.state(node))
    checkpointer.wait_until_finished()
    checkpointer.close()


def plain_restore(path: Path, abstract: Any) -> Any:
    graphdef, state = nnx.split(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(path, state)
    return nnx.merge(graphdef, restored)


def measure(width: int, depth: int, repeats: int, root: Path) -> dict[str, Any]:
    node = build(width, depth, frozen=True)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(node)))

    def abstract(frozen: bool) -> Any:
        return nnx.eval_shape(lambda: build(width, depth, frozen=frozen))

    variants = {
        "plain": (lambda p: plain_save(p, node), lambda p: plain_restore(p, abstract(True))),
        "ff": (
            lambda p: ff.checkpoint.save(p, node),
            lambda p: ff.checkpoint.restore(p, abstract(True)),
        ),
        # A fresh all-trainable target: restore also re-types it and rebuilds the
        # optimizer's state structure (plain orbax cannot restore into it at all).
        "ff fresh": (
            lambda p: ff.checkpoint.save(p, node),
            lambda p: ff.checkpoint.restore(p, abstract(False)),
        ),
        "ff unverified": (
            lambda p: ff.checkpoint.save(p, node),
            lambda p: ff.checkpoint.restore(p, abstract(True), verify=False),
        ),
    }
    arrays = jax.tree.leaves(nnx.state(node))
    times: dict[str, list[float]] = {}
    names = list(variants)
    for i in range(repeats + 1):  # the first round warms up
        shift = i % len(names)  # rotate the order, so that no variant always runs first
        for name in names[shift:] + names[:shift]:
            save, restore = variants[name]
            path = root / f"{name}-{i}"
            gc.collect()
            start = time.perf_counter()
            save(path)
            saved = time.perf_counter() - start
            gc.collect()
            start = time.perf_counter()
            out = restore(path)
            jax.block_until_ready(jax.tree.leaves(nnx.state(out)))
            restored = time.perf_counter() - start
            shutil.rmtree(path)
            if i:
                times.setdefault(f"{name} save", []).append(saved)
                times.setdefault(f"{name} restore", []).append(restored)
        start = time.perf_counter()
        for x in arrays:
            checksum(x)
        if i:
            times.setdefault("checksums", []).append(time.perf_counter() - start)

    def paired(ff_key: str, plain_key: str) -> float:
        """Median over rounds of the ratio within a round (runs close in time)."""
        return statistics.median(
            a / b for a, b in zip(times[ff_key], times[plain_key], strict=True)
        )

    def total(name: str) -> list[float]:
        return [a + b for a, b in zip(times[f"{name} save"], times[f"{name} restore"], strict=True)]

    times["ff total"], times["plain total"] = total("ff"), total("plain")
    return {
        "state_mib": state_bytes / 2**20,
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "min_seconds": {k: min(v) for k, v in times.items()},
        "ratios": {
            "save": paired("ff save", "plain save"),
            "restore": paired("ff restore", "plain restore"),
            "fresh restore": paired("ff fresh restore", "plain restore"),
            "save + restore": paired("ff total", "plain total"),
            "verify": paired("ff restore", "ff unverified restore"),
            "checksums / save": paired("checksums", "ff save"),
        },
        "times": times,
    }


class LoRAMLP(nnx.Module):
    def __init__(self, width: int, depth: int, rank: int) -> None:
        rngs = nnx.Rngs(0)
        self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])
        self.adapters = nnx.List([nnx.LoRA(width, rank, width, rngs=rngs) for _ in range(depth)])
        self.head = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer, adapter in zip(self.layers, self.adapters, strict=True):
            x = nnx.relu(layer(x) + adapter(x))
        return self.head(x)


def build_adapted(width: int, depth: int, rank: int) -> tuple[LoRAMLP, ff.Optimizer]:
    """The same base every time (seeded), everything but the LoRA parameters frozen."""
    model = LoRAMLP(width, depth, rank)
    ff.freeze(model, nnx.All(ff.Trainable, nnx.Not(nnx.LoRAParam)))
    return model, ff.Optimizer(model, optax.adamw(1e-3, weight_decay=0.1))


def trained(width: int, depth: int, rank: int) -> tuple[LoRAMLP, ff.Optimizer]:
    """After one training step: LoRA weights and optimizer moments are no longer zeros."""
    model, opt = build_adapted(width, depth, rank)
    x = jax.random.normal(jax.random.key(1), (8, width))

    def loss_fn(model: LoRAMLP) -> jax.Array:
        return (model(x) ** 2).mean()

    _, grads = ff.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return model, opt


def nbytes(tree: Any) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def disk_bytes(path: Path) -> int:
    """The sizes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def same_state(a: Any, b: Any) -> bool:
    """Whether two nodes hold the same arrays at the same paths."""
    left, right = (dict(nnx.to_flat_state(nnx.state(n))) for n in (a, b))
    return left.keys() == right.keys() and all(
        np.array_equal(np.asarray(v.get_value()), np.asarray(right[k].get_value()))
        for k, v in left.items()
    )


def incompressible(node: tuple[LoRAMLP, ff.Optimizer]) -> None:
    """Overwrites the LoRA parameters and the optimizer state with random bytes, in place."""
    model, opt = node
    rng = np.random.default_rng(0)

    def noise(x: Any) -> Any:
        return rng.integers(0, 256, x.nbytes, dtype=np.uint8).view(x.dtype).reshape(x.shape)

    for part, state in ((model, nnx.state(model, nnx.LoRAParam)), (opt, nnx.state(opt))):
        nnx.update(part, jax.tree.map(lambda x: jnp.asarray(noise(x)), state))


def measure_adapter(width: int, depth: int, rank: int, repeats: int, root: Path) -> dict[str, Any]:
    node = trained(width, depth, rank)
    model, opt = node
    lora = nnx.state(model, nnx.LoRAParam)
    base = jax.tree.leaves(nnx.state(model, nnx.Not(nnx.LoRAParam)))
    selected = nbytes(lora) + nbytes(nnx.state(opt))  # the optimizer trains only the LoRA
    base_bytes = sum(x.nbytes for x in base)

    save = ff.checkpoint.save
    variants = {
        "full": lambda p: save(p, node),
        "adapter": lambda p: save(p, node, only=nnx.LoRAParam),
        "shapes": lambda p: save(p, node, only=nnx.LoRAParam, fingerprint="shapes"),
    }
    times: dict[str, list[float]] = {}
    on_disk: dict[str, int] = {}
    names = list(variants)
    for i in range(repeats + 1):  # the first round warms up, and checks what was restored
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            path = root / f"{name}-{i}"
            gc.collect()
            start = time.perf_counter()
            variants[name](path)
            saved = time.perf_counter() - start
            on_disk[name] = disk_bytes(path)
            fresh = build_adapted(width, depth, rank)  # a concrete base
            gc.collect()
            start = time.perf_counter()
            out = ff.checkpoint.restore(path, fresh)
            jax.block_until_ready(jax.tree.leaves(nnx.state(out)))
            restored = time.perf_counter() - start
            shutil.rmtree(path)
            if not i and not same_state(out, node):
                raise AssertionError(f"{name}: the restored state differs from the saved one")
            if i:
                times.setdefault(f"{name} save", []).append(saved)
                times.setdefault(f"{name} restore", []).append(restored)
            del fresh, out
        start = time.perf_counter()
        for x in base:
            checksum(x)
        if i:
            times.setdefault("fingerprint", []).append(time.perf_counter() - start)
    path = root / "adapter-flags"
    save(path, node, only=nnx.LoRAParam)
    flags = ff.checkpoint.read_flags(path)
    shutil.rmtree(path)
    if flags is None:
        raise AssertionError("the adapter checkpoint has no flags")
    stored = sum(
        int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in flags.arrays.values()
    )
    if stored != selected:
        raise AssertionError(f"the adapter stores {stored} bytes of arrays, not {selected}")
    fingerprinted = sum(checked is not None for _, _, checked in flags.base.values())
    if fingerprinted != len(base):
        raise AssertionError(f"{fingerprinted} checksums in the fingerprint, not {len(base)}")
    incompressible(node)
    path = root / "adapter-incompressible"
    save(path, node, only=nnx.LoRAParam)
    overhead = disk_bytes(path) - selected
    shutil.rmtree(path)

    def paired(key: str, other: str) -> float:
        return statistics.median(a / b for a, b in zip(times[key], times[other], strict=True))

    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "base_params": sum(x.size for x in base),
        "adapter_params": sum(x.size for x in jax.tree.leaves(lora)),
        "arrays_stored": len(flags.arrays),
        "base_bytes": base_bytes,
        "selected_bytes": selected,
        "disk_bytes": on_disk,
        "disk_minus_selected_bytes": on_disk["adapter"] - selected,
        "overhead_bytes": overhead,
        "median_seconds": median,
        "min_seconds": {k: min(v) for k, v in times.items()},
        "fingerprint_gb_per_s": base_bytes / median["fingerprint"] / 1e9,
        "ratios": {
            "adapter save / full": paired("adapter save", "full save"),
            "adapter restore / full": paired("adapter restore", "full restore"),
            "shapes save / full": paired("shapes save", "full save"),
            "shapes restore / full": paired("shapes restore", "full restore"),
            "adapter restore / shapes": paired("adapter restore", "shapes restore"),
            "fingerprint / adapter save": paired("fingerprint", "adapter save"),
        },
        "times": times,
    }


def print_adapter(models: dict[str, Any], rank: int, repeats: int) -> None:
    """Prints the adapter section's two markdown tables."""
    print(f"\nAdapter checkpoints (nnx.LoRA of rank {rank} beside each layer, AdamW)\n")
    print(
        "| model | base params / adapter's | arrays | selected B | full on disk MiB "
        "| adapter on disk B | shapes on disk B | disk - selected B | overhead B |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for name, r in models.items():
        d = r["disk_bytes"]
        print(
            f"| {name} | {r['base_params'] / r['adapter_params']:.0f} | {r['arrays_stored']} "
            f"| {r['selected_bytes']:,} | {d['full'] / 2**20:.1f} | {d['adapter']:,} "
            f"| {d['shapes']:,} | {r['disk_minus_selected_bytes']:,} | {r['overhead_bytes']:,} |"
        )
    print(
        "\n| model | save full s | adapter s | ratio | shapes s | ratio | restore full s "
        "| adapter s | ratio | shapes s | ratio | base check | fingerprint ms | GB/s |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for name, r in models.items():
        t, q = r["median_seconds"], r["ratios"]
        print(
            f"| {name} | {t['full save']:.3f} | {t['adapter save']:.3f} "
            f"| {q['adapter save / full']:.2f}x | {t['shapes save']:.3f} "
            f"| {q['shapes save / full']:.2f}x | {t['full restore']:.3f} "
            f"| {t['adapter restore']:.3f} | {q['adapter restore / full']:.2f}x "
            f"| {t['shapes restore']:.3f} | {q['shapes restore / full']:.2f}x "
            f"| {q['adapter restore / shapes']:.2f}x | {1e3 * t['fingerprint']:.1f} "
            f"| {r['fingerprint_gb_per_s']:.2f} |"
        )
    print(
        f"\nbase params / adapter's: parameter counts; arrays: arrays the adapter stores; "
        "selected: bytes of the LoRA parameters and their optimizer state (what the adapter "
        "stores); disk - selected: the adapter's bytes on disk minus those (net of orbax's zstd "
        "compression); overhead: the same with the selected arrays holding random bytes, which "
        f"do not compress. Seconds: medians of {repeats} rounds; full: the whole (model, opt); "
        "adapter: only=nnx.LoRAParam, restored onto a concrete base with its CRC-32s checked; "
        "shapes: fingerprint='shapes' (nothing to check); ratio: / full, the median over rounds "
        "of the ratio within each round; base check: adapter restore / shapes restore; "
        "fingerprint: CRC-32 of the base's arrays (part of the adapter's save and restore)."
    )


def print_flags(models: dict[str, Any], repeats: int) -> None:
    """Prints the table of ff.checkpoint against plain orbax."""
    header = (
        f"{'state':<11} {'MiB':>6}  {'save':>6} {'ff':>6} {'ratio':>6}  {'restore':>7} "
        f"{'ff':>6} {'ratio':>6}  {'fresh':>6} {'ratio':>6}  {'total ratio':>11}  "
        f"{'verify':>6}  {'checksums':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, r in models.items():
        t, q = r["median_seconds"], r["ratios"]
        print(
            f"{name:<11} {r['state_mib']:>6.1f}  {t['plain save']:>6.3f} {t['ff save']:>6.3f} "
            f"{q['save']:>5.2f}x  {t['plain restore']:>7.3f} {t['ff restore']:>6.3f} "
            f"{q['restore']:>5.2f}x  {t['ff fresh restore']:>6.3f} {q['fresh restore']:>5.2f}x  "
            f"{q['save + restore']:>10.2f}x  {q['verify']:>5.2f}x  {t['checksums']:>9.4f}"
        )
    print(
        f"\nseconds: medians of {repeats} rounds; save/restore: plain orbax, ff: ff.checkpoint; "
        "ratio: ff / plain, the median over rounds of the ratio within each round; fresh: "
        "ff.checkpoint.restore into an all-trainable target (re-typed, optimizer rebuilt; "
        "plain orbax cannot restore into it); total: save + restore; verify: ff restore / "
        "ff restore with verify=False; checksums: seconds to checksum every array (part of "
        "ff save)."
    )


def main(
    repeats: int = 15,
    out: str | None = None,
    where: str | None = None,
    sizes: dict[str, tuple[int, int]] | None = None,
    sections: tuple[str, ...] = SECTIONS,
    rank: int = ADAPTER_RANK,
) -> dict[str, Any]:
    """Measures every size; prints the tables; writes ``checkpoint_cost.json`` to ``out``.

    Args:
        repeats: timed rounds per size (after one warm-up round).
        out: folder for ``checkpoint_cost.json``; nothing is written when None.
        where: folder for the checkpoints; defaults to ``/dev/shm`` where it exists.
        sizes: name -> (width, depth) of the MLPs; defaults to ``SIZES``.
        sections: which to run: ``"flags"`` (ff.checkpoint against plain orbax)
            and ``"adapter"`` (adapter checkpoints against full ones).
        rank: the rank of the adapter section's LoRA.

    Returns:
        The results, as written to the JSON file.
    """
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}: choose among {SECTIONS}")
    if where is None and Path("/dev/shm").is_dir():
        where = "/dev/shm"
    results: dict[str, Any] = {
        "device": str(jax.devices()[0]),
        "repeats": repeats,
        "directory": where or tempfile.gettempdir(),
        "models": {},
    }
    if "adapter" in sections:
        results["adapter"] = {"rank": rank, "models": {}}
    with tempfile.TemporaryDirectory(dir=where) as directory:
        for name, (width, depth) in (sizes or SIZES).items():
            if "flags" in sections:
                results["models"][name] = measure(width, depth, repeats, Path(directory))
            if "adapter" in sections:
                results["adapter"]["models"][name] = measure_adapter(
                    width, depth, rank, repeats, Path(directory)
                )
    if "flags" in sections:
        print_flags(results["models"], repeats)
    if "adapter" in sections:
        print_adapter(results["adapter"]["models"], rank, repeats)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "checkpoint_cost.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwritten to {Path(out) / 'checkpoint_cost.json'}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per variant")
    parser.add_argument("--dir", default=None, help="where to write the checkpoints")
    parser.add_argument(
        "--out", default="benchmarks/results", help="folder for checkpoint_cost.json"
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="flags: ff.checkpoint against plain orbax; adapter: adapter against full checkpoints",
    )
    parser.add_argument(
        "--rank", type=int, default=ADAPTER_RANK, help="LoRA rank in the adapter section"
    )
    args = parser.parse_args()
    main(args.repeats, args.out, args.dir, sections=tuple(args.sections), rank=args.rank)
