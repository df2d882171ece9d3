"""The loss at each unfreeze of the quickstart's fine-tuning, with and without own step counts.

Runs the fine-tuning of ``examples/quickstart.py`` (a new head on digits 5-9,
then the pretrained backbone unfrozen block by block, top first, on an
``ff.UnfreezeSchedule``) under three optimizers, each ``optax.adamw(1e-3,
weight_decay=1e-2)`` in an ``ff.Optimizer``:

- **shared count**: the optimizer is built before the backbone is frozen, so
  every block it unfreezes later is one it held at the start and uses the
  optimizer's one step count (what every parameter did before own counts):
  fresh moments, but the bias correction of a late step;
- **own counts**: built with the backbone frozen, so each unfrozen block
  gets step counts of its own, from zero, as with a fresh optimizer;
- **own counts + warm-up**: the same with ``warmup_steps=50``.

For each unfreeze it prints the largest loss of the 20 steps after it as a
multiple of the mean loss of the 10 steps before, as a range over the seeds
(the seed picks the new head and the batches); and, for scale, the same ratio
halfway through each phase, where nothing changes. It draws the loss
curves of the first seed (``docs/assets/unfreeze-dynamics.svg`` by default;
the fine-tuning guide shows it).

    python benchmarks/unfreeze_dynamics.py [--steps 150] [--seeds 0 1 2] [--svg PATH]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import optax
from flax import nnx

import flax_freeze as ff

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import quickstart  # noqa: E402  # pyright: ignore[reportMissingImports]

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SVG = ROOT / "docs" / "assets" / "unfreeze-dynamics.svg"
SHARED = "shared count"
OWN = "own counts"
WARMUP = "own counts + warm-up 50"
CONFIGS = (SHARED, OWN, WARMUP)
STYLES = {SHARED: "tab:red", OWN: "tab:blue", WARMUP: "tab:green"}


def pretrain(steps: int) -> quickstart.Classifier:
    """The quickstart's pretrained model (digits 0-4), trained as the quickstart does."""
    model = quickstart.Classifier(nnx.Rngs(0))
    step = ff.TrainStep(model, ff.Optimizer(model, optax.adam(1e-3)), quickstart.loss_fn)
    x, y, _, _ = quickstart.digits(range(0, 5))
    rng = np.random.default_rng(0)
    for _ in range(steps):
        idx = rng.integers(0, len(y), 64)
        step(x[idx], y[idx])
    return model


def fine_tune(
    pretrained: quickstart.Classifier, config: str, seed: int, steps: int
) -> tuple[list[float], list[int]]:
    """The losses of one fine-tuning run, and the steps at which blocks were unfrozen."""
    backbone = nnx.clone(pretrained.backbone)
    model = quickstart.Classifier(nnx.Rngs(1 + seed), backbone=backbone)
    tx = optax.adamw(1e-3, weight_decay=1e-2)
    if config == SHARED:
        opt = ff.Optimizer(model, tx)  # holds the backbone: unfrozen later, it shares the count
        ff.freeze(model.backbone)
    else:
        ff.freeze(model.backbone)
        opt = ff.Optimizer(model, tx, warmup_steps=50 if config == WARMUP else 0)
    plan = {(3 - block) * steps: f"backbone/blocks/{block}/.*" for block in (2, 1, 0)}
    schedule = ff.UnfreezeSchedule(plan)
    step = ff.TrainStep(model, opt, quickstart.loss_fn)
    x, y, _, _ = quickstart.digits(range(5, 10))
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    for i in range(4 * steps):
        schedule(model, i)
        idx = rng.integers(0, len(y), 64)
        losses.append(float(step(x[idx], y[idx])))
    return losses, sorted(plan)


def draw(curves: dict[str, list[float]], marks: Sequence[int], path: Path) -> None:
    """The loss curves of one seed, a panel per optimizer, unfreeze points marked."""
    fig, axes = plt.subplots(
        len(curves), 1, figsize=(8, 2.2 * len(curves)), sharex=True, sharey=True
    )
    for ax, (config, losses) in zip(axes, curves.items(), strict=True):
        ax.plot(losses, lw=0.7, color=STYLES[config])
        ax.set_yscale("log")
        ax.set_ylabel("training loss")
        ax.set_title(config, fontsize=10, loc="left")
        for at in marks:
            ax.axvline(at, color="0.4", ls="--", lw=0.8)
    for at, block in zip(marks, (2, 1, 0), strict=True):
        axes[0].text(at, 1.02, f"unfreeze block {block}", transform=axes[0].get_xaxis_transform(),
                     ha="center", fontsize=8)  # fmt: skip
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context({"svg.hashsalt": "flax_freeze", "svg.fonttype": "none"}):
        fig.savefig(path, metadata={"Date": None})
    plt.close(fig)


def main(
    steps: int = 150, seeds: Sequence[int] = (0, 1, 2), svg: Path | None = SVG
) -> dict[str, list[list[float]]]:
    """Runs every optimizer on every seed; returns, per optimizer, each seed's three jumps.

    Raises:
        ValueError: if ``steps`` is under 20: the ratio halfway through the
            first phase needs 10 steps before it.
    """
    if steps < 20:
        raise ValueError(f"`steps` must be at least 20 per phase, got {steps}.")
    pretrained = pretrain(steps)
    jumps: dict[str, list[list[float]]] = {config: [] for config in CONFIGS}
    calm: list[float] = []  # halfway through each phase: the noise of the minibatch loss
    first: dict[str, list[float]] = {}
    marks: list[int] = []
    for seed in seeds:
        for config in CONFIGS:
            losses, marks = fine_tune(pretrained, config, seed, steps)
            jumps[config].append([quickstart.jump(losses, at) for at in marks])
            calm += [quickstart.jump(losses, at + steps // 2) for at in [0, *marks]]
            first.setdefault(config, losses)
    print(
        "Largest loss in the 20 steps after each unfreeze, over the mean of the 10 before "
        f"({steps} steps per phase; seeds {list(seeds)}):\n"
    )
    print("| optimizer | block 2 | block 1 | block 0 |")
    print("|---|--:|--:|--:|")
    for config in CONFIGS:
        cells = []
        for block in range(3):
            values = [run[block] for run in jumps[config]]
            low, high = min(values), max(values)
            cells.append(
                f"{low:.1f}x" if f"{low:.1f}" == f"{high:.1f}" else f"{low:.1f}-{high:.1f}x"
            )
        print(f"| {config} | {' | '.join(cells)} |")
    print(
        f"\nHalfway through a phase, nothing changing: {min(calm):.1f}-{max(calm):.1f}x "
        f"(median {float(np.median(calm)):.1f}x)."
    )
    if svg is not None:
        draw(first, marks, svg)
        print(f"\nwrote {svg}")
    return jumps


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per phase")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--svg", type=Path, default=SVG, help="where to draw the first seed")
    args = parser.parse_args()
    main(args.steps, args.seeds, args.svg)
