"""Gaussian-process regression with kernel hyperparameters held fixed where they live.

Kernels are plain frozen dataclasses (pytrees). A hyperparameter wrapped in
``ff.FrozenParam`` is held fixed by ``ff.grad``; ``ff.unfreeze`` returns a new
kernel with it trainable. Data: scikit-learn's diabetes set (shipped with the
package, no download).

Phases:
1. RBF kernel, lengthscales frozen: fit variance and noise.
2. Lengthscales unfrozen: fit on.
3. A compositional kernel ``rbf + rbf * linear`` with the product's RBF frozen
   by path.

    python examples/gp_kernels.py [--n N] [--steps S]
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_diabetes

import flax_freeze as ff


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RBF:
    """Squared-exponential kernel with per-feature lengthscales (log scale)."""

    log_variance: Any
    log_lengthscale: Any

    def __call__(self, x1: jax.Array, x2: jax.Array) -> jax.Array:
        ls = jnp.exp(self.log_lengthscale)
        d2 = (((x1[:, None, :] - x2[None, :, :]) / ls) ** 2).sum(-1)
        return jnp.exp(self.log_variance) * jnp.exp(-0.5 * d2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Linear:
    """Linear kernel ``variance * x1 . x2`` (log scale)."""

    log_variance: Any

    def __call__(self, x1: jax.Array, x2: jax.Array) -> jax.Array:
        return jnp.exp(self.log_variance) * x1 @ x2.T


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sum:
    """Sum of two kernels."""

    k1: Any
    k2: Any

    def __call__(self, x1: jax.Array, x2: jax.Array) -> jax.Array:
        return self.k1(x1, x2) + self.k2(x1, x2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Product:
    """Product of two kernels."""

    k1: Any
    k2: Any

    def __call__(self, x1: jax.Array, x2: jax.Array) -> jax.Array:
        return self.k1(x1, x2) * self.k2(x1, x2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GP:
    """A kernel plus Gaussian observation noise."""

    kernel: Any
    log_noise: Any


def neg_log_marginal_likelihood(gp: GP, x: jax.Array, y: jax.Array) -> jax.Array:
    """``-log p(y | x)`` per data point, through a Cholesky factorisation."""
    n = y.shape[0]
    k = gp.kernel(x, x) + (jnp.exp(gp.log_noise) + 1e-6) * jnp.eye(n)
    chol = jnp.linalg.cholesky(k)
    alpha = jax.scipy.linalg.cho_solve((chol, True), y)
    nll = 0.5 * y @ alpha + jnp.log(jnp.diag(chol)).sum() + 0.5 * n * jnp.log(2 * jnp.pi)
    return nll / n


def diabetes(n: int) -> tuple[jax.Array, jax.Array]:
    """The first ``n`` points of the diabetes set, standardised."""
    data = load_diabetes()
    x, y = data.data[:n], data.target[:n]
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def fit(gp: GP, x: jax.Array, y: jax.Array, steps: int, lr: float = 0.05) -> GP:
    """Adam on the trainable hyperparameters only; frozen ones are never touched."""
    tx = optax.adam(lr)
    opt_state = tx.init(ff.trainable_tree(gp))

    @jax.jit
    def step(gp: GP, opt_state: Any) -> tuple[GP, Any]:
        grads = ff.grad(neg_log_marginal_likelihood)(gp, x, y)  # None at frozen leaves
        updates, opt_state = tx.update(grads, opt_state)
        return ff.apply_updates(gp, updates), opt_state

    for _ in range(steps):
        gp, opt_state = step(gp, opt_state)
    return gp


def frozen_values(tree: Any) -> list[np.ndarray]:
    """The values of every FrozenParam in ``tree``, for checking they never move."""
    return [
        np.asarray(v.get_value())
        for v in jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, ff.FrozenParam))
        if isinstance(v, ff.FrozenParam)
    ]


def check_unchanged(before: list[np.ndarray], after: list[np.ndarray]) -> None:
    """Raises if any frozen value moved: they must stay bit-identical."""
    if len(before) != len(after) or not all(
        np.array_equal(a, b) for a, b in zip(before, after, strict=True)
    ):
        raise RuntimeError("a frozen hyperparameter moved during fitting")


def main(n: int = 300, steps: int = 150) -> dict[str, float]:
    x, y = diabetes(n)
    d = x.shape[1]
    nll = jax.jit(neg_log_marginal_likelihood)
    results: dict[str, float] = {}

    gp = GP(RBF(0.0, ff.FrozenParam(jnp.full((d,), 1.0))), log_noise=0.0)
    results["start"] = float(nll(gp, x, y))
    print(f"start: -log p(y)/n = {results['start']:.4f}")

    before = frozen_values(gp)
    gp = fit(gp, x, y, steps)
    check_unchanged(before, frozen_values(gp))
    results["lengthscale_frozen"] = float(nll(gp, x, y))
    print(f"phase 1, lengthscales frozen: -log p(y)/n = {results['lengthscale_frozen']:.4f}")
    print(
        f"  variance {float(jnp.exp(gp.kernel.log_variance)):.3f}, "
        f"noise {float(jnp.exp(gp.log_noise)):.3f}"
    )

    gp = ff.unfreeze(gp, ff.PathRegex(".*log_lengthscale"))
    gp = fit(gp, x, y, steps)
    results["all_trained"] = float(nll(gp, x, y))
    print(f"phase 2, lengthscales trained: -log p(y)/n = {results['all_trained']:.4f}")
    print(f"  lengthscales {np.round(np.exp(np.asarray(gp.kernel.log_lengthscale)), 2)}")

    kernel = Sum(gp.kernel, Product(RBF(0.0, jnp.full((d,), 1.5)), Linear(-2.0)))
    composite = ff.freeze(GP(kernel, gp.log_noise), ff.PathRegex("kernel/k2/k1/.*"))
    results["composite_start"] = float(nll(composite, x, y))
    before = frozen_values(composite)
    composite = fit(composite, x, y, steps)
    check_unchanged(before, frozen_values(composite))
    results["composite"] = float(nll(composite, x, y))
    print(
        f"phase 3, rbf + rbf * linear with the product's rbf frozen: "
        f"-log p(y)/n = {results['composite_start']:.4f} -> {results['composite']:.4f}"
    )
    k = composite.kernel
    print(
        f"  rbf variance {float(jnp.exp(k.k1.log_variance)):.3f}, "
        f"linear variance {float(jnp.exp(k.k2.k2.log_variance)):.4f}, "
        f"noise {float(jnp.exp(composite.log_noise)):.3f} "
        f"(product rbf held at variance {float(jnp.exp(k.k2.k1.log_variance.get_value())):.3f})"
    )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="number of data points")
    parser.add_argument("--steps", type=int, default=150, help="Adam steps per phase")
    args = parser.parse_args()
    main(args.n, args.steps)
