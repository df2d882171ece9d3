"""What the one walk and the one status decide, seen the same way by every part of the package."""

import jax.numpy as jnp
import numpy as np
import optax
import paramax
from flax import nnx

import flax_freeze as ff


def test_unfreeze_makes_a_parameter_declared_frozen_in_a_pytree_a_param():
    tree = ff.unfreeze({"a": ff.FrozenParam(0.5), "b": ff.FrozenParam(jnp.ones(2))})
    assert type(tree["a"]) is nnx.Param and tree["a"].get_raw_value() == 0.5
    assert type(tree["b"]) is nnx.Param
    np.testing.assert_array_equal(tree["b"].get_raw_value(), [1.0, 1.0])


def test_unfreeze_gives_back_the_bare_leaf_that_freeze_wrapped():
    frozen = ff.freeze({"a": 0.5, "b": jnp.ones(2)}, "a")
    assert type(frozen["a"]) is ff.FrozenParam
    back = ff.unfreeze(frozen)
    assert back["a"] == 0.5 and type(back["a"]) is float
    assert isinstance(back["b"], type(jnp.ones(2)))


def test_a_leaf_frozen_by_restore_unfreezes_to_the_bare_leaf(tmp_path):
    ff.checkpoint.save(tmp_path / "c", ff.freeze({"w": jnp.ones(2), "v": jnp.zeros(3)}, "w"))
    restored = ff.checkpoint.restore(tmp_path / "c", {"w": jnp.zeros(2), "v": jnp.ones(3)})
    assert type(restored["w"]) is ff.FrozenParam
    back = ff.unfreeze(restored)
    assert isinstance(back["w"], type(jnp.ones(2)))
    np.testing.assert_array_equal(back["w"], [1.0, 1.0])


def test_inside_a_paramax_wrapper_parameters_are_frozen_for_summary_and_checkpoint(tmp_path):
    tree = {
        "fixed": paramax.NonTrainable({"p": nnx.Param(jnp.ones(2)), "n": jnp.asarray(3)}),
        "w": jnp.ones(4),
    }
    rows = {r.path: (r.type, r.status) for r in ff.summary(tree).rows}
    assert rows == {
        "fixed/tree/n": ("NonTrainable", "state"),
        "fixed/tree/p": ("Param", "frozen"),
        "w": ("Array", "trainable"),
    }
    ff.checkpoint.save(tmp_path / "c", tree)
    flags = ff.checkpoint.read_flags(tmp_path / "c")
    assert (sorted(flags.frozen), sorted(flags.trainable)) == (["fixed/tree/p"], ["w"])
    restored = ff.checkpoint.restore(tmp_path / "c", tree)
    assert type(restored["fixed"].tree["p"]) is nnx.Param  # the wrapper freezes it, not a re-type


def test_grad_and_optimizer_state_skip_what_the_summary_calls_frozen():
    tree = {"w": jnp.ones(3), "b": ff.FrozenParam(jnp.ones(2)), "n": 4}
    grads = ff.grad(lambda t: (t["w"].sum() + t["b"].sum()) * t["n"])(tree)
    state = optax.adam(0.1).init(ff.trainable_tree(tree))
    statuses = {r.path: r.status for r in ff.summary(tree).rows}
    assert statuses == {"b": "frozen", "n": "state", "w": "trainable"}
    assert (grads["b"], grads["n"]) == (None, None)
    np.testing.assert_array_equal(grads["w"], [4.0, 4.0, 4.0])
    assert {k: v is None for k, v in state[0].mu.items()} == {"b": True, "n": True, "w": False}
