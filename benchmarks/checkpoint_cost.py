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

Checkpoints go to ``--dir`` (default: ``/dev/shm`` where it exists), a RAM
disk, so that disk write-back noise does not drown the difference.

    python benchmarks/checkpoint_cost.py [--repeats N] [--dir DIR] [--out FOLDER]
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
import optax
import orbax.checkpoint as ocp
from flax import nnx

import flax_freeze as ff
from flax_freeze.checkpoint._checksum import checksum

SIZES = {"MLP 4x256": (256, 4), "MLP 8x1024": (1024, 8), "MLP 8x2048": (2048, 8)}


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


def main(
    repeats: int = 15,
    out: str | None = None,
    where: str | None = None,
    sizes: dict[str, tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Measures every size; prints the table; writes ``checkpoint_cost.json`` to ``out``.

    Args:
        repeats: timed rounds per size (after one warm-up round).
        out: folder for ``checkpoint_cost.json``; nothing is written when None.
        where: folder for the checkpoints; defaults to ``/dev/shm`` where it exists.
        sizes: name -> (width, depth) of the MLPs; defaults to ``SIZES``.

    Returns:
        The results, as written to the JSON file.
    """
    if where is None and Path("/dev/shm").is_dir():
        where = "/dev/shm"
    results: dict[str, Any] = {
        "device": str(jax.devices()[0]),
        "repeats": repeats,
        "directory": where or tempfile.gettempdir(),
        "models": {},
    }
    with tempfile.TemporaryDirectory(dir=where) as directory:
        for name, (width, depth) in (sizes or SIZES).items():
            results["models"][name] = measure(width, depth, repeats, Path(directory))
    header = (
        f"{'state':<11} {'MiB':>6}  {'save':>6} {'ff':>6} {'ratio':>6}  {'restore':>7} "
        f"{'ff':>6} {'ratio':>6}  {'fresh':>6} {'ratio':>6}  {'total ratio':>11}  "
        f"{'verify':>6}  {'checksums':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results["models"].items():
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
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "checkpoint_cost.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwritten to {Path(out) / 'checkpoint_cost.json'}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per variant")
    parser.add_argument("--dir", default=None, help="where to write the checkpoints")
    parser.add_argument(
        "--out", default="benchmarks/results", help="folder for checkpoint_cost.json"
    )
    args = parser.parse_args()
    main(args.repeats, args.out, args.dir)
