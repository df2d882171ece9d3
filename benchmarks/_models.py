"""The benchmarked models, their random data and their freeze settings.

Three NNX models, each with a loss ``loss_fn(model, x, y)``:

* ``MLP``: 8 hidden layers of width 1024 (ReLU) and a 10-class linear head.
* ``Encoder``: a pre-LayerNorm transformer encoder (token and position
  embeddings, 6 blocks of d_model 256 with 4 heads and a 4x MLP, a final
  LayerNorm, mean pooling) and a 10-class linear head.
* ``GP``: an RBF Gaussian process (log variance, per-feature log lengthscales,
  log noise) scored by its negative log marginal likelihood, so small that
  per-call host overhead dominates a step.

A setting is a regular expression over the ``/``-joined parameter paths: what
it matches is frozen. Data is random and made here; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

Batch = tuple[jax.Array, jax.Array]


class MLP(nnx.Module):
    """``depth`` hidden ReLU layers of ``width`` units, then a linear head."""

    def __init__(self, rngs: nnx.Rngs, *, width: int, depth: int, classes: int) -> None:
        self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])
        self.head = nnx.Linear(width, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return self.head(x)


class Block(nnx.Module):
    """Pre-LayerNorm encoder block: multi-head self-attention, then a 4x GELU MLP."""

    def __init__(self, rngs: nnx.Rngs, *, d_model: int, heads: int) -> None:
        self.heads = heads
        self.norm1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.qkv = nnx.Linear(d_model, 3 * d_model, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(d_model, d_model, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.up = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
        self.down = nnx.Linear(4 * d_model, d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, s, d = x.shape
        q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
        q, k, v = (t.reshape(b, s, self.heads, d // self.heads) for t in (q, k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // self.heads)
        att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        x = x + self.out(att.reshape(b, s, d))
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class Encoder(nnx.Module):
    """Token + position embeddings, ``depth`` blocks, LayerNorm, mean pooling, linear head."""

    def __init__(
        self,
        rngs: nnx.Rngs,
        *,
        vocab: int,
        seq: int,
        d_model: int,
        heads: int,
        depth: int,
        classes: int,
    ) -> None:
        self.embed = nnx.Embed(vocab, d_model, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq, d_model)))
        self.blocks = nnx.List([Block(rngs, d_model=d_model, heads=heads) for _ in range(depth)])
        self.norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, classes, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens) + self.pos[...]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(axis=1))


class GP(nnx.Module):
    """RBF Gaussian-process regression; calling it gives ``-log p(y | x) / n``."""

    def __init__(self, *, features: int) -> None:
        self.log_variance = nnx.Param(jnp.array(0.0, jnp.float32))
        self.log_lengthscale = nnx.Param(jnp.zeros(features, jnp.float32))
        self.log_noise = nnx.Param(jnp.array(-1.0, jnp.float32))

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return gp_nll(self.log_variance[...], self.log_lengthscale[...], self.log_noise[...], x, y)


def gp_nll(
    log_variance: jax.Array,
    log_lengthscale: jax.Array,
    log_noise: jax.Array,
    x: jax.Array,
    y: jax.Array,
) -> jax.Array:
    """Negative log marginal likelihood per point of an RBF GP, through a Cholesky factor."""
    n = y.shape[0]
    z = x / jnp.exp(log_lengthscale)
    d2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    k = jnp.exp(log_variance) * jnp.exp(-0.5 * d2) + (jnp.exp(log_noise) + 1e-6) * jnp.eye(n)
    chol = jnp.linalg.cholesky(k)
    alpha = jax.scipy.linalg.cho_solve((chol, True), y)
    nll = 0.5 * y @ alpha + jnp.log(jnp.diag(chol)).sum() + 0.5 * n * jnp.log(2 * jnp.pi)
    return nll / n


def classification_loss(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of ``model(x)`` against integer labels ``y``."""
    logits = model(x)  # type: ignore[operator]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def gp_loss(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
    """The GP's negative log marginal likelihood per point."""
    return model(x, y)  # type: ignore[operator]


@dataclasses.dataclass(frozen=True)
class Setting:
    """Which parameters are frozen: those whose ``/``-joined path fully matches ``frozen``."""

    name: str
    frozen: str | None  # None: nothing frozen

    def is_frozen(self, path: str) -> bool:
        return self.frozen is not None and re.fullmatch(self.frozen, path) is not None


@dataclasses.dataclass(frozen=True)
class Spec:
    """A benchmarked model: how to build it, its loss, one random batch and its settings."""

    name: str
    title: str
    build: Callable[[], nnx.Module]
    loss_fn: Callable[[nnx.Module, jax.Array, jax.Array], jax.Array]
    batch: Callable[[], Batch]
    settings: tuple[Setting, ...]
    sizes: dict[str, int]


def mlp_spec(*, width: int = 1024, depth: int = 8, batch: int = 256, classes: int = 10) -> Spec:
    """The MLP with its three settings: linear probe, bottom half frozen, nothing frozen."""

    def build() -> nnx.Module:
        return MLP(nnx.Rngs(0), width=width, depth=depth, classes=classes)

    def data() -> Batch:
        rng = np.random.default_rng(1)
        x = rng.standard_normal((batch, width), dtype=np.float32)
        y = rng.integers(0, classes, batch, dtype=np.int32)
        return jnp.asarray(x), jnp.asarray(y)

    half = "|".join(str(i) for i in range(depth // 2))
    return Spec(
        name="mlp",
        title=f"MLP {depth}x{width}, batch {batch}",
        build=build,
        loss_fn=classification_loss,
        batch=data,
        settings=(
            Setting("linear probe", r"layers/.*"),
            Setting("bottom half frozen", rf"layers/({half})/.*"),
            Setting("nothing frozen", None),
        ),
        sizes={"width": width, "depth": depth, "batch": batch, "classes": classes},
    )


def encoder_spec(
    *,
    d_model: int = 256,
    heads: int = 4,
    depth: int = 6,
    seq: int = 128,
    batch: int = 16,
    vocab: int = 1024,
    classes: int = 10,
) -> Spec:
    """The transformer encoder with the same three settings as the MLP."""

    def build() -> nnx.Module:
        return Encoder(
            nnx.Rngs(0),
            vocab=vocab,
            seq=seq,
            d_model=d_model,
            heads=heads,
            depth=depth,
            classes=classes,
        )

    def data() -> Batch:
        rng = np.random.default_rng(2)
        tokens = rng.integers(0, vocab, (batch, seq), dtype=np.int32)
        y = rng.integers(0, classes, batch, dtype=np.int32)
        return jnp.asarray(tokens), jnp.asarray(y)

    half = "|".join(str(i) for i in range(depth // 2))
    return Spec(
        name="transformer",
        title=f"Transformer {depth} blocks, d_model {d_model}, {heads} heads, "
        f"seq {seq}, batch {batch}",
        build=build,
        loss_fn=classification_loss,
        batch=data,
        settings=(
            Setting("linear probe", r"(?!head/).*"),
            Setting("bottom half frozen", rf"embed/.*|pos|blocks/({half})/.*"),
            Setting("nothing frozen", None),
        ),
        sizes={
            "d_model": d_model,
            "heads": heads,
            "depth": depth,
            "seq": seq,
            "batch": batch,
            "vocab": vocab,
            "classes": classes,
        },
    )


def gp_spec(*, points: int = 32, features: int = 3) -> Spec:
    """The tiny GP: lengthscales frozen, or nothing frozen."""

    def build() -> nnx.Module:
        return GP(features=features)

    def data() -> Batch:
        rng = np.random.default_rng(3)
        x = rng.standard_normal((points, features), dtype=np.float32)
        y = np.sin(x.sum(-1)) + 0.1 * rng.standard_normal(points, dtype=np.float32)
        return jnp.asarray(x), jnp.asarray(y.astype(np.float32))

    return Spec(
        name="gp",
        title=f"GP, {points} points, {features} features",
        build=build,
        loss_fn=gp_loss,
        batch=data,
        settings=(
            Setting("lengthscales frozen", r"log_lengthscale"),
            Setting("nothing frozen", None),
        ),
        sizes={"points": points, "features": features},
    )


def param_paths(model: nnx.Module) -> list[tuple[str, Any]]:
    """``(path, array)`` of every parameter of ``model``, in ``jax.tree`` order of its state."""
    state = nnx.state(model)
    flat = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    return [
        ("/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), v.get_raw_value())
        for path, v in flat
    ]
