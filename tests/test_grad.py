"""Tests for ``ff.grad`` / ``ff.value_and_grad`` on NNX modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flax_freeze as ff
from helpers import flops

RTOL, ATOL = 1e-5, 1e-6


# --------------------------------------------------------------------------- models


class Counter(nnx.Variable):
    """A custom, non-parameter variable that the loss writes."""


class Net(nnx.Module):
    """Linear body -> tanh -> head, scaled by a parameter declared frozen."""

    def __init__(self, rngs: nnx.Rngs, din: int = 3, dh: int = 5, dout: int = 2) -> None:
        self.body = nnx.Linear(din, dh, rngs=rngs)
        self.head = nnx.Linear(dh, dout, rngs=rngs)
        self.scale = ff.FrozenParam(jnp.linspace(0.5, 1.5, dout))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(jnp.tanh(self.body(x))) * self.scale


def make_net(seed: int = 0) -> Net:
    """Net with ``scale`` declared frozen and ``body/kernel`` frozen by ``ff.freeze``."""
    net = Net(nnx.Rngs(seed))
    ff.freeze(net, ff.PathRegex("body/kernel"))
    return net


NET_TRAINABLE = {("body", "bias"), ("head", "bias"), ("head", "kernel")}
NET_FROZEN = {("body", "kernel"), ("scale",)}


class BNNet(nnx.Module):
    """Frozen Linear -> BatchNorm (training mode) -> Linear, and a call counter."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.body = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.5, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)
        self.calls = Counter(jnp.array(0, dtype=jnp.int32))

    def __call__(self, x: jax.Array) -> jax.Array:
        self.calls[...] += 1
        return self.head(jnp.tanh(self.bn(self.body(x))))


def make_bn_net() -> BNNet:
    net = BNNet(nnx.Rngs(0))
    ff.freeze(net, ff.PathRegex("body/.*"))
    return net


class Tied(nnx.Module):
    """Two layers; ``b.kernel`` is the very same ``nnx.Param`` object as ``a.kernel``."""

    def __init__(self, rngs: nnx.Rngs, tie: bool = True) -> None:
        self.a = nnx.Linear(3, 3, rngs=rngs)
        self.b = nnx.Linear(3, 3, rngs=rngs)
        if tie:
            self.b.kernel = self.a.kernel
        else:
            self.b.kernel[...] = self.a.kernel[...]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.b(jnp.tanh(self.a(x)))


class MLP(nnx.Module):
    """Three hidden Linear layers and a head, all ``width`` wide."""

    def __init__(self, rngs: nnx.Rngs, width: int = 256, hidden: int = 3) -> None:
        self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(hidden)])
        self.head = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return self.head(x)


# --------------------------------------------------------------------------- helpers


def loss_fn(model: nnx.Module, x: jax.Array) -> jax.Array:
    return jnp.mean(model(x) ** 2)


def inputs(n: int = 6, d: int = 3, seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (n, d))


def flat(state: Any) -> dict[tuple[Any, ...], np.ndarray]:
    """``{path: array}`` of an ``nnx.State``."""
    return {
        path: np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v)
        for path, v in nnx.to_flat_state(state)
    }


def flat_types(state: Any) -> dict[tuple[Any, ...], type]:
    return {path: type(v) for path, v in nnx.to_flat_state(state)}


def assert_states_close(actual: Any, expected: Any) -> None:
    a, e = flat(actual), flat(expected)
    assert set(a) == set(e)
    for path in e:
        np.testing.assert_allclose(a[path], e[path], rtol=RTOL, atol=ATOL, err_msg=str(path))


def reference_grads(
    f: Callable[..., Any], model: nnx.Module, *args: Any, wrt: Any = ff.Trainable
) -> tuple[Any, nnx.State]:
    """The hand-written split: ``nnx.split`` + ``jax.value_and_grad`` on the ``wrt`` state."""
    with nnx.set_graph_mode(True):
        graphdef, params, rest = nnx.split(model, wrt, ...)

        def pure(p: nnx.State) -> jax.Array:
            return f(nnx.merge(graphdef, p, rest, copy=True), *args)

        return jax.value_and_grad(pure)(params)


@pytest.fixture(params=[True, False], ids=["graph-mode", "tree-mode"])
def graph_mode(request: pytest.FixtureRequest) -> Any:
    with nnx.set_graph_mode(request.param):
        yield request.param


# Places a gradient call can run. Each runner calls ``fn(model, *args)`` and returns
# ``(output, model_after)``: a pure ``jax.jit`` hands the written module back as output.


def _eager(fn: Callable[..., Any], model: Any, *args: Any) -> tuple[Any, Any]:
    return fn(model, *args), model


def _tree_mode(fn: Callable[..., Any], model: Any, *args: Any) -> tuple[Any, Any]:
    with nnx.set_graph_mode(False):
        return fn(model, *args), model


def _nnx_jit(fn: Callable[..., Any], model: Any, *args: Any) -> tuple[Any, Any]:
    return nnx.jit(fn)(model, *args), model


def _nnx_jit_tree(fn: Callable[..., Any], model: Any, *args: Any) -> tuple[Any, Any]:
    return nnx.jit(fn, graph=False)(model, *args), model


def _tree_mode_nnx_jit(fn: Callable[..., Any], model: Any, *args: Any) -> tuple[Any, Any]:
    with nnx.set_graph_mode(False):
        return nnx.jit(fn)(model, *args), model


def _jax_jit(fn: Callable[..., Any], model: Any, *args: Any) -> tuple[Any, Any]:
    return jax.jit(lambda m, *a: (fn(m, *a), m))(model, *args)


RUNNERS = pytest.mark.parametrize(
    "run",
    [_eager, _tree_mode, _nnx_jit, _nnx_jit_tree, _tree_mode_nnx_jit, _jax_jit],
    ids=[
        "eager-graph-mode",
        "eager-tree-mode",
        "nnx.jit",
        "nnx.jit-graph=False",
        "tree-mode-nnx.jit",
        "jax.jit-module-as-pytree",
    ],
)


# --------------------------------------------------------------------------- what is differentiated


def test_grads_hold_exactly_the_trainable_paths(graph_mode: bool) -> None:
    model, x = make_net(), inputs()
    grads = ff.grad(loss_fn)(model, x)
    assert isinstance(grads, nnx.State)
    assert set(flat(grads)) == NET_TRAINABLE
    assert all(t is nnx.Param for t in flat_types(grads).values())
    _, expected = reference_grads(loss_fn, model, x)
    assert set(flat(expected)) == NET_TRAINABLE
    assert_states_close(grads, expected)
    assert all(np.any(g != 0) for g in flat(grads).values())


def test_value_and_grad_returns_loss_and_the_reference_grads(graph_mode: bool) -> None:
    model, x = make_net(), inputs()
    loss, grads = ff.value_and_grad(loss_fn)(model, x)
    expected_loss, expected = reference_grads(loss_fn, model, x)
    np.testing.assert_allclose(loss, expected_loss, rtol=RTOL)
    np.testing.assert_allclose(loss, loss_fn(model, x), rtol=RTOL)
    assert_states_close(grads, expected)


def test_frozen_params_are_absent_and_the_model_is_untouched(graph_mode: bool) -> None:
    model, x = make_net(), inputs()
    before = flat(nnx.state(model))
    types_before = flat_types(nnx.state(model))
    grads = ff.grad(loss_fn)(model, x)
    assert not NET_FROZEN & set(flat(grads))
    assert type(model.scale) is ff.FrozenParam  # declared frozen
    assert type(model.body.kernel) is ff.FrozenParam  # frozen by ff.freeze
    assert flat_types(nnx.state(model)) == types_before
    after = flat(nnx.state(model))
    assert set(after) == set(before)
    for path in before:
        np.testing.assert_array_equal(after[path], before[path])
    assert grads["head"]["kernel"] is not model.head.kernel


def test_plain_jax_grad_and_tree_mode_nnx_grad_differentiate_frozen_params() -> None:
    """Why ff.grad exists: tree-mode transforms treat FrozenParam as just another leaf."""
    model, x = make_net(), inputs()
    jax_grads = jax.grad(loss_fn)(model, x)
    assert type(jax_grads.scale) is ff.FrozenParam
    assert np.all(np.asarray(jax_grads.scale[...]) != 0)
    assert np.all(np.asarray(jax_grads.body.kernel[...]) != 0)
    tree_grads = nnx.grad(loss_fn, graph=False)(model, x)
    np.testing.assert_allclose(tree_grads.scale[...], jax_grads.scale[...], rtol=RTOL)
    with nnx.set_graph_mode(False):
        assert np.all(np.asarray(nnx.grad(loss_fn)(model, x).scale[...]) != 0)
        ours = ff.grad(loss_fn)(model, x)
    assert set(flat(ours)) == NET_TRAINABLE
    # Graph-mode nnx.grad (wrt=nnx.Param) skips FrozenParam, since it is no Param subclass.
    assert set(flat(nnx.grad(loss_fn)(model, x))) == NET_TRAINABLE


def make_lora(freeze_lora: bool = False) -> nnx.LoRALinear:
    model = nnx.LoRALinear(4, 3, lora_rank=2, rngs=nnx.Rngs(0))
    model.lora.lora_b[...] = jax.random.normal(jax.random.key(2), (2, 3))  # init is zeros
    ff.freeze(model, ff.PathRegex("kernel|bias"))
    if freeze_lora:
        ff.freeze(model, ff.PathRegex("lora/lora_b"))
    return model


def test_lora_params_are_trainable(graph_mode: bool) -> None:
    model, x = make_lora(), inputs(d=4)
    grads = ff.grad(loss_fn)(model, x)
    assert flat_types(grads) == {
        ("lora", "lora_a"): nnx.LoRAParam,
        ("lora", "lora_b"): nnx.LoRAParam,
    }
    _, expected = reference_grads(loss_fn, model, x)
    assert_states_close(grads, expected)
    assert np.any(flat(grads)[("lora", "lora_a")] != 0)


def test_frozen_lora_param_is_absent(graph_mode: bool) -> None:
    model, x = make_lora(freeze_lora=True), inputs(d=4)
    assert type(model.lora.lora_b) is ff.FrozenParam
    grads = ff.grad(loss_fn)(model, x)
    assert set(flat(grads)) == {("lora", "lora_a")}
    _, expected = reference_grads(loss_fn, model, x)
    assert_states_close(grads, expected)


# --------------------------------------------------------------------------- where it runs


@RUNNERS
def test_grad_matches_reference_wherever_it_runs(run: Callable[..., Any]) -> None:
    model, x = make_net(), inputs()
    _, expected = reference_grads(loss_fn, model, x)
    grads, _ = run(ff.grad(loss_fn), model, x)
    assert set(flat(grads)) == NET_TRAINABLE
    assert_states_close(grads, expected)


@RUNNERS
def test_value_and_grad_matches_reference_wherever_it_runs(run: Callable[..., Any]) -> None:
    model, x = make_net(), inputs()
    expected_loss, expected = reference_grads(loss_fn, model, x)
    (loss, grads), _ = run(ff.value_and_grad(loss_fn), model, x)
    np.testing.assert_allclose(loss, expected_loss, rtol=RTOL)
    assert_states_close(grads, expected)


# --------------------------------------------------------------------------- argnums and has_aux


def encoder() -> nnx.Linear:
    enc = nnx.Linear(3, 3, rngs=nnx.Rngs(5))
    ff.freeze(enc, ff.PathRegex("bias"))
    return enc


def two_modules_loss(enc: nnx.Module, dec: nnx.Module, x: jax.Array) -> jax.Array:
    return jnp.mean(dec(jnp.tanh(enc(x))) ** 2)


def test_argnums_one_differentiates_the_second_argument(graph_mode: bool) -> None:
    model, x = make_net(), inputs()

    def f(x: jax.Array, m: nnx.Module) -> jax.Array:
        return loss_fn(m, x)

    grads = ff.grad(f, argnums=1)(x, model)
    assert isinstance(grads, nnx.State)
    _, expected = reference_grads(loss_fn, model, x)
    assert_states_close(grads, expected)
    loss, grads = ff.value_and_grad(f, argnums=1)(x, model)
    np.testing.assert_allclose(loss, loss_fn(model, x), rtol=RTOL)
    assert_states_close(grads, expected)


@pytest.mark.parametrize(
    "argnums", [(0, 1), (1, 0), (1,), (0,)], ids=["(0,1)", "(1,0)", "(1,)", "(0,)"]
)
def test_argnums_tuple_gives_a_tuple_of_states(graph_mode: bool, argnums: tuple[int, ...]) -> None:
    enc, dec, x = encoder(), make_net(), inputs()
    _, enc_expected = reference_grads(lambda e: two_modules_loss(e, dec, x), enc)
    _, dec_expected = reference_grads(lambda d: two_modules_loss(enc, d, x), dec)
    expected = {0: enc_expected, 1: dec_expected}
    assert set(flat(enc_expected)) == {("kernel",)}

    grads = ff.grad(two_modules_loss, argnums=argnums)(enc, dec, x)
    assert isinstance(grads, tuple)
    assert len(grads) == len(argnums)
    for position, g in zip(argnums, grads, strict=True):
        assert isinstance(g, nnx.State)
        assert_states_close(g, expected[position])

    loss, grads = ff.value_and_grad(two_modules_loss, argnums=argnums)(enc, dec, x)
    np.testing.assert_allclose(loss, two_modules_loss(enc, dec, x), rtol=RTOL)
    assert len(grads) == len(argnums)
    for position, g in zip(argnums, grads, strict=True):
        assert_states_close(g, expected[position])


def test_argnums_on_a_plain_array_argument_gives_its_gradient(graph_mode: bool) -> None:
    """A non-module argument named by ``argnums`` is differentiated, as with jax.grad."""
    model, x = make_net(), inputs()
    expected_x = jax.grad(loss_fn, argnums=1)(model, x)
    _, expected_model = reference_grads(loss_fn, model, x)
    model_grads, x_grads = ff.grad(loss_fn, argnums=(0, 1))(model, x)
    assert_states_close(model_grads, expected_model)
    assert isinstance(x_grads, jax.Array), f"got {type(x_grads).__name__}: {x_grads!r}"
    np.testing.assert_allclose(x_grads, expected_x, rtol=RTOL, atol=ATOL)


def loss_with_aux(model: nnx.Module, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    y = model(x)
    return jnp.mean(y**2), {"y_sum": y.sum(), "tag": 7}


@RUNNERS
def test_has_aux(run: Callable[..., Any]) -> None:
    model, x = make_net(), inputs()
    _, expected = reference_grads(lambda m, x: loss_with_aux(m, x)[0], model, x)
    y_sum = model(x).sum()

    ((loss, aux), grads), _ = run(ff.value_and_grad(loss_with_aux, has_aux=True), model, x)
    np.testing.assert_allclose(loss, loss_fn(model, x), rtol=RTOL)
    assert set(aux) == {"y_sum", "tag"}
    np.testing.assert_allclose(aux["y_sum"], y_sum, rtol=RTOL, atol=ATOL)
    assert int(aux["tag"]) == 7
    assert_states_close(grads, expected)

    (grads, aux), _ = run(ff.grad(loss_with_aux, has_aux=True), model, x)
    np.testing.assert_allclose(aux["y_sum"], y_sum, rtol=RTOL, atol=ATOL)
    assert_states_close(grads, expected)


# --------------------------------------------------------------------------- state the loss writes


@RUNNERS
def test_batch_stats_and_counter_reach_the_caller_as_with_nnx_grad(
    run: Callable[..., Any],
) -> None:
    x = inputs(n=8)
    model, reference = make_bn_net(), make_bn_net()
    for step in (1, 2):
        grads, model = run(ff.grad(loss_fn), model, x)
        expected = nnx.grad(loss_fn)(reference, x)  # graph mode, wrt=nnx.Param
        assert set(flat(grads)) == {
            ("bn", "bias"),
            ("bn", "scale"),
            ("head", "bias"),
            ("head", "kernel"),
        }
        assert_states_close(grads, expected)
        assert int(model.calls[...]) == int(reference.calls[...]) == step
        assert_states_close(nnx.state(model, nnx.BatchStat), nnx.state(reference, nnx.BatchStat))
    assert np.all(np.asarray(model.bn.mean[...]) != 0)  # the statistics did move
    assert np.all(np.asarray(model.bn.var[...]) != 1)


def test_batch_stats_written_eagerly_equal_nnx_grad_exactly(graph_mode: bool) -> None:
    x = inputs(n=8)
    model, reference = make_bn_net(), make_bn_net()
    loss, _ = ff.value_and_grad(loss_fn)(model, x)
    expected_loss, _ = nnx.value_and_grad(loss_fn, graph=True)(reference, x)
    np.testing.assert_array_equal(loss, expected_loss)
    np.testing.assert_array_equal(model.bn.mean[...], reference.bn.mean[...])
    np.testing.assert_array_equal(model.bn.var[...], reference.bn.var[...])
    assert int(model.calls[...]) == 1


def test_state_written_in_a_non_differentiated_argument_reaches_the_caller(
    graph_mode: bool,
) -> None:
    model, x = make_net(), inputs()
    log = nnx.Dict(steps=Counter(jnp.array(0)), last=Counter(jnp.zeros(())))

    def f(m: nnx.Module, x: jax.Array, *, log: nnx.Dict) -> jax.Array:
        loss = loss_fn(m, x)
        log["steps"][...] += 1
        log["last"][...] = jax.lax.stop_gradient(loss)
        return loss

    grads = ff.grad(f)(model, x, log=log)
    ff.grad(f)(model, x, log=log)
    assert int(log["steps"][...]) == 2
    np.testing.assert_allclose(log["last"][...], loss_fn(model, x), rtol=RTOL)
    assert set(flat(grads)) == NET_TRAINABLE


class DropNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.body = nnx.Linear(3, 8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.drop(self.body(x)))


def test_dropout_rng_counter_advances_as_with_nnx_grad(graph_mode: bool) -> None:
    x = inputs(n=16)

    def make() -> DropNet:
        return ff.freeze(DropNet(nnx.Rngs(0, dropout=1)), ff.PathRegex("body/kernel"))

    model, reference = make(), make()
    with nnx.set_graph_mode(True):
        expected = [nnx.grad(loss_fn)(reference, x) for _ in range(2)]
    got = [ff.grad(loss_fn)(model, x) for _ in range(2)]
    assert int(model.drop.rngs.count[...]) == int(reference.drop.rngs.count[...]) == 2
    for g, e in zip(got, expected, strict=True):
        assert_states_close(g, e)
    # Two different masks were drawn, so the two gradients differ.
    assert not np.allclose(flat(got[0])[("head", "kernel")], flat(got[1])[("head", "kernel")])


# --------------------------------------------------------------------------- tied weights


def test_tied_weights_get_one_gradient_entry_equal_to_the_sum(graph_mode: bool) -> None:
    x = inputs()
    tied, untied = Tied(nnx.Rngs(0)), Tied(nnx.Rngs(0), tie=False)
    assert tied.a.kernel is tied.b.kernel
    grads = ff.grad(loss_fn)(tied, x)
    assert set(flat(grads)) == {("a", "kernel"), ("a", "bias"), ("b", "bias")}

    with nnx.set_graph_mode(True):
        expected = nnx.grad(loss_fn)(tied, x)
        separate = flat(nnx.grad(loss_fn)(untied, x))
    assert_states_close(grads, expected)
    np.testing.assert_allclose(
        flat(grads)[("a", "kernel")],
        separate[("a", "kernel")] + separate[("b", "kernel")],
        rtol=RTOL,
        atol=ATOL,
    )
    assert tied.a.kernel is tied.b.kernel  # the tie survives the call


# --------------------------------------------------------------------------- wrt


@pytest.mark.parametrize(
    ("make", "wrt", "paths"),
    [
        (make_net, ff.PathRegex("head/.*"), {("head", "bias"), ("head", "kernel")}),
        (make_net, nnx.PathContains("bias"), {("body", "bias"), ("head", "bias")}),
        (make_net, nnx.All(nnx.Param, nnx.PathContains("kernel")), {("head", "kernel")}),
        (make_net, ff.FrozenParam, NET_FROZEN),
        (
            lambda: nnx.LoRALinear(4, 3, lora_rank=2, rngs=nnx.Rngs(0)),
            nnx.LoRAParam,
            {("lora", "lora_a"), ("lora", "lora_b")},
        ),
    ],
    ids=["PathRegex-head", "PathContains-bias", "All-Param-kernel", "FrozenParam", "LoRAParam"],
)
def test_wrt_filter_selects_what_is_differentiated(
    graph_mode: bool, make: Callable[[], nnx.Module], wrt: Any, paths: set[tuple[str, ...]]
) -> None:
    model = make()
    x = inputs(d=4) if isinstance(model, nnx.LoRALinear) else inputs()
    loss, grads = ff.value_and_grad(loss_fn, wrt=wrt)(model, x)
    assert set(flat(grads)) == paths
    expected_loss, expected = reference_grads(loss_fn, model, x, wrt=wrt)
    np.testing.assert_allclose(loss, expected_loss, rtol=RTOL)
    assert_states_close(grads, expected)


def test_grads_feed_an_nnx_optimizer_over_the_trainable_state() -> None:
    model, x = make_net(), inputs()
    before = flat(nnx.state(model))
    grads = ff.grad(loss_fn)(model, x)
    optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=ff.Trainable)
    optimizer.update(model, grads)
    after, g = flat(nnx.state(model)), flat(grads)
    for path in NET_TRAINABLE:
        np.testing.assert_allclose(after[path], before[path] - 0.5 * g[path], rtol=RTOL, atol=ATOL)
    for path in NET_FROZEN:
        np.testing.assert_array_equal(after[path], before[path])


# --------------------------------------------------------------------------- FLOPs


def mse(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((model(x) - y) ** 2)


TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))


def hand_written_step(
    graphdef: nnx.GraphDef, diff: nnx.State, rest: nnx.State, x: jax.Array, y: jax.Array
) -> tuple[jax.Array, nnx.State]:
    def pure(d: nnx.State) -> jax.Array:
        return mse(nnx.merge(graphdef, d, rest, copy=True), x, y)

    return jax.value_and_grad(pure)(diff)


@pytest.mark.parametrize(
    ("frozen", "min_ratio"),
    [("layers/.*", 2.0), ("layers/[01]/.*", 1.4)],
    ids=["linear-probe", "half-frozen"],
)
@pytest.mark.parametrize("with_optax", [False, True], ids=["grads-out", "clip-adam-grads-out"])
@pytest.mark.parametrize("entry", ["split-merge", "module-pytree"])
def test_flops_equal_the_hand_written_split(
    frozen: str, min_ratio: float, with_optax: bool, entry: str
) -> None:
    model = ff.freeze(MLP(nnx.Rngs(0)), ff.PathRegex(frozen))
    x = jax.random.normal(jax.random.key(0), (64, 256))
    y = jax.random.normal(jax.random.key(1), (64, 256))

    graphdef, state = nnx.split(model)
    split_def, trainable, rest = nnx.split(model, ff.Trainable, ...)
    full_def, every_param, full_rest = nnx.split(model, (nnx.Param, ff.FrozenParam), ...)
    assert flat(every_param).keys() > flat(trainable).keys()

    def ours(model: MLP, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
        loss, grads = ff.value_and_grad(mse)(model, x, y)
        if not with_optax:
            return loss, grads
        params = nnx.state(model, ff.Trainable)
        updates, opt_state = TX.update(grads, opt_state, params)
        return loss, grads, optax.apply_updates(params, updates), opt_state

    def ours_split_merge(state: nnx.State, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
        return ours(nnx.merge(graphdef, state), opt_state, x, y)

    def by_hand(
        gdef: nnx.GraphDef, diff: nnx.State, rest: nnx.State, opt_state: Any, x: Any, y: Any
    ) -> Any:
        loss, grads = hand_written_step(gdef, diff, rest, x, y)
        if not with_optax:
            return loss, grads
        updates, opt_state = TX.update(grads, opt_state, diff)
        return loss, grads, optax.apply_updates(diff, updates), opt_state

    opt_state = TX.init(trainable) if with_optax else None
    full_opt_state = TX.init(every_param) if with_optax else None

    if entry == "split-merge":
        ours_flops = flops(ours_split_merge, state, opt_state, x, y)
    else:
        ours_flops = flops(ours, model, opt_state, x, y)
    split_flops = flops(
        lambda d, r, o, x, y: by_hand(split_def, d, r, o, x, y), trainable, rest, opt_state, x, y
    )
    full_flops = flops(
        lambda d, r, o, x, y: by_hand(full_def, d, r, o, x, y),
        every_param,
        full_rest,
        full_opt_state,
        x,
        y,
    )
    assert split_flops > 0
    assert abs(ours_flops - split_flops) <= 0.01 * split_flops, (ours_flops, split_flops)
    # The check has teeth: the full backward costs clearly more.
    assert full_flops > min_ratio * split_flops, (full_flops, split_flops)


# --------------------------------------------------------------------------- errors

TRANSFORMS = pytest.mark.parametrize(
    "transform", [ff.grad, ff.value_and_grad], ids=["grad", "value_and_grad"]
)


@TRANSFORMS
@pytest.mark.parametrize(
    ("argnums", "error"),
    [
        ("a", TypeError),
        (-1, TypeError),
        ((), TypeError),
        ((0, 0), ValueError),
        (True, TypeError),
        ((0, True), TypeError),
        (1.0, TypeError),
        ((0, -1), TypeError),
    ],
    ids=[
        "str",
        "negative",
        "empty-tuple",
        "repeated",
        "bool",
        "tuple-with-bool",
        "float",
        "tuple-negative",
    ],
)
def test_malformed_argnums_raise(transform: Callable[..., Any], argnums: Any, error: type) -> None:
    model, x = make_net(), inputs()
    with pytest.raises(error, match="`argnums`"):
        transform(loss_fn, argnums=argnums)(model, x)


@TRANSFORMS
@pytest.mark.parametrize("argnums", [2, (0, 5)], ids=["int", "tuple"])
def test_argnums_beyond_the_arguments_raise(transform: Callable[..., Any], argnums: Any) -> None:
    model, x = make_net(), inputs()
    with pytest.raises(ValueError, match=r"`argnums` .* 2 positional arguments"):
        transform(loss_fn, argnums=argnums)(model, x)


@TRANSFORMS
def test_has_aux_without_a_pair_raises(graph_mode: bool, transform: Callable[..., Any]) -> None:
    model, x = make_net(), inputs()
    with pytest.raises(TypeError, match="`has_aux=True`.*pair"):
        transform(loss_fn, has_aux=True)(model, x)


@TRANSFORMS
@pytest.mark.parametrize(
    "wrt", [3, 2.5, object(), [nnx.Param, 3]], ids=["int", "float", "object", "list-with-int"]
)
def test_wrt_not_a_filter_raises(transform: Callable[..., Any], wrt: Any) -> None:
    model, x = make_net(), inputs()
    with pytest.raises(TypeError, match="`wrt`"):
        transform(loss_fn, wrt=wrt)(model, x)
