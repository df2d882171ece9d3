"""LoRA and QLoRA with qwix, trained with flax_freeze: only the adapters move.

On scikit-learn's digits (shipped with the package, no download):

1. pretrain an MLP on digits 0-4 (its head has ten outputs, five never used);
2. add qwix LoRA adapters to every layer (``qwix.apply_lora_to_model``) and
   train only them on all ten digits, the way tunix does: the base weights stay
   ``nnx.Param`` (qwix looks them up as such), ``ff.Optimizer`` and
   ``ff.value_and_grad`` take ``wrt=nnx.LoRAParam``;
3. the same with a 4-bit (nf4) base, QLoRA: a quantized base may be frozen, so
   ``ff.freeze(model, nnx.Not(nnx.LoRAParam))`` marks it and the default
   ``wrt`` trains the adapters alone.

After each phase the base weights are checked to be bit-identical to the
pretrained (or quantized) ones. Each phase prints a few losses and the test
accuracy; the LoRA phases also print the summary table.

    python examples/lora_qwix.py [--steps N]
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix
from flax import nnx
from sklearn.datasets import load_digits

import flax_freeze as ff


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, width: int = 64):
        self.hidden1 = nnx.Linear(64, width, rngs=rngs)
        self.hidden2 = nnx.Linear(width, width, rngs=rngs)
        self.head = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.hidden1(x))
        x = nnx.relu(self.hidden2(x))
        return self.head(x)


def digits(classes: range, seed: int = 0) -> tuple[jax.Array, ...]:
    """Train and test splits of the digits in ``classes`` (labels kept as the digit)."""
    data = load_digits()
    keep = np.isin(data.target, list(classes))
    x = (data.data[keep] / 16.0).astype(np.float32)
    y = data.target[keep].astype(np.int32)
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


@nnx.jit(static_argnames="wrt")
def train_step(model: MLP, opt: ff.Optimizer, x: jax.Array, y: jax.Array, wrt: Any) -> jax.Array:
    loss, grads = ff.value_and_grad(loss_fn, wrt=wrt)(model, x, y)
    opt.update(model, grads)
    return loss


@nnx.jit
def accuracy(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return (model(x).argmax(-1) == y).mean()


def train(model: MLP, opt: ff.Optimizer, data: tuple, steps: int, wrt: Any, seed: int) -> float:
    """Trains ``steps`` steps on batches of 64; prints a few losses; returns the test accuracy."""
    x, y, xt, yt = data
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        idx = rng.integers(0, len(y), 64)
        losses.append(float(train_step(model, opt, x[idx], y[idx], wrt)))
    shown = [losses[i] for i in sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps - 1})]
    print("  loss " + " -> ".join(f"{loss:.3f}" for loss in shown))
    return float(accuracy(model, xt, yt))


def add_lora(model: MLP, x: jax.Array, weight_qtype: str | None) -> MLP:
    """A copy of ``model`` with qwix (Q)LoRA adapters on every layer; ``model`` is unchanged."""
    provider = qwix.LoraProvider(module_path=".*", rank=4, alpha=8.0, weight_qtype=weight_qtype)
    return qwix.apply_lora_to_model(model, provider, x, rngs=nnx.Rngs(1))


def base_weights(model: MLP) -> list[np.ndarray]:
    """Every array that is not an adapter, for checking that the base never moves."""
    return [np.asarray(a) for a in jax.tree.leaves(nnx.state(model, nnx.Not(nnx.LoRAParam)))]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(
        x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b, strict=True)
    )


def main(steps: int = 300) -> dict[str, Any]:
    results: dict[str, Any] = {}
    old, all_digits = digits(range(0, 5)), digits(range(0, 10))

    # 1. Pretrain every weight on digits 0-4.
    pretrained = MLP(nnx.Rngs(0))
    opt = ff.Optimizer(pretrained, optax.adam(3e-3))
    print("pretrain, every weight, on digits 0-4:")
    results["pretrain"] = train(pretrained, opt, old, steps, ff.Trainable, seed=0)
    results["before_lora"] = float(accuracy(pretrained, *all_digits[2:]))
    print(f"  test accuracy {results['pretrain']:.3f} on 0-4, {results['before_lora']:.3f} on 0-9")

    # 2. LoRA: the base stays nnx.Param (qwix finds it as such); train the adapters alone.
    model = add_lora(pretrained, all_digits[0][:1], weight_qtype=None)
    before = base_weights(model)
    opt = ff.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    print("LoRA, rank 4, adapters only (wrt=nnx.LoRAParam):")
    results["lora"] = train(model, opt, all_digits, steps, nnx.LoRAParam, seed=1)
    results["lora_base_unchanged"] = same(before, base_weights(model))
    print(f"  test accuracy on 0-9: {results['lora']:.3f}")
    print(ff.summary(model))
    adapters = sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    print(f"trained: the {adapters:,} adapter weights; the nnx.Param base is only read")

    # 3. QLoRA: a 4-bit base, which may be frozen; the default wrt then trains the adapters.
    model = add_lora(pretrained, all_digits[0][:1], weight_qtype="nf4")
    ff.freeze(model, nnx.Not(nnx.LoRAParam))
    before = base_weights(model)
    opt = ff.Optimizer(model, optax.adam(1e-2))
    print("QLoRA, nf4 base frozen, rank 4:")
    results["qlora"] = train(model, opt, all_digits, steps, ff.Trainable, seed=1)
    results["qlora_base_unchanged"] = same(before, base_weights(model))
    print(f"  test accuracy on 0-9: {results['qlora']:.3f}")
    print(ff.summary(model))

    if not (results["lora_base_unchanged"] and results["qlora_base_unchanged"]):
        raise RuntimeError("a base weight moved during adapter training")
    print("base weights bit-identical after LoRA and QLoRA training")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per phase")
    args = parser.parse_args()
    main(args.steps)
