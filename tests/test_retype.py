import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_freeze as ff


class Block(nnx.Module):
    def __init__(self, d, rngs):
        self.lin = nnx.Linear(d, d, rngs=rngs)
        self.bn = nnx.BatchNorm(d, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.lin(x)))


class Net(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([Block(4, rngs) for _ in range(3)])
        self.extra = nnx.Dict({"proj": nnx.Linear(4, 4, rngs=rngs)})
        self.pair = nnx.data((nnx.Param(jnp.ones(2)), nnx.Param(jnp.zeros(2))))
        self.plain = nnx.data([nnx.Param(jnp.ones(3))])
        self.lora = nnx.LoRA(4, 2, 4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)


def variables(node):
    """Every (first path, variable) of a node."""
    return {p: v for p, v in nnx.iter_graph(node, graph=True) if isinstance(v, nnx.Variable)}


def types(node):
    return {p: type(v) for p, v in variables(node).items()}


def test_freeze_everything_by_default_in_place():
    net = Net(nnx.Rngs(0))
    assert ff.freeze(net) is net
    for path, v in variables(net).items():
        if path[-1] in ("kernel", "bias", "scale", "lora_a", "lora_b") or path[0] in (
            "pair",
            "plain",
        ):
            assert type(v) is ff.FrozenParam, path
    assert type(net.blocks[0].bn.mean) is nnx.BatchStat
    assert not nnx.state(net, nnx.Param)


def test_freeze_keeps_the_same_array_objects():
    net = Net(nnx.Rngs(0))
    before = {p: v.get_raw_value() for p, v in variables(net).items()}
    ff.freeze(net)
    after = {p: v.get_raw_value() for p, v in variables(net).items()}
    assert before.keys() == after.keys()
    for path in before:
        assert after[path] is before[path], path


def test_freeze_reaches_lists_dicts_and_tuples():
    net = Net(nnx.Rngs(0))
    ff.freeze(net, ff.PathRegex("(blocks/1|extra|pair|plain)/.*"))
    assert type(net.blocks[1].lin.kernel) is ff.FrozenParam
    assert type(net.blocks[0].lin.kernel) is nnx.Param
    assert type(net.extra["proj"].kernel) is ff.FrozenParam
    assert isinstance(net.pair, tuple)
    assert [type(v) for v in net.pair] == [ff.FrozenParam, ff.FrozenParam]
    assert type(net.plain[0]) is ff.FrozenParam


def test_freeze_leaves_batch_stats_and_rng_state_alone():
    net = Net(nnx.Rngs(0))
    before = types(net)
    ff.freeze(net, ...)
    after = types(net)
    for path, typ in before.items():
        if not issubclass(typ, nnx.Param):
            assert after[path] is typ, path


def test_unfreeze_restores_the_param_subtype():
    net = Net(nnx.Rngs(0))
    ff.freeze(net, ff.PathRegex("lora/.*"))
    assert type(net.lora.lora_a) is ff.FrozenParam
    assert net.lora.lora_a.get_metadata("param_type") is nnx.LoRAParam
    ff.unfreeze(net, ff.PathRegex("lora/.*"))
    assert type(net.lora.lora_a) is nnx.LoRAParam
    assert "param_type" not in net.lora.lora_a.get_metadata()


def test_unfreeze_of_a_declared_frozen_param_gives_param():
    class M(nnx.Module):
        def __init__(self):
            self.w = ff.FrozenParam(jnp.ones(2))

    m = ff.unfreeze(M())
    assert type(m.w) is nnx.Param


def test_freeze_keeps_every_metadata_entry():
    class M(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(
                jnp.ones((2, 2)), out_sharding=(None, "model"), eager_sharding=False, note="hello"
            )

    m = M()
    meta = m.w.get_metadata()
    ff.freeze(m)
    frozen_meta = m.w.get_metadata()
    assert frozen_meta.pop("param_type") is nnx.Param
    assert frozen_meta == meta
    ff.unfreeze(m)
    assert m.w.get_metadata() == meta


def test_freeze_keeps_a_sharded_array_and_its_sharding():
    mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("model"))
    m = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
    m.kernel.set_raw_value(
        jax.device_put(m.kernel.get_raw_value(), NamedSharding(mesh, P(None, "model")))
    )
    m.bias.set_raw_value(jax.device_put(m.bias.get_raw_value(), sharding))
    kernel = m.kernel.get_raw_value()
    ff.freeze(m)
    assert m.kernel.get_raw_value() is kernel
    assert m.kernel.get_raw_value().sharding == NamedSharding(mesh, P(None, "model"))
    ff.unfreeze(m)
    assert m.bias.get_raw_value().sharding == sharding


def test_ties_stay_one_object():
    shared = nnx.Linear(3, 3, rngs=nnx.Rngs(0))

    class Tied(nnx.Module):
        def __init__(self):
            self.enc = nnx.Dict({"emb": shared})
            self.dec = nnx.Dict({"emb": shared})
            self.w = nnx.Param(jnp.ones(3))
            self.alias = nnx.data([self.w])

    m = Tied()
    ff.freeze(m, ff.PathRegex("alias/.*"))  # matches the tied variable by its second path
    assert type(m.w) is ff.FrozenParam
    assert m.alias[0] is m.w
    ff.freeze(m, ff.PathRegex("dec/.*"))
    assert m.enc["emb"] is m.dec["emb"]
    assert m.enc["emb"].kernel is m.dec["emb"].kernel
    assert type(m.enc["emb"].kernel) is ff.FrozenParam
    assert nnx.find_duplicates(m)  # still shared after re-typing
    ff.unfreeze(m)
    assert m.alias[0] is m.w
    assert type(m.w) is nnx.Param
    assert m.enc["emb"].kernel is m.dec["emb"].kernel


def test_matched_nothing_names_the_filter_and_lists_paths():
    net = Net(nnx.Rngs(0))
    with pytest.raises(
        ValueError, match=r"PathRegex\('decoder/\.\*'\).*matched no parameter of Net.*head/bias"
    ):
        ff.freeze(net, ff.PathRegex("decoder/.*"))
    with pytest.raises(ValueError, match=r"unfreeze\(\) matched no parameter.*missing_ok=True"):
        ff.unfreeze(net)
    assert ff.unfreeze(net, missing_ok=True) is net
    assert ff.freeze(net, ff.PathRegex("decoder/.*"), missing_ok=True) is net
    assert type(net.head.kernel) is nnx.Param


def test_matched_nothing_for_a_filter_that_selects_only_batch_stats():
    net = Net(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"`filter` <class 'flax.nnx.variablelib.BatchStat'>"):
        ff.freeze(net, nnx.BatchStat)


def test_bad_filter_is_a_type_error():
    with pytest.raises(TypeError, match=r"`filter` must be an NNX filter .* got 3"):
        ff.freeze(Net(nnx.Rngs(0)), 3)


@pytest.mark.parametrize(
    "filter_",
    [
        pytest.param(nnx.PathContains("head"), id="path-contains"),
        pytest.param(nnx.All(nnx.Param, nnx.PathContains("head")), id="all"),
        pytest.param(nnx.Any(nnx.PathContains("head"), nnx.PathContains("nothing")), id="any"),
        pytest.param(lambda path, v: path[0] == "head", id="callable"),
        pytest.param(ff.PathRegex("head/.*"), id="regex"),
    ],
)
def test_nnx_filters_select_the_head(filter_):
    net = Net(nnx.Rngs(0))
    ff.freeze(net, filter_)
    frozen = {p for p, t in types(net).items() if t is ff.FrozenParam}
    assert frozen == {("head", "kernel"), ("head", "bias")}


def test_not_filter_freezes_all_but_the_head():
    net = Net(nnx.Rngs(0))
    ff.freeze(net, nnx.Not(nnx.PathContains("head")))
    trainable = {p for p, t in types(net).items() if issubclass(t, nnx.Param)}
    assert trainable == {("head", "kernel"), ("head", "bias")}


def test_freezing_restores_exact_flags_also_on_error():
    net = Net(nnx.Rngs(0))
    ff.freeze(net, ff.PathRegex("blocks/0/.*"))
    before = types(net)
    with ff.freezing(net, ff.PathRegex("(blocks|lora)/.*")) as inner:
        assert inner is net
        assert type(net.lora.lora_b) is ff.FrozenParam
        assert type(net.blocks[2].lin.kernel) is ff.FrozenParam
    assert types(net) == before
    seen_inside = []

    def fail():
        with ff.freezing(net):
            seen_inside.append(len(nnx.state(net, nnx.Param)))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail()
    assert seen_inside == [0]
    assert types(net) == before
    assert type(net.blocks[0].lin.kernel) is ff.FrozenParam  # was frozen before: stays
    assert type(net.lora.lora_a) is nnx.LoRAParam


def test_freeze_and_unfreeze_inside_nnx_jit():
    net = Net(nnx.Rngs(0))

    @nnx.jit
    def f(net):
        ff.freeze(net, ff.PathRegex("blocks/.*"))
        ff.unfreeze(net, ff.PathRegex("blocks/2/.*"))

    kernel = np.asarray(net.blocks[0].lin.kernel[...])
    f(net)
    assert type(net.blocks[0].lin.kernel) is ff.FrozenParam
    assert type(net.blocks[2].lin.kernel) is nnx.Param
    np.testing.assert_array_equal(np.asarray(net.blocks[0].lin.kernel[...]), kernel)


# ----------------------------------------------------------------------------------------------
# Property: unfreeze after freeze restores types, metadata, values and ties exactly.


PARAM_TYPES = [nnx.Param, nnx.LoRAParam, ff.FrozenParam, nnx.BatchStat]


@st.composite
def module_trees(draw, depth=0):
    mod = nnx.Module()
    n = draw(st.integers(1, 3))
    for i in range(n):
        kind = draw(st.sampled_from(["var", "module", "list", "tuple"] if depth < 2 else ["var"]))
        if kind == "var":
            typ = draw(st.sampled_from(PARAM_TYPES))
            shape = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
            setattr(mod, f"v{i}", typ(jnp.full(shape, float(i + depth)), tag=f"t{i}"))
        elif kind == "module":
            setattr(mod, f"m{i}", draw(module_trees(depth + 1)))
        elif kind == "list":
            setattr(mod, f"l{i}", nnx.List([draw(module_trees(depth + 1)) for _ in range(2)]))
        else:
            setattr(mod, f"t{i}", nnx.data((nnx.Param(jnp.ones(2)), draw(module_trees(depth + 1)))))
    if depth == 0 and draw(st.booleans()):
        # a tie: some variable reachable twice
        params = [v for _, v in nnx.iter_graph(mod) if isinstance(v, nnx.Variable)]
        mod.alias = nnx.data([draw(st.sampled_from(params))])
    return mod


def snapshot(node):
    out = {}
    for path, v in variables(node).items():
        meta = v.get_metadata()
        meta.pop("param_type", None)
        out[path] = (type(v), meta, v.get_raw_value(), id(v))
    return out


def ties(node):
    return sorted(map(sorted, nnx.find_duplicates(node, only=nnx.Variable)))


filters = st.sampled_from(
    [
        ff.Trainable,
        nnx.LoRAParam,
        ff.PathRegex(".*v0"),
        ff.PathRegex("m.*"),
        ff.PathRegex("l[0-9]+/1/.*"),
        nnx.PathContains("t1"),
        lambda path, v: len(path) % 2 == 0,
    ]
)


@settings(max_examples=40, deadline=None)
@given(module_trees(), filters)
def test_property_unfreeze_after_freeze_restores_everything(mod, filter_):
    before = snapshot(mod)
    before_ties = ties(mod)
    frozen_before = {p for p, (t, *_rest) in before.items() if t is ff.FrozenParam}
    ff.freeze(mod, filter_, missing_ok=True)
    mid = snapshot(mod)
    assert ties(mod) == before_ties
    newly_frozen = {
        p for p, (t, *_rest) in mid.items() if t is ff.FrozenParam and p not in frozen_before
    }
    for path, (typ, meta, value, _) in before.items():
        assert mid[path][1] == meta
        assert mid[path][2] is value
        if not issubclass(typ, nnx.Param):
            assert mid[path][0] is typ
    ff.unfreeze(mod, lambda path, v: path in newly_frozen, missing_ok=True)
    after = snapshot(mod)
    assert ties(mod) == before_ties
    for path, (typ, meta, value, _) in before.items():
        assert after[path][0] is typ, path
        assert after[path][1] == meta, path
        assert after[path][2] is value, path


# ----------------------------------------------------------------------------------------------
# Frozen parameters kept in a lower precision


def test_freeze_in_bfloat16_halves_frozen_bytes_and_unfreeze_casts_back():
    net = Net(nnx.Rngs(0))
    x = jnp.ones((2, 4))
    full = ff.summary(ff.freeze(Net(nnx.Rngs(0)), ff.PathRegex("blocks/.*"))).frozen_bytes
    kernel = np.asarray(net.blocks[0].lin.kernel[...])
    ff.freeze(net, ff.PathRegex("blocks/.*"), dtype=jnp.bfloat16)
    assert net.blocks[0].lin.kernel.dtype == jnp.bfloat16
    assert net.blocks[0].lin.kernel.get_metadata()["trained_dtype"] == np.dtype("float32")
    assert ff.summary(net).frozen_bytes * 2 == full
    out = net.blocks[0](x)  # Flax layers promote: the computation runs as before
    assert out.dtype == jnp.float32
    ff.unfreeze(net, ff.PathRegex("blocks/.*"))
    assert net.blocks[0].lin.kernel.dtype == jnp.float32
    assert "trained_dtype" not in net.blocks[0].lin.kernel.get_metadata()
    rounded = np.asarray(jnp.asarray(kernel).astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(net.blocks[0].lin.kernel[...]), rounded)


def test_freeze_in_bfloat16_keeps_sharding():
    mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    m = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
    sharding = NamedSharding(mesh, P(None, "model"))
    m.kernel.set_raw_value(jax.device_put(m.kernel.get_raw_value(), sharding))
    ff.freeze(m, dtype=jnp.bfloat16)
    assert m.kernel.get_raw_value().sharding == sharding
    ff.unfreeze(m)
    assert m.kernel.get_raw_value().sharding == sharding
    assert m.kernel.dtype == jnp.float32


def test_freeze_dtype_on_pytrees_and_bad_dtype():
    tree = {"w": jnp.ones(3), "v": 2.0}
    frozen = ff.freeze(tree, dtype=jnp.bfloat16)
    assert frozen["w"].dtype == jnp.bfloat16
    assert ff.unfreeze(frozen)["w"].dtype == jnp.float32
    with pytest.raises(
        TypeError, match=r"`dtype` must be a floating dtype such as jnp.bfloat16, got"
    ):
        ff.freeze(tree, dtype=jnp.int8)
    with pytest.raises(TypeError, match=r"`dtype` must be a floating dtype"):
        ff.freeze(tree, dtype="not-a-dtype")


def test_freeze_dtype_on_an_abstract_model_stays_abstract():
    def make():
        return ff.freeze(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), dtype=jnp.bfloat16)

    abstract = nnx.eval_shape(make)
    kernel = abstract.kernel.get_raw_value()
    assert isinstance(kernel, jax.ShapeDtypeStruct)
    assert kernel.dtype == jnp.bfloat16
    ff.unfreeze(abstract)
    kernel = abstract.kernel.get_raw_value()
    assert isinstance(kernel, jax.ShapeDtypeStruct)
    assert kernel.dtype == jnp.float32
    assert kernel.shape == (2, 3)
