"""Quickstart: pretrain, freeze the backbone, fine-tune the head, unfreeze part of it.

Runs on scikit-learn's digits (shipped with the package, no download):
pretrain an MLP on digits 0-4, give it a new head for digits 5-9, train the
head with the backbone frozen, then unfreeze the last block and train on.

    python examples/quickstart.py [--steps N]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import flax_freeze as ff


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
def train_step(model: Classifier, opt: ff.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    loss, grads = ff.value_and_grad(loss_fn)(model, x, y)  # grads of trainable state only
    opt.update(model, grads)
    return loss


@nnx.jit
def accuracy(model: Classifier, x: jax.Array, y: jax.Array) -> jax.Array:
    return (model(x).argmax(-1) == y).mean()


def digits(classes: range, seed: int = 0) -> tuple[jax.Array, ...]:
    data = load_digits()
    keep = np.isin(data.target, list(classes))
    x = (data.data[keep] / 16.0).astype(np.float32)
    y = (data.target[keep] - classes.start).astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    split = int(0.8 * len(y))
    return (
        jnp.asarray(x[:split]),
        jnp.asarray(y[:split]),
        jnp.asarray(x[split:]),
        jnp.asarray(y[split:]),
    )


def train(model, opt, x, y, steps: int, batch: int = 64, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    loss = float("nan")
    for _ in range(steps):
        idx = rng.integers(0, len(y), batch)
        loss = float(train_step(model, opt, x[idx], y[idx]))
    return loss


def main(steps: int = 200) -> dict[str, float]:
    results = {}
    # 1. Pretrain on digits 0-4.
    x, y, xt, yt = digits(range(0, 5))
    pretrained = Classifier(nnx.Rngs(0))
    train(pretrained, ff.Optimizer(pretrained, optax.adam(1e-3)), x, y, steps)
    results["pretrain"] = float(accuracy(pretrained, xt, yt))
    print(f"pretrained on digits 0-4: test accuracy {results['pretrain']:.3f}")

    # 2. New head for digits 5-9, backbone frozen.
    x, y, xt, yt = digits(range(5, 10))
    model = Classifier(nnx.Rngs(1), backbone=ff.freeze(pretrained.backbone))
    opt = ff.Optimizer(model, optax.adamw(1e-3, weight_decay=1e-2))
    print("\nsummary with the backbone frozen:")
    print(ff.summary(model))
    frozen_kernel = np.asarray(model.backbone.blocks[0].linear.kernel[...])
    loss = train(model, opt, x, y, steps)
    results["head"] = float(accuracy(model, xt, yt))
    print(f"\nhead only: loss {loss:.3f}, test accuracy {results['head']:.3f}")
    if not np.array_equal(frozen_kernel, np.asarray(model.backbone.blocks[0].linear.kernel[...])):
        raise RuntimeError("the frozen backbone moved during fine-tuning")

    # 3. Unfreeze the last block: the optimizer follows, keeping the head's Adam state.
    ff.unfreeze(model, ff.PathRegex("backbone/blocks/2/.*"))
    print("\nsummary with the last block unfrozen:")
    print(ff.summary(model))
    loss = train(model, opt, x, y, steps, seed=1)
    results["last_block"] = float(accuracy(model, xt, yt))
    print(f"\nhead + last block: loss {loss:.3f}, test accuracy {results['last_block']:.3f}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per phase")
    main(parser.parse_args().steps)
