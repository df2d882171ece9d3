"""A Gaussian process with an ARD kernel, some of its lengthscales held fixed.

An RBF kernel with automatic relevance determination (ARD) has one
lengthscale per input feature. Here a few of them are taken as known and
held fixed, and the rest are fitted, with the kernel's variance and the
noise, by maximising the marginal likelihood, on scikit-learn's diabetes
data (shipped with the package, no download; standardised, a subset of a few
hundred points).

The parameters are a plain pytree (a dict of log-lengthscale vector,
log-variance and log-noise). ``ff.freeze(params, "log_lengthscale",
where=fixed)`` holds the ``fixed`` elements of the vector: the leaf becomes
an ``ff.PartlyFrozen`` array that the kernel code reads as the whole vector,
while ``ff.grad``, ``ff.trainable_tree`` (for ``optax.adam``'s state) and
``ff.apply_updates`` see only the free dimensions. The fixed lengthscales
are checked to be bit-identical after fitting (RuntimeError otherwise).

It prints the negative log marginal likelihood before and after, each
feature's lengthscale (fixed ones marked) and the optimizer state's shapes.

    python examples/gp_ard.py [--n N] [--steps S]
"""

from __future__ import annotations

import argparse
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_diabetes
from sklearn.utils import Bunch

import flax_freeze as ff

#: Features whose lengthscales we pretend to know: the demographic ones,
#: taken to matter little (a long lengthscale), and one blood serum measure.
KNOWN = {"age": 3.0, "sex": 3.0, "s2": 2.0}


def diabetes(n: int) -> tuple[jax.Array, jax.Array, list[str]]:
    """The first ``n`` points of the diabetes set, standardised, and the feature names."""
    data = cast(Bunch, load_diabetes())
    x, y = data.data[:n], data.target[:n]
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), list(data.feature_names)


def ard_rbf(params: dict[str, Any], x1: jax.Array, x2: jax.Array) -> jax.Array:
    """``variance * exp(-|(x1 - x2) / lengthscale|^2 / 2)``, one lengthscale per feature."""
    ls = jnp.exp(params["log_lengthscale"])
    d2 = (((x1[:, None, :] - x2[None, :, :]) / ls) ** 2).sum(-1)
    return jnp.exp(params["log_variance"]) * jnp.exp(-0.5 * d2)


def neg_log_marginal_likelihood(params: dict[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
    """``-log p(y | x)`` per data point, through a Cholesky factorisation."""
    n = y.shape[0]
    k = ard_rbf(params, x, x) + (jnp.exp(params["log_noise"]) + 1e-6) * jnp.eye(n)
    chol = jnp.linalg.cholesky(k)
    alpha = jax.scipy.linalg.cho_solve((chol, True), y)
    nll = 0.5 * y @ alpha + jnp.log(jnp.diag(chol)).sum() + 0.5 * n * jnp.log(2 * jnp.pi)
    return nll / n


def fit(
    params: dict[str, Any], x: jax.Array, y: jax.Array, steps: int, lr: float = 0.05
) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """Adam on the trainable elements only; returns the fitted params and Adam's state shapes."""
    tx = optax.adam(lr)
    opt_state = tx.init(ff.trainable_tree(params))  # moments for the free dimensions only
    shapes = state_shapes(opt_state)

    @jax.jit
    def step(params: dict[str, Any], opt_state: Any) -> tuple[dict[str, Any], Any]:
        grads = ff.grad(neg_log_marginal_likelihood)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state)
        return ff.apply_updates(params, updates), opt_state

    for _ in range(steps):
        params, opt_state = step(params, opt_state)
    return params, shapes


def state_shapes(opt_state: Any) -> dict[str, tuple[int, ...]]:
    """The shape of every array in an optimizer state, by path (step counts included)."""
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): tuple(np.shape(leaf))
        for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
    }


def main(n: int = 300, steps: int = 200) -> dict[str, Any]:
    """Fits the free hyperparameters with the known lengthscales held fixed.

    Args:
        n: number of data points (the first ``n`` of the 442).
        steps: Adam steps.

    Returns:
        The negative log marginal likelihood per point before and after,
        the fitted lengthscales, the mask of fixed ones, whether they are
        bit-identical (always True: main() raises otherwise), the optimizer
        state's shapes and its number of elements.
    """
    x, y, names = diabetes(n)
    d = x.shape[1]
    fixed = np.array([name in KNOWN for name in names])
    log_lengthscale = np.zeros(d, np.float32)  # lengthscale 1 on standardised features
    for i, name in enumerate(names):
        if name in KNOWN:
            log_lengthscale[i] = np.log(KNOWN[name])
    params: dict[str, Any] = {  # float32 arrays, not Python floats: one compile of the step
        "log_lengthscale": jnp.asarray(log_lengthscale),
        "log_variance": jnp.zeros((), jnp.float32),
        "log_noise": jnp.full((), np.log(0.5), jnp.float32),
    }
    params = ff.freeze(params, "log_lengthscale", where=fixed)
    part = params["log_lengthscale"]
    free = [name for name, is_fixed in zip(names, fixed, strict=True) if not is_fixed]
    print(f"{part!r}; free features: {', '.join(free)}")

    nll = jax.jit(neg_log_marginal_likelihood)
    before = float(nll(params, x, y))
    start = np.asarray(params["log_lengthscale"])
    params, shapes = fit(params, x, y, steps)
    after = float(nll(params, x, y))
    fitted = np.asarray(params["log_lengthscale"])
    identical = fixed_identical(start, fitted, fixed)

    print(f"-log p(y | x) / n: {before:.4f} -> {after:.4f} after {steps} Adam steps")
    lengthscales = np.exp(fitted)
    for name, ls, is_fixed in zip(names, lengthscales, fixed, strict=True):
        print(f"  {name:>4}: lengthscale {ls:8.3f}" + ("  (fixed)" if is_fixed else ""))
    print(
        f"  variance {float(jnp.exp(params['log_variance'])):.3f}, "
        f"noise {float(jnp.exp(params['log_noise'])):.3f}"
    )
    print(f"fixed lengthscales bit-identical: {identical}")
    print("Adam state: " + ", ".join(f"{p} {s}" for p, s in shapes.items()))
    return {
        "nll_before": before,
        "nll_after": after,
        "lengthscales": lengthscales,
        "fixed": fixed,
        "fixed_identical": identical,
        "n_free": int((~fixed).sum()),
        "trainable_count": ff.summary(params).trainable_count,
        "opt_state_shapes": shapes,
        "opt_state_count": sum(int(np.prod(s)) for s in shapes.values()),
    }


def fixed_identical(start: np.ndarray, fitted: np.ndarray, fixed: np.ndarray) -> bool:
    """Raises RuntimeError unless the fixed elements are bit-identical; True otherwise."""
    if start[fixed].tobytes() != fitted[fixed].tobytes():
        raise RuntimeError("a fixed lengthscale moved during fitting")
    return True


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="number of data points")
    parser.add_argument("--steps", type=int, default=200, help="Adam steps")
    args = parser.parse_args()
    main(args.n, args.steps)
