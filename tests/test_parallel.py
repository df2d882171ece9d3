"""Multi-device training on 8 fake CPU devices: same weights, frozen never communicated."""

import re

import data_parallel as dp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_freeze as ff

STYLES = ["jit", "shard_map", "shard_map_no_vma", "pmap"]


def test_eight_devices():
    assert jax.device_count() == 8


def params_of(model):
    return {
        "/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))
    }


@pytest.mark.parametrize("frozen", ["probe", "half"])
@pytest.mark.parametrize("style", STYLES)
def test_same_weights_as_single_device(style, frozen):
    reference, ref_losses = dp.run("single", frozen=frozen)
    model, losses = dp.run(style, frozen=frozen)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    got, want = params_of(model), params_of(reference)
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6, err_msg=path)
    start, _ = dp.make(frozen)
    for path, value in params_of(start).items():
        if path.startswith("layers/") and (frozen == "probe" or path.split("/")[1] in "01"):
            np.testing.assert_array_equal(got[path], value, err_msg=path)  # bit-identical


def test_pmap_keeps_frozen_weights_bit_identical_on_every_device():
    model, opt = dp.make("half")
    graphdef, state = nnx.split((model, opt))
    frozen_before = np.asarray(model.layers[0].kernel[...])
    x, y = dp.batch()
    n = jax.device_count()
    state = dp.stack(state, n)
    state, _ = dp.pmap_step()(graphdef, state, x.reshape(n, -1, 32), y.reshape(n, -1))
    stacked, _ = nnx.merge(graphdef, state)
    per_device = np.asarray(stacked.layers[0].kernel[...])
    assert per_device.shape == (n, *frozen_before.shape)
    for d in range(n):
        np.testing.assert_array_equal(per_device[d], frozen_before)
    trained = np.asarray(stacked.head.kernel[...])
    for d in range(1, n):
        np.testing.assert_array_equal(trained[d], trained[0])


@pytest.mark.parametrize(
    ("check_vma", "loss_pmean", "grads_pmean", "scale"),
    [
        pytest.param(True, True, False, 1, id="vma-pmean-loss"),
        pytest.param(True, True, True, 1, id="vma-pmean-loss-and-grads"),
        pytest.param(True, False, True, 8, id="vma-pmap-habit-is-8x"),
        pytest.param(False, False, True, 1, id="no-vma-pmean-grads"),
    ],
)
def test_shard_map_gradient_patterns(check_vma, loss_pmean, grads_pmean, scale):
    """With check_vma=True JAX sums the cotangents of replicated inputs itself."""
    mesh = dp.data_mesh()
    model, _ = dp.make("probe")
    x, y = dp.shard_batch(*dp.batch(), mesh)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(mesh, P()))

    def loss(m, x, y):
        value = dp.loss_fn(m, x, y)
        return jax.lax.pmean(value, "data") if loss_pmean else value

    def local(s, x, y):
        g = ff.grad(loss)(nnx.merge(graphdef, s), x, y)
        return jax.lax.pmean(g, "data") if grads_pmean else g

    f = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P(), check_vma=check_vma
    )
    got = jax.jit(f)(state, x, y)
    ref = ff.grad(dp.loss_fn)(dp.make("probe")[0], *dp.batch())
    np.testing.assert_allclose(
        np.asarray(got["head"]["kernel"][...]),
        scale * np.asarray(ref["head"]["kernel"][...]),
        rtol=1e-5,
        atol=1e-7,
    )


# ------------------------------------------------------------------------------ communication

_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}  # fmt: skip


def all_reduce_bytes(hlo: str) -> int:
    """Bytes produced by every all-reduce in compiled HLO text (tuple results summed)."""
    total = 0
    for line in hlo.splitlines():
        if not re.search(r"\ball-reduce(-start)?\(", line) or "=" not in line:
            continue
        result = line.split("=", 1)[1].split("all-reduce", 1)[0]
        for dtype, dims in _SHAPE.findall(result):
            count = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            total += count * _BYTES[dtype]
    return total


def compiled_text(style, frozen):
    model, opt = dp.make(frozen)
    x, y = dp.batch()
    mesh = dp.data_mesh()
    n = jax.device_count()
    if style == "jit":
        dp.replicate((model, opt), mesh)
        xs, ys = dp.shard_batch(x, y, mesh)
        return dp.jit_step.lower(model, opt, xs, ys).compile().as_text()
    graphdef, state = nnx.split((model, opt))
    if style.startswith("shard_map"):
        step = dp.shard_map_step(mesh, check_vma=style == "shard_map")
        state = jax.device_put(state, NamedSharding(mesh, P()))
        xs, ys = dp.shard_batch(x, y, mesh)
        return step.lower(graphdef, state, xs, ys).compile().as_text()
    step = dp.pmap_step()
    return (
        step.lower(graphdef, dp.stack(state, n), x.reshape(n, -1, 32), y.reshape(n, -1))
        .compile()
        .as_text()
    )


@pytest.mark.parametrize("frozen", ["probe", "half"])
@pytest.mark.parametrize("style", STYLES)
def test_all_reduced_bytes_are_the_trainable_bytes(style, frozen):
    model, _ = dp.make(frozen)
    trainable = ff.summary(model).trainable_bytes
    frozen_bytes = ff.summary(model).frozen_bytes
    reduced = all_reduce_bytes(compiled_text(style, frozen))
    # the trainable gradients plus a few scalars (the loss), never a frozen weight
    assert trainable <= reduced <= trainable + 16, (reduced, trainable, frozen_bytes)
    assert frozen_bytes > reduced


def test_all_reduce_parser_counts_tuples():
    hlo = "  %ar = (f32[64,10]{1,0}, f32[10]{0}, f32[]) all-reduce(%a, %b, %c), replica_groups={}"
    assert all_reduce_bytes(hlo) == (640 + 10 + 1) * 4


# ------------------------------------------------------------------------------ sharded models


class Sharded(nnx.Module):
    """Every parameter annotated, as FSDP/tensor-parallel models are."""

    def __init__(self, rngs):
        init, zeros = nnx.initializers.lecun_normal(), nnx.initializers.zeros_init()

        def linear(din, dout, kernel_spec, bias_spec):
            return nnx.Linear(
                din,
                dout,
                kernel_init=nnx.with_partitioning(init, kernel_spec),
                bias_init=nnx.with_partitioning(zeros, bias_spec),
                rngs=rngs,
            )

        self.body = linear(16, 32, (None, "model"), ("model",))
        self.mid = linear(32, 32, ("model", None), (None,))
        self.head = linear(32, 4, ("model", None), (None,))

    def __call__(self, x):
        return self.head(nnx.relu(self.mid(nnx.relu(self.body(x)))))


def shardings(node):
    return {
        "/".join(map(str, p)): v.get_raw_value().sharding
        for p, v in nnx.to_flat_state(nnx.state(node))
        if hasattr(v.get_raw_value(), "sharding")
    }


def test_two_d_mesh_freeze_and_unfreeze_keep_shardings():
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        model = Sharded(nnx.Rngs(0))
        ff.freeze(model, ff.PathRegex("(body|mid)/.*"))
        opt = ff.Optimizer(model, optax.adamw(1e-2, weight_decay=0.1))
        x = jax.device_put(jnp.ones((16, 16)), NamedSharding(mesh, P("data")))
        y = jnp.arange(16) % 4

        @nnx.jit
        def step(model, opt, x, y):
            loss, grads = ff.value_and_grad(
                lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
            )(model)
            opt.update(model, grads)
            # Flax's sharding pattern: keep the state on its annotated shardings.
            state = nnx.state((model, opt))
            nnx.update(
                (model, opt), jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state))
            )
            return loss

        before = shardings(model)
        assert before["body/kernel"].spec == P(None, "model")
        frozen_kernel = np.asarray(model.body.kernel[...])
        step(model, opt, x, y)
        np.testing.assert_array_equal(np.asarray(model.body.kernel[...]), frozen_kernel)
        ff.unfreeze(model, ff.PathRegex("mid/.*"))
        ff.freeze(model, ff.PathRegex("head/bias"))
        retyped = shardings(model)  # re-typing moves nothing
        assert all(retyped[p].is_equivalent_to(s, 2) for p, s in before.items())
        assert opt.migrate(model) is True  # eagerly: the new state, sharded like its param
        mu = opt.opt_state[0].mu
        for name in ("kernel", "bias"):
            param = getattr(model.mid, name).get_raw_value().sharding
            assert mu["mid"][name].get_raw_value().sharding.is_equivalent_to(param, 2), name
        step(model, opt, x, y)
        step(model, opt, x, y)
        after = shardings(model)
        for path, sharding in before.items():
            assert after[path].is_equivalent_to(sharding, 2), path
        mu = opt.opt_state[0].mu
        mid_kernel = mu["mid"]["kernel"].get_raw_value().sharding
        assert mid_kernel.is_equivalent_to(NamedSharding(mesh, P("model", None)), 2)
        assert "bias" not in mu["head"]
        np.testing.assert_array_equal(np.asarray(model.body.kernel[...]), frozen_kernel)


def test_bfloat16_frozen_backbone_on_a_mesh_reports_the_saving():
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        model = Sharded(nnx.Rngs(0))
        full = ff.summary(model).trainable_bytes
        ff.freeze(model, ff.PathRegex("(body|mid)/.*"), dtype=jnp.bfloat16)
        s = ff.summary(model)
        assert s.frozen_bytes == (16 * 32 + 32 + 32 * 32 + 32) * 2
        assert s.frozen_bytes + s.trainable_bytes < full
        assert model.body.kernel.get_raw_value().sharding.spec == P(None, "model")
        out = nnx.jit(lambda m, x: m(x))(model, jnp.ones((8, 16)))
        assert out.dtype == jnp.float32
