"""Tests for ff.checkpoint on Linen state: TrainState, variables and params dicts, boxes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_freeze as ff
from flax_freeze import linen as ffl
from helpers import ADAMW, CNN, CNN_X, CNNState, cnn_state, cnn_train

MODEL, PLAIN = CNN(), CNN(frozen_dense=False)


def frozen_paths(tree):
    return {r.path for r in ff.summary(tree).rows if r.status == "frozen"}


def flat(tree):
    return {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def assert_values(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def assert_same(a, b):
    """Same boxes, same optimizer-state structure, bit-identical values."""
    for part in ("params", "opt_state", "batch_stats"):
        x, y = getattr(a, part), getattr(b, part)
        assert jax.tree.structure(x) == jax.tree.structure(y), part
        assert_values(x, y)
    assert int(a.step) == int(b.step)


CONV = {"Conv_0/bias", "Conv_0/kernel"}


@pytest.mark.parametrize("abstract", [False, True], ids=["concrete", "abstract"])
def test_train_state_resumes_bit_exactly_in_an_all_trainable_target(tmp_path, abstract):
    state = cnn_train(cnn_state(MODEL, 0, frozen="Conv_0/.*"), 3)
    ff.checkpoint.save(tmp_path / "ckpt", state)
    expected = cnn_train(state, 2, start=3)
    target = jax.eval_shape(lambda: cnn_state(PLAIN, 5)) if abstract else cnn_state(PLAIN, 5)
    assert not frozen_paths(target.params)
    restored = ff.checkpoint.restore(tmp_path / "ckpt", target)
    assert type(restored) is CNNState
    assert frozen_paths(restored.params) == {*CONV, "Dense_0/kernel"}
    assert_same(restored, state)  # opt_state rebuilt for the saved trainable set
    assert_same(cnn_train(restored, 2, start=3), expected)


def test_flags_and_describe_of_a_train_state(tmp_path):
    state = cnn_train(cnn_state(MODEL, 0, frozen="Conv_0/.*"), 1)
    ff.checkpoint.save(tmp_path / "ckpt", state)
    flags = ff.checkpoint.read_flags(tmp_path / "ckpt")
    assert flags.frozen == {"params/Conv_0/bias", "params/Conv_0/kernel", "params/Dense_0/kernel"}
    assert flags.trainable == {
        "params/BatchNorm_0/bias",
        "params/BatchNorm_0/scale",
        "params/Dense_0/bias",
        "params/Dense_1/bias",
        "params/Dense_1/kernel",
    }
    assert flags.types["params/Dense_0/kernel"] == "flax_freeze._boxes.FrozenBox"
    assert flags.arrays["params/Dense_0/kernel"] == ((4, 8), "float32")  # unboxed, its own path
    assert flags.arrays["step"] == ((), "int32")
    rows = {r.path: r for r in ff.checkpoint.describe(tmp_path / "ckpt").rows}
    assert {rows[p].status for p in ("step", "batch_stats/BatchNorm_0/mean")} == {"state"}
    assert rows["opt_state/0/mu/Dense_1/kernel"].status == "state"
    assert "opt_state/0/mu/Dense_0/kernel" not in rows  # no optimizer state for frozen ones


def test_restore_unfreezes_what_was_saved_trainable(tmp_path):
    state = cnn_train(cnn_state(PLAIN, 0, frozen="Dense_1/.*"), 2)
    ff.checkpoint.save(tmp_path / "ckpt", state)
    expected = cnn_train(state, 2, start=2)
    target = cnn_state(MODEL, 3, frozen="(Conv_0|BatchNorm_0)/.*")
    assert frozen_paths(target.params) == {
        *CONV,
        "BatchNorm_0/bias",
        "BatchNorm_0/scale",
        "Dense_0/kernel",
    }
    restored = ff.checkpoint.restore(tmp_path / "ckpt", target)
    assert frozen_paths(restored.params) == {"Dense_1/bias", "Dense_1/kernel"}
    assert_same(restored, state)
    assert_same(cnn_train(restored, 2, start=2), expected)


def test_flags_target_keeps_the_boxes_and_migrates_the_optimizer_state(tmp_path):
    state = cnn_train(cnn_state(MODEL, 0, frozen="Conv_0/.*"), 2)
    ff.checkpoint.save(tmp_path / "ckpt", state)
    target = cnn_state(MODEL, 4)  # only Dense_0/kernel frozen
    restored = ff.checkpoint.restore(tmp_path / "ckpt", target, flags="target")
    assert frozen_paths(restored.params) == {"Dense_0/kernel"}
    assert_values(ffl.unfreeze(restored.params), ffl.unfreeze(state.params))
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(target.opt_state)
    adam, saved = restored.opt_state[0], state.opt_state[0]
    assert int(adam.count) == 2
    assert not np.asarray(adam.mu["Conv_0"]["kernel"]).any()  # newly trainable: fresh state
    np.testing.assert_array_equal(adam.nu["Dense_1"]["kernel"], saved.nu["Dense_1"]["kernel"])
    assert int(cnn_train(restored, 1, start=2).step) == 3


def test_whole_variables_dict_and_bare_params_dict(tmp_path):
    variables = ffl.freeze(
        MODEL.init(jax.random.key(0), CNN_X), ff.PathRegex("params/Conv_0/kernel")
    )
    ff.checkpoint.save(tmp_path / "vars", variables)
    flags = ff.checkpoint.read_flags(tmp_path / "vars")
    assert flags.frozen == {"params/Conv_0/kernel", "params/Dense_0/kernel"}
    assert not {"batch_stats/BatchNorm_0/mean", "batch_stats/BatchNorm_0/var"} & (
        flags.frozen | flags.trainable
    )
    restored = ff.checkpoint.restore(tmp_path / "vars", PLAIN.init(jax.random.key(1), CNN_X))
    assert frozen_paths(restored) == {"params/Conv_0/kernel", "params/Dense_0/kernel"}
    assert_values(restored, variables)
    # The params dict alone: frozen where it was saved frozen, trainable elsewhere.
    ff.checkpoint.save(tmp_path / "params", variables["params"])
    all_frozen = ffl.freeze(PLAIN.init(jax.random.key(2), CNN_X)["params"])
    restored = ff.checkpoint.restore(tmp_path / "params", all_frozen)
    assert frozen_paths(restored) == {"Conv_0/kernel", "Dense_0/kernel"}
    plain = ff.checkpoint.restore(
        tmp_path / "params", PLAIN.init(jax.random.key(2), CNN_X)["params"]
    )
    assert isinstance(plain["Conv_0"]["kernel"], ffl.FrozenBox)  # a Linen box, not a FrozenParam
    assert_values(plain, variables["params"])
    kept = ff.checkpoint.restore(tmp_path / "params", all_frozen, flags="target")
    assert jax.tree.structure(kept) == jax.tree.structure(all_frozen)


class Boxed(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        outer = ffl.frozen(nn.with_partitioning(init, (None, "model")))
        inner = nn.with_partitioning(ffl.frozen(init), ("model", None))
        x = nn.Dense(8, kernel_init=outer, name="outer")(x)
        x = nn.Dense(8, kernel_init=inner, name="inner")(x)
        return nn.Dense(2, kernel_init=nn.with_partitioning(init, ("model", None)), name="plain")(x)


def specs(params):
    return {k: params[k]["kernel"].get_partition_spec() for k in ("outer", "inner", "plain")}


def test_partitioned_boxes_inside_and_outside_frozen_boxes_keep_their_names(tmp_path):
    x = jnp.ones((2, 3))
    params = Boxed().init(jax.random.key(0), x)["params"]
    names = specs(params)
    state = ffl.TrainState.create(apply_fn=Boxed().apply, params=params, tx=ADAMW)
    ff.checkpoint.save(tmp_path / "ckpt", state)
    flags = ff.checkpoint.read_flags(tmp_path / "ckpt")
    assert flags.frozen == {"params/outer/kernel", "params/inner/kernel"}
    assert flags.types["params/inner/kernel"] == "flax.core.meta.Partitioned"
    assert "params/plain/kernel" in flags.arrays  # no '/value' levels
    # Into a target that trains everything and one that freezes everything.
    for target_params in (ffl.unfreeze(params), ffl.freeze(params)):
        target = ffl.TrainState.create(apply_fn=Boxed().apply, params=target_params, tx=ADAMW)
        restored = ff.checkpoint.restore(tmp_path / "ckpt", target)
        assert frozen_paths(restored.params) == {"outer/kernel", "inner/kernel"}
        assert specs(restored.params) == names
        assert isinstance(restored.params["plain"]["kernel"], nn.Partitioned)
        assert_values(restored.params, params)
        assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state.opt_state)
        assert_values(restored.opt_state, state.opt_state)
    kept = ff.checkpoint.restore(tmp_path / "ckpt", target, flags="target")
    assert frozen_paths(kept.params) == frozen_paths(target.params)  # everything
    assert len(frozen_paths(kept.params)) == 6
    assert specs(kept.params) == names
