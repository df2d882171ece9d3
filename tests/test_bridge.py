"""Bridged Linen modules (``nnx.bridge.ToNNX``) keep working as their parameters are re-typed."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flax_freeze as ff
from flax_freeze import linen as ffl
from flax_freeze._bridge import FrozenParamsToNNX

X = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
Y = jnp.array([[0.5, -0.5], [1.0, 0.0]])


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(2)(nn.relu(nn.Dense(4)(x)))


class Block(nn.Module):
    @nn.compact
    def __call__(self, carry: jax.Array, _: Any) -> tuple[jax.Array, None]:
        return nn.tanh(nn.Dense(4)(carry)), None


class ScanNet(nn.Module):
    """A remat'd input layer, three scanned remat'd blocks, a head."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.remat(nn.Dense)(4, name="inp")(x)
        stack = nn.scan(
            nn.remat(Block),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=3,
        )
        x, _ = stack(name="blocks")(x, None)
        return nn.Dense(2, name="out")(x)


class Hybrid(nnx.Module):
    """A bridged Linen encoder next to native NNX layers."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.encoder = nnx.bridge.ToNNX(MLP(), rngs=rngs)
        self.norm = nnx.LayerNorm(2, rngs=rngs)
        self.head = nnx.Linear(2, 2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.norm(self.encoder(x)))


def bridged(linen: nn.Module, seed: int = 0) -> Any:
    return nnx.bridge.lazy_init(nnx.bridge.ToNNX(linen, rngs=nnx.Rngs(seed)), X)


def hybrid(seed: int = 0) -> Any:
    return nnx.bridge.lazy_init(Hybrid(nnx.Rngs(seed)), X)


#: (id, model factory, what to freeze, every parameter path, the bridged modules' paths)
MODELS = [
    pytest.param(
        lambda: bridged(nn.Dense(2)),
        ff.PathRegex("kernel"),
        {"kernel", "bias"},
        [()],
        id="dense",
    ),
    pytest.param(
        lambda: bridged(MLP()),
        ff.PathRegex("Dense_0/.*"),
        {"Dense_0/kernel", "Dense_0/bias", "Dense_1/kernel", "Dense_1/bias"},
        [()],
        id="mlp",
    ),
    pytest.param(
        hybrid,
        ff.PathRegex("encoder/.*"),
        {
            "encoder/Dense_0/kernel",
            "encoder/Dense_0/bias",
            "encoder/Dense_1/kernel",
            "encoder/Dense_1/bias",
            "norm/scale",
            "norm/bias",
            "head/kernel",
            "head/bias",
        },
        [("encoder",)],
        id="nested-in-nnx",
    ),
    pytest.param(
        lambda: bridged(ScanNet()),
        ff.PathRegex("(inp|blocks)/.*"),
        {
            "inp/kernel",
            "inp/bias",
            "blocks/Dense_0/kernel",
            "blocks/Dense_0/bias",
            "out/kernel",
            "out/bias",
        },
        [()],
        id="scan-remat",
    ),
]


def flat(node: Any) -> dict[str, nnx.Variable]:
    """'/'-joined path -> variable, for every variable of ``node``."""
    return {
        "/".join(map(str, p)): v
        for p, v in nnx.iter_graph(node, graph=True)
        if isinstance(v, nnx.Variable)
    }


def params(node: Any) -> dict[str, nnx.Variable]:
    return {p: v for p, v in flat(node).items() if isinstance(v, nnx.Param | ff.FrozenParam)}


def types(node: Any) -> dict[str, str]:
    return {p: type(v).__name__ for p, v in params(node).items()}


def at(node: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        node = getattr(node, key)
    return node


def grad_paths(grads: nnx.State) -> set[str]:
    return {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(grads)}


@pytest.mark.parametrize(("make", "filter_", "paths", "bridges"), MODELS)
def test_freeze_unfreeze_freezing_keep_the_forward_pass(make, filter_, paths, bridges):
    model = make()
    assert set(types(model)) == paths
    y0 = np.asarray(model(X))
    arrays = {p: v.get_raw_value() for p, v in params(model).items()}

    assert ff.freeze(model, filter_) is model
    frozen = {p for p, t in types(model).items() if t == "FrozenParam"}
    assert frozen == {p for p in paths if filter_(tuple(p.split("/")), None)}
    assert all(type(at(model, b)) is FrozenParamsToNNX for b in bridges)
    np.testing.assert_array_equal(np.asarray(model(X)), y0)
    assert all(v.get_raw_value() is arrays[p] for p, v in params(model).items())

    assert ff.unfreeze(model) is model
    assert set(types(model).values()) == {"Param"}
    assert all(type(at(model, b)) is nnx.bridge.ToNNX for b in bridges)
    np.testing.assert_array_equal(np.asarray(model(X)), y0)

    with ff.freezing(model, filter_):
        assert {p for p, t in types(model).items() if t == "FrozenParam"} == frozen
        np.testing.assert_array_equal(np.asarray(model(X)), y0)
    assert set(types(model).values()) == {"Param"}
    assert all(type(at(model, b)) is nnx.bridge.ToNNX for b in bridges)
    assert all(v.get_raw_value() is arrays[p] for p, v in params(model).items())


@pytest.mark.parametrize("graph_mode", [True, False], ids=["graph", "tree"])
@pytest.mark.parametrize(("make", "filter_", "paths", "bridges"), MODELS)
def test_grad_has_exactly_the_trainable_paths(make, filter_, paths, bridges, graph_mode):
    del bridges
    model = ff.freeze(make(), filter_)
    trainable = {p for p, t in types(model).items() if t == "Param"}
    with nnx.set_graph_mode(graph_mode):
        grads = ff.grad(lambda m: (m(X) ** 2).sum())(model)
    assert grad_paths(grads) == trainable
    assert trainable == paths - {p for p in paths if filter_(tuple(p.split("/")), None)}


def train(model: Any, opt: Any, grad_fn: Any, steps: int = 5) -> list[float]:
    @nnx.jit
    def step(model: Any, opt: Any) -> jax.Array:
        loss, grads = grad_fn(lambda m: ((m(X) - Y) ** 2).mean())(model)
        opt.update(model, grads)
        return loss

    return [float(step(model, opt)) for _ in range(steps)]


@pytest.mark.parametrize(
    ("make", "frozen"),
    [
        pytest.param(lambda: bridged(MLP()), ff.PathRegex("Dense_0/.*"), id="mlp"),
        pytest.param(hybrid, ff.PathRegex("encoder/Dense_1/.*|head/kernel"), id="nested-in-nnx"),
        pytest.param(lambda: bridged(ScanNet()), ff.PathRegex("blocks/.*"), id="scan-remat"),
    ],
)
def test_jitted_training_equals_a_hand_written_diffstate_split(make, frozen):
    tx = optax.adamw(0.05, weight_decay=0.1)
    model = ff.freeze(make(), frozen)
    frozen_before = {
        p: np.asarray(v[...]) for p, v in flat(model).items() if type(v) is ff.FrozenParam
    }
    assert frozen_before
    losses = train(model, ff.Optimizer(model, tx), ff.value_and_grad)

    reference = make()  # the same weights, nothing frozen: a hand-written split instead
    wrt = nnx.All(nnx.Param, nnx.Not(frozen))
    ref_losses = train(
        reference,
        nnx.Optimizer(reference, tx, wrt=wrt),
        lambda f: nnx.value_and_grad(f, argnums=nnx.DiffState(0, wrt)),
    )
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6, atol=1e-6)
    assert losses[-1] < losses[0]
    ref = flat(reference)
    for path, v in flat(model).items():
        if type(v) is ff.FrozenParam:
            np.testing.assert_array_equal(np.asarray(v[...]), frozen_before[path])
            np.testing.assert_array_equal(np.asarray(ref[path][...]), frozen_before[path])
        elif type(v) is nnx.Param:
            np.testing.assert_allclose(np.asarray(v[...]), np.asarray(ref[path][...]), atol=1e-6)


def test_checkpoint_restores_a_frozen_bridged_model_into_a_fresh_one(tmp_path):
    model = ff.freeze(hybrid(0), ff.PathRegex("encoder/Dense_0/.*|head/bias"))
    y = np.asarray(model(X))
    ff.checkpoint.save(tmp_path / "ckpt", model)

    fresh = hybrid(1)  # other weights, nothing frozen
    assert not np.array_equal(np.asarray(fresh(X)), y)
    restored = ff.checkpoint.restore(tmp_path / "ckpt", fresh)
    assert restored is fresh
    assert types(fresh) == types(model)
    assert type(fresh.encoder) is FrozenParamsToNNX
    np.testing.assert_array_equal(np.asarray(fresh(X)), y)
    for path, v in params(model).items():
        np.testing.assert_array_equal(np.asarray(params(fresh)[path][...]), np.asarray(v[...]))


def test_frozen_parameters_survive_mutable_collections():
    class Normed(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            return nn.BatchNorm(use_running_average=False)(nn.Dense(4)(x))

    model = ff.freeze(bridged(Normed()), ff.PathRegex("Dense_0/kernel|BatchNorm_0/scale"))
    kernel, scale = model.Dense_0["kernel"], model.BatchNorm_0["scale"]
    kernel_value = kernel.get_raw_value()
    mean = np.asarray(model.BatchNorm_0["mean"][...])

    y = model(X, mutable=["batch_stats"])
    assert y.shape == (2, 4)
    assert not np.array_equal(np.asarray(model.BatchNorm_0["mean"][...]), mean)
    assert type(model.BatchNorm_0["mean"]) is nnx.BatchStat
    assert model.Dense_0["kernel"] is kernel
    assert model.BatchNorm_0["scale"] is scale

    model(X, mutable=True)  # every collection comes back from Linen, params included
    assert model.Dense_0["kernel"] is kernel
    assert model.BatchNorm_0["scale"] is scale
    assert kernel.get_raw_value() is kernel_value
    assert types(model) == {
        "Dense_0/kernel": "FrozenParam",
        "Dense_0/bias": "Param",
        "BatchNorm_0/scale": "FrozenParam",
        "BatchNorm_0/bias": "Param",
    }


def test_a_value_written_by_linen_into_a_frozen_parameter_is_kept():
    class Writes(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            w = self.param("w", nn.initializers.ones, (3,))
            if not self.is_initializing():
                self.put_variable("params", "w", w * 2)
            return x * w

    model = ff.freeze(bridged(Writes()))
    w = model.w
    model(X, mutable=["params"])
    assert model.w is w
    assert type(w) is ff.FrozenParam
    np.testing.assert_array_equal(np.asarray(w[...]), [2.0, 2.0, 2.0])


def test_linen_methods_see_the_frozen_parameters():
    class Encoder(nn.Module):
        def setup(self) -> None:
            self.inner = nn.Dense(4)
            self.outer = nn.Dense(2)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.outer(self.hidden(x))

        def hidden(self, x: jax.Array) -> jax.Array:
            return self.inner(x)

    model = ff.freeze(bridged(Encoder()), ff.PathRegex("inner/.*"))
    kernel, bias = model.inner["kernel"][...], model.inner["bias"][...]
    np.testing.assert_array_equal(np.asarray(model.hidden(X)), np.asarray(X @ kernel + bias))


def test_lazy_init_again_keeps_frozen_paths_frozen():
    model = ff.freeze(bridged(MLP()), ff.PathRegex("Dense_1/.*"))
    nnx.bridge.lazy_init(model, X)
    assert types(model) == {
        "Dense_0/kernel": "Param",
        "Dense_0/bias": "Param",
        "Dense_1/kernel": "FrozenParam",
        "Dense_1/bias": "FrozenParam",
    }
    assert model(X).shape == (2, 2)


def test_a_subclass_of_tonnx_gets_its_own_frozen_aware_class():
    class Scaled(nnx.bridge.ToNNX):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return 2 * super().__call__(*args, **kwargs)

    model = nnx.bridge.lazy_init(Scaled(MLP(), rngs=nnx.Rngs(0)), X)
    y = np.asarray(model(X))
    ff.freeze(model, ff.PathRegex("Dense_1/.*"))
    assert isinstance(model, Scaled)
    assert type(model).__name__ == "FrozenParamsScaled"
    np.testing.assert_array_equal(np.asarray(model(X)), y)
    ff.unfreeze(model)
    assert type(model) is Scaled


def test_freezing_a_plain_bridge_inside_nnx_jit_fails_before_changing_anything():
    model = hybrid()

    @nnx.jit
    def freeze_inside(m: Any) -> None:
        ff.freeze(m, ff.PathRegex(".*/kernel"))

    with pytest.raises(
        ValueError,
        match=r"`node` holds an nnx\.bridge\.ToNNX module \(encoder\) whose parameters would "
        r"become frozen inside a JAX transformation .* Freeze eagerly, before the "
        r"transformation",
    ):
        freeze_inside(model)
    assert set(types(model).values()) == {"Param"}
    assert type(model.encoder) is nnx.bridge.ToNNX


def test_freeze_and_unfreeze_inside_nnx_jit_after_an_eager_freeze():
    model = ff.freeze(hybrid(), ff.PathRegex("encoder/Dense_0/kernel"))
    y = np.asarray(model(X))

    @nnx.jit
    def change(m: Any) -> jax.Array:
        ff.freeze(m, ff.PathRegex("encoder/Dense_1/.*"))
        ff.unfreeze(m, ff.PathRegex("encoder/Dense_0/kernel"))
        return m(X)

    np.testing.assert_array_equal(np.asarray(change(model)), y)
    frozen = {p for p, t in types(model).items() if t == "FrozenParam"}
    assert frozen == {"encoder/Dense_1/kernel", "encoder/Dense_1/bias"}
    assert type(model.encoder) is FrozenParamsToNNX
    np.testing.assert_array_equal(np.asarray(model(X)), y)


def test_to_nnx_then_freeze_and_unfreeze_all():
    dense = nn.Dense(2, kernel_init=ffl.frozen(nn.initializers.lecun_normal()))
    model = ffl.to_nnx(bridged(dense))
    assert types(model) == {"kernel": "FrozenParam", "bias": "Param"}
    y = np.asarray(model(X))
    ff.freeze(model)
    np.testing.assert_array_equal(np.asarray(model(X)), y)
    ff.unfreeze(model)
    assert type(model) is nnx.bridge.ToNNX
    np.testing.assert_array_equal(np.asarray(model(X)), y)


def test_to_nnx_inside_a_transformation_is_refused():
    model = nnx.bridge.ToNNX(nn.Dense(2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"`node` holds an nnx\.bridge\.ToNNX module"):
        nnx.eval_shape(lambda: ffl.to_nnx(nnx.bridge.ToNNX(nn.Dense(2), rngs=nnx.Rngs(0))))
    assert type(ffl.to_nnx(model)) is FrozenParamsToNNX  # eagerly: fine
