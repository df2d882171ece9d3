"""Linen fine-tuning: a small CNN, a new head, convolutions frozen, then unfrozen.

On scikit-learn's digits (8x8 images, shipped with the package): train a CNN
on digits 0-4, replace its head for digits 5-9 and fine-tune with the
convolutional layers frozen (``ffl.freeze`` + ``ffl.TrainState``), then
unfreeze them for a last phase. BatchNorm statistics keep updating throughout:
freezing is not eval mode.

    python examples/linen_finetune.py [--steps N]
"""

from __future__ import annotations

import argparse
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import flax_freeze as ff
from flax_freeze import linen as ffl


class CNN(nn.Module):
    classes: int = 5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = nn.Conv(16, (3, 3), name="conv1")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn1")(x)
        x = nn.relu(x)
        x = nn.Conv(32, (3, 3), strides=2, name="conv2")(x)
        x = nn.relu(x)
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.classes, name="head")(x)


class TrainState(ffl.TrainState):
    batch_stats: Any


def digits(classes: range, seed: int = 0) -> tuple[jax.Array, ...]:
    data = load_digits()
    keep = np.isin(data.target, list(classes))
    x = (data.images[keep] / 16.0).astype(np.float32)[..., None]
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


@jax.jit
def train_step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, jax.Array]:
    def loss_fn(params: Any) -> tuple[jax.Array, Any]:
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, x, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates

    (loss, updates), grads = ff.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
    return state, loss


@jax.jit
def accuracy(state: TrainState, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x, False)
    return (logits.argmax(-1) == y).mean()


def train(state: TrainState, x: jax.Array, y: jax.Array, steps: int, seed: int) -> TrainState:
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(y), 64)
        state, _ = train_step(state, x[idx], y[idx])
    return state


def conv_params(state: TrainState) -> list[np.ndarray]:
    """The convolution weights, unboxed, for checking that frozen ones never move."""
    conv = {k: v for k, v in state.params.items() if k.startswith("conv")}
    return [np.asarray(a) for a in jax.tree.leaves(nn.meta.unbox(conv))]


def main(steps: int = 300) -> dict[str, float]:
    results: dict[str, float] = {}
    model = CNN()
    x, y, xt, yt = digits(range(0, 5))
    variables = model.init(jax.random.key(0), x[:1])
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=optax.adam(3e-3),
        batch_stats=variables["batch_stats"],
    )
    state = train(state, x, y, steps, seed=0)
    results["pretrain"] = float(accuracy(state, xt, yt))
    print(f"phase 1, pretrain on digits 0-4: test accuracy {results['pretrain']:.3f}")

    # New head for digits 5-9, convolutions (and the BatchNorm scale/bias) frozen.
    x, y, xt, yt = digits(range(5, 10))
    fresh_head = model.init(jax.random.key(1), x[:1])["params"]["head"]
    params = {**state.params, "head": fresh_head}
    params = ffl.freeze(params, ff.PathRegex("(conv1|conv2|bn1)/.*"))
    state = TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=optax.adamw(3e-3, weight_decay=1e-2),
        batch_stats=state.batch_stats,
    )
    print(ff.summary({"params": state.params, "batch_stats": state.batch_stats}))
    before = conv_params(state)
    state = train(state, x, y, steps, seed=1)
    if not all(np.array_equal(a, b) for a, b in zip(before, conv_params(state), strict=True)):
        raise RuntimeError("a frozen convolution moved during fine-tuning")
    results["head_only"] = float(accuracy(state, xt, yt))
    print(f"phase 2, head only (convolutions frozen): test accuracy {results['head_only']:.3f}")

    # Unfreeze everything: the optimizer state is migrated, the head's kept.
    state = state.unfreeze()
    state = train(state, x, y, steps, seed=2)
    results["all"] = float(accuracy(state, xt, yt))
    print(f"phase 3, everything trained: test accuracy {results['all']:.3f}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per phase")
    main(parser.parse_args().steps)
