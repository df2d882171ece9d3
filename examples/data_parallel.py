"""Data-parallel training with a frozen backbone, in the three JAX styles.

The same step — ``ff.value_and_grad`` of the trainable state, an
``ff.Optimizer`` update — runs

(a) under ``nnx.jit`` with ``NamedSharding``: batch sharded on ``data``, state
    replicated; XLA inserts the gradient all-reduce;
(b) under ``jax.shard_map``: state replicated, batch sharded. With
    ``check_vma=True`` (the default) JAX sums the cotangents of replicated
    inputs itself, so the gradient of ``pmean(local_loss)`` is already the
    global gradient. The ``pmap`` habit — the gradient of the *local* loss,
    then ``pmean`` — is wrong here by the device count: the sum is already
    taken, and ``pmean`` of a value that no longer varies leaves it as it is
    (measured in ``tests/test_parallel.py``). With ``check_vma=False`` the
    ``pmap`` habit is right: local gradient, then ``pmean``;
(c) under ``jax.pmap``: state replicated per device, local gradients
    averaged with ``pmean``.

Frozen weights get no gradient, so they are never communicated: the bytes
all-reduced per step are the trainable parameters' bytes (plus the loss).
Run on 8 fake CPU devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/data_parallel.py
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_freeze as ff


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, width: int = 64, depth: int = 3, classes: int = 10):
        dims = [32] + [width] * depth
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims, dims[1:], strict=False)]
        )
        self.head = nnx.Linear(width, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.head(x)


def make(frozen: str = "probe", seed: int = 0) -> tuple[MLP, ff.Optimizer]:
    """A model with ``frozen`` = "probe" (all but the head) or "half" (bottom layers)."""
    model = MLP(nnx.Rngs(seed))
    pattern = "layers/.*" if frozen == "probe" else "layers/[01]/.*"
    ff.freeze(model, ff.PathRegex(pattern))
    return model, ff.Optimizer(model, optax.adam(1e-2))


def loss_fn(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def batch(n: int = 64, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 32)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


# ------------------------------------------------------------------------ single device


@nnx.jit
def single_step(model: MLP, opt: ff.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    loss, grads = ff.value_and_grad(loss_fn)(model, x, y)
    opt.update(model, grads)
    return loss


# ------------------------------------------------------------------------ (a) jit + shardings


def data_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def replicate(node: Any, mesh: jax.sharding.Mesh) -> None:
    """Puts every array of ``node`` on all devices, in place."""
    state = nnx.state(node)
    nnx.update(node, jax.device_put(state, NamedSharding(mesh, P())))


def shard_batch(x: jax.Array, y: jax.Array, mesh: jax.sharding.Mesh) -> tuple[jax.Array, ...]:
    sharding = NamedSharding(mesh, P("data"))
    return jax.device_put(x, sharding), jax.device_put(y, sharding)


jit_step = single_step  # the same nnx.jit step: XLA partitions it from the input shardings


# ------------------------------------------------------------------------ (b) shard_map


def shard_map_step(mesh: jax.sharding.Mesh, *, check_vma: bool = True) -> Callable[..., Any]:
    """A jitted ``(graphdef, state, x, y) -> (state, loss)`` step over ``jax.shard_map``."""

    def local(graphdef: Any, state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, jax.Array]:
        model, opt = nnx.merge(graphdef, state)
        if check_vma:
            # JAX sums the cotangents of the replicated state: these are global grads.
            def global_loss(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
                return jax.lax.pmean(loss_fn(model, x, y), "data")

            loss, grads = ff.value_and_grad(global_loss)(model, x, y)
        else:
            loss, grads = ff.value_and_grad(loss_fn)(model, x, y)
            loss, grads = jax.lax.pmean((loss, grads), "data")
        opt.update(model, grads)
        return nnx.state((model, opt)), loss

    def step(graphdef: Any, state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, jax.Array]:
        mapped = jax.shard_map(
            lambda s, x, y: local(graphdef, s, x, y),
            mesh=mesh,
            in_specs=(P(), P("data"), P("data")),
            out_specs=(P(), P()),
            check_vma=check_vma,
        )
        return mapped(state, x, y)

    return jax.jit(step, static_argnums=0)


# ------------------------------------------------------------------------ (c) pmap


def pmap_step() -> Callable[..., Any]:
    """A ``jax.pmap``-ed ``(graphdef, state, x, y) -> (state, loss)`` step."""

    def local(graphdef: Any, state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, jax.Array]:
        model, opt = nnx.merge(graphdef, state)
        loss, grads = ff.value_and_grad(loss_fn)(model, x, y)
        loss, grads = jax.lax.pmean((loss, grads), "data")  # only trainable grads exist
        opt.update(model, grads)
        return nnx.state((model, opt)), loss

    return jax.pmap(local, axis_name="data", in_axes=(None, 0, 0, 0), static_broadcasted_argnums=0)


def stack(tree: Any, n: int) -> Any:
    """Replicates every array of ``tree`` along a new leading axis of size ``n``."""
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *jnp.shape(a))), tree)


def run(style: str, steps: int = 3, frozen: str = "probe") -> tuple[MLP, list[float]]:
    """Trains ``steps`` steps in one style and returns the model and the losses."""
    model, opt = make(frozen)
    x, y = batch()
    n = jax.device_count()
    losses: list[float] = []
    if style == "single":
        for _ in range(steps):
            losses.append(float(single_step(model, opt, x, y)))
        return model, losses
    mesh = data_mesh()
    if style == "jit":
        replicate((model, opt), mesh)
        xs, ys = shard_batch(x, y, mesh)
        for _ in range(steps):
            losses.append(float(jit_step(model, opt, xs, ys)))
        return model, losses
    graphdef, state = nnx.split((model, opt))
    if style in ("shard_map", "shard_map_no_vma"):
        step = shard_map_step(mesh, check_vma=style == "shard_map")
        state = jax.device_put(state, NamedSharding(mesh, P()))
        xs, ys = shard_batch(x, y, mesh)
        for _ in range(steps):
            state, loss = step(graphdef, state, xs, ys)
            losses.append(float(loss))
    elif style == "pmap":
        step = pmap_step()
        state = stack(state, n)
        xs, ys = x.reshape(n, -1, *x.shape[1:]), y.reshape(n, -1)
        for _ in range(steps):
            state, loss = step(graphdef, state, xs, ys)
            losses.append(float(loss[0]))
        state = jax.tree.map(lambda a: a[0], state)  # every device holds the same state
    else:
        raise ValueError(
            f"`style` must be one of single, jit, shard_map, shard_map_no_vma, pmap; got {style!r}."
        )
    model, _ = nnx.merge(graphdef, state)
    return model, losses


def main() -> None:
    reference, ref_losses = run("single")
    ref = nnx.state(reference, nnx.Param)
    print(f"{jax.device_count()} devices; single-device losses {np.round(ref_losses, 5)}")
    for style in ("jit", "shard_map", "shard_map_no_vma", "pmap"):
        model, losses = run(style)
        diff = jax.tree.map(
            lambda a, b: float(jnp.abs(a - b).max()), nnx.state(model, nnx.Param), ref
        )
        worst = max(jax.tree.leaves(diff))
        print(f"{style:>17}: losses {np.round(losses, 5)}, max |w - w_single| {worst:.2e}")
        if worst > 1e-4:
            raise SystemExit(f"{style}: weights differ from single-device training by {worst:.2e}")


if __name__ == "__main__":
    main()
