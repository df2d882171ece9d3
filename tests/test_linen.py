"""Linen support: frozen boxes, freeze/unfreeze on dicts, grads, TrainState, the bridge."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_freeze as ff
from flax_freeze import linen as ffl
from helpers import flops

X = jnp.linspace(-1, 1, 24).reshape(8, 3)
Y = jnp.arange(8) % 2


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
        x = nn.Dense(16, kernel_init=ffl.frozen(nn.initializers.lecun_normal()), name="body")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        x = nn.relu(x)
        x = nn.Dense(16, name="mid")(x)
        return nn.Dense(2, name="head")(x)


def init():
    return Net().init(jax.random.key(0), X)


def leaves_by_path(tree):
    return {
        jax.tree_util.keystr(k): v
        for k, v in jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=lambda x: x is None or isinstance(x, ffl.FrozenBox)
        )[0]
    }


# --------------------------------------------------------------------------- frozen(init)


def test_frozen_initializer_boxes_and_modules_see_arrays():
    v = init()
    assert type(v["params"]["body"]["kernel"]) is ffl.FrozenBox
    assert type(v["params"]["body"]["bias"]) is not ffl.FrozenBox
    out, _ = Net().apply(v, X, mutable=["batch_stats"])
    plain = {**v, "params": nn.meta.unbox(v["params"])}
    expected, _ = Net().apply(plain, X, mutable=["batch_stats"])
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


@pytest.mark.parametrize("order", ["frozen-outside", "frozen-inside"])
def test_frozen_composes_with_partitioning(order):
    init_fn = nn.initializers.lecun_normal()
    if order == "frozen-outside":
        kinit = ffl.frozen(nn.with_partitioning(init_fn, (None, "model")))
    else:
        kinit = nn.with_partitioning(ffl.frozen(init_fn), (None, "model"))
    dense = nn.Dense(4, kernel_init=kinit)
    v = dense.init(jax.random.key(0), jnp.ones((1, 3)))
    spec = nn.get_partition_spec(v)["params"]["kernel"]
    assert spec == jax.sharding.PartitionSpec(None, "model")
    g = ff.grad(lambda p: dense.apply({"params": p}, jnp.ones((1, 3))).sum())(v["params"])
    assert g["kernel"] is None
    np.testing.assert_array_equal(np.asarray(g["bias"]), np.ones(4))
    thawed = ffl.unfreeze(v)["params"]["kernel"]
    assert type(thawed) is nn.Partitioned
    assert thawed.names == (None, "model")
    assert nn.get_partition_spec(ffl.freeze(ffl.unfreeze(v)))["params"]["kernel"] == spec


def test_frozen_box_forwards_axis_changes_under_scan():
    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            kinit = ffl.frozen(nn.with_partitioning(nn.initializers.ones, ("a", "b")))
            return nn.Dense(3, kernel_init=kinit)(x), None

    scanned = nn.scan(
        Layer,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=2,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    v = scanned().init(jax.random.key(0), jnp.ones((1, 3)), None)
    kernel = v["params"]["Dense_0"]["kernel"]
    assert type(kernel) is ffl.FrozenBox
    assert kernel.get_partition_spec() == jax.sharding.PartitionSpec("layers", "a", "b")


# nn.scan and nn.vmap stack the copies of a layer along a new first axis, named "stack"
# in the partitioning and on the mesh.
STACK = {nn.PARTITION_NAME: "stack"}
BOX_KINDS = pytest.mark.parametrize("kind", ["bare", "frozen-outside", "frozen-inside"])


def stack_mesh():
    return jax.make_mesh((2, 4), ("stack", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def frozen_kernel_init(kind):
    """A frozen kernel: a bare box, or one outside or inside a (None, 'model') partitioning."""
    init = nn.initializers.ones
    if kind == "bare":
        return ffl.frozen(init)
    if kind == "frozen-outside":
        return ffl.frozen(nn.with_partitioning(init, (None, "model")))
    return nn.with_partitioning(ffl.frozen(init), (None, "model"))


def on_a_mesh(model, x, *args):
    """Sharded init from nn.get_sharding, then jitted apply and ff.grad, as in Flax's guide."""
    mesh = stack_mesh()
    with jax.set_mesh(mesh):
        abstract = jax.eval_shape(model.init, jax.random.key(0), x, *args)
        shardings = nn.get_sharding(abstract, mesh)
        variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), x, *args)
        out = jax.jit(model.apply)(variables, x, *args)

        def loss(params):  # the sum of the output (of a scan: of its carry)
            return jnp.sum(jax.tree.leaves(model.apply({"params": params}, x, *args))[0])

        grads = jax.jit(ff.grad(loss))(variables["params"])
    return mesh, shardings["params"], variables["params"], out, grads


def stacked_spec(kind):
    return P() if kind == "bare" else P("stack", None, "model")


@BOX_KINDS
def test_frozen_kernels_under_scan_are_sharded_applied_and_not_differentiated(kind):
    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            kernel_init, bias_init = frozen_kernel_init(kind), nn.initializers.ones
            return nn.Dense(8, kernel_init=kernel_init, bias_init=bias_init)(x), None

    scanned = nn.scan(
        Layer,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=2,
        metadata_params=STACK,
    )
    mesh, shardings, params, (out, _), grads = on_a_mesh(scanned(), jnp.ones((2, 8)), None)
    kernel = params["Dense_0"]["kernel"]
    assert ffl.FrozenBox in {type(kernel), type(kernel.unbox())}
    assert nn.unbox(kernel).shape == (2, 8, 8)
    sharding = NamedSharding(mesh, stacked_spec(kind))
    assert shardings["Dense_0"]["kernel"] == sharding
    assert nn.unbox(kernel).sharding == sharding
    np.testing.assert_array_equal(out, np.full((2, 8), 73.0))  # 8 * (8 * 1 + 1) + 1
    assert grads["Dense_0"]["kernel"] is None
    np.testing.assert_array_equal(grads["Dense_0"]["bias"], [[16.0] * 8, [2.0] * 8])


@BOX_KINDS
def test_frozen_kernels_under_vmap_are_sharded_applied_and_not_differentiated(kind):
    stacked = nn.vmap(
        nn.Dense,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=None,
        axis_size=2,
        metadata_params=STACK,
    )
    model = stacked(8, kernel_init=frozen_kernel_init(kind), bias_init=nn.initializers.ones)
    mesh, shardings, params, out, grads = on_a_mesh(model, jnp.ones((1, 8)))
    kernel = params["kernel"]
    assert ffl.FrozenBox in {type(kernel), type(kernel.unbox())}
    assert nn.unbox(kernel).shape == (2, 8, 8)
    sharding = NamedSharding(mesh, stacked_spec(kind))
    assert shardings["kernel"] == sharding
    assert nn.unbox(kernel).sharding == sharding
    np.testing.assert_array_equal(out, np.full((2, 1, 8), 9.0))  # 8 * 1 + 1
    assert grads["kernel"] is None
    np.testing.assert_array_equal(grads["bias"], np.ones((2, 8)))


def test_dense_general_reshapes_a_frozen_kernel_inside_its_box():
    # DenseGeneral (and attention, built on it) re-boxes its reshaped kernel.
    dense = nn.DenseGeneral((2, 3), kernel_init=ffl.frozen(nn.initializers.ones))
    x = jnp.ones((1, 4))
    params = dense.init(jax.random.key(0), x)["params"]
    assert type(params["kernel"]) is ffl.FrozenBox
    assert params["kernel"].value.shape == (4, 2, 3)
    np.testing.assert_array_equal(dense.apply({"params": params}, x), np.full((1, 2, 3), 4.0))
    grads = ff.grad(lambda p: dense.apply({"params": p}, x).sum())(params)
    assert grads["kernel"] is None
    np.testing.assert_array_equal(grads["bias"], np.ones((2, 3)))


# --------------------------------------------------------------------------- freeze / unfreeze


def test_freeze_params_dict_by_regex_without_copies():
    params = init()["params"]
    frozen = ffl.freeze(params, ff.PathRegex("mid/.*"))
    assert frozen is not params
    assert type(frozen["mid"]["kernel"]) is ffl.FrozenBox
    assert frozen["mid"]["kernel"].value is params["mid"]["kernel"]
    assert frozen["head"]["kernel"] is params["head"]["kernel"]
    assert type(params["mid"]["kernel"]) is not ffl.FrozenBox  # the input is untouched
    thawed = ffl.unfreeze(frozen, "mid/.*")
    assert thawed["mid"]["kernel"] is params["mid"]["kernel"]
    assert type(thawed["body"]["kernel"]) is ffl.FrozenBox  # not selected


def test_freeze_by_callable_and_default_filters():
    params = init()["params"]
    frozen = ffl.freeze(params, lambda path, value: path[0] == "head")
    assert {k for k, v in leaves_by_path(frozen).items() if isinstance(v, ffl.FrozenBox)} == {
        "['body']['kernel']",
        "['head']['bias']",
        "['head']['kernel']",
    }
    everything = ffl.freeze(params)
    assert all(type(v) is ffl.FrozenBox for v in leaves_by_path(everything).values())
    assert not any(
        type(v) is ffl.FrozenBox for v in leaves_by_path(ffl.unfreeze(everything)).values()
    )


def test_variables_dict_only_params_are_touched():
    v = init()
    frozen = ffl.freeze(v, ff.PathRegex(".*"))
    assert frozen["batch_stats"] is v["batch_stats"] or frozen["batch_stats"] == v["batch_stats"]
    assert type(frozen["batch_stats"]["bn"]["mean"]) is not ffl.FrozenBox
    assert type(frozen["params"]["head"]["kernel"]) is ffl.FrozenBox
    extra = {
        **v,
        "frozen_params": {"scale": ffl.FrozenBox(jnp.ones(2))},
        "cache": {"k": jnp.ones(2)},
    }
    thawed = ffl.unfreeze(extra, ff.PathRegex(".*"))
    assert type(thawed["frozen_params"]["scale"]) is ffl.FrozenBox
    assert type(thawed["params"]["body"]["kernel"]) is not ffl.FrozenBox
    with pytest.raises(ValueError, match=r"matched no parameter"):
        ffl.freeze(v, ff.PathRegex("batch_stats/.*"))


def test_matched_nothing_and_bad_filter():
    params = init()["params"]
    with pytest.raises(
        ValueError, match=r"PathRegex\('encoder/\.\*'\).*matched no parameter.*head/bias"
    ):
        ffl.freeze(params, ff.PathRegex("encoder/.*"))
    assert ffl.freeze(params, "encoder/.*", missing_ok=True) == params
    with pytest.raises(
        TypeError, match=r"`filter` must be ff.PathRegex, a regex string or a callable"
    ):
        ffl.freeze(params, 3)


# --------------------------------------------------------------------------- gradients


def loss_params(params, batch_stats):
    logits, upd = Net().apply(
        {"params": params, "batch_stats": batch_stats}, X, mutable=["batch_stats"]
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean(), upd


def test_ff_grad_on_params_dict_gives_none_at_frozen_leaves():
    v = init()
    params = ffl.freeze(v["params"], ff.PathRegex("mid/.*"))
    grads, upd = ff.grad(loss_params, has_aux=True)(params, v["batch_stats"])
    assert grads["body"]["kernel"] is None
    assert grads["mid"] == {"bias": None, "kernel": None}
    # the trainable leaves equal a hand-written split
    trainable = {"head": params["head"], "bias": params["body"]["bias"], "bn": params["bn"]}

    def closed(t):
        p = {**params, "head": t["head"], "bn": t["bn"]}
        p = {**p, "body": {**params["body"], "bias": t["bias"]}}
        return loss_params(p, v["batch_stats"])[0]

    ref = jax.grad(closed)(trainable)
    np.testing.assert_allclose(
        np.asarray(grads["head"]["kernel"]), np.asarray(ref["head"]["kernel"]), rtol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(grads["body"]["bias"]), np.asarray(ref["bias"]), rtol=1e-5
    )
    assert upd["batch_stats"]["bn"]["mean"].shape == (16,)


def test_ffl_grad_on_whole_variables_dict():
    v = init()
    v = ffl.freeze(v, ff.PathRegex("params/mid/.*"))

    def loss(variables):
        logits, upd = Net().apply(variables, X, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean(), upd

    (value, upd), grads = ffl.value_and_grad(loss, has_aux=True)(v)
    assert set(grads) == {"params"}
    assert grads["params"]["mid"]["kernel"] is None
    assert grads["params"]["body"]["kernel"] is None
    assert grads["params"]["head"]["kernel"].shape == (16, 2)
    g2, upd2 = ffl.grad(loss, has_aux=True)(v)
    np.testing.assert_array_equal(
        np.asarray(g2["params"]["head"]["kernel"]), np.asarray(grads["params"]["head"]["kernel"])
    )
    np.testing.assert_array_equal(
        np.asarray(upd2["batch_stats"]["bn"]["mean"]), np.asarray(upd["batch_stats"]["bn"]["mean"])
    )
    assert float(value) > 0


def test_ffl_grad_rejects_a_params_dict():
    with pytest.raises(
        TypeError, match=r"`argnums` names argument 0, which is not a Linen variables dict"
    ):
        ffl.grad(lambda p: 0.0)(init()["params"])


def test_ffl_value_and_grad_and_grad_with_a_tuple_of_argnums():
    head = nn.Dense(3)
    net_vars = init()  # body/kernel declared frozen
    head_vars = ffl.freeze(head.init(jax.random.key(1), jnp.ones((1, 2))), "params/kernel")

    def loss(net_vars, head_vars, x):
        return jnp.mean(head.apply(head_vars, Net().apply(net_vars, x, train=False)) ** 2)

    value, (g_net, g_head) = ffl.value_and_grad(loss, argnums=(0, 1))(net_vars, head_vars, X)
    # The reference: plain jax.grad over every unboxed parameter, frozen ones included.
    plain_net, plain_head = nn.unbox(ffl.unfreeze(net_vars)), ffl.unfreeze(head_vars)
    ref_value, (ref_net, ref_head) = jax.value_and_grad(
        lambda n, h: loss({**plain_net, "params": n}, {"params": h}, X), argnums=(0, 1)
    )(plain_net["params"], plain_head["params"])
    assert float(value) == float(ref_value)
    assert set(g_net) == set(g_head) == {"params"}  # batch_stats is not differentiated
    assert g_net["params"]["body"]["kernel"] is None
    assert g_head["params"]["kernel"] is None
    expected_net = {**ref_net, "body": {**ref_net["body"], "kernel": None}}
    assert jax.tree.structure(g_net["params"]) == jax.tree.structure(expected_net)
    for got, want in zip(
        jax.tree.leaves(g_net["params"]), jax.tree.leaves(expected_net), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(g_head["params"]["bias"], ref_head["bias"])
    # ffl.grad, in the order of argnums, with aux.
    (g_head2, g_net2), aux = ffl.grad(
        lambda n, h, x: (loss(n, h, x), x.shape[0]), argnums=(1, 0), has_aux=True
    )(net_vars, head_vars, X)
    assert aux == 8
    np.testing.assert_array_equal(g_head2["params"]["bias"], g_head["params"]["bias"])
    np.testing.assert_array_equal(
        g_net2["params"]["head"]["kernel"], g_net["params"]["head"]["kernel"]
    )


def test_ffl_grad_leaves_the_frozen_params_collection_of_to_linen_alone():
    class M(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 2, rngs=rngs)
            self.scale = ff.FrozenParam(jnp.full(2, 3.0))

        def __call__(self, x):
            return self.lin(x) * self.scale

    lm = nnx.bridge.ToLinen(M, args=())
    v = lm.init(jax.random.key(0), jnp.ones((1, 3)))
    assert set(v) == {"params", "frozen_params"}
    g = ffl.grad(lambda v: lm.apply(v, jnp.ones((1, 3))).sum())(v)
    assert set(g) == {"params"}
    np.testing.assert_allclose(np.asarray(g["params"]["lin"]["bias"]), [3.0, 3.0])
    s = ff.summary(v)
    assert s.frozen_count == 2
    assert s.trainable_count == 8


class Deep(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(4):
            x = nn.relu(nn.Dense(256, name=f"layer{i}")(x))
        return nn.Dense(10, name="head")(x)


@pytest.mark.parametrize("clip", [False, True], ids=["plain", "clip-by-global-norm"])
@pytest.mark.parametrize("via", ["ff.grad", "ffl.grad"])
def test_no_frozen_weight_gradients_inflops(clip, via):
    x = jax.random.normal(jax.random.key(0), (64, 256))
    y = jnp.arange(64) % 10
    v = Deep().init(jax.random.key(1), x)
    frozen = ffl.freeze(v, ff.PathRegex("params/layer.*"))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)) if clip else optax.adam(1e-3)

    def loss_vars(variables):
        return optax.softmax_cross_entropy_with_integer_labels(Deep().apply(variables, x), y).mean()

    def step_ff(variables):
        if via == "ffl.grad":
            grads = ffl.grad(loss_vars)(variables)["params"]
        else:
            grads = ff.grad(lambda p: loss_vars({"params": p}))(variables["params"])
        state = tx.init(ff.trainable_tree(variables["params"]))
        updates, _ = tx.update(grads, state)
        return ff.apply_updates(variables["params"], updates), grads

    def step_split(variables):
        params = nn.meta.unbox(variables["params"])
        head = params["head"]
        grads = jax.grad(lambda h: loss_vars({"params": {**params, "head": h}}))(head)
        state = tx.init(head)
        updates, _ = tx.update(grads, state)
        return optax.apply_updates(head, updates), grads

    def step_full(variables):
        params = nn.meta.unbox(variables["params"])
        return jax.grad(lambda p: loss_vars({"params": p}))(params)

    f_ff, f_split, f_full = (
        flops(step_ff, frozen),
        flops(step_split, frozen),
        flops(step_full, frozen),
    )
    assert abs(f_ff - f_split) <= 0.01 * f_split, (f_ff, f_split)
    assert f_full > 2.0 * f_split


# --------------------------------------------------------------------------- TrainState


class BNState(ffl.TrainState):
    batch_stats: Any


@jax.jit
def bn_step(state, x, y):
    def loss(params):
        logits, upd = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, x, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

    (_, upd), grads = ff.value_and_grad(loss, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=upd["batch_stats"])


def make_state(tx):
    v = init()
    return BNState.create(
        apply_fn=Net().apply, params=v["params"], tx=tx, batch_stats=v["batch_stats"]
    )


def test_train_state_is_a_flax_train_state_with_the_same_create():
    state = make_state(optax.adam(1e-2))
    assert isinstance(state, train_state.TrainState)
    assert int(state.step) == 0
    # apply_fn works on the boxed params unchanged
    state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, X, train=False)
    mu = state.opt_state[0].mu
    assert mu["body"]["kernel"] is None
    assert mu["head"]["kernel"].shape == (16, 2)


@pytest.mark.parametrize(
    "tx",
    [
        pytest.param(optax.adamw(0.1, weight_decay=0.5), id="adamw"),
        pytest.param(optax.chain(optax.add_decayed_weights(0.5), optax.sgd(0.1)), id="decay-sgd"),
        pytest.param(optax.lion(0.1, weight_decay=0.5), id="lion"),
        pytest.param(
            optax.chain(optax.clip_by_global_norm(0.1), optax.adamw(0.1)), id="clip-adamw"
        ),
    ],
)
def test_frozen_params_stay_bit_identical(tx):
    state = make_state(tx)
    state = state.freeze(ff.PathRegex("mid/.*"))
    before = nn.meta.unbox(state.params)
    mean_before = np.asarray(state.batch_stats["bn"]["mean"])
    for _ in range(3):
        state = bn_step(state, X, Y)
    after = nn.meta.unbox(state.params)
    for name in ("body", "mid"):
        np.testing.assert_array_equal(
            np.asarray(after[name]["kernel"]), np.asarray(before[name]["kernel"])
        )
    assert not np.array_equal(
        np.asarray(after["head"]["kernel"]), np.asarray(before["head"]["kernel"])
    )
    assert not np.array_equal(np.asarray(state.batch_stats["bn"]["mean"]), mean_before)
    assert int(state.step) == 3


def test_unfreeze_migrates_optimizer_state():
    state = make_state(optax.adam(1e-2))
    for _ in range(2):
        state = bn_step(state, X, Y)
    head_mu = np.asarray(state.opt_state[0].mu["head"]["kernel"])
    count = int(state.opt_state[0].count)
    state = state.unfreeze(ff.PathRegex("body/kernel"))
    assert type(state.params["body"]["kernel"]) is not ffl.FrozenBox
    np.testing.assert_array_equal(np.asarray(state.opt_state[0].mu["head"]["kernel"]), head_mu)
    assert int(state.opt_state[0].count) == count
    np.testing.assert_array_equal(np.asarray(state.opt_state[0].mu["body"]["kernel"]), 0.0)
    state = bn_step(state, X, Y)
    assert int(state.step) == 3
    state = state.freeze(ff.PathRegex("head/.*"))
    assert state.opt_state[0].mu["head"] == {"bias": None, "kernel": None}
    state = bn_step(state, X, Y)


def test_apply_gradients_accepts_ffl_grad_output():
    state = make_state(optax.sgd(0.1))
    grads = ffl.grad(lambda v: loss_params(v["params"], v["batch_stats"])[0])(
        {"params": state.params, "batch_stats": state.batch_stats}
    )
    new = state.apply_gradients(grads=grads)
    delta = np.asarray(new.params["head"]["bias"]) - np.asarray(state.params["head"]["bias"])
    np.testing.assert_allclose(delta, -0.1 * np.asarray(grads["params"]["head"]["bias"]), rtol=1e-6)


# --------------------------------------------------------------------------- the bridge


def test_to_nnx_bridge_makes_frozen_boxes_frozen_params():
    linen = nn.Sequential(
        [nn.Dense(4, kernel_init=ffl.frozen(nn.initializers.lecun_normal())), nn.Dense(2)]
    )
    model = nnx.bridge.ToNNX(linen, rngs=nnx.Rngs(0))
    model = nnx.bridge.lazy_init(model, jnp.ones((1, 3)))
    kernel = model.layers_0["kernel"]
    assert type(kernel) is nnx.Param  # plain bridge: a Param that remembers its box type
    assert kernel.get_metadata()["linen_meta_type"] is ffl.FrozenBox
    assert ffl.to_nnx(model) is model
    assert type(model.layers_0["kernel"]) is ff.FrozenParam
    assert type(model.layers_1["kernel"]) is nnx.Param
    grads = ff.grad(lambda m: m(jnp.ones((1, 3))).sum())(model)
    assert {p for p, _ in nnx.to_flat_state(grads)} == {
        ("layers_0", "bias"),
        ("layers_1", "bias"),
        ("layers_1", "kernel"),
    }


# --------------------------------------------------------------------------- summary


def test_summary_of_params_and_variables_dicts():
    v = init()
    s = ff.summary(v["params"])
    rows = {r.path: r for r in s.rows}
    assert rows["body/kernel"].status == "frozen"
    assert rows["body/kernel"].type == "FrozenBox"
    assert rows["head/kernel"].status == "trainable"
    assert s.frozen_count == 3 * 16
    s = ff.summary(v)
    rows = {r.path: r for r in s.rows}
    assert rows["batch_stats/bn/mean"].status == "state"
    assert rows["params/body/kernel"].status == "frozen"
    assert s.totals.count["state"] == 32
    assert s.trainable_count == 16 + 16 * 2 + 16 * 16 + 16 + 16 * 2 + 2


# --------------------------------------------------------------------------- the example


def test_linen_example_fine_tunes_with_frozen_convolutions():
    import linen_finetune

    r = linen_finetune.main(steps=60)  # raises if a frozen convolution moved
    assert r["pretrain"] > 0.8
    assert r["head_only"] > 0.6  # chance is 0.2
    assert r["all"] > 0.6


def test_summary_of_a_train_state_counts_optimizer_state_as_state():
    state = make_state(optax.adam(1e-2)).freeze(ff.PathRegex("mid/.*"))
    s = ff.summary(state)
    rows = {r.path: r for r in s.rows}
    assert rows["params/mid/kernel"].status == "frozen"
    assert rows["params/head/kernel"].status == "trainable"
    assert rows["opt_state/0/mu/head/kernel"].status == "state"
    assert rows["batch_stats/bn/mean"].status == "state"
    assert s.trainable_count == ff.summary(state.params).trainable_count
