"""What the one walk and the one status decide, seen the same way by every part of the package."""

import json

import jax.numpy as jnp
import numpy as np
import optax
import paramax
import pytest
from flax import nnx

import flax_freeze as ff


def test_unfreeze_makes_a_parameter_declared_frozen_in_a_pytree_a_param():
    tree = ff.unfreeze({"a": ff.FrozenParam(0.5), "b": ff.FrozenParam(jnp.ones(2))})
    assert type(tree["a"]) is nnx.Param
    assert tree["a"].get_raw_value() == 0.5
    assert type(tree["b"]) is nnx.Param
    np.testing.assert_array_equal(tree["b"].get_raw_value(), [1.0, 1.0])


def test_unfreeze_gives_back_the_bare_leaf_that_freeze_wrapped():
    frozen = ff.freeze({"a": 0.5, "b": jnp.ones(2)}, "a")
    assert type(frozen["a"]) is ff.FrozenParam
    back = ff.unfreeze(frozen)
    assert type(back["a"]) is float
    assert back["a"] == 0.5
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


def _pair(frozen_b: bool):
    a = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    b = nnx.Linear(4, 5, rngs=nnx.Rngs(1))
    if frozen_b:
        ff.freeze(b, "kernel")
    return a, b, ff.Optimizer(b, optax.adam(0.1))


def test_an_optimizer_is_restored_for_its_own_model_not_one_with_the_same_paths(tmp_path):
    a, b, opt_b = _pair(frozen_b=True)
    x = jnp.ones((3, 4))
    grads = ff.grad(lambda m: m(x).sum())(b)
    opt_b.update(b, grads)
    ff.checkpoint.save(tmp_path / "c", (a, b, opt_b))
    assert ff.checkpoint.read_flags(tmp_path / "c").owners == {"2": "1"}
    a2, b2, opt_b2 = ff.checkpoint.restore(tmp_path / "c", _pair(frozen_b=False))
    assert type(b2.kernel) is ff.FrozenParam
    assert type(a2.kernel) is nnx.Param
    assert opt_b2.trained_paths == (("bias",),)
    np.testing.assert_array_equal(
        opt_b2.opt_state[0].mu["bias"][...], opt_b.opt_state[0].mu["bias"][...]
    )
    assert opt_b2.opt_state[0].mu["bias"][...].shape == (5,)


def test_saved_in_any_order_the_optimizer_finds_its_model(tmp_path):
    a, b, opt_b = _pair(frozen_b=True)
    ff.checkpoint.save(tmp_path / "c", {"opt": opt_b, "a": a, "b": b})
    assert ff.checkpoint.read_flags(tmp_path / "c").owners == {"opt": "b"}
    a2, b2, opt2 = _pair(frozen_b=False)
    out = ff.checkpoint.restore(tmp_path / "c", {"opt": opt2, "a": a2, "b": b2})
    assert out["opt"].opt_state[0].mu["bias"][...].shape == (5,)


def test_a_checkpoint_without_owners_finds_the_model_in_the_target(tmp_path):
    a, b, opt_b = _pair(frozen_b=True)
    ff.checkpoint.save(tmp_path / "c", (a, b, opt_b))
    flags = tmp_path / "c" / "flags" / "metadata"
    data = json.loads(flags.read_text())
    del data["owners"]  # as earlier versions wrote it
    flags.write_text(json.dumps(data))
    _, b2, opt_b2 = ff.checkpoint.restore(tmp_path / "c", _pair(frozen_b=False))
    assert type(b2.kernel) is ff.FrozenParam
    assert opt_b2.opt_state[0].mu["bias"][...].shape == (5,)


def _without_owners(path):
    flags = path / "flags" / "metadata"
    data = json.loads(flags.read_text())
    del data["owners"]  # as earlier versions wrote it
    flags.write_text(json.dumps(data))


def test_without_owners_the_saved_state_shapes_pick_the_model(tmp_path):
    a, b, opt_b = _pair(frozen_b=True)
    ff.checkpoint.save(tmp_path / "c", (b, opt_b, a))
    _without_owners(tmp_path / "c")
    a2, b2, opt_b2 = _pair(frozen_b=False)
    b2, opt_b2, _ = ff.checkpoint.restore(tmp_path / "c", (b2, opt_b2, a2))
    assert opt_b2.opt_state[0].mu["bias"][...].shape == (5,)


def test_without_owners_two_models_that_fit_are_an_error_not_a_guess(tmp_path):
    tx = optax.adafactor(0.1, min_dim_size_to_factor=2)  # factored: no state of a kernel's shape
    a = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    b = ff.freeze(nnx.Linear(4, 5, rngs=nnx.Rngs(1)), "bias")
    ff.checkpoint.save(tmp_path / "c", (a, b, ff.Optimizer(b, tx)))
    _without_owners(tmp_path / "c")
    b2 = nnx.Linear(4, 5, rngs=nnx.Rngs(1))
    target = (nnx.Linear(2, 3, rngs=nnx.Rngs(0)), b2, ff.Optimizer(b2, tx))
    with pytest.raises(
        ValueError, match=r"several models the optimizer could belong to \(\[0, 1\]\)"
    ):
        ff.checkpoint.restore(tmp_path / "c", target)
    ff.checkpoint.save(tmp_path / "d", (a, b, ff.Optimizer(b, tx)))  # with owners: no doubt
    _, b3, opt3 = ff.checkpoint.restore(tmp_path / "d", target)
    assert type(b3.bias) is ff.FrozenParam
    assert opt3.trained_paths == (("kernel",),)


def test_malformed_owners_are_refused(tmp_path):
    _, b, opt_b = _pair(frozen_b=True)
    ff.checkpoint.save(tmp_path / "c", (b, opt_b))
    flags = tmp_path / "c" / "flags" / "metadata"
    data = json.loads(flags.read_text())
    data["owners"] = {"7": "0"}
    flags.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"malformed 'owners' entry: it names optimizers .*\[7\]"):
        ff.checkpoint.read_flags(tmp_path / "c")


def test_describe_takes_a_manager_directory_and_a_step(tmp_path):
    import orbax.checkpoint as ocp

    tree = {"w": jnp.ones(2), "b": ff.FrozenParam(jnp.ones(3))}
    with ocp.CheckpointManager(tmp_path) as manager:
        for step in (0, 1):
            manager.save(step, args=ff.checkpoint.save_args(tree))
        manager.wait_until_finished()
    latest = ff.checkpoint.describe(tmp_path)
    assert (latest.step, latest.directory) == (1, str(tmp_path / "1"))
    first = ff.checkpoint.describe(tmp_path, step=0)
    assert first.step == 0
    assert first.to_json()["step"] == 0
    assert [(r.path, r.status) for r in first.rows] == [("b", "frozen"), ("w", "trainable")]
    with pytest.raises(ValueError, match=r"`step` 5 is not a finished step of .*\[0, 1\]"):
        ff.checkpoint.describe(tmp_path, step=5)
    assert ff.checkpoint.describe(tmp_path / "1").step is None
