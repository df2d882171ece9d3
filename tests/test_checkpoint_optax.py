"""Plain optax state restored with its pytree model when the frozen sets differ."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flax_freeze as ff
from helpers import RBF

TX = optax.adam(0.1)


def kernel(frozen: bool, value: float = 1.0) -> RBF:
    lengthscale = jnp.float32(value / 2)
    return RBF(jnp.float32(value), ff.FrozenParam(lengthscale) if frozen else lengthscale)


def loss(k: RBF) -> jax.Array:
    return (k.variance - 3.0) ** 2 + (k.lengthscale * 1.0 - 2.0) ** 2


def train(k: RBF, opt_state, steps: int = 3):
    for _ in range(steps):
        updates, opt_state = TX.update(ff.grad(loss)(k), opt_state)
        k = ff.apply_updates(k, updates)
    return k, opt_state


def value(x):
    return float(x[...]) if isinstance(x, ff.FrozenParam) else float(x)


def trained(frozen: bool):
    k = kernel(frozen)
    return train(k, TX.init(ff.trainable_tree(k)))


def fresh_target(frozen: bool):
    k = kernel(frozen, 0.0)
    return k, TX.init(ff.trainable_tree(k))


def test_saved_frozen_into_all_trainable_target_takes_the_saved_flags(tmp_path):
    k, opt = trained(frozen=True)
    ff.checkpoint.save(tmp_path / "ckpt", (k, opt))
    k2, opt2 = ff.checkpoint.restore(tmp_path / "ckpt", fresh_target(frozen=False))
    assert isinstance(k2.lengthscale, ff.FrozenParam)
    assert opt2[0].mu.lengthscale is None
    assert opt2[0].nu.lengthscale is None
    assert jax.tree.structure(opt2) == jax.tree.structure(opt)
    for a, b in zip(jax.tree.leaves(opt2), jax.tree.leaves(opt), strict=True):
        np.testing.assert_array_equal(a, b)
    # Training goes on exactly as without the checkpoint.
    expected, _ = train(k, opt, 2)
    resumed, _ = train(k2, opt2, 2)
    assert value(resumed.variance) == value(expected.variance)
    assert value(resumed.lengthscale) == value(expected.lengthscale) == 0.5


def test_saved_frozen_into_all_trainable_target_keeping_its_flags(tmp_path):
    k, opt = trained(frozen=True)
    ff.checkpoint.save(tmp_path / "ckpt", (k, opt))
    k2, opt2 = ff.checkpoint.restore(tmp_path / "ckpt", fresh_target(False), flags="target")
    assert not isinstance(k2.lengthscale, ff.FrozenParam)
    assert value(k2.lengthscale) == 0.5
    assert int(opt2[0].count) == 3  # the shared count is kept
    assert float(opt2[0].mu.variance) == float(opt[0].mu.variance)
    assert float(opt2[0].mu.lengthscale) == 0.0  # newly trainable: fresh, as tx.init gives
    assert float(opt2[0].nu.lengthscale) == 0.0


def test_saved_trainable_into_a_target_with_a_frozen_leaf(tmp_path):
    k, opt = trained(frozen=False)
    ff.checkpoint.save(tmp_path / "ckpt", (k, opt))
    k2, opt2 = ff.checkpoint.restore(tmp_path / "ckpt", fresh_target(frozen=True))
    assert not isinstance(k2.lengthscale, ff.FrozenParam)  # the saved flags win
    assert float(opt2[0].mu.lengthscale) == float(opt[0].mu.lengthscale) != 0.0
    expected, _ = train(k, opt, 2)
    resumed, _ = train(k2, opt2, 2)
    assert value(resumed.lengthscale) == value(expected.lengthscale)
    k3, opt3 = ff.checkpoint.restore(tmp_path / "ckpt", fresh_target(True), flags="target")
    assert isinstance(k3.lengthscale, ff.FrozenParam)
    assert opt3[0].mu.lengthscale is None  # the saved moments of the frozen leaf are not read
    assert float(opt3[0].mu.variance) == float(opt[0].mu.variance)


def test_flattened_state_is_never_handed_to_another_parameter(tmp_path):
    tx = optax.flatten(optax.adam(0.1))
    a = {"a": jnp.ones(2), "b": ff.FrozenParam(jnp.ones(2))}
    state = tx.init(ff.trainable_tree(a))
    updates, state = tx.update({"a": jnp.ones(2), "b": None}, state)
    a = ff.apply_updates(a, updates)
    ff.checkpoint.save(tmp_path / "ckpt", (a, state))
    b = {"a": ff.FrozenParam(jnp.ones(2)), "b": jnp.ones(2)}  # same sizes, the other one trains
    target = (b, tx.init(ff.trainable_tree(b)))
    _, kept = ff.checkpoint.restore(tmp_path / "ckpt", target, flags="target")
    assert kept[0].mu.tolist() == [0.0, 0.0]  # fresh: a's moments are not b's
    assert int(kept[0].count) == 1
    tree, taken = ff.checkpoint.restore(tmp_path / "ckpt", target)
    assert taken[0].mu.tolist() == state[0].mu.tolist()  # the saved flags: a trains again
    assert not isinstance(tree["a"], ff.FrozenParam)
    assert isinstance(tree["b"], ff.FrozenParam)


def test_abstract_state_that_must_start_fresh_is_an_error(tmp_path):
    tx = optax.flatten(optax.adam(0.1))
    a = {"a": jnp.ones(2), "b": ff.FrozenParam(jnp.ones(2))}
    ff.checkpoint.save(tmp_path / "ckpt", (a, tx.init(ff.trainable_tree(a))))
    b = {"a": ff.FrozenParam(jnp.ones(2)), "b": jnp.ones(2)}
    target = (b, jax.eval_shape(tx.init, ff.trainable_tree(b)))
    with pytest.raises(ValueError, match=r"`target` optimizer state at '1/0/mu' belongs to no"):
        ff.checkpoint.restore(tmp_path / "ckpt", target, flags="target")


def test_moments_are_state_not_trainable_parameters(tmp_path):
    k, opt = trained(frozen=True)
    ff.checkpoint.save(tmp_path / "ckpt", (k, opt))
    flags = ff.checkpoint.read_flags(tmp_path / "ckpt")
    assert flags.trainable == {"0/variance"}
    assert flags.frozen == {"0/lengthscale"}
    rows = {r.path: r.status for r in ff.checkpoint.describe(tmp_path / "ckpt").rows}
    assert rows["1/0/mu/variance"] == rows["1/0/count"] == "state"
