"""Adapter checkpoints: save a LoRA adapter alone and restore it onto its base.

On scikit-learn's digits (shipped with the package, no download):

1. pretrain an MLP on upright digits and save its full checkpoint, the base;
2. wrap each of its layers in an ``nnx.LoRA`` (its ``lora_b`` starts at zero,
   so the adapted model starts equal to the base), freeze everything but the
   ``nnx.LoRAParam`` adapters and fine-tune them on digits turned a quarter
   turn, which the base cannot read;
3. save the adapter alone: ``ff.checkpoint.save(dir, (model, opt),
   only=nnx.LoRAParam)`` stores the adapters, their optimizer state, the
   frozen flags of every path and a fingerprint of the base (shapes, dtypes
   and a checksum of each array);
4. rebuild the base from its own checkpoint, wrap it in fresh adapters and
   restore the adapter checkpoint onto it: the predictions are bit-identical
   to the fine-tuned model's, the base weights to the pretrained ones, and
   one more training step from either gives the same weights;
5. restoring the adapter onto a base pretrained with another seed is refused.

It prints both checkpoints' sizes on disk: the adapter is a small fraction of
the base. ``python -m flax_freeze inspect OUT/adapter`` shows what it holds and
what it expects from a base.

    python examples/lora_adapter.py [--steps N] [--rank R] [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import flax_freeze as ff

WIDTH = 512
LAYERS = ("hidden1", "hidden2", "head")


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, width: int = WIDTH):
        self.hidden1 = nnx.Linear(64, width, rngs=rngs)
        self.hidden2 = nnx.Linear(width, width, rngs=rngs)
        self.head = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.hidden1(x))
        x = nnx.relu(self.hidden2(x))
        return self.head(x)


def add_lora(model: MLP, rank: int, rngs: nnx.Rngs) -> MLP:
    """Wraps each layer of ``model`` in an ``nnx.LoRA`` of rank ``rank``, in place.

    The base layer becomes the LoRA's ``base_module`` (``hidden1/base_module/kernel``)
    and the adapters are ``nnx.LoRAParam`` (``hidden1/lora_a``, ``hidden1/lora_b``).
    """
    for name in LAYERS:
        linear = getattr(model, name)
        lora = nnx.LoRA(
            linear.in_features, rank, linear.out_features, base_module=linear, rngs=rngs
        )
        setattr(model, name, lora)
    return model


def base_weights(model: MLP) -> dict[str, np.ndarray]:
    """The base layers' weights by layer, with or without adapters around them."""
    weights = {}
    for name in LAYERS:
        layer = getattr(model, name)
        linear = getattr(layer, "base_module", layer)
        for kind in ("kernel", "bias"):
            weights[f"{name}/{kind}"] = np.asarray(getattr(linear, kind)[...])
    return weights


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def digits(turned: bool, seed: int = 0) -> tuple[jax.Array, ...]:
    """Train and test splits of the digits, upright or turned a quarter turn."""
    pixels, labels = load_digits(return_X_y=True)
    images = (pixels / 16.0).astype(np.float32).reshape(-1, 8, 8)
    if turned:
        images = np.rot90(images, k=1, axes=(1, 2))
    x = images.reshape(len(images), 64)
    y = labels.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    split = int(0.8 * len(y))
    return (
        jnp.asarray(x[:split]),
        jnp.asarray(y[:split]),
        jnp.asarray(x[split:]),
        jnp.asarray(y[split:]),
    )


def loss_fn(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def logits(model: MLP, x: jax.Array) -> jax.Array:
    return model(x)


def accuracy(model: MLP, x: jax.Array, y: jax.Array) -> float:
    return float((logits(model, x).argmax(-1) == y).mean())


def train(step: ff.TrainStep, data: tuple, steps: int, seed: int) -> float:
    """Trains ``steps`` steps on batches of 64; prints a few losses; returns the test accuracy."""
    x, y, xt, yt = data
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        idx = rng.integers(0, len(y), 64)
        losses.append(float(step(x[idx], y[idx])))
    shown = [losses[i] for i in sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps - 1})]
    print("  loss " + " -> ".join(f"{loss:.3f}" for loss in shown))
    return accuracy(step.model, xt, yt)


def pretrain(seed: int, data: tuple, steps: int) -> MLP:
    model = MLP(nnx.Rngs(seed))
    train(ff.TrainStep(model, ff.Optimizer(model, optax.adam(1e-3)), loss_fn), data, steps, seed)
    return model


def lora_optimizer(model: MLP) -> ff.Optimizer:
    return ff.Optimizer(model, optax.adam(1e-2))


def disk_bytes(directory: Path) -> int:
    """The size of a checkpoint on disk: the sum of its files' sizes."""
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def main(steps: int = 300, rank: int = 2, out: str | Path = "out/lora_adapter") -> dict[str, Any]:
    out = Path(out)
    results: dict[str, Any] = {}
    upright, turned = digits(turned=False), digits(turned=True)

    # 1. Pretrain on upright digits and save the base's full checkpoint.
    print("pretrain, every weight, on upright digits:")
    model = pretrain(0, upright, steps)
    results["pretrain"] = accuracy(model, *upright[2:])
    results["before"] = accuracy(model, *turned[2:])
    print(
        f"  test accuracy {results['pretrain']:.3f} upright, "
        f"{results['before']:.3f} turned a quarter turn"
    )
    pretrained, base_logits = base_weights(model), logits(model, turned[2])
    ff.checkpoint.save(out / "base", model, force=True)

    # 2. LoRA adapters on every layer; only they train. lora_b starts at zero: the
    # adapted model computes what the base computes.
    add_lora(model, rank, nnx.Rngs(1))
    ff.freeze(model, nnx.Not(nnx.LoRAParam))
    results["starts_equal"] = bool(np.array_equal(logits(model, turned[2]), base_logits))
    opt = lora_optimizer(model)
    step = ff.TrainStep(model, opt, loss_fn)  # gradients of the trainable adapters only
    print(f"LoRA, rank {rank}, base frozen, on turned digits:")
    results["finetuned"] = train(step, turned, steps, seed=1)
    print(
        f"  test accuracy on turned digits: {results['before']:.3f} -> {results['finetuned']:.3f}"
    )
    print(
        f"  {ff.summary(model).totals.line()}; before training it computed what the base did: "
        f"{results['starts_equal']}"
    )
    if not (results["starts_equal"] and same(pretrained, base_weights(model))):
        raise RuntimeError("a base weight moved during adapter training")

    # 3. Save the adapter alone, with its optimizer state and the base's fingerprint.
    ff.checkpoint.save(out / "adapter", (model, opt), only=nnx.LoRAParam, force=True)
    print(str(ff.checkpoint.describe(out / "adapter")).splitlines()[0])

    # 4. Rebuild the base from its own checkpoint, add fresh adapters (the flags come
    # from the adapter checkpoint), and restore the adapter onto it.
    abstract = nnx.eval_shape(lambda: MLP(nnx.Rngs(2)))
    base = ff.checkpoint.restore(out / "base", abstract)
    rebuilt = add_lora(base, rank, nnx.Rngs(3))
    rebuilt, rebuilt_opt = ff.checkpoint.restore(
        out / "adapter", (rebuilt, lora_optimizer(rebuilt))
    )
    results["restored"] = accuracy(rebuilt, *turned[2:])
    results["identical"] = bool(
        np.array_equal(logits(model, turned[2]), logits(rebuilt, turned[2]))
    )
    results["base_identical"] = same(pretrained, base_weights(rebuilt))
    print(
        f"restored base + adapter: test accuracy {results['restored']:.3f}; predictions "
        f"bit-identical: {results['identical']}; base bit-identical: {results['base_identical']}"
    )
    if not (results["identical"] and results["base_identical"]):
        raise RuntimeError("the restored model differs from the fine-tuned one")

    # The optimizer state came along: one more step from each gives the same adapters.
    x, y = turned[0][:64], turned[1][:64]
    step(x, y)
    ff.TrainStep(rebuilt, rebuilt_opt, loss_fn)(x, y)
    adapters = [np.asarray(a) for a in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))]
    resumed = [np.asarray(a) for a in jax.tree.leaves(nnx.state(rebuilt, nnx.LoRAParam))]
    results["resumed_identical"] = len(adapters) == len(resumed) and all(
        np.array_equal(a, b) for a, b in zip(adapters, resumed, strict=True)
    )
    print(f"one more training step from each: adapters identical: {results['resumed_identical']}")
    if not results["resumed_identical"]:
        raise RuntimeError("training resumed from the restored adapter differs")

    # 5. The same adapter onto another base (pretrained with another seed) is refused.
    print("another base, pretrained with seed 1:")
    other = add_lora(pretrain(1, upright, steps), rank, nnx.Rngs(3))
    try:
        ff.checkpoint.restore(out / "adapter", (other, lora_optimizer(other)))
    except ValueError as err:
        results["refused"] = True
        print(f"  refused: {str(err).splitlines()[0]}")
    else:
        raise RuntimeError("the adapter was restored onto another base")

    base_bytes, adapter_bytes = disk_bytes(out / "base"), disk_bytes(out / "adapter")
    results["base_bytes"], results["adapter_bytes"] = base_bytes, adapter_bytes
    print(
        f"checkpoint sizes on disk: base {kib(base_bytes)}, adapter {kib(adapter_bytes)} "
        f"({base_bytes / adapter_bytes:.1f}x smaller)"
    )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=str(__doc__).splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per phase")
    parser.add_argument("--rank", type=int, default=2, help="rank of the LoRA adapters")
    parser.add_argument(
        "--out", default="out/lora_adapter", help="where to write the two checkpoints"
    )
    args = parser.parse_args()
    main(args.steps, args.rank, args.out)
