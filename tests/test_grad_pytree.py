"""ff.grad, freeze/unfreeze and FrozenParam as a marker in arbitrary pytrees."""

import typing

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, struct

import flax_freeze as ff
from flax_freeze import linen as ffl
from flax_freeze._filters import path_str
from helpers import ADAMW, FROZEN0, RBF, Net, assert_same, flops, loss_fn


class View(typing.NamedTuple):
    parameter: typing.Any
    num_data: typing.Any


@struct.dataclass
class Lin:
    slope: typing.Any
    name: str = struct.field(pytree_node=False, default="lin")


def func(s):
    return jnp.exp(s.parameter) ** 2 / s.num_data


# ---------------------------------------------------------------------------------------
# The request that started the project


@pytest.mark.parametrize("frozen", [100, 100.0], ids=["int", "float"])
def test_the_seed_example_runs_with_frozen_param(frozen):
    s = View(2.0, ff.FrozenParam(frozen))
    g = ff.grad(func)(s)
    assert g.num_data is None
    np.testing.assert_allclose(float(g.parameter), 2 * np.exp(4.0) / 100, rtol=1e-6)
    assert isinstance(g, View)


def test_plain_jax_grad_differentiates_a_float_frozen_param():
    s = View(2.0, ff.FrozenParam(100.0))
    g = jax.grad(func)(s)
    # jax.grad sees the FrozenParam as pytree data and differentiates it.
    np.testing.assert_allclose(float(g.num_data[...]), -np.exp(4.0) / 100**2, rtol=1e-5)
    # stop_frozen gives the way out: an exact zero, the rest unchanged.
    g = jax.grad(lambda t: func(ff.stop_frozen(t)))(s)
    assert float(g.num_data[...]) == 0.0
    np.testing.assert_allclose(float(g.parameter), 2 * np.exp(4.0) / 100, rtol=1e-6)


def test_stop_frozen_keeps_structure_and_metadata():
    tree = {"a": jnp.ones(2), "b": ff.FrozenParam(jnp.ones(2), note="x")}
    out = ff.stop_frozen(tree)
    assert out["a"] is tree["a"]
    assert type(out["b"]) is ff.FrozenParam
    assert out["b"].get_metadata()["note"] == "x"


def test_stop_frozen_on_linen_frozen_boxes_gives_plain_jax_grad_a_zero():
    ones = nn.initializers.ones
    model = nn.Sequential(
        [
            nn.Dense(4, kernel_init=ffl.frozen(ones)),
            nn.Dense(2, kernel_init=ffl.frozen(nn.with_partitioning(ones, (None, "model")))),
        ]
    )
    x = jnp.ones((1, 3))
    params = model.init(jax.random.key(0), x)["params"]

    def loss(p):  # h = [3, 3, 3, 3], out = [12, 12]
        return model.apply({"params": p}, x).sum()

    plain = jax.grad(loss)(params)  # a box is a pytree node: its value is differentiated
    np.testing.assert_array_equal(nn.unbox(plain["layers_0"]["kernel"]), np.full((3, 4), 2.0))
    np.testing.assert_array_equal(nn.unbox(plain["layers_1"]["kernel"]), np.full((4, 2), 3.0))
    stopped = jax.grad(lambda p: loss(ff.stop_frozen(p)))(params)
    assert jax.tree.structure(stopped) == jax.tree.structure(params)  # boxes and names kept
    assert type(stopped["layers_1"]["kernel"]) is ffl.FrozenBox
    assert stopped["layers_1"]["kernel"].value.names == (None, "model")
    np.testing.assert_array_equal(nn.unbox(stopped["layers_0"]["kernel"]), np.zeros((3, 4)))
    np.testing.assert_array_equal(nn.unbox(stopped["layers_1"]["kernel"]), np.zeros((4, 2)))
    np.testing.assert_array_equal(stopped["layers_0"]["bias"], [2.0] * 4)
    np.testing.assert_array_equal(stopped["layers_1"]["bias"], [1.0] * 2)
    grads = ff.grad(loss)(params)  # what ff.grad gives without building the zeros
    assert grads["layers_0"]["kernel"] is None
    assert grads["layers_1"]["kernel"] is None
    np.testing.assert_array_equal(grads["layers_0"]["bias"], stopped["layers_0"]["bias"])
    np.testing.assert_array_equal(grads["layers_1"]["bias"], stopped["layers_1"]["bias"])


# ---------------------------------------------------------------------------------------
# Which leaves are differentiated, and the mirror that comes back


def test_mirror_of_a_nested_mix():
    tree = {
        "rbf": RBF(jnp.array(1.5), ff.FrozenParam(jnp.array(0.5))),
        "lin": Lin(jnp.array([1.0, 2.0])),
        "list": [2.0, 3, True, "s", jnp.arange(3), jnp.array([1.0], jnp.float16)],
        "param": nnx.Param(jnp.array(3.0)),
        "none": None,
    }

    def f(t, x):
        out = t["rbf"].variance * jnp.exp(-x / t["rbf"].lengthscale)
        out = out + (t["lin"].slope * x).sum() + t["list"][0] ** 2 * t["list"][1]
        out = out + t["param"] * 2 + t["list"][5].astype(jnp.float32).sum()
        return out.sum() + t["list"][4].sum()

    g = ff.grad(f)(tree, jnp.array(1.0))
    assert g["rbf"].lengthscale is None
    np.testing.assert_allclose(float(g["rbf"].variance), np.exp(-2.0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g["lin"].slope), [1.0, 1.0])
    assert g["lin"].name == "lin"
    np.testing.assert_allclose(float(g["list"][0]), 12.0)
    assert g["list"][1:5] == [None, None, None, None]
    assert g["list"][5].dtype == jnp.float16
    assert float(g["list"][5][0]) == 1.0
    assert type(g["param"]) is nnx.Param
    assert float(g["param"][...]) == 2.0
    assert g["none"] is None


def test_values_equal_a_hand_closed_function():
    k = RBF(jnp.array(1.3), ff.FrozenParam(jnp.array(0.7)))
    x = jnp.linspace(0, 1, 5)

    def loss(k):
        return (k.variance * jnp.exp(-(x**2) / k.lengthscale)).sum()

    g = ff.grad(loss)(k)
    expected = jax.grad(lambda v: (v * jnp.exp(-(x**2) / 0.7)).sum())(jnp.array(1.3))
    np.testing.assert_allclose(float(g.variance), float(expected), rtol=1e-6)


def test_modules_inside_a_pytree_give_their_state():
    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    ff.freeze(model, ff.PathRegex("kernel"))
    tree = (model, {"w": jnp.ones(2)})
    g = ff.grad(lambda t: t[0](t[1]["w"][None]).sum() + t[1]["w"].sum())(tree)
    assert isinstance(g[0], nnx.State)
    assert set(g[0].keys()) == {"bias"}
    np.testing.assert_allclose(np.asarray(g[1]["w"]), 1.0 + np.asarray(model.kernel[...])[:, 0])


def test_bare_array_and_float_arguments():
    np.testing.assert_allclose(np.asarray(ff.grad(lambda x: (x**2).sum())(jnp.ones(3))), 2.0)
    assert float(ff.grad(lambda x: x**3)(2.0)) == 12.0
    assert ff.grad(lambda x: 1.0 * x)(ff.FrozenParam(2.0)) == nnx.State({})


def test_value_and_grad_argnums_and_aux_on_pytrees():
    tree = {"a": 2.0, "b": ff.FrozenParam(3.0)}
    (loss, aux), (g0, g1) = ff.value_and_grad(
        lambda t, y: (t["a"] * t["b"] * y, "aux"), argnums=(0, 1), has_aux=True
    )(tree, 5.0)
    assert float(loss) == 30.0
    assert aux == "aux"
    assert float(g0["a"]) == 15.0
    assert g0["b"] is None
    assert float(g1) == 6.0


def test_wrt_filter_on_pytree_leaves():
    tree = RBF(jnp.array(1.0), jnp.array(2.0))
    g = ff.grad(lambda k: k.variance * k.lengthscale, wrt=ff.PathRegex("lengthscale"))(tree)
    assert g.variance is None
    assert float(g.lengthscale) == 1.0


def test_complex_leaves_are_differentiated():
    z = {"z": jnp.array(1.0 + 2.0j)}
    g = ff.grad(lambda t: jnp.abs(t["z"]) ** 2)(z)
    np.testing.assert_allclose(complex(g["z"]), 2.0 - 4.0j)


# ---------------------------------------------------------------------------------------
# optax on pytrees: trainable_tree and apply_updates


def test_optax_step_on_a_pytree_never_moves_frozen_values():
    tree = {"w": jnp.array([1.0, -1.0]), "f": ff.FrozenParam(jnp.array([5.0])), "n": 4}
    tx = optax.adamw(0.1, weight_decay=0.5)
    state = tx.init(ff.trainable_tree(tree))
    assert len(jax.tree.leaves(state)) == 3  # count, mu["w"], nu["w"]

    def loss(t):
        return ((t["w"] - t["f"]) ** 2).sum() * t["n"]

    for _ in range(3):
        grads = ff.grad(loss)(tree)
        updates, state = tx.update(grads, state, ff.trainable_tree(tree))
        tree = ff.apply_updates(tree, updates)
    assert type(tree["f"]) is ff.FrozenParam
    np.testing.assert_array_equal(np.asarray(tree["f"][...]), [5.0])
    assert tree["n"] == 4
    assert not np.allclose(np.asarray(tree["w"]), [1.0, -1.0])


X = jax.random.normal(jax.random.key(0), (16, 3))
Y = jax.random.normal(jax.random.key(1), (16, 2))


def test_trainable_tree_of_a_module_drives_a_plain_optax_loop_like_nnx_state():
    model, twin = ff.freeze(Net(0), FROZEN0), ff.freeze(Net(0), FROZEN0)
    tree = ff.trainable_tree(model)
    assert isinstance(tree, nnx.State)
    assert {path_str(p) for p, _ in nnx.to_flat_state(tree)} == {
        "layers/1/bias",
        "layers/1/kernel",
        "norm/bias",
        "norm/scale",
    }
    assert tree["layers"][1]["kernel"] is model.layers[1].kernel
    frozen = np.array(model.layers[0].kernel[...])
    opt_state = ADAMW.init(ff.trainable_tree(model))
    ref_state = ADAMW.init(nnx.state(twin, nnx.Param))  # Flax's own loop with plain optax
    for _ in range(2):
        grads = ff.grad(loss_fn)(model, X, Y)
        updates, opt_state = ADAMW.update(grads, opt_state, ff.trainable_tree(model))
        nnx.update(model, optax.apply_updates(ff.trainable_tree(model), updates))
        ref_grads = nnx.grad(loss_fn)(twin, X, Y)
        ref_updates, ref_state = ADAMW.update(ref_grads, ref_state, nnx.state(twin, nnx.Param))
        nnx.update(twin, optax.apply_updates(nnx.state(twin, nnx.Param), ref_updates))
    assert jax.tree.structure(opt_state) == jax.tree.structure(ref_state)
    assert_same(model, twin)  # parameters, batch statistics and RNG state
    np.testing.assert_array_equal(model.layers[0].kernel[...], frozen)  # despite weight decay
    assert not np.array_equal(model.layers[1].kernel[...], Net(0).layers[1].kernel[...])


def test_trainable_tree_of_a_pytree_holding_a_module_mirrors_its_grads():
    tree = (ff.freeze(Net(0), FROZEN0), {"w": jnp.ones(2), "f": ff.FrozenParam(jnp.full(2, 3.0))})
    trainable = ff.trainable_tree(tree)
    assert isinstance(trainable[0], nnx.State)
    assert {path_str(p) for p, _ in nnx.to_flat_state(trainable[0])} == {
        "layers/1/bias",
        "layers/1/kernel",
        "norm/bias",
        "norm/scale",
    }
    assert trainable[1]["f"] is None
    np.testing.assert_array_equal(trainable[1]["w"], [1.0, 1.0])

    def loss(t):
        return loss_fn(t[0], X * t[1]["w"][0], Y) + (t[1]["w"] * t[1]["f"]).sum()

    grads = ff.grad(loss)(tree)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    tx = optax.sgd(0.5)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    np.testing.assert_array_equal(updates[1]["w"], grads[1]["w"] * -0.5)
    assert updates[1]["f"] is None


def test_apply_updates_keeps_dtype_and_variables():
    tree = {"h": jnp.ones(2, jnp.bfloat16), "p": nnx.Param(jnp.ones(2))}
    out = ff.apply_updates(tree, {"h": jnp.full(2, 0.5), "p": nnx.Param(jnp.full(2, 0.25))})
    assert out["h"].dtype == jnp.bfloat16
    assert type(out["p"]) is nnx.Param
    np.testing.assert_array_equal(np.asarray(out["p"][...]), [1.25, 1.25])


# ---------------------------------------------------------------------------------------
# freeze / unfreeze / freezing on pytrees


def test_freeze_and_unfreeze_return_new_trees():
    k = RBF(1.0, 0.5)
    frozen = ff.freeze(k, ff.PathRegex("lengthscale"))
    assert k.lengthscale == 0.5  # the original is untouched
    assert type(frozen.lengthscale) is ff.FrozenParam
    assert frozen.lengthscale.get_value() == 0.5
    back = ff.unfreeze(frozen, ff.PathRegex(".*lengthscale"))
    assert back == k
    assert ff.unfreeze(View(2.0, ff.FrozenParam(3.0))).num_data == 3.0


def test_freeze_by_callable_and_type_filters_on_pytrees():
    tree = {"a": jnp.ones(2), "b": [jnp.zeros(1), nnx.LoRAParam(jnp.ones(1))]}
    frozen = ff.freeze(tree, lambda path, v: path[0] == "b")
    assert type(frozen["a"]) is not ff.FrozenParam
    assert type(frozen["b"][0]) is ff.FrozenParam
    assert type(frozen["b"][1]) is ff.FrozenParam
    assert type(ff.unfreeze(frozen, nnx.Not(nnx.PathContains("a")))["b"][1]) is nnx.LoRAParam
    only_lora = ff.freeze(tree, nnx.LoRAParam)
    assert type(only_lora["b"][1]) is ff.FrozenParam
    assert type(only_lora["b"][0]) is not ff.FrozenParam


def test_matched_nothing_on_pytrees():
    with pytest.raises(ValueError, match=r"PathRegex\('nope'\).*matched no parameter of RBF"):
        ff.freeze(RBF(1.0, 2.0), ff.PathRegex("nope"))
    assert ff.freeze(RBF(1.0, 2.0), ff.PathRegex("nope"), missing_ok=True) == RBF(1.0, 2.0)


def test_freezing_yields_a_new_tree():
    k = RBF(1.0, 2.0)
    with ff.freezing(k, ff.PathRegex("variance")) as frozen:
        assert type(frozen.variance) is ff.FrozenParam
        g = ff.grad(lambda k: k.variance * k.lengthscale)(frozen)
        assert g.variance is None
    assert k.variance == 1.0


# ---------------------------------------------------------------------------------------
# Tracers inside FrozenParam


def test_tracers_live_inside_frozen_param_under_jit_vmap_scan():
    def loss(k, x):
        return (k.variance * jnp.exp(-x / k.lengthscale)).sum()

    k = RBF(jnp.array(1.0), ff.FrozenParam(jnp.array(0.5)))
    x = jnp.linspace(0, 1, 4)
    g = jax.jit(ff.grad(loss))(k, x)
    assert g.lengthscale is None
    # vmap over a batch of frozen values
    ks = RBF(jnp.ones(3), ff.FrozenParam(jnp.array([0.5, 1.0, 2.0])))
    gs = jax.vmap(ff.grad(loss), in_axes=(0, None))(ks, x)
    np.testing.assert_allclose(np.asarray(gs.variance)[0], float(g.variance), rtol=1e-6)

    def body(k, _):
        gk = ff.grad(loss)(k, x)
        return ff.apply_updates(k, jax.tree.map(lambda v: -0.1 * v, gk)), k.lengthscale * 1.0

    final, seen = jax.lax.scan(body, k, None, length=3)
    assert float(final.lengthscale[...]) == 0.5
    np.testing.assert_array_equal(np.asarray(seen), [0.5, 0.5, 0.5])


def test_frozen_param_built_from_a_tracer_inside_jit_and_nnx_jit():
    @jax.jit
    def f(x):
        tree = {"w": x * 2, "f": ff.FrozenParam(x + 1)}
        return ff.grad(lambda t: (t["w"] * t["f"]).sum())(tree)["w"]

    np.testing.assert_allclose(np.asarray(f(jnp.ones(2))), [2.0, 2.0])

    class M(nnx.Module):
        def __init__(self):
            self.k = nnx.data(RBF(nnx.Param(jnp.array(2.0)), ff.FrozenParam(jnp.array(3.0))))

    @nnx.jit
    def g(m):
        return ff.grad(lambda m: m.k.variance * m.k.lengthscale)(m)

    grads = g(M())
    assert {p for p, _ in nnx.to_flat_state(grads)} == {("k", "variance")}


def test_retracing_follows_the_frozen_set_not_the_values():
    traces = []

    @jax.jit
    def step(k):
        traces.append(1)
        return ff.grad(lambda k: k.variance * k.lengthscale)(k)

    k = RBF(jnp.array(1.0), ff.FrozenParam(jnp.array(2.0)))
    step(k)
    step(RBF(jnp.array(5.0), ff.FrozenParam(jnp.array(7.0))))  # new values: no retrace
    assert len(traces) == 1
    step(ff.unfreeze(k))  # a new frozen set: one retrace
    step(ff.unfreeze(RBF(jnp.array(3.0), ff.FrozenParam(jnp.array(4.0)))))
    assert len(traces) == 2


# ---------------------------------------------------------------------------------------
# The frozen part's backward work is not done


def test_gp_grad_with_frozen_lengthscale_does_no_lengthscale_work():
    from gp_kernels import GP, RBF as GPRBF, diabetes, neg_log_marginal_likelihood  # noqa: I001

    x, y = diabetes(60)  # small n: the Cholesky (n^3) does not drown the n^2 d kernel work
    d = x.shape[1]
    ls = jnp.full((d,), 0.5)
    frozen = GP(GPRBF(jnp.array(0.0), ff.FrozenParam(ls)), jnp.array(0.0))
    trainable = GP(GPRBF(jnp.array(0.0), ls), jnp.array(0.0))

    def closed(variance, noise):  # hand-written: closes over the frozen lengthscale
        return neg_log_marginal_likelihood(GP(GPRBF(variance, ls), noise), x, y)

    f_frozen = flops(lambda gp: ff.grad(neg_log_marginal_likelihood)(gp, x, y), frozen)
    f_closed = flops(jax.grad(closed, argnums=(0, 1)), jnp.array(0.0), jnp.array(0.0))
    f_trainable = flops(lambda gp: ff.grad(neg_log_marginal_likelihood)(gp, x, y), trainable)
    assert f_frozen <= f_closed * 1.001
    assert f_trainable > f_frozen * 1.2, (f_trainable, f_frozen)


# ---------------------------------------------------------------------------------------
# The example


def test_gp_example_improves_each_phase_and_keeps_frozen_values(capsys):
    import gp_kernels

    r = gp_kernels.main(n=80, steps=30)  # asserts inside: frozen values never move
    assert r["lengthscale_frozen"] < r["start"]
    assert r["all_trained"] < r["lengthscale_frozen"]
    assert r["composite"] < r["composite_start"]
    out = capsys.readouterr().out
    assert "phase 2, lengthscales trained" in out
