"""Adapter checkpoints: save only what was trained, restore it onto its base, refuse another."""

import json
import subprocess
import sys

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
from flax_freeze import linen as ffl
from flax_freeze.checkpoint._checksum import checksum
from helpers import ADAMW, CNN, CNN_X, ROOT, cnn_state, cnn_train, variable_types, variable_values

X = jnp.linspace(-1.0, 1.0, 4 * 8).reshape(4, 8)


class Adapted(nnx.Module):
    """A base (two Linear layers, BatchNorm) with a LoRA adapter beside each layer."""

    def __init__(self, seed=0, width=16, rank=2):
        rngs = nnx.Rngs(seed)
        self.body = nnx.Linear(8, width, rngs=rngs)
        self.norm = nnx.BatchNorm(width, use_running_average=True, rngs=rngs)
        self.head = nnx.Linear(width, 3, rngs=rngs)
        lora = nnx.Rngs(100)  # the adapter's own initialisation, whatever the base's seed
        self.body_lora = nnx.LoRA(8, rank, width, rngs=lora)
        self.head_lora = nnx.LoRA(width, rank, 3, rngs=lora)

    def __call__(self, x):
        h = jax.nn.relu(self.norm(self.body(x) + self.body_lora(x)))
        return self.head(h) + self.head_lora(h)


BASE = nnx.All(ff.Trainable, nnx.Not(nnx.LoRAParam))
LORA = ["body_lora/lora_a", "body_lora/lora_b", "head_lora/lora_a", "head_lora/lora_b"]
BASE_PATHS = [
    "body/bias", "body/kernel", "head/bias", "head/kernel",
    "norm/bias", "norm/mean", "norm/scale", "norm/var",
]  # fmt: skip


def loss(model, x):
    return (model(x) ** 2).mean()


def fine_tuned(seed=0, steps=3):
    """The adapted model with its base frozen, trained ``steps`` steps, and its optimizer."""
    model = Adapted(seed)
    ff.freeze(model, BASE)
    opt = ff.Optimizer(model, ADAMW)
    step = ff.TrainStep(model, opt, loss)
    for i in range(steps):
        step(X + i)
    return model, opt


def base(seed=0):
    """A fresh adapted model: the base's weights of ``seed``, nothing frozen, its optimizer."""
    model = Adapted(seed)
    return model, ff.Optimizer(model, ADAMW)


def stored(path):
    return sorted(ff.checkpoint.read_flags(path).arrays)


# --- what an adapter checkpoint holds ------------------------------------------------------------


def test_only_stores_the_selected_variables_their_optimizer_state_and_all_flags(tmp_path):
    model, opt = fine_tuned()
    ff.checkpoint.save(tmp_path / "a", (model, opt), only=nnx.LoRAParam)
    flags = ff.checkpoint.read_flags(tmp_path / "a")
    moments = [f"1/opt_state/0/{m}/{p}" for m in ("mu", "nu") for p in LORA]
    assert sorted(flags.arrays) == sorted(
        [f"0/{p}" for p in LORA] + moments + ["1/opt_state/0/count", "1/step"]
    )
    # the flags of every path, the base's included
    frozen = ["body/bias", "body/kernel", "head/bias", "head/kernel", "norm/bias", "norm/scale"]
    assert flags.frozen == {f"0/{p}" for p in frozen}
    assert flags.trainable == {f"0/{p}" for p in LORA}
    assert flags.types["0/norm/mean"] == "flax.nnx.variablelib.BatchStat"
    # the fingerprint of the rest: shapes, dtypes and CRC-32s
    assert sorted(flags.base) == [f"0/{p}" for p in BASE_PATHS]
    assert flags.base["0/body/kernel"][:2] == ((8, 16), "float32")
    assert flags.base["0/body/kernel"][2] == checksum(np.asarray(model.body.kernel[...]))
    assert flags.is_adapter
    assert flags.optimizers == {"1": tuple(tuple(p.split("/")) for p in LORA)}


def test_trainable_selects_what_was_trained(tmp_path):
    model = Adapted()
    ff.freeze(model, ff.PathRegex("body/.*|body_lora/.*"))
    ff.checkpoint.save(tmp_path / "a", model, only=ff.Trainable)
    assert stored(tmp_path / "a") == [
        "head/bias",
        "head/kernel",
        *LORA[2:],
        "norm/bias",
        "norm/scale",
    ]


def test_optimizer_state_of_parameters_not_saved_is_left_out_unchecked(tmp_path):
    model = Adapted()
    ff.freeze(model, ff.PathRegex("body/.*"))  # head and both adapters train
    opt = ff.Optimizer(model, ADAMW)
    ff.TrainStep(model, opt, loss)(X)
    ff.checkpoint.save(tmp_path / "a", (model, opt), only=nnx.LoRAParam)
    flags = ff.checkpoint.read_flags(tmp_path / "a")
    assert "1/opt_state/0/mu/head/kernel" not in flags.arrays
    assert flags.base["1/opt_state/0/mu/head/kernel"] == ((16, 3), "float32", None)
    assert flags.base["0/head/kernel"][2] is not None  # trained, not saved: checked by value


def test_rng_state_is_fingerprinted_by_shape_only(tmp_path):
    model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Dropout(0.5, rngs=nnx.Rngs(1)))
    ff.checkpoint.save(tmp_path / "a", model, only=ff.PathRegex("layers/0/bias"))
    flags = ff.checkpoint.read_flags(tmp_path / "a")
    assert flags.base["layers/1/rngs/count"] == ((), "uint32", None)
    assert flags.base["layers/0/kernel"][2] is not None


def test_fingerprint_shapes_records_no_checksums(tmp_path):
    model, opt = fine_tuned()
    ff.checkpoint.save(tmp_path / "a", (model, opt), only=nnx.LoRAParam, fingerprint="shapes")
    assert {c for _, _, c in ff.checkpoint.read_flags(tmp_path / "a").base.values()} == {None}
    other, other_opt = base(seed=7)  # other values, same shapes: accepted without checksums
    ff.checkpoint.restore(tmp_path / "a", (other, other_opt))
    np.testing.assert_array_equal(other.body_lora.lora_a[...], model.body_lora.lora_a[...])


# --- restoring onto a base -----------------------------------------------------------------------


def test_restore_onto_the_base_gives_the_fine_tuned_model_and_resumes_bit_exactly(tmp_path):
    model, opt = fine_tuned()
    ff.checkpoint.save(tmp_path / "a", (model, opt), only=nnx.LoRAParam)
    target, target_opt = base()
    restored = ff.checkpoint.restore(tmp_path / "a", (target, target_opt))
    assert restored[0] is target
    assert restored[1] is target_opt
    assert variable_types(target) == variable_types(model)  # the saved flags, base included
    values, expected = variable_values(target), variable_values(model)
    for path in expected:
        np.testing.assert_array_equal(values[path], expected[path], err_msg=path)
    np.testing.assert_array_equal(target(X), model(X))
    assert int(target_opt.step[...]) == 3
    # training resumes as if never interrupted
    ff.TrainStep(model, opt, loss)(X + 10)
    ff.TrainStep(target, target_opt, loss)(X + 10)
    np.testing.assert_array_equal(target(X), model(X))


def test_restore_args_and_checkpoint_manager(tmp_path):
    model, opt = fine_tuned()
    with ocp.CheckpointManager(tmp_path / "run") as manager:
        manager.save(3, args=ff.checkpoint.save_args((model, opt), only=nnx.LoRAParam))
        manager.wait_until_finished()
        target, target_opt = base()
        args = ff.checkpoint.restore_args(manager, (target, target_opt))
        target, target_opt = args.finish(manager.restore(args.step, args=args))
        np.testing.assert_array_equal(target(X), model(X))
        other = base(seed=1)
        with pytest.raises(ValueError, match=r"is an adapter for another base"):
            ff.checkpoint.restore_args(manager, other)
        args = ff.checkpoint.restore_args(manager, other, check_base=False)
        args.finish(manager.restore(args.step, args=args))
        np.testing.assert_array_equal(other[0].head_lora.lora_b[...], model.head_lora.lora_b[...])


def test_another_base_is_refused_naming_what_differs(tmp_path):
    model, opt = fine_tuned()
    ff.checkpoint.save(tmp_path / "a", (model, opt), only=nnx.LoRAParam)
    other, other_opt = base(seed=1)
    before = variable_values(other)
    with pytest.raises(ValueError, match=r"another base") as err:
        ff.checkpoint.restore(tmp_path / "a", (other, other_opt))
    message = str(err.value)
    assert "is an adapter for another base" in message
    assert "at 2 path(s): [0/body/kernel (other values), 0/head/kernel (other values)]" in message
    assert "pass check_base=False to apply it anyway" in message
    after = variable_values(other)  # nothing changed
    for path in before:
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)


def test_other_shapes_and_other_paths_are_named(tmp_path):
    model, opt = fine_tuned()
    ff.checkpoint.save(tmp_path / "a", model, only=nnx.LoRAParam)

    class Wider(Adapted):
        def __init__(self):
            super().__init__()
            self.head = nnx.Linear(16, 3, use_bias=False, rngs=nnx.Rngs(0))
            self.extra = nnx.Param(jnp.zeros(2))

    with pytest.raises(ValueError, match=r"another base") as err:
        ff.checkpoint.restore(tmp_path / "a", Wider())
    assert "[extra (not in the base), head/bias (not in the target), head/kernel" in str(err.value)
    target = Adapted(width=32, rank=2)
    with pytest.raises(ValueError, match=r"shapes or dtypes differ"):  # the adapter itself
        ff.checkpoint.restore(tmp_path / "a", target)


def test_check_base_false_applies_the_adapter_to_another_base(tmp_path):
    model, _ = fine_tuned()
    ff.checkpoint.save(tmp_path / "a", model, only=nnx.LoRAParam)
    other = Adapted(seed=1)
    kernel = np.asarray(other.body.kernel[...])
    ff.checkpoint.restore(tmp_path / "a", other, check_base=False)
    np.testing.assert_array_equal(other.body_lora.lora_b[...], model.body_lora.lora_b[...])
    np.testing.assert_array_equal(other.body.kernel[...], kernel)  # its own base, now frozen
    assert type(other.body.kernel).__name__ == "FrozenParam"


def test_abstract_target_is_refused(tmp_path):
    model, _ = fine_tuned()
    ff.checkpoint.save(tmp_path / "a", model, only=nnx.LoRAParam)
    abstract = nnx.eval_shape(lambda: Adapted())
    with pytest.raises(ValueError, match=r"is an adapter: .* but `target` is abstract at .*"
                       r"The base must be concrete"):  # fmt: skip
        ff.checkpoint.restore(tmp_path / "a", abstract, check_base=False)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"only": ff.PathRegex("nothing/.*")}, ValueError, r"`only` .* selects nothing to save"),
        ({"only": 3}, TypeError, r"`only` must be an NNX filter"),
        ({"only": nnx.LoRAParam, "fingerprint": "hash"}, ValueError, r"`fingerprint` must be"),
    ],
    ids=["nothing", "not-a-filter", "fingerprint"],
)
def test_bad_arguments(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        ff.checkpoint.save(tmp_path / "a", Adapted(), **kwargs)
    assert not (tmp_path / "a").exists()


def test_a_full_checkpoint_is_no_adapter(tmp_path):
    ff.checkpoint.save(tmp_path / "full", Adapted())
    assert not ff.checkpoint.read_flags(tmp_path / "full").is_adapter
    assert not ff.checkpoint.describe(tmp_path / "full").is_adapter


# --- size ----------------------------------------------------------------------------------------


class Big(nnx.Module):
    def __init__(self, width):
        rngs = nnx.Rngs(0)
        self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(3)])
        self.loras = nnx.List([nnx.LoRA(width, 2, width, rngs=rngs) for _ in range(3)])


def disk_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.parametrize("width", [512, 1024])
def test_adapter_bytes_on_disk_are_the_selected_arrays_plus_a_fixed_overhead(tmp_path, width):
    model = Big(width)
    ff.freeze(model, nnx.All(ff.Trainable, nnx.Not(nnx.LoRAParam)))
    opt = ff.Optimizer(model, optax.adam(1e-3))
    step = ff.TrainStep(
        model, opt, lambda m, x: sum((x @ a.lora_a @ a.lora_b).sum() for a in m.loras)
    )
    for i in range(3):  # adapters and moments of random-looking values, as after training
        step(jax.random.normal(jax.random.key(i), (2, width)))
    selected = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(opt)))
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, ff.FrozenParam)))
    assert base_bytes >= 100 * selected
    ff.checkpoint.save(tmp_path / "full", (model, opt))
    ff.checkpoint.save(tmp_path / "adapter", (model, opt), only=nnx.LoRAParam)
    adapter, full = disk_bytes(tmp_path / "adapter"), disk_bytes(tmp_path / "full")
    # orbax compresses arrays, so a stored array may take fewer bytes than it holds
    assert adapter <= selected + opt_bytes + 40_000  # metadata, flags with the fingerprint
    assert full >= 0.9 * base_bytes
    assert full / adapter > 50, (full, adapter)


# --- inspect -------------------------------------------------------------------------------------


def test_inspect_shows_an_adapter_and_its_base(tmp_path):
    model, opt = fine_tuned()
    ff.checkpoint.save(tmp_path / "a", (model, opt), only=nnx.LoRAParam)
    description = ff.checkpoint.describe(tmp_path / "a")
    assert description.is_adapter
    assert [r.path for r in description.base] == [f"0/{p}" for p in BASE_PATHS]
    assert description.base[1].status == "frozen"
    assert description.fingerprint["0/norm/mean"].startswith("crc32:")
    text = str(description)
    assert "an adapter: holds 14 path(s), expects 8 from a base" in text
    assert "expected from a base (its fingerprint):" in text
    kernel = next(line for line in text.splitlines() if line.startswith("0/body/kernel"))
    assert kernel.split() == [
        "0/body/kernel", "FrozenParam", "(8,", "16)", "float32", "frozen", "128", "512",
        description.fingerprint["0/body/kernel"],
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "flax_freeze", "inspect", str(tmp_path / "a"), "--json"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    data = json.loads(result.stdout)
    assert data["adapter"] is True
    assert [v["path"] for v in data["variables"]][:2] == [
        "0/body_lora/lora_a",
        "0/body_lora/lora_b",
    ]
    by_path = {b["path"]: b for b in data["base"]}
    assert by_path["0/body/kernel"]["checksum"] == description.fingerprint["0/body/kernel"]
    assert by_path["0/body/kernel"]["shape"] == [8, 16]
    assert data["base_totals"]["frozen"]["count"] == 8 * 16 + 16 + 16 * 3 + 3 + 16 + 16


# --- Linen ---------------------------------------------------------------------------------------


def test_linen_train_state_adapter_by_path_and_by_frozen_boxes(tmp_path):
    state = cnn_train(cnn_state(CNN(frozen_dense=False), 0, frozen="Conv_0/.*"), 2)
    for name, only in [("path", ff.PathRegex("params/Dense_.*")), ("trainable", ff.Trainable)]:
        ff.checkpoint.save(tmp_path / name, state, only=only)
        flags = ff.checkpoint.read_flags(tmp_path / name)
        assert all(not k.startswith("params/Conv_0") for k in flags.arrays)
        assert "params/Dense_0/kernel" in flags.arrays
        assert "opt_state/0/mu/Dense_0/kernel" in flags.arrays
        assert "step" in flags.arrays
        assert "params/Conv_0/kernel" in flags.base
        assert "params/Conv_0/kernel" in flags.frozen
        assert "batch_stats/BatchNorm_0/mean" in flags.base
    # onto a fresh base: same Conv weights, nothing frozen; trained stats come from the base
    fresh = cnn_state(CNN(frozen_dense=False), 0)
    fresh = fresh.replace(batch_stats=state.batch_stats)
    restored = ff.checkpoint.restore(tmp_path / "trainable", fresh)
    assert type(restored.params["Conv_0"]["kernel"]).__name__ == "FrozenBox"
    assert int(restored.step) == 2
    again = cnn_train(restored, 1, start=2)
    expected = cnn_train(state, 1, start=2)
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(expected.params), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"batch_stats/BatchNorm_0/mean \(other values\)"):
        ff.checkpoint.restore(tmp_path / "trainable", cnn_state(CNN(frozen_dense=False), 0))


def test_linen_params_dict_adapter(tmp_path):
    params = CNN(frozen_dense=False).init(jax.random.key(0), CNN_X)["params"]
    frozen = ffl.freeze(params, "Conv_0/.*")
    ff.checkpoint.save(tmp_path / "a", frozen, only=ff.Trainable)
    assert stored(tmp_path / "a") == [
        "BatchNorm_0/bias",
        "BatchNorm_0/scale",
        "Dense_0/bias",
        "Dense_0/kernel",
        "Dense_1/bias",
        "Dense_1/kernel",
    ]
    restored = ff.checkpoint.restore(tmp_path / "a", params)
    assert type(restored["Conv_0"]["kernel"]).__name__ == "FrozenBox"
    other = CNN(frozen_dense=False).init(jax.random.key(1), CNN_X)["params"]
    with pytest.raises(ValueError, match=r"Conv_0/kernel \(other values\)"):
        ff.checkpoint.restore(tmp_path / "a", other)


# --- several devices -----------------------------------------------------------------------------


def test_sharded_adapter_restores_onto_a_sharded_base_with_its_shardings(tmp_path):
    mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))

    def sharded(seed):
        model = Adapted(seed, width=16, rank=8)
        for layer in (model.body, model.body_lora):
            for variable in nnx.state(layer, nnx.Param).values():
                value = variable.get_raw_value()
                spec = P(None, "model") if value.ndim == 2 and value.shape[1] == 16 else P()
                variable.set_raw_value(jax.device_put(value, NamedSharding(mesh, spec)))
        return model

    model = sharded(0)
    ff.freeze(model, BASE)
    ff.checkpoint.save(tmp_path / "a", model, only=nnx.LoRAParam)
    target = sharded(0)
    ff.checkpoint.restore(tmp_path / "a", target)
    assert target.body_lora.lora_b.get_raw_value().sharding == NamedSharding(mesh, P(None, "model"))
    assert target.body.kernel.get_raw_value().sharding == NamedSharding(mesh, P(None, "model"))
    np.testing.assert_array_equal(target.body_lora.lora_b[...], model.body_lora.lora_b[...])
    with pytest.raises(ValueError, match=r"another base"):
        ff.checkpoint.restore(tmp_path / "a", sharded(1))


def test_a_saved_tuple_restored_into_a_module_gets_a_hint(tmp_path):
    model, opt = fine_tuned()
    ff.checkpoint.save(tmp_path / "a", (model, opt), only=nnx.LoRAParam)
    hint = r"a saved tuple of 2 \(its paths start with 0/, 1/...\): restore into a tuple"
    with pytest.raises(ValueError, match=hint):
        ff.checkpoint.restore(tmp_path / "a", base()[0])
    with pytest.warns(ff.checkpoint.PartialRestoreWarning, match=r"ignored \(not in the target\)"):
        restored = ff.checkpoint.restore(tmp_path / "a", (base()[0],), partial=True)
    np.testing.assert_array_equal(restored[0](X), model(X))
