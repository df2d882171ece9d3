"""Other libraries' parameter and frozen types (GPJax, paramax) and ff.AnyParam."""

import subprocess
import sys

import equinox as eqx
import gpjax as gpx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import paramax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn.datasets import load_diabetes

import flax_freeze as ff
from flax_freeze import _boxes, _variables


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    """Each test starts with no registered type, and its registrations end with it."""
    monkeypatch.setattr(_variables, "_registered", ())


@pytest.fixture
def x64():
    """Double precision, as GPJax's documentation uses (its Dataset warns otherwise)."""
    with jax.enable_x64(True):
        yield


def flat_paths(state):
    return {path for path, _ in nnx.to_flat_state(state)}


class Weight(nnx.Variable):
    """A parameter type of some library: a sibling of nnx.Param."""


class Count(nnx.Variable):
    """A state type of some library."""


class Mixed(nnx.Module):
    def __init__(self):
        self.lin = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
        self.lora = nnx.LoRA(2, 1, 3, rngs=nnx.Rngs(1))
        self.w = Weight(jnp.full((3,), 2.0))
        self.frozen = ff.FrozenParam(jnp.full((3,), 3.0))
        self.stat = nnx.BatchStat(jnp.zeros(3))
        self.count = Count(jnp.zeros((), jnp.int32))

    def __call__(self, x):
        return (self.lin(x) + self.lora(x)) * self.w * self.frozen


# ---------------------------------------------------------------------------------------
# register_param_type, Trainable and ff.AnyParam


def test_unregistered_type_is_state_registered_is_trainable():
    model = Mixed()
    lin_lora = {("lin", "kernel"), ("lin", "bias"), ("lora", "lora_a"), ("lora", "lora_b")}
    assert flat_paths(nnx.state(model, ff.Trainable)) == lin_lora
    assert ff.register_param_type(Weight) is Weight
    assert flat_paths(nnx.state(model, ff.Trainable)) == lin_lora | {("w",)}
    assert flat_paths(nnx.state(model, ff.AnyParam)) == lin_lora | {("w",), ("frozen",)}
    # Plain Flax is not affected.
    assert flat_paths(nnx.state(model, nnx.Param)) == lin_lora
    assert ff.AnyParam((), nnx.BatchStat(1.0)) is False
    assert ff.AnyParam((), Count(1.0)) is False
    assert repr(ff.AnyParam) == "AnyParam"


def test_register_param_type_is_idempotent_and_a_decorator():
    @ff.register_param_type
    class Scale(Weight):
        pass

    assert ff.register_param_type(Scale) is Scale
    assert ff.register_param_type(Weight) is Weight
    assert _variables._registered == (Scale, Weight)
    assert _variables.param_types() == (nnx.Param, Scale, Weight)


@pytest.mark.parametrize("cls", [nnx.Param, nnx.LoRAParam], ids=["Param", "LoRAParam"])
def test_registering_param_or_a_subclass_changes_nothing(cls):
    assert ff.register_param_type(cls) is cls
    assert _variables._registered == ()


class Frozen2(ff.FrozenParam):
    pass


@pytest.mark.parametrize(
    ("cls", "error", "match"),
    [
        pytest.param(
            Weight(1.0),
            TypeError,
            r"`cls` must be an nnx.Variable subclass .*got Weight\(.*Pass its class: "
            r"ff.register_param_type\(type\(v\)\), here Weight\.",
            id="instance",
        ),
        pytest.param(3, TypeError, r"`cls` must be an nnx.Variable subclass .*got 3\.", id="int"),
        pytest.param(
            dict, TypeError, r"`cls` dict is not an nnx.Variable subclass: only", id="not-variable"
        ),
        pytest.param(
            ff.FrozenParam,
            ValueError,
            r"`cls` FrozenParam is the frozen type \(ff.FrozenParam\): it cannot also be",
            id="FrozenParam",
        ),
        pytest.param(
            Frozen2, ValueError, r"`cls` Frozen2 is the frozen type", id="FrozenParam-subclass"
        ),
        pytest.param(
            nnx.Variable,
            ValueError,
            r"`cls` flax.nnx.variablelib.Variable is the base of every variable",
            id="Variable",
        ),
        pytest.param(
            nnx.BatchStat,
            ValueError,
            r"`cls` flax.nnx.variablelib.BatchStat is one of Flax's own variable types",
            id="BatchStat",
        ),
        pytest.param(
            nnx.RngKey,
            ValueError,
            r"`cls` flax.nnx.rnglib.RngKey is one of Flax's own variable types",
            id="RngKey",
        ),
    ],
)
def test_register_param_type_rejects(cls, error, match):
    with pytest.raises(error, match=match):
        ff.register_param_type(cls)
    assert _variables._registered == ()


def test_any_param_parameter_norm_counts_frozen_weights():
    model = Mixed()
    ff.register_param_type(Weight)
    model.lin.kernel = ff.FrozenParam(model.lin.kernel.get_value())

    def norm(state):
        return float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(state))))

    arrays = [model.lin.kernel, model.lin.bias, model.lora.lora_a, model.lora.lora_b]
    arrays += [model.w, model.frozen]
    expected = float(jnp.sqrt(sum(jnp.sum(v.get_value() ** 2) for v in arrays)))
    assert norm(nnx.state(model, ff.AnyParam)) == expected
    assert norm(nnx.state(model, nnx.Param)) < expected


def test_any_param_sharding_rule_places_frozen_weights():
    model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 8, rngs=nnx.Rngs(1)))
    model.layers[0].kernel = ff.FrozenParam(model.layers[0].kernel.get_value())
    mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))

    def rule(x):
        return NamedSharding(mesh, P(None, "model") if x.ndim == 2 else P())

    weights = nnx.state(model, nnx.Param)
    assert ("layers", 0, "kernel") not in flat_paths(weights)
    weights = nnx.state(model, ff.AnyParam)
    nnx.update(model, jax.device_put(weights, jax.tree.map(rule, weights)))
    for layer in model.layers:
        assert layer.kernel.get_raw_value().sharding.spec == P(None, "model")
    assert isinstance(model.layers[0].kernel, ff.FrozenParam)


# ---------------------------------------------------------------------------------------
# GPJax (NNX releases): Parameter(nnx.Variable) types


@pytest.fixture
def data(x64):
    x, y = load_diabetes(return_X_y=True)
    x, y = x[:40, 2:3] * 10.0, y[:40, None]
    return gpx.Dataset(X=jnp.asarray(x), y=jnp.asarray((y - y.mean()) / y.std()))


def posterior(n):
    prior = gpx.gps.Prior(mean_function=gpx.mean_functions.Zero(), kernel=gpx.kernels.RBF())
    return prior * gpx.likelihoods.Gaussian(num_datapoints=n)


def nmll(model, data):
    return -gpx.objectives.conjugate_mll(model, data)


GP_PATHS = {
    ("likelihood", "obs_stddev"),
    ("prior", "kernel", "lengthscale"),
    ("prior", "kernel", "variance"),
}


def test_gpjax_parameter_is_a_sibling_of_param():
    assert issubclass(gpx.parameters.PositiveReal, gpx.parameters.Parameter)
    assert gpx.parameters.Parameter.__bases__ == (nnx.Variable,)
    assert not issubclass(gpx.parameters.Parameter, nnx.Param)


def test_gpjax_unregistered_grad_raises_and_names_the_type(data):
    model = posterior(data.n)
    with pytest.raises(
        ValueError,
        match=r"`argnums` names argument 0, a ConjugatePosterior, which holds no parameter "
        r"\(nnx.Param or ff.FrozenParam\), so ff.grad would return no gradient at all. It "
        r"holds variables of floats whose types are not parameters to flax_freeze: "
        r"NonNegativeReal, PositiveReal \(a gpjax.parameters.Parameter\). If they are "
        r"parameters, declare their type once with "
        r"ff.register_param_type\(gpjax.parameters.Parameter\)\.",
    ):
        ff.grad(nmll)(model, data)
    with pytest.raises(
        ValueError,
        match=r"`wrt` <class 'flax.nnx.variablelib.Param'> passed to grad\(\) matched no "
        r"parameter of ConjugatePosterior\. Its parameter paths are: \(none\)\. It holds "
        r"variables of floats .*"
        r"ff.register_param_type\(gpjax.parameters.Parameter\)\. Check the filter",
    ):
        ff.grad(nmll, wrt=nnx.Param)(model, data)
    # A path filter selects variables whatever their type.
    grads = ff.grad(nmll, wrt=ff.PathRegex("prior/.*"))(model, data)
    assert flat_paths(grads) == GP_PATHS - {("likelihood", "obs_stddev")}


def test_empty_gradient_stays_allowed_without_foreign_float_variables():
    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    model.count = Count(jnp.zeros(()))  # a float, but the model has parameters (all frozen)
    model.kernel = ff.FrozenParam(model.kernel.get_value())
    model.bias = ff.FrozenParam(model.bias.get_value())
    assert ff.grad(lambda m: m(jnp.ones((1, 2))).sum())(model) == nnx.State({})
    ints = nnx.Module()
    ints.count = Count(jnp.zeros((), jnp.int32))  # no float at all
    assert ff.grad(lambda m: 0.0)(ints) == nnx.State({})


def test_gpjax_registered_grad_optimizer_and_summary(data):
    ff.register_param_type(gpx.parameters.Parameter)
    model = posterior(data.n)
    assert flat_paths(ff.grad(nmll)(model, data)) == GP_PATHS
    # Held fixed from the start, by declaring it frozen.
    kernel = model.prior.kernel
    kernel.lengthscale = ff.FrozenParam(kernel.lengthscale.get_value())
    frozen = kernel.lengthscale.get_raw_value()

    grads = ff.grad(nmll)(model, data)
    assert flat_paths(grads) == GP_PATHS - {("prior", "kernel", "lengthscale")}
    assert type(grads["prior"]["kernel"]["variance"]) is gpx.parameters.NonNegativeReal
    plain = nnx.grad(nmll, argnums=nnx.DiffState(0, gpx.parameters.Parameter))(model, data)
    ours = dict(nnx.to_flat_state(grads))
    for path, g in nnx.to_flat_state(plain):
        np.testing.assert_array_equal(g.get_value(), ours[path].get_value())

    opt = ff.Optimizer(model, optax.adam(0.01))
    assert flat_paths(opt.opt_state[0].mu) == GP_PATHS - {("prior", "kernel", "lengthscale")}
    losses = []
    for _ in range(4):
        loss, grads = ff.value_and_grad(nmll)(model, data)
        opt.update(model, grads)
        losses.append(float(loss))
    assert losses == sorted(losses, reverse=True)
    assert losses[0] > losses[-1]
    assert kernel.lengthscale.get_raw_value() is frozen
    assert type(kernel.variance) is gpx.parameters.NonNegativeReal
    assert kernel.variance.get_metadata()["tag"] == "non_negative"

    s = ff.summary(model)
    rows = {(r.path, r.type, r.status) for r in s.rows}
    assert rows == {
        ("likelihood/obs_stddev", "NonNegativeReal", "trainable"),
        ("prior/kernel/lengthscale", "FrozenParam", "frozen"),
        ("prior/kernel/variance", "NonNegativeReal", "trainable"),
        ("prior/mean_function/constant", "Array", "state"),  # an array attribute, not trained
    }
    assert (s.trainable_count, s.frozen_count, s.frozen_bytes) == (2, 1, 8)


def test_gpjax_fit_leaves_a_frozen_parameter_alone(data):
    # GPJax's own trainer selects gpjax.parameters.Parameter: a FrozenParam is not one.
    model = posterior(data.n)
    kernel = model.prior.kernel
    kernel.lengthscale = ff.FrozenParam(jnp.asarray(0.7))
    before = np.asarray(kernel.variance.get_value())
    fitted, history = gpx.fit(
        model=model,
        objective=nmll,
        train_data=data,
        optim=optax.adam(0.01),
        num_iters=3,
        verbose=False,
    )
    assert type(fitted.prior.kernel.lengthscale) is ff.FrozenParam
    assert float(fitted.prior.kernel.lengthscale.get_value()) == 0.7
    assert float(fitted.prior.kernel.variance.get_value()) != float(before)
    assert history.shape == (3,)


def test_gpjax_freeze_by_path_trains_the_rest_and_unfreeze_restores_the_type(data):
    ff.register_param_type(gpx.parameters.Parameter)
    model = posterior(data.n)
    kernel = model.prior.kernel
    original = kernel.lengthscale
    ff.freeze(model, ff.PathRegex("prior/kernel/lengthscale"))
    assert type(kernel.lengthscale) is ff.FrozenParam
    assert kernel.lengthscale.get_raw_value() is original.get_raw_value()
    assert kernel.lengthscale.get_metadata()["param_type"] is gpx.parameters.PositiveReal
    assert flat_paths(ff.grad(nmll)(model, data)) == GP_PATHS - {("prior", "kernel", "lengthscale")}
    opt = ff.Optimizer(model, optax.adam(0.01))
    for _ in range(3):
        opt.update(model, ff.grad(nmll)(model, data))
    assert kernel.lengthscale.get_raw_value() is original.get_raw_value()

    ff.unfreeze(model)
    assert type(kernel.lengthscale) is gpx.parameters.PositiveReal
    assert kernel.lengthscale.get_raw_value() is original.get_raw_value()
    assert kernel.lengthscale.get_metadata() == original.get_metadata()
    assert flat_paths(ff.grad(nmll)(model, data)) == GP_PATHS


def test_gpjax_real_with_a_prior_round_trips_its_metadata():
    ff.register_param_type(gpx.parameters.Parameter)
    prior = dist.Normal(0.0, 1.0)
    module = nnx.Module()
    module.shift = gpx.parameters.Real(jnp.asarray([0.5, -1.0]), prior=prior)
    metadata = module.shift.get_metadata()
    ff.freeze(module, ff.PathRegex("shift"))
    ff.unfreeze(module)
    assert type(module.shift) is gpx.parameters.Real
    assert module.shift.get_metadata() == metadata
    assert module.shift.get_metadata()["numpyro_properties"]["prior"] is prior
    assert module.shift.tag == "real"
    np.testing.assert_array_equal(module.shift.get_value(), [0.5, -1.0])


def test_gpjax_freeze_unregistered_says_what_to_register():
    module = nnx.Module()
    module.scale = gpx.parameters.PositiveReal(jnp.asarray(2.0))
    with pytest.raises(
        ValueError,
        match=r"matched no parameter of Module\. Its parameter paths are: \(none\)\. It "
        r"holds variables of floats .*PositiveReal \(a gpjax.parameters.Parameter\).*"
        r"ff.register_param_type\(gpjax.parameters.Parameter\)",
    ):
        ff.freeze(module)


def test_gpjax_checkpoint_restores_flags_and_types(data, tmp_path):
    ff.register_param_type(gpx.parameters.Parameter)
    model = ff.freeze(posterior(data.n), ff.PathRegex("prior/kernel/lengthscale"))
    model.prior.kernel.variance[...] = 0.25
    ff.checkpoint.save(tmp_path / "ckpt", model)
    restored = ff.checkpoint.restore(tmp_path / "ckpt", posterior(data.n))
    kernel = restored.prior.kernel
    assert type(kernel.lengthscale) is ff.FrozenParam
    assert type(kernel.variance) is gpx.parameters.NonNegativeReal
    assert float(kernel.variance.get_value()) == 0.25
    ff.unfreeze(restored)
    assert type(kernel.lengthscale) is gpx.parameters.PositiveReal
    assert kernel.lengthscale.get_metadata()["tag"] == "positive"


def test_checkpoint_refuses_to_freeze_an_unregistered_type(data, tmp_path):
    ff.register_param_type(gpx.parameters.Parameter)
    model = posterior(data.n)
    model.prior.kernel.lengthscale = ff.FrozenParam(jnp.asarray(1.0))
    ff.checkpoint.save(tmp_path / "ckpt", model)
    _variables._registered = ()
    with pytest.raises(
        ValueError,
        match=r"The checkpoint holds 'prior/kernel/lengthscale' frozen, but in `target` it is "
        r"a PositiveReal, which is not a parameter.*"
        r"ff.register_param_type\(gpjax.parameters.Parameter\)",
    ):
        ff.checkpoint.restore(tmp_path / "ckpt", posterior(data.n))
    # With the target's flags, the target keeps its own types.
    restored = ff.checkpoint.restore(tmp_path / "ckpt", posterior(data.n), flags="target")
    assert type(restored.prior.kernel.lengthscale) is gpx.parameters.PositiveReal
    assert float(restored.prior.kernel.lengthscale.get_value()) == 1.0


# ---------------------------------------------------------------------------------------
# paramax (GPJax 1.0 and other Equinox code): NonTrainable


class Affine(eqx.Module):
    weight: jax.Array
    bias: jax.Array | paramax.NonTrainable

    def __call__(self, x):
        return x @ self.weight + self.bias


def affine():
    bias = paramax.NonTrainable(jnp.asarray([1.0, -1.0]))
    return Affine(jnp.asarray([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), bias)


def loss(model, x):
    return jnp.sum(paramax.unwrap(model)(x) ** 2)


X = jnp.asarray([[1.0, 0.0, 1.0], [0.0, 1.0, 2.0]])


def test_paramax_non_trainable_gets_no_gradient_and_no_optimizer_state():
    model = affine()
    g = ff.grad(loss)(model, X)
    assert isinstance(g, Affine)
    assert g.bias is None
    expected = jax.grad(loss)(model, X)  # paramax's own: a zero behind stop_gradient
    np.testing.assert_array_equal(g.weight, expected.weight)
    np.testing.assert_array_equal(expected.bias.tree, [0.0, 0.0])

    trainable = ff.trainable_tree(model)
    assert trainable.bias is None
    assert trainable.weight is model.weight
    tx = optax.adamw(0.1, weight_decay=0.5)
    opt_state = tx.init(trainable)
    assert [x.shape for x in jax.tree.leaves(opt_state) if x.ndim] == [(3, 2), (3, 2)]

    @jax.jit
    def step(model, opt_state):
        grads = ff.grad(loss)(model, X)
        updates, opt_state = tx.update(grads, opt_state, ff.trainable_tree(model))
        return ff.apply_updates(model, updates), opt_state

    new, opt_state = step(model, opt_state)
    assert isinstance(new.bias, paramax.NonTrainable)
    np.testing.assert_array_equal(new.bias.tree, [1.0, -1.0])
    assert not np.array_equal(new.weight, model.weight)
    np.testing.assert_array_equal(paramax.unwrap(new).bias, [1.0, -1.0])


def test_paramax_non_trainable_in_a_dict_from_non_trainable():
    tree = {"w": jnp.asarray([1.0, 2.0]), "fixed": paramax.non_trainable({"b": jnp.ones(2)})}
    g = ff.grad(lambda t: jnp.sum(paramax.unwrap(t)["w"] * paramax.unwrap(t)["fixed"]["b"]))(tree)
    assert g["fixed"] == {"b": None}  # non_trainable wraps each leaf
    np.testing.assert_array_equal(g["w"], [1.0, 1.0])
    assert ff.trainable_tree(tree)["fixed"] == {"b": None}
    unwrapped = paramax.unwrap(tree)
    np.testing.assert_array_equal(unwrapped["fixed"]["b"], [1.0, 1.0])


def test_paramax_summary_counts_non_trainable_frozen():
    s = ff.summary(affine())
    assert [(r.path, r.type, r.shape, r.status, r.count) for r in s.rows] == [
        ("bias/tree", "NonTrainable", (2,), "frozen", 2),
        ("weight", "Array", (3, 2), "trainable", 6),
    ]
    assert (s.trainable_count, s.frozen_count, s.frozen_bytes) == (6, 2, 8)
    wrapped = {"p": paramax.NonTrainable({"k": nnx.Param(jnp.ones(3)), "n": 2})}
    assert [(r.path, r.type, r.status) for r in ff.summary(wrapped).rows] == [
        ("p/tree/k", "Param", "frozen"),
        ("p/tree/n", "NonTrainable", "state"),
    ]


def test_stop_frozen_keeps_non_trainable_and_stops_its_leaves():
    model = affine()
    stopped = ff.stop_frozen(model)
    assert isinstance(stopped.bias, paramax.NonTrainable)
    # Read without paramax.unwrap (whose stop_gradient would hide the difference).
    g = jax.grad(lambda m: jnp.sum(m.bias.tree * 2.0))(model)
    np.testing.assert_array_equal(g.bias.tree, [2.0, 2.0])
    g = jax.grad(lambda m: jnp.sum(ff.stop_frozen(m).bias.tree * 2.0))(model)
    np.testing.assert_array_equal(g.bias.tree, [0.0, 0.0])


def test_paramax_checkpoint_flags_non_trainable_frozen(tmp_path):
    model = affine()
    ff.checkpoint.save(tmp_path / "ckpt", model)
    flags = ff.checkpoint.read_flags(tmp_path / "ckpt")
    assert (sorted(flags.frozen), sorted(flags.trainable)) == (["bias/tree"], ["weight"])
    target = Affine(jnp.zeros((3, 2)), paramax.NonTrainable(jnp.zeros(2)))
    restored = ff.checkpoint.restore(tmp_path / "ckpt", target)
    assert isinstance(restored.bias, paramax.NonTrainable)
    np.testing.assert_array_equal(restored.bias.tree, [1.0, -1.0])
    np.testing.assert_array_equal(restored.weight, model.weight)


def test_foreign_frozen_types_need_no_import(monkeypatch):
    monkeypatch.delitem(sys.modules, "paramax")
    assert _boxes.foreign_frozen_types() == ()
    assert not _boxes.is_foreign_frozen(affine().bias)
    assert "paramax" not in sys.modules


def test_importing_flax_freeze_imports_no_other_library():
    code = (
        "import sys, flax_freeze; "
        "print(sorted(m for m in ('paramax', 'equinox', 'gpjax') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
