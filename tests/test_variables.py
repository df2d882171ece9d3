import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flax_freeze as ff


class Model(nnx.Module):
    def __init__(self):
        self.lin = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
        self.lora = nnx.LoRA(3, 4, 2, rngs=nnx.Rngs(1))
        self.scale = ff.FrozenParam(jnp.full((2,), 2.0))

    def __call__(self, x):
        return (self.lin(x) + self.lora(x)) * self.scale


def flat_paths(state):
    return {path for path, _ in nnx.to_flat_state(state)}


def test_frozen_param_is_a_variable_but_not_a_param():
    v = ff.FrozenParam(jnp.ones(3))
    assert isinstance(v, nnx.Variable)
    assert not isinstance(v, nnx.Param)
    assert not issubclass(ff.FrozenParam, nnx.Param)


def test_linen_collection_name_is_frozen_params():
    assert nnx.variablelib.variable_name_from_type(ff.FrozenParam) == "frozen_params"
    assert nnx.variablelib.variable_type_from_name("frozen_params") is ff.FrozenParam


def test_plain_flax_state_and_grad_skip_frozen_param():
    model = Model()
    assert flat_paths(nnx.state(model, nnx.Param)) == {
        ("lin", "kernel"),
        ("lin", "bias"),
        ("lora", "lora_a"),
        ("lora", "lora_b"),
    }
    grads = nnx.grad(lambda m: m(jnp.ones((1, 3))).sum())(model)
    assert ("scale",) not in flat_paths(grads)
    assert ("lin", "kernel") in flat_paths(grads)


def test_plain_nnx_optimizer_holds_no_state_for_frozen_param():
    model = Model()
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    assert ("scale",) not in flat_paths(opt.opt_state[0].mu)
    assert len(flat_paths(opt.opt_state[0].mu)) == 4


def test_trainable_selects_param_and_subclasses_only():
    model = Model()
    selected = flat_paths(nnx.state(model, ff.Trainable))
    assert selected == {
        ("lin", "kernel"),
        ("lin", "bias"),
        ("lora", "lora_a"),
        ("lora", "lora_b"),
    }
    assert isinstance(model.lora.lora_a, nnx.LoRAParam)
    assert ff.Trainable((), nnx.BatchStat(jnp.ones(1))) is False
    assert ff.Trainable((), ff.FrozenParam(jnp.ones(1))) is False
    assert repr(ff.Trainable) == "Trainable"


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        pytest.param(lambda v: v + 1, [3.0, 5.0], id="add"),
        pytest.param(lambda v: 1 - v, [-1.0, -3.0], id="rsub"),
        pytest.param(lambda v: v * 3, [6.0, 12.0], id="mul"),
        pytest.param(lambda v: v / 2, [1.0, 2.0], id="div"),
        pytest.param(lambda v: v**2, [4.0, 16.0], id="pow"),
        pytest.param(lambda v: jnp.sqrt(v), [np.sqrt(2.0), 2.0], id="jnp"),
        pytest.param(lambda v: v[1], 4.0, id="index"),
    ],
)
def test_frozen_param_behaves_like_its_value(op, expected):
    v = ff.FrozenParam(jnp.array([2.0, 4.0]))
    np.testing.assert_allclose(np.asarray(op(v)), expected, rtol=1e-6)


def test_frozen_param_shape_dtype_and_matmul():
    v = ff.FrozenParam(jnp.eye(2, dtype=jnp.float32))
    assert v.shape == (2, 2)
    assert v.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(v @ jnp.array([1.0, 2.0])), [1.0, 2.0])


def test_frozen_param_round_trips_through_jit():
    model = Model()
    out = nnx.jit(lambda m, x: m(x))(model, jnp.ones((1, 3)))
    expected = model(jnp.ones((1, 3)))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    assert jax.tree.leaves(nnx.state(model, ff.FrozenParam))[0].shape == (2,)


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        pytest.param(lambda v: v < 3.0, [True, False], id="lt"),
        pytest.param(lambda v: v <= 2.0, [True, False], id="le"),
        pytest.param(lambda v: v > 3.0, [False, True], id="gt"),
        pytest.param(lambda v: v >= 4.0, [False, True], id="ge"),
        pytest.param(lambda v: v == 4.0, [False, True], id="eq"),
        pytest.param(lambda v: v != 4.0, [True, False], id="ne"),
        pytest.param(lambda v: 3.0 < v, [False, True], id="reflected"),
        pytest.param(lambda v: v < ff.FrozenParam(jnp.array([3.0, 3.0])), [True, False], id="var"),
    ],
)
def test_frozen_param_comparisons_act_on_the_value(op, expected):
    v = ff.FrozenParam(jnp.array([2.0, 4.0]))
    np.testing.assert_array_equal(np.asarray(op(v)), expected)


def test_frozen_param_holding_python_numbers():
    assert ff.FrozenParam(0.5) < 1
    assert ff.FrozenParam(100) / 4 == 25.0
    assert float(jnp.exp(ff.FrozenParam(0.0))) == 1.0
