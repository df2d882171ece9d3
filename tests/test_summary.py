import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flax_freeze as ff
from flax_freeze._summary import Row


class Net(nnx.Module):
    def __init__(self):
        self.body = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
        self.bn = nnx.BatchNorm(8, rngs=nnx.Rngs(0))
        self.head = nnx.Linear(8, 2, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
        self.scale = ff.FrozenParam(jnp.ones((), jnp.float32))


def test_summary_rows_are_exact():
    net = ff.freeze(Net(), ff.PathRegex("body/.*"))
    rows = {r.path: r for r in ff.summary(net).rows}
    assert rows["body/kernel"] == Row(
        "body/kernel", "FrozenParam", (4, 8), "float32", "frozen", 32, 128
    )
    assert rows["head/kernel"] == Row(
        "head/kernel", "Param", (8, 2), "bfloat16", "trainable", 16, 32
    )
    assert rows["bn/mean"] == Row("bn/mean", "BatchStat", (8,), "float32", "state", 8, 32)
    assert rows["scale"] == Row("scale", "FrozenParam", (), "float32", "frozen", 1, 4)
    assert list(rows) == sorted(rows)


def test_summary_totals():
    s = ff.summary(ff.freeze(Net(), ff.PathRegex("body/.*")))
    # trainable: head 16 + 2 (bf16) and bn scale/bias 8 + 8 (f32)
    assert s.trainable_count == 34
    assert s.trainable_bytes == 18 * 2 + 16 * 4
    # frozen: body 32 + 8 and scale 1, all float32
    assert s.frozen_count == 41
    assert s.frozen_bytes == 41 * 4
    assert s.totals.count["state"] == 16
    assert s.totals.bytes["state"] == 64


def test_summary_by_module():
    s = ff.summary(ff.freeze(Net(), ff.PathRegex("body/.*")))
    groups = s.by_module()
    assert set(groups) == {"body", "bn", "head", "scale"}
    assert groups["body"].count == {"trainable": 0, "frozen": 40, "state": 0}
    assert groups["head"].bytes == {"trainable": 36, "frozen": 0, "state": 0}


def test_summary_follows_freeze_and_unfreeze():
    net = Net()
    assert ff.summary(ff.freeze(net)).trainable_count == 0
    assert ff.summary(ff.unfreeze(net)).frozen_count == 0


def test_summary_prints_a_table_with_totals():
    text = str(ff.summary(ff.freeze(Net(), ff.PathRegex("body/.*"))))
    lines = text.splitlines()
    assert lines[0].split() == ["path", "type", "shape", "dtype", "status", "count", "bytes"]
    assert any(line.split()[:2] == ["body/kernel", "FrozenParam"] for line in lines)
    assert lines[-1] == "total: trainable 34 (100 B), frozen 41 (164 B), state 16 (64 B)"
    assert "body: trainable 0 (0 B), frozen 40 (160 B)" in lines


def test_summary_counts_a_tied_variable_once():
    shared = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    pair = nnx.List([shared, shared])
    s = ff.summary(pair)
    assert [r.path for r in s.rows] == ["0/bias", "0/kernel"]
    assert s.trainable_count == 6


@pytest.mark.parametrize("n", [1023, 1024 * 1024 * 3])
def test_bytes_formatting(n):
    from flax_freeze._summary import human_bytes

    assert human_bytes(n) == ("1,023 B" if n == 1023 else "3.0 MiB")


def test_summary_shows_rng_keys_as_state():
    s = ff.summary(nnx.Dropout(0.5, rngs=nnx.Rngs(0)))
    rows = {r.path: r for r in s.rows}
    key_row = next(r for r in rows.values() if r.dtype.startswith("key<"))
    assert key_row.status == "state"
    assert key_row.bytes == 8


def test_summary_counts_python_floats_in_float32():
    (row,) = ff.summary({"a": 0.5}).rows
    assert row == Row("a", "float", (), "float32", "trainable", 1, 4)


# ----------------------------------------------------------- one walk, one vocabulary


def test_train_state_lists_step_and_optimizer_count_as_state_like_a_checkpoint(tmp_path):
    import flax.linen as nn
    import optax

    from flax_freeze import linen as ffl

    model = nn.Dense(2)
    params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    params = ffl.freeze(params, "kernel")
    state = ffl.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(0.1))
    rows = {r.path: r for r in ff.summary(state).rows}
    assert rows["step"] == Row("step", "int", (), "int32", "state", 1, 4)
    assert rows["opt_state/0/count"] == Row(
        "opt_state/0/count", "Array", (), "int32", "state", 1, 4
    )
    assert rows["params/kernel"] == Row(
        "params/kernel", "FrozenBox", (3, 2), "float32", "frozen", 6, 24
    )
    assert rows["params/bias"] == Row("params/bias", "Array", (2,), "float32", "trainable", 2, 8)
    assert rows["opt_state/0/mu/bias"].status == "state"
    path = tmp_path / "ckpt"
    ff.checkpoint.save(path, state)
    described = ff.checkpoint.describe(path)
    assert [(r.path, r.status, r.count, r.bytes) for r in described.rows] == [
        (r.path, r.status, r.count, r.bytes) for r in ff.summary(state).rows
    ]
    assert described.totals == ff.summary(state).totals


def test_bare_values_are_named_by_their_type():
    tree = {"f": 0.5, "n": 3, "a": jnp.ones(2), "np": np.ones(2, np.float32)}
    rows = {r.path: (r.type, r.status) for r in ff.summary(tree).rows}
    assert rows == {
        "a": ("Array", "trainable"),
        "f": ("float", "trainable"),
        "n": ("int", "state"),
        "np": ("ndarray", "trainable"),
    }


def test_linen_variables_dict_rows_are_typed_by_value_not_collection():
    variables = {
        "params": {"w": jnp.ones(2)},
        "frozen_params": {"v": jnp.ones(3)},
        "batch_stats": {"mean": jnp.zeros(4)},
    }
    rows = {r.path: (r.type, r.status) for r in ff.summary(variables).rows}
    assert rows == {
        "batch_stats/mean": ("Array", "state"),
        "frozen_params/v": ("Array", "frozen"),
        "params/w": ("Array", "trainable"),
    }


def test_plain_optax_state_beside_its_parameters_is_state_not_trainable():
    import optax

    params = {"w": jnp.ones(2), "b": ff.FrozenParam(jnp.ones(3))}
    opt_state = optax.adam(0.1).init(ff.trainable_tree(params))
    totals = ff.summary((params, opt_state)).totals
    assert totals.count == {"trainable": 2, "frozen": 3, "state": 5}
    assert (totals.total_count, totals.total_bytes) == (10, 40)
    assert totals.to_json()["total"] == {"count": 10, "bytes": 40}


def test_totals_is_one_type_on_summaries_and_descriptions(tmp_path):
    tree = {"w": jnp.ones(2), "b": ff.FrozenParam(jnp.ones(3))}
    ff.checkpoint.save(tmp_path / "c", tree)
    described = ff.checkpoint.describe(tmp_path / "c").totals
    assert type(described) is type(ff.summary(tree).totals) is ff.Totals
    assert described.count == {"trainable": 2, "frozen": 3, "state": 0}
    assert described.line() == "trainable 2 (8 B), frozen 3 (12 B)"
