"""Tests for ff.checkpoint: flags, manager args, interop, sharding, errors, crashes."""

import dataclasses
import json
import pickle
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_freeze as ff
from flax_freeze import checkpoint as ffc
from helpers import (
    FROZEN0,
    Net,
    assert_same,
    child_env,
    flags_json,
    loss_fn,
    net_and_optimizer,
    plain_standard,
    saved,
    variable_types,
    variable_values,
    write_flags,
)

X = jax.random.normal(jax.random.key(0), (16, 3))
Y = jax.random.normal(jax.random.key(1), (16, 2))


@nnx.jit
def train_step(model, opt, x, y):
    loss, grads = ff.value_and_grad(loss_fn)(model, x, y)
    opt.update(model, grads)
    return loss


# --- save / restore: modules, flags -------------------------------------------------------


def test_module_round_trip_restores_flags_in_place(tmp_path):
    model = ff.freeze(Net(0), FROZEN0)
    ff.checkpoint.save(tmp_path / "ckpt", model)
    target = Net(1)
    restored = ff.checkpoint.restore(tmp_path / "ckpt", target)
    assert restored is target
    assert variable_types(target) == variable_types(model)
    assert variable_types(target)["layers/0/kernel"] == "FrozenParam"
    assert_same(target, model)


def test_flags_target_keeps_the_targets_types(tmp_path):
    ff.checkpoint.save(tmp_path / "ckpt", ff.freeze(Net(0), FROZEN0))
    target = ff.freeze(Net(1), ff.PathRegex("layers/1/.*"))
    before = variable_types(target)
    ff.checkpoint.restore(tmp_path / "ckpt", target, flags="target")
    assert variable_types(target) == before
    assert_same(target, ff.freeze(Net(0), FROZEN0))


def test_unfrozen_in_checkpoint_unfreezes_target(tmp_path):
    ff.checkpoint.save(tmp_path / "ckpt", Net(0))
    target = ff.freeze(Net(1))
    ff.checkpoint.restore(tmp_path / "ckpt", target)
    assert set(variable_types(target).values()) >= {"Param"}
    assert "FrozenParam" not in variable_types(target).values()


def test_flags_records_paths_and_types(tmp_path):
    ff.checkpoint.save(tmp_path / "ckpt", ff.freeze(Net(0), FROZEN0))
    flags = ff.checkpoint.read_flags(tmp_path / "ckpt")
    assert flags.frozen == {"layers/0/bias", "layers/0/kernel"}
    assert flags.trainable == {"layers/1/bias", "layers/1/kernel", "norm/bias", "norm/scale"}
    assert flags.types["norm/mean"] == "flax.nnx.variablelib.BatchStat"
    assert flags.keys == {"drop/rngs/key": "threefry2x32"}
    data = json.loads((tmp_path / "ckpt" / "flags" / "metadata").read_text())
    assert data["format"] == ffc.FORMAT
    assert data["version"] == 3
    assert data["base"] == {}
    assert re.fullmatch(r"[0-9a-f]{32}", data["save_id"])
    assert set(data["checksums"]) == set(data["arrays"])


class LoRANet(nnx.Module):
    def __init__(self, seed=0):
        self.a = nnx.LoRAParam(jax.random.normal(jax.random.key(seed), (3, 2)))
        self.b = nnx.Param(jnp.zeros(2))


def test_lora_param_type_survives_round_trips(tmp_path):
    model = ff.freeze(LoRANet(0), ff.PathRegex("a"))
    ff.checkpoint.save(tmp_path / "ckpt", model)
    assert ff.checkpoint.read_flags(tmp_path / "ckpt").param_types == {
        "a": "flax.nnx.nn.lora.LoRAParam"
    }
    # A target declaring the parameter frozen learns its trainable type.
    declared = LoRANet(1)
    declared.a = ff.FrozenParam(declared.a[...])
    ff.checkpoint.restore(tmp_path / "ckpt", declared)
    assert type(ff.unfreeze(declared).a) is nnx.LoRAParam
    # Saved trainable as LoRAParam, restored into a declared-frozen target.
    ff.checkpoint.save(tmp_path / "lora", LoRANet(0))
    declared = LoRANet(1)
    declared.a = ff.FrozenParam(declared.a[...])
    ff.checkpoint.restore(tmp_path / "lora", declared)
    assert type(declared.a) is nnx.LoRAParam


def test_parameters_frozen_in_lower_precision(tmp_path):
    model = ff.freeze(Net(0), FROZEN0, dtype=jnp.bfloat16)
    ff.checkpoint.save(tmp_path / "ckpt", model)
    flags = ff.checkpoint.read_flags(tmp_path / "ckpt")
    assert flags.trained_dtypes == {"layers/0/bias": "float32", "layers/0/kernel": "float32"}
    assert flags.arrays["layers/0/kernel"] == ((3, 4), "bfloat16")
    # A float32 target is re-typed to the saved flags and precision ...
    for target in (Net(1), nnx.eval_shape(lambda: Net(1))):
        restored = ff.checkpoint.restore(tmp_path / "ckpt", target)
        assert restored.layers[0].kernel[...].dtype == jnp.bfloat16
        assert_same(restored, model)
        assert ff.unfreeze(restored).layers[0].kernel[...].dtype == jnp.float32
    # ... or keeps its own, the saved values cast up.
    kept = ff.checkpoint.restore(tmp_path / "ckpt", Net(1), flags="target")
    assert isinstance(kept.layers[0].kernel, nnx.Param)
    np.testing.assert_array_equal(
        kept.layers[0].kernel[...], model.layers[0].kernel[...].astype(jnp.float32)
    )
    # The other way: a target frozen in bfloat16 takes the saved float32 trainable values.
    trained = Net(0)
    ff.checkpoint.save(tmp_path / "f32", trained)
    for target in (
        ff.freeze(Net(1), FROZEN0, dtype=jnp.bfloat16),
        nnx.eval_shape(lambda: ff.freeze(Net(1), FROZEN0, dtype=jnp.bfloat16)),
    ):
        restored = ff.checkpoint.restore(tmp_path / "f32", target)
        assert isinstance(restored.layers[0].kernel, nnx.Param)
        assert_same(restored, trained)
    kept = ff.checkpoint.restore(
        tmp_path / "f32", ff.freeze(Net(1), FROZEN0, dtype=jnp.bfloat16), flags="target"
    )
    assert kept.layers[0].kernel[...].dtype == jnp.bfloat16
    assert ff.unfreeze(kept).layers[0].kernel[...].dtype == jnp.float32
    # Saved frozen in float32: a bfloat16-frozen target holds float32 from then on.
    ff.checkpoint.save(tmp_path / "frozen32", ff.freeze(Net(0), FROZEN0))
    restored = ff.checkpoint.restore(
        tmp_path / "frozen32", ff.freeze(Net(1), FROZEN0, dtype=jnp.bfloat16)
    )
    assert restored.layers[0].kernel[...].dtype == jnp.float32
    assert not restored.layers[0].kernel.has_metadata("trained_dtype")
    # Unrelated dtypes still differ.
    with pytest.raises(
        ValueError,
        match=r"layers/0/kernel \(checkpoint \(3, 4\) bfloat16, target \(3, 4\) float16\)",
    ):
        ff.checkpoint.restore(tmp_path / "ckpt", ff.freeze(Net(1), FROZEN0, dtype=jnp.float16))


def test_model_and_optimizer_with_lower_precision_frozen_part(tmp_path):
    model = Net(0)
    ff.freeze(model, FROZEN0, dtype=jnp.bfloat16)
    opt = ff.Optimizer(model, optax.adamw(0.05, weight_decay=0.1))
    train(model, opt, 2)
    ff.checkpoint.save(tmp_path / "ckpt", (model, opt))
    train(model, opt, 2, start=2)
    model2, opt2 = ff.checkpoint.restore(tmp_path / "ckpt", net_and_optimizer(4, frozen=False))
    train(model2, opt2, 2, start=2)
    assert_same(model2, model)
    assert_same(opt2, opt)


def test_tied_variable_is_stored_once_and_stays_tied(tmp_path):
    class Tied(nnx.Module):
        def __init__(self):
            self.enc = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
            self.dec = nnx.Linear(2, 2, rngs=nnx.Rngs(1))
            self.dec.kernel = self.enc.kernel

    model = ff.freeze(Tied(), ff.PathRegex("enc/kernel"))
    ff.checkpoint.save(tmp_path / "ckpt", model)
    assert ff.checkpoint.read_flags(tmp_path / "ckpt").frozen == {"dec/kernel"}  # the least path
    target = Tied()
    ff.checkpoint.restore(tmp_path / "ckpt", target)
    assert target.dec.kernel is target.enc.kernel
    assert isinstance(target.dec.kernel, ff.FrozenParam)
    np.testing.assert_array_equal(target.enc.kernel[...], model.enc.kernel[...])


def test_abstract_target_from_eval_shape(tmp_path):
    model = ff.freeze(Net(0), FROZEN0)
    ff.checkpoint.save(tmp_path / "ckpt", model)
    abstract = nnx.eval_shape(lambda: Net(5))
    restored = ff.checkpoint.restore(tmp_path / "ckpt", abstract)
    assert variable_types(restored) == variable_types(model)
    assert_same(restored, model)
    out = restored(X)  # usable: RNG key restored as a key
    assert out.shape == (16, 2)


# --- optimizers ---------------------------------------------------------------------------


def train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        train_step(model, opt, X + i, Y)


@pytest.mark.parametrize("abstract", [False, True], ids=["concrete", "abstract"])
def test_model_and_optimizer_resume_bit_exactly(tmp_path, abstract):
    model, opt = net_and_optimizer()
    train(model, opt, 3)
    ff.checkpoint.save(tmp_path / "ckpt", (model, opt))
    train(model, opt, 3, start=3)
    # A fresh, all-trainable model and optimizer: the flags and the optimizer
    # structure come from the checkpoint.
    if abstract:
        target = nnx.eval_shape(lambda: net_and_optimizer(7, frozen=False))
    else:
        target = net_and_optimizer(7, frozen=False)
    model2, opt2 = ff.checkpoint.restore(tmp_path / "ckpt", target)
    assert opt2.trained_paths == opt.trained_paths
    assert sorted(opt2.opt_state[0].mu["layers"].keys()) == [1]
    assert int(opt2.step[...]) == 3
    train(model2, opt2, 3, start=3)
    assert variable_types(model2) == variable_types(model)
    assert_same(model2, model)
    assert_same(opt2, opt)


def test_flags_target_lets_the_optimizer_migrate(tmp_path):
    model, opt = net_and_optimizer()
    train(model, opt, 2)
    ff.checkpoint.save(tmp_path / "ckpt", (model, opt))
    model2, opt2 = ff.checkpoint.restore(
        tmp_path / "ckpt", net_and_optimizer(3, frozen=False), flags="target"
    )
    assert "FrozenParam" not in variable_types(model2).values()
    assert opt2.trained_paths == opt.trained_paths  # the saved state, for the saved set
    train(model2, opt2, 1)  # migrates: layers/0 now trains with fresh state
    assert sorted(opt2.opt_state[0].mu["layers"].keys()) == [0, 1]


def test_model_part_of_a_model_and_optimizer_checkpoint(tmp_path):
    model, opt = net_and_optimizer()
    train(model, opt, 1)
    ff.checkpoint.save(tmp_path / "ckpt", (model, opt))
    with pytest.warns(ff.checkpoint.PartialRestoreWarning, match=r"ignored.*\[1/opt_state/0/count"):
        (restored,) = ff.checkpoint.restore(tmp_path / "ckpt", (Net(3),), partial=True)
    assert variable_types(restored) == variable_types(model)
    assert_same(restored, model)


def test_optimizer_alone_with_other_trained_set_needs_its_model(tmp_path):
    model, opt = net_and_optimizer()
    ff.checkpoint.save(tmp_path / "ckpt", opt)
    _, other = net_and_optimizer(frozen=False)
    with pytest.raises(
        ValueError,
        match=r"optimizer \(the target itself\) was saved training \[layers/1/bias.*holds no"
        r".*Restore the optimizer together with its model",
    ):
        ff.checkpoint.restore(tmp_path / "ckpt", other)
    _, same = net_and_optimizer(2)
    restored = ff.checkpoint.restore(tmp_path / "ckpt", same)
    assert restored is same
    assert_same(same, opt)


# --- pytrees ------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RBFWithSteps:
    variance: object
    lengthscale: object
    steps: int


def test_pytree_round_trip_with_frozen_leaves_and_numbers(tmp_path):
    tree = {
        "k": RBFWithSteps(1.25, ff.FrozenParam(jnp.array([0.5, 2.0])), 7),
        "n": np.arange(3, dtype=np.int32),
        "s": np.float32(2.5),
        "t": {(1, 2): jnp.ones(2)},
    }
    ff.checkpoint.save(tmp_path / "ckpt", tree)
    flags = ff.checkpoint.read_flags(tmp_path / "ckpt")
    assert flags.frozen == {"k/lengthscale"}
    assert flags.trainable == {"k/variance", "s", "t/(1, 2)"}
    target = {
        "k": RBFWithSteps(0.0, jnp.zeros(2), 0),
        "n": np.zeros(3, np.int32),
        "s": np.float32(0),
        "t": {(1, 2): jnp.zeros(2)},
    }
    out = ff.checkpoint.restore(tmp_path / "ckpt", target)
    assert out["k"].variance == 1.25
    assert type(out["k"].variance) is float
    assert out["k"].steps == 7
    assert type(out["k"].steps) is int
    assert isinstance(out["k"].lengthscale, ff.FrozenParam)
    assert out["k"].lengthscale[...].tolist() == [0.5, 2.0]
    assert isinstance(out["n"], np.ndarray)
    assert out["n"].tolist() == [0, 1, 2]
    assert out["s"] == np.float32(2.5)
    assert isinstance(out["s"], np.float32)
    assert out["t"][(1, 2)].tolist() == [1.0, 1.0]
    # flags="target" leaves the bare leaf bare; re-typing the other way unwraps.
    assert not isinstance(
        ff.checkpoint.restore(tmp_path / "ckpt", target, flags="target")["k"].lengthscale,
        ff.FrozenParam,
    )
    ff.checkpoint.save(tmp_path / "plain", {"a": 1.0})
    assert ff.checkpoint.restore(tmp_path / "plain", {"a": ff.FrozenParam(0.0)}) == {"a": 1.0}


# --- plain Flax / orbax interop -----------------------------------------------------------


def plain_pure_dict(path, model):
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, nnx.to_pure_dict(nnx.state(model)))


def plain_manager(path, model):
    with ocp.CheckpointManager(path.parent / "mngr") as mngr:
        mngr.save(3, args=ocp.args.StandardSave(nnx.state(model)))
        mngr.wait_until_finished()
    (path.parent / "mngr" / "3").rename(path)


@pytest.mark.parametrize("writer", [plain_standard, plain_pure_dict, plain_manager])
def test_plain_checkpoint_restores_keeping_target_flags(tmp_path, writer):
    pretrained = Net(0)
    writer(tmp_path / "plain", pretrained)
    assert ff.checkpoint.read_flags(tmp_path / "plain") is None
    target = ff.freeze(Net(1), FROZEN0)  # fine-tune with a frozen first layer
    before = variable_types(target)
    ff.checkpoint.restore(tmp_path / "plain", target)
    assert variable_types(target) == before
    assert_same(target, ff.freeze(pretrained, FROZEN0))


def test_flax_freeze_checkpoint_restores_with_plain_orbax(tmp_path):
    model = ff.freeze(Net(0), FROZEN0)
    ff.checkpoint.save(tmp_path / "ckpt", model)
    # The recipe of the module docstring: a plain Flax model, orbax alone.
    abstract = nnx.eval_shape(lambda: Net(1))
    graphdef, state = nnx.split(abstract)
    with ocp.StandardCheckpointer() as checkpointer:
        pure = checkpointer.restore(tmp_path / "ckpt" / "state", nnx.to_pure_dict(state))
    key = pure["drop"]["rngs"]["key"]
    pure["drop"]["rngs"]["key"] = jax.random.wrap_key_data(key)  # keys come back as key data
    nnx.replace_by_pure_dict(state, pure)
    plain = nnx.merge(graphdef, state)
    assert "FrozenParam" not in variable_types(plain).values()
    assert_same(plain, ff.unfreeze(model))


# --- sharding -----------------------------------------------------------------------------


class Sharded(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(
            4,
            8,
            kernel_metadata={"out_sharding": ("data", "model")},
            bias_metadata={"out_sharding": ("model",)},
            rngs=rngs,
        )
        self.head = nnx.Linear(8, 2, rngs=rngs)


def test_abstract_target_without_shardings_gets_them_from_metadata(tmp_path):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        model = ff.freeze(Sharded(nnx.Rngs(0)), ff.PathRegex("dense/.*"))
    ff.checkpoint.save(tmp_path / "ckpt", model)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Sharded(nnx.Rngs(1)))
    assert abstract.dense.kernel.get_raw_value().sharding is None
    with pytest.raises(
        ValueError, match=r"dense/bias.*out_sharding=\('model',\).*names no mesh.*jax.set_mesh"
    ):
        ff.checkpoint.restore(tmp_path / "ckpt", abstract)
    with jax.set_mesh(mesh):
        restored = ff.checkpoint.restore(tmp_path / "ckpt", abstract)
    assert restored.dense.kernel[...].sharding == NamedSharding(mesh, P("data", "model"))
    assert restored.dense.bias[...].sharding == NamedSharding(mesh, P("model"))
    assert restored.head.kernel[...].sharding == NamedSharding(mesh, P())
    assert isinstance(restored.dense.kernel, ff.FrozenParam)
    assert_same(restored, model)
    # The variable's own mesh metadata needs no context.
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Sharded(nnx.Rngs(1)))
    for v in (abstract.dense.kernel, abstract.dense.bias):
        v.set_metadata("mesh", mesh)
    restored = ff.checkpoint.restore(tmp_path / "ckpt", abstract)
    assert restored.dense.kernel[...].sharding == NamedSharding(mesh, P("data", "model"))


def test_abstract_mesh_of_explicit_axes_is_made_concrete(tmp_path):
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    with jax.set_mesh(mesh):
        model = Sharded(nnx.Rngs(0))
        abstract = nnx.eval_shape(lambda: Sharded(nnx.Rngs(1)))
    ff.checkpoint.save(tmp_path / "ckpt", model)
    restored = ff.checkpoint.restore(tmp_path / "ckpt", abstract)  # outside the mesh context
    sharding = restored.dense.kernel[...].sharding
    assert sharding.spec == P("data", "model")
    assert sharding.mesh.shape == mesh.shape
    too_big = jax.sharding.AbstractMesh((16,), ("x",))
    target = {"w": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=NamedSharding(too_big, P()))}
    ff.checkpoint.save(tmp_path / "w", {"w": jnp.ones(3)})
    with pytest.raises(
        ValueError, match=r"'w' on the abstract mesh.*Restore inside `with jax.set_mesh"
    ):
        ff.checkpoint.restore(tmp_path / "w", target)


def test_concrete_targets_keep_their_shardings_also_for_rebuilt_optimizer_state(tmp_path):
    mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[4:])
    model, opt = net_and_optimizer()
    ff.checkpoint.save(tmp_path / "ckpt", (model, opt))
    target_model, target_opt = net_and_optimizer(1, frozen=False)
    kernel = NamedSharding(mesh, P(None, "x"))
    target_model.layers[1].kernel.set_raw_value(
        jax.device_put(jnp.zeros((4, 2)), NamedSharding(mesh, P("x")))
    )
    target_model.layers[0].kernel.set_raw_value(
        jax.device_put(target_model.layers[0].kernel[...], kernel)
    )
    target_opt = ff.Optimizer(target_model, optax.adamw(0.05, weight_decay=0.1))
    ff.checkpoint.restore(tmp_path / "ckpt", (target_model, target_opt))
    assert target_model.layers[0].kernel[...].sharding == kernel
    assert target_model.layers[1].kernel[...].sharding == NamedSharding(mesh, P("x"))
    mu = target_opt.opt_state[0].mu["layers"][1]["kernel"]
    assert mu[...].sharding == NamedSharding(mesh, P("x"))  # rebuilt, placed like its parameter
    assert_same(target_opt, opt)


# --- errors -------------------------------------------------------------------------------


def test_shape_mismatch_names_the_path_and_both_shapes(tmp_path):
    ff.checkpoint.save(tmp_path / "ckpt", Net(0))
    with pytest.raises(
        ValueError,
        match=r"shapes or dtypes differ at 7 path\(s\): "
        r"\[layers/0/bias \(checkpoint \(4,\) float32, target \(5,\) float32\)",
    ):
        ff.checkpoint.restore(tmp_path / "ckpt", Net(0, width=5))


def test_dtype_and_key_mismatches(tmp_path):
    path = saved(tmp_path, {"w": jnp.ones(2), "k": jax.random.key(0)})
    with pytest.raises(
        ValueError, match=r"w \(checkpoint \(2,\) float32, target \(2,\) bfloat16\)"
    ):
        ff.checkpoint.restore(path, {"w": jnp.ones(2, jnp.bfloat16), "k": jax.random.key(1)})
    with pytest.raises(
        ValueError, match=r"k \(checkpoint \(\) key<threefry2x32>, target \(\) key<rbg>\)"
    ):
        ff.checkpoint.restore(path, {"w": jnp.ones(2), "k": jax.random.key(1, impl="rbg")})
    with pytest.raises(
        ValueError, match=r"k \(checkpoint \(\) key<threefry2x32>, target \(2,\) uint32\)"
    ):
        ff.checkpoint.restore(path, {"w": jnp.ones(2), "k": jnp.zeros(2, jnp.uint32)})


def test_missing_paths_both_ways_and_partial(tmp_path):
    path = saved(tmp_path)
    target = {"a": jnp.zeros(3), "c": jnp.full(2, 7.0)}
    with pytest.raises(
        ValueError,
        match=r"Missing from the checkpoint: \[c\]; not in the target: \[b\]\. Pass partial=True",
    ):
        ff.checkpoint.restore(path, target)
    with pytest.warns(
        ff.checkpoint.PartialRestoreWarning,
        match=r"Restored 1 path.*\(missing from the checkpoint\): \[c\]; "
        r"ignored \(not in the target\): \[b\]",
    ):
        out = ff.checkpoint.restore(path, target, partial=True)
    assert out["a"].tolist() == [1.0] * 3
    assert out["c"].tolist() == [7.0, 7.0]
    with pytest.raises(
        ValueError, match=r"No path of `target` \(dict\) is in checkpoint.*even with partial=True"
    ):
        ff.checkpoint.restore(path, {"z": jnp.zeros(3)}, partial=True)
    abstract = {
        "a": jax.ShapeDtypeStruct((3,), jnp.float32),
        "c": jax.ShapeDtypeStruct((2,), jnp.float32),
    }
    with pytest.raises(
        ValueError, match=r"partial=True would leave abstract values of `target` unfilled at \[c\]"
    ):
        ff.checkpoint.restore(path, abstract, partial=True)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: "{not json", r"flags item of checkpoint .* is not valid JSON"),
        (lambda d: {**d, "format": "other"}, r"is not a flax_freeze flags item \(format 'other'\)"),
        (lambda d: [1], r"is not a flax_freeze flags item \(format 'list'\)"),
        (lambda d: {**d, "version": 4}, r"has version 4; this flax_freeze reads version 3"),
        (lambda d: {**d, "frozen": "b"}, r"has a malformed 'frozen' entry: 'b'"),
        (lambda d: {**d, "types": {"a": 1}}, r"has a malformed 'types' entry"),
        (lambda d: {**d, "optimizers": []}, r"has a malformed 'optimizers' entry: \[\]"),
        (lambda d: {**d, "optimizers": {"": [["a", 1.5]]}}, r"malformed 'optimizers' entry for ''"),
        (
            lambda d: {**d, "frozen": ["b", "nope/kernel"]},
            r"names paths that are neither in its state item nor in its base: \[nope/kernel\]",
        ),
        (
            lambda d: {**d, "param_types": {"a": "x.LoRAParam"}},
            r"gives trainable types for paths that are not frozen: \[a\]",
        ),
        (
            lambda d: {**d, "trained_dtypes": {"a": "float32"}},
            r"gives trainable dtypes for paths that are not frozen: \[a\]",
        ),
        (
            lambda d: {**d, "trained_dtypes": {"b": "f99"}},
            r"has a malformed 'trained_dtypes' entry \(parameters are trained in floating "
            r"dtypes\): \{'b': 'f99'\}",
        ),
        (
            lambda d: {**d, "trainable": ["a", "b"]},
            r"lists paths as both frozen and trainable: \[b\]",
        ),
        (lambda d: {**d, "arrays": [1]}, r"has a malformed 'arrays' entry: \[1\]"),
        (
            lambda d: {**d, "arrays": {**d["arrays"], "a": {"shape": [3], "dtype": "f99"}}},
            r"malformed 'arrays' entry for 'a': \{'shape': \[3\], 'dtype': 'f99'\}",
        ),
        (
            lambda d: {
                **d,
                "arrays": {**d["arrays"], "c": {"shape": [], "dtype": "int32"}},
                "checksums": {**d["checksums"], "c": "crc32:" + "0" * 8},
            },
            r"does not list the arrays its state item holds: listed but not stored \[c\], "
            r"stored but not listed \[\]",
        ),
    ],
    ids=[
        "not-json",
        "format",
        "not-a-dict",
        "version",
        "frozen",
        "types",
        "optimizers",
        "optimizer-path",
        "unknown-paths",
        "param-types",
        "trained-dtypes",
        "trained-dtype-name",
        "both",
        "arrays",
        "array-dtype",
        "arrays-differ",
    ],
)
def test_bad_flags_items(tmp_path, edit, match):
    path = saved(tmp_path)
    write_flags(path, edit(flags_json(path)))
    with pytest.raises(ValueError, match=match):
        ff.checkpoint.restore(path, {"a": jnp.zeros(3), "b": jnp.zeros(2)})


def test_damaged_checkpoints(tmp_path):
    path = saved(tmp_path)
    (path / "flags" / "metadata").unlink()
    with pytest.raises(ValueError, match=r"flags item of checkpoint .* has no JSON file"):
        ff.checkpoint.read_flags(path)
    path = saved(tmp_path, name="other")
    (path / "state" / "_METADATA").write_text("garbage")
    with pytest.raises(
        ValueError, match=r"The array metadata of checkpoint '.*other' is not valid JSON"
    ):
        ff.checkpoint.restore(path, {"a": jnp.zeros(3), "b": jnp.zeros(2)})


def test_directories_that_are_not_checkpoints(tmp_path):
    target = {"a": jnp.zeros(3)}
    with pytest.raises(FileNotFoundError, match=r"`directory` '.*nowhere' does not exist\.$"):
        ff.checkpoint.restore(tmp_path / "nowhere", target)
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        ValueError, match=r"`directory` '.*file' is a file, not a checkpoint directory"
    ):
        ff.checkpoint.restore(tmp_path / "file", target)
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ValueError, match=r"'.*empty' is not an orbax checkpoint: it has neither a 'state' item"
    ):
        ff.checkpoint.describe(tmp_path / "empty")
    (tmp_path / "x.orbax-checkpoint-tmp-123").mkdir()
    with pytest.raises(ValueError, match=r"is an unfinished checkpoint: its save did not complete"):
        ff.checkpoint.restore(tmp_path / "x.orbax-checkpoint-tmp-123", target)
    with ocp.CheckpointManager(tmp_path / "mngr") as mngr:
        mngr.save(4, args=ff.checkpoint.save_args(target))
    with pytest.raises(
        ValueError,
        match=r"It is a CheckpointManager directory with steps \[4\]: pass one step's directory",
    ):
        ff.checkpoint.restore(tmp_path / "mngr", target)
    (tmp_path / "gone.flax-freeze-old").mkdir()
    with pytest.raises(
        FileNotFoundError,
        match=r"previous checkpoint is complete at '.*gone.flax-freeze-old'; rename it to 'gone'",
    ):
        ff.checkpoint.restore(tmp_path / "gone", target)


def test_bad_arguments_to_restore(tmp_path):
    path = saved(tmp_path)
    with pytest.raises(
        ValueError, match=r"`flags` must be 'checkpoint' .* or 'target' .*, got 'saved'"
    ):
        ff.checkpoint.restore(path, {"a": jnp.zeros(3)}, flags="saved")
    with pytest.raises(
        ValueError, match=r"`target` holds no arrays to restore into: got dict \{'x': 'text'\}"
    ):
        ff.checkpoint.restore(path, {"x": "text"})


class Holder(nnx.Module):
    def __init__(self, value):
        self.v = nnx.Variable(value)


@pytest.mark.parametrize(
    ("node", "error", "match"),
    [
        ({"s": "text"}, ValueError, r"`node` holds no arrays to save: got dict"),
        (jnp.ones(2), ValueError, r"`node` is a single ArrayImpl, with no path.*\{'x': node\}"),
        (
            {"w": jax.ShapeDtypeStruct((2,), jnp.float32)},
            ValueError,
            r"`node` is abstract .* at \[w\]: save needs real arrays",
        ),
        (Holder("text"), TypeError, r"variables whose values are not arrays \(str\) at \[v\]"),
        ({"a/b": jnp.ones(1)}, ValueError, r"keys containing '/' at \[\('a/b',\)\]"),
        (
            {"a.b": jnp.ones(1), "a": {"b": jnp.ones(1)}},
            ValueError,
            r"two entries stored under the same name 'a.b'",
        ),
    ],
    ids=["empty", "single-array", "abstract", "not-an-array", "slash", "dots"],
)
def test_nodes_that_cannot_be_saved(tmp_path, node, error, match):
    with pytest.raises(error, match=match):
        ff.checkpoint.save(tmp_path / "ckpt", node)
    assert not (tmp_path / "ckpt").exists()


def test_save_refuses_to_overwrite_without_force(tmp_path):
    path = saved(tmp_path)
    with pytest.raises(ValueError, match=r"`directory` '.*ckpt' already exists\. Pass force=True"):
        ff.checkpoint.save(path, {"a": jnp.ones(3)})
    ff.checkpoint.save(path, {"a": jnp.full(3, 2.0)}, force=True)
    assert ff.checkpoint.restore(path, {"a": jnp.zeros(3)})["a"].tolist() == [2.0] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        ValueError,
        match=r"`directory` '.*file' is a file, not a checkpoint\. save\(\.\.\., force=True\) "
        r"replaces only",
    ):
        ff.checkpoint.save(tmp_path / "file", {"a": jnp.ones(3)}, force=True)


def test_nothing_is_unpickled(tmp_path, monkeypatch):
    model, opt = net_and_optimizer()
    ff.checkpoint.save(tmp_path / "ckpt", (model, opt))

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    ff.checkpoint.restore(tmp_path / "ckpt", net_and_optimizer(1, frozen=False))
    ff.checkpoint.describe(tmp_path / "ckpt")


# --- CheckpointManager --------------------------------------------------------------------


def test_manager_keep_best_async_and_restore_args(tmp_path):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=2, best_fn=lambda m: m["loss"], best_mode="min", enable_async_checkpointing=True
    )
    model, opt = net_and_optimizer()
    snapshots = {}
    with ocp.CheckpointManager(tmp_path / "m", options=options) as mngr:
        for step, loss in enumerate([5.0, 1.0, 4.0, 2.0, 3.0]):
            train(model, opt, 1, start=step)
            mngr.save(step, args=ff.checkpoint.save_args((model, opt)), metrics={"loss": loss})
            snapshots[step] = variable_values(model)
        mngr.wait_until_finished()
        assert sorted(mngr.all_steps()) == [1, 3]
        assert mngr.best_step() == 1
        args = ff.checkpoint.restore_args(mngr, net_and_optimizer(9, frozen=False))
        assert args.step == 3
        model2, opt2 = args.finish(mngr.restore(args.step, args=args))
        assert variable_types(model2) == variable_types(model)
        assert variable_values(model2).keys() == snapshots[3].keys()
        assert all(
            np.array_equal(variable_values(model2)[k], snapshots[3][k]) for k in snapshots[3]
        )
        best = ff.checkpoint.restore_args(mngr, net_and_optimizer(9), step=mngr.best_step())
        model3, _ = best.finish(mngr.restore(best.step, args=best))
        assert all(
            np.array_equal(variable_values(model3)[k], snapshots[1][k]) for k in snapshots[1]
        )
        with pytest.raises(
            ValueError, match=r"`step` 2 is not a finished step of .*; its steps are \[1, 3\]"
        ):
            ff.checkpoint.restore_args(mngr, net_and_optimizer(9), step=2)
        with pytest.raises(
            TypeError,
            match=r"`restored` must be what manager.restore\(args.step, args=args\) returned",
        ):
            args.finish({"state": 3})
    # A step directory works with plain restore too.
    model4, _ = ff.checkpoint.restore(tmp_path / "m" / "3", net_and_optimizer(9, frozen=False))
    assert variable_types(model4) == variable_types(model)


def test_restore_args_errors(tmp_path):
    with ocp.CheckpointManager(tmp_path / "empty") as mngr:
        with pytest.raises(
            ValueError,
            match=r"`source` '.*empty' is a CheckpointManager directory with no finished step",
        ):
            ff.checkpoint.restore_args(mngr, {"a": jnp.zeros(3)})
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "plain", {"a": jnp.ones(3)})
    with pytest.raises(
        ValueError,
        match=r"is not a Composite checkpoint with a 'state' item.*Use ff.checkpoint.restore",
    ):
        ff.checkpoint.restore_args(tmp_path / "plain", {"a": jnp.zeros(3)})
    args = ff.checkpoint.restore_args(saved(tmp_path), {"a": jnp.zeros(3), "b": jnp.zeros(2)})
    assert args.step is None
    assert set(args.keys()) == {"state", "flags"}


# --- crash safety -------------------------------------------------------------------------

CHILD_PRELUDE = """
import glob, os, signal, sys, threading, time
import jax.numpy as jnp
import orbax.checkpoint as ocp
import flax_freeze as ff

def state(v):  # 128 MiB
    big = [jnp.full((1024, 1024), v, jnp.float32) for _ in range(32)]
    return {"big": big, "w": ff.FrozenParam(jnp.full(3, v))}
"""


def run_child(code, *args):
    return subprocess.run(
        [sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code), *map(str, args)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def small_target():
    return {"big": [jnp.zeros((1024, 1024)) for _ in range(32)], "w": jnp.zeros(3)}


def test_manager_survives_sigkill_mid_save(tmp_path):
    done = run_child(
        """
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
        mngr = ocp.CheckpointManager(sys.argv[1], options=options)
        mngr.save(1, args=ff.checkpoint.save_args(state(1.0)))
        mngr.wait_until_finished()
        mngr.save(2, args=ff.checkpoint.save_args(state(2.0)))  # async: writing in the background
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        tmp_path,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert list(tmp_path.glob("2.orbax-checkpoint-tmp*"))  # killed mid-save
    with ocp.CheckpointManager(tmp_path) as mngr:
        assert mngr.latest_step() == 1
        args = ff.checkpoint.restore_args(mngr, small_target())
        out = args.finish(mngr.restore(args.step, args=args))
        assert args.step == 1
        assert float(out["big"][31][5, 5]) == 1.0
        assert isinstance(out["w"], ff.FrozenParam)
        mngr.save(2, args=ff.checkpoint.save_args(state_like(out, 3.0)))  # and saving goes on
        mngr.wait_until_finished()
        assert mngr.latest_step() == 2


def state_like(tree, v):
    return jax.tree.map(lambda x: jnp.full_like(x, v), tree)


def test_forced_save_killed_mid_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    ff.checkpoint.save(
        path,
        {"big": [jnp.full((1024, 1024), 1.0) for _ in range(32)], "w": ff.FrozenParam(jnp.ones(3))},
    )
    done = run_child(
        """
        path = sys.argv[1]
        def kill_when_writing():
            while not glob.glob(path + ".flax-freeze-new*"):
                time.sleep(0.0005)
            os.kill(os.getpid(), signal.SIGKILL)
        threading.Thread(target=kill_when_writing, daemon=True).start()
        ff.checkpoint.save(path, state(2.0), force=True)
        print("save finished")
        """,
        path,
    )
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    assert list(tmp_path.glob("ckpt.flax-freeze-new*"))  # the unfinished new one
    out = ff.checkpoint.restore(path, small_target())
    assert float(out["big"][31][5, 5]) == 1.0
    assert isinstance(out["w"], ff.FrozenParam)
    ff.checkpoint.save(path, state_like(out, 3.0), force=True)  # cleans up and replaces
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert float(ff.checkpoint.restore(path, small_target())["big"][0][0, 0]) == 3.0


# --- relative paths, Python numbers, several processes ----------------------------------


def test_relative_directories_everywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tree = {"a": jnp.ones(3), "b": ff.FrozenParam(jnp.zeros(2))}
    target = {"a": jnp.zeros(3), "b": jnp.ones(2)}
    ff.checkpoint.save("ckpt", tree)
    ff.checkpoint.save(Path("ckpt"), tree, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert ff.checkpoint.read_flags("ckpt").frozen == {"b"}
    assert isinstance(ff.checkpoint.restore("ckpt", target)["b"], ff.FrozenParam)
    assert ff.checkpoint.describe("ckpt").directory == str(tmp_path / "ckpt")
    args = ff.checkpoint.restore_args("ckpt", target)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        out = args.finish(checkpointer.restore(tmp_path / "ckpt", args=args))
    assert out["a"].tolist() == [1.0] * 3


def test_python_numbers_are_stored_as_jax_computes_them(tmp_path):
    tree = {"lr": 0.1, "step": 3, "done": True, "w": jnp.ones(2)}
    ff.checkpoint.save(tmp_path / "ckpt", tree)
    arrays = ff.checkpoint.read_flags(tmp_path / "ckpt").arrays
    assert arrays["lr"] == ((), "float32")
    assert arrays["step"] == ((), "int32")
    assert arrays["done"] == ((), "bool")
    # An abstract target from jax.eval_shape holds the same dtypes.
    out = ff.checkpoint.restore(tmp_path / "ckpt", jax.eval_shape(lambda: tree))
    assert out["lr"].dtype == jnp.float32
    assert float(out["lr"]) == float(np.float32(0.1))
    assert out["step"].dtype == jnp.int32
    assert int(out["step"]) == 3
    # A concrete target gets Python numbers back, as they were computed in float32.
    out = ff.checkpoint.restore(
        tmp_path / "ckpt", {"lr": 0.0, "step": 0, "done": False, "w": tree["w"]}
    )
    assert out["lr"] == float(np.float32(0.1))
    assert type(out["step"]) is int
    assert out["done"] is True
    # Integers too large for int32 are kept exact; float64 scalars fill Python floats.
    ff.checkpoint.save(tmp_path / "wide", {"n": 2**40, "x": np.float64(0.1)})
    assert ff.checkpoint.read_flags(tmp_path / "wide").arrays["n"] == ((), "int64")
    assert ff.checkpoint.restore(tmp_path / "wide", {"n": 0, "x": 0.5}) == {"n": 2**40, "x": 0.1}


PROCESS = """
import sys
import jax
import numpy as np

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{sys.argv[1]}", 2, int(sys.argv[2]))
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import flax_freeze as ff

mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
everywhere = NamedSharding(mesh, PartitionSpec())
def replicated(value):
    a = np.asarray(value)
    return jax.make_array_from_callback(a.shape, everywhere, lambda i: a[i])
path = sys.argv[3]
for value in (1.0, 2.0, 3.0):
    tree = {"w": replicated(np.full(3, value)), "b": ff.FrozenParam(replicated(np.full(2, value)))}
    ff.checkpoint.save(path, tree, force=True)
    out = ff.checkpoint.restore(path, {"w": replicated(np.zeros(3)), "b": replicated(np.zeros(2))})
    assert isinstance(out["b"], ff.FrozenParam), out
    assert float(out["w"].addressable_data(0)[0]) == value, out
print("restored", jax.process_index())
"""


def test_forced_saves_from_two_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    path = tmp_path / "ckpt"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", PROCESS, str(port), str(i), str(path)],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outs = [w.communicate(timeout=120) for w in workers]
    finally:
        for w in workers:
            w.kill()
    for i, (w, (out, err)) in enumerate(zip(workers, outs, strict=True)):
        assert w.returncode == 0, err[-3000:]
        assert f"restored {i}" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (
        ff.checkpoint.restore(path, {"w": jnp.zeros(3), "b": jnp.zeros(2)})["w"].tolist()
        == [3.0] * 3
    )


# --- the example --------------------------------------------------------------------------


def test_resume_training_example_ends_bit_exact():
    import resume_training

    result = resume_training.main(steps=60, every=10, kill_at=40)
    assert result == {
        "killed": True,
        "resumed_from": result["resumed_from"],
        "identical": True,
        "frozen": True,
    }
    assert result["resumed_from"] in (30, 40)


def test_cost_benchmark_runs(tmp_path, capsys):
    import checkpoint_cost

    results = checkpoint_cost.main(1, str(tmp_path), str(tmp_path), {"MLP 2x32": (32, 2)})
    assert set(results["models"]["MLP 2x32"]["ratios"]) == {
        "save",
        "restore",
        "fresh restore",
        "save + restore",
        "verify",
        "checksums / save",
    }
    assert json.loads((tmp_path / "checkpoint_cost.json").read_text())["repeats"] == 1
    adapter = results["adapter"]["models"]["MLP 2x32"]
    assert adapter["disk_bytes"]["adapter"] < adapter["disk_bytes"]["full"]
    assert 0 < adapter["overhead_bytes"] < 20_000 + 2_000 * adapter["arrays_stored"]
    assert set(adapter["ratios"]) >= {"adapter save / full", "adapter restore / full"}
    assert "MLP 2x32" in capsys.readouterr().out


@pytest.mark.parametrize(
    "fresh_frozen", [True, False], ids=["fresh-as-built", "fresh-all-trainable"]
)
def test_own_step_counts_are_saved_and_restored(tmp_path, fresh_frozen):
    """Parameters unfrozen after the optimizer was built keep their own counts across a restore."""

    def make(frozen):
        model = Net(0)
        if frozen:
            ff.freeze(model, FROZEN0)
        return model, ff.Optimizer(model, optax.adam(0.01))

    x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))
    model, opt = make(True)
    step = ff.TrainStep(model, opt, loss_fn)
    for _ in range(5):
        step(x, y)
    ff.unfreeze(model, FROZEN0)
    for _ in range(2):
        step(x, y)
    assert [c[...].tolist() for c in opt.own_counts] == [[2, 2], [2, 2]]
    ff.checkpoint.save(tmp_path / "ckpt", (model, opt))
    fresh, fresh_opt = ff.checkpoint.restore(tmp_path / "ckpt", make(fresh_frozen))
    assert fresh_opt.own_paths == opt.own_paths
    assert [c[...].tolist() for c in fresh_opt.own_counts] == [[2, 2], [2, 2]]
    assert int(fresh_opt.opt_state[0].count[...]) == 7
    step(x, y)
    ff.TrainStep(fresh, fresh_opt, loss_fn)(x, y)
    assert_same(fresh, model)
