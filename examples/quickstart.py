"""Quickstart: pretrain, freeze the backbone, fine-tune the head, unfreeze block by block.

On scikit-learn's digits (shipped with the package, no download):

1. pretrain an MLP (three blocks and a head) on digits 0-4;
2. give it a new head for digits 5-9 and train the head alone, backbone frozen;
3. unfreeze the backbone gradually, top block first, on an
   ``ff.UnfreezeSchedule``; each unfrozen block starts with step counts of its
   own and a warm-up, as with a fresh optimizer, so the loss does not jump;
4. save a checkpoint with the frozen flags and the schedule halfway, restore
   it into a fresh model, and carry on from the restored one.

One ``ff.TrainStep`` trains every phase of the fine-tuning: it follows each
unfreeze by itself. Each phase shows a progress bar, the summary table and the
test accuracy. The loss curve, with the unfreeze points marked, is written as a
PNG, and the largest loss in the 20 steps after each unfreeze is printed as a
multiple of the mean loss of the 10 steps before.

    python examples/quickstart.py [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from tqdm import tqdm

import flax_freeze as ff

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class Block(nnx.Module):
    def __init__(self, din: int, dout: int, rngs: nnx.Rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.norm = nnx.LayerNorm(dout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.gelu(self.norm(self.linear(x)))


class Backbone(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, width: int = 128, depth: int = 3):
        dims = [64] + [width] * depth
        self.blocks = nnx.List([Block(a, b, rngs) for a, b in zip(dims, dims[1:], strict=False)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x


class Classifier(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, backbone: Backbone | None = None):
        self.backbone = backbone if backbone is not None else Backbone(rngs)
        self.head = nnx.Linear(128, 5, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.backbone(x))


def loss_fn(model: Classifier, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def accuracy(model: Classifier, x: jax.Array, y: jax.Array) -> jax.Array:
    return (model(x).argmax(-1) == y).mean()


def digits(classes: range, seed: int = 0) -> tuple[jax.Array, ...]:
    """Train and test splits of the digits in ``classes``, labels from 0."""
    data = load_digits()
    keep = np.isin(data.target, list(classes))
    x = (data.data[keep] / 16.0).astype(np.float32)
    y = (data.target[keep] - classes.start).astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    split = int(0.8 * len(y))
    train_split = jnp.asarray(x[:split]), jnp.asarray(y[:split])
    return (*train_split, jnp.asarray(x[split:]), jnp.asarray(y[split:]))


def train(
    name: str,
    step: ff.TrainStep,
    data: tuple,
    steps: int,
    losses: list[float],
    schedule: ff.UnfreezeSchedule | None = None,
) -> float:
    """Trains ``steps`` steps with a progress bar; returns the test accuracy."""
    x, y, xt, yt = data
    rng = np.random.default_rng(len(losses))
    bar = tqdm(range(steps), desc=f"{name:<24}", ncols=90, mininterval=0.5)
    for _ in bar:
        # The schedule unfreezes what is due at this step; the step follows the
        # change by itself (gradients of the trainable state only, optimizer
        # state migrated, own step counts for the newly trainable parameters).
        if schedule is not None and schedule(step.model, len(losses)):
            bar.write(str(ff.summary(step.model)))
        idx = rng.integers(0, len(y), 64)
        losses.append(float(step(x[idx], y[idx])))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    acc = float(accuracy(step.model, xt, yt))
    print(f"{name}: test accuracy {acc:.3f}")
    return acc


def jump(losses: list[float], at: int, after: int = 20, before: int = 10) -> float:
    """The largest loss of the ``after`` steps from ``at`` over the mean of the ``before``."""
    return max(losses[at : at + after]) / float(np.mean(losses[at - before : at]))


def plot(losses: list[float], marks: list[tuple[int, str]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(losses, lw=0.8, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    for step, label in marks:
        ax.axvline(step, color="tab:red", ls="--", lw=0.8)
        ax.text(step, ax.get_ylim()[1], f" {label}", rotation=90, va="top", fontsize=8)
    ax.set_title("fine-tuning on digits 5-9: head first, then block by block")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(steps: int = 150, out: str | Path = "out/quickstart") -> dict[str, float]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, float] = {}

    # 1. Pretrain on digits 0-4.
    pretrained = Classifier(nnx.Rngs(0))
    pretrain_losses: list[float] = []
    results["pretrain"] = train(
        "pretrain (digits 0-4)",
        ff.TrainStep(pretrained, ff.Optimizer(pretrained, optax.adam(1e-3)), loss_fn),
        digits(range(0, 5)),
        steps,
        pretrain_losses,
    )

    # 2. New head for digits 5-9, backbone frozen. Blocks unfrozen later get
    # step counts of their own and a warm-up of 50 steps: they start as with a
    # fresh optimizer, while the head goes on with its own Adam state.
    data = digits(range(5, 10))
    model = Classifier(nnx.Rngs(1), backbone=ff.freeze(pretrained.backbone))
    tx = optax.adamw(1e-3, weight_decay=1e-2)
    opt = ff.Optimizer(model, tx, warmup_steps=50)
    step = ff.TrainStep(model, opt, loss_fn)  # one compiled step for every phase
    plan = {(3 - block) * steps: f"backbone/blocks/{block}/.*" for block in (2, 1, 0)}
    schedule = ff.UnfreezeSchedule(plan)
    losses: list[float] = []
    print(ff.summary(model))
    frozen_kernel = np.asarray(model.backbone.blocks[0].linear.kernel[...])
    results["head"] = train("head only", step, data, steps, losses, schedule)
    if not np.array_equal(frozen_kernel, np.asarray(model.backbone.blocks[0].linear.kernel[...])):
        raise RuntimeError("the frozen backbone moved during fine-tuning")

    # 3. Unfreeze block by block, top first, as the schedule says; checkpoint
    # halfway (model, optimizer and schedule) and go on from the restored run.
    checkpoint = out / "checkpoint"
    for block in (2, 1, 0):
        name = f"head + blocks {block}-2"
        results[f"block_{block}"] = train(name, step, data, steps, losses, schedule)
        if block == 1:
            if checkpoint.exists():
                shutil.rmtree(checkpoint)
            ff.checkpoint.save(checkpoint, (model, opt, schedule))
            fresh = Classifier(nnx.Rngs(2))  # all trainable: the checkpoint brings the flags
            fresh_opt = ff.Optimizer(fresh, tx, warmup_steps=50)
            model, opt, schedule = ff.checkpoint.restore(
                checkpoint, (fresh, fresh_opt, ff.UnfreezeSchedule(plan))
            )
            step = ff.TrainStep(model, opt, loss_fn)  # a step for the restored model
            frozen_now = {r.path for r in ff.summary(model).rows if r.status == "frozen"}
            print(f"restored {checkpoint}: {len(frozen_now)} frozen arrays, as saved")
            results["restored"] = float(accuracy(model, *data[2:]))

    marks = [(at, f"unfreeze block {plan[at].split('/')[2]}") for at in sorted(plan)]
    print("\nlargest loss in the 20 steps after each unfreeze, over the mean of the 10 before:")
    for at, label in marks:
        results[f"jump_{label.split()[-1]}"] = jump(losses, at)
        print(f"  {label} (step {at}): {jump(losses, at):.2f}x")
    plot(losses, marks, out / "loss.png")
    print(f"\nwrote {out / 'loss.png'} and the checkpoint {checkpoint}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per phase")
    parser.add_argument(
        "--out", default="out/quickstart", help="where to write the plot and the checkpoint"
    )
    args = parser.parse_args()
    main(args.steps, args.out)
