"""qwix LoRA / QLoRA: the tunix recipe with flax_freeze, and a frozen base refused loudly."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import qwix
from flax import nnx

import flax_freeze as ff
from flax_freeze._qwix import check_qwix, is_qwix_lora_base
from helpers import variable_types

# qwix 0.1.8 uses Flax APIs that Flax 0.12 deprecates (Module.iter_modules, Variable.value,
# VariableState): its own warnings, not flax_freeze's.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:qwix")

REFUSED = r"selects 2 base weight\(s\) of qwix LoRA adapters: \[l1/kernel, mix/kernel\]"
STEPS = 10


class Net(nnx.Module):
    """An nnx.Linear, an nnx.Einsum (both adapted by qwix) and a head."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(8, 16, rngs=rngs)
        self.mix = nnx.Einsum("bi,hio->bho", (2, 16, 8), (2, 8), rngs=rngs)
        self.head = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.l1(x))
        h = self.mix(h).reshape(x.shape[0], 16)
        return self.head(nnx.relu(h))


X = jax.random.normal(jax.random.key(1), (16, 8))
Y = jnp.arange(16) % 4


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def lora(qtype=None, module_path="l1|mix", rules=None):
    """A fresh Net with qwix adapters on ``module_path`` (by default l1 and mix, not head)."""
    if rules is not None:
        provider = qwix.LoraProvider(rules)
    else:
        provider = qwix.LoraProvider(module_path=module_path, rank=2, alpha=4.0, weight_qtype=qtype)
    return qwix.apply_lora_to_model(Net(nnx.Rngs(0)), provider, X[:1], rngs=nnx.Rngs(1))


def base(model):
    """Every array that is not an adapter, as numpy, by path."""
    state = nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.LoRAParam)))
    return {path: np.asarray(v.get_value()) for path, v in state}


def bit_identical(a, b):
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a
    )


def selection(model, pattern=".*"):
    """The nnx.Param variables of ``model`` whose path matches, each with its path."""
    regex = ff.PathRegex(pattern)
    return [(v, [p]) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param) and regex(p, v)]


@nnx.jit
def tunix_step(model, opt, x, y):
    """tunix's PeftTrainer step: nnx.value_and_grad on LoRAParam, nnx.Optimizer(wrt=LoRAParam)."""
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))
    loss, grads = grad_fn(model, x, y)
    opt.update(model, grads)
    return loss, optax.tree.norm(grads)


@nnx.jit(static_argnames="wrt")
def ff_step(model, opt, x, y, wrt):
    """The same step with ff.value_and_grad and an ff.Optimizer."""
    loss, grads = ff.value_and_grad(loss_fn, wrt=wrt)(model, x, y)
    opt.update(model, grads)
    return loss, optax.tree.norm(grads)


def tunix_way(model, steps=STEPS):
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    return [tuple(map(float, tunix_step(model, opt, X, Y))) for _ in range(steps)]


def ff_way(model, wrt, steps=STEPS):
    opt = ff.Optimizer(model, optax.adam(1e-2), wrt=wrt)
    return [tuple(map(float, ff_step(model, opt, X, Y, wrt))) for _ in range(steps)]


_TUNIX: dict = {}


def tunix_trajectory(qtype):
    """(losses and grad norms, final adapters) of the tunix way, computed once per qtype."""
    if qtype not in _TUNIX:
        model = lora(qtype)
        trajectory = tunix_way(model)
        adapters = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
        _TUNIX[qtype] = trajectory, jax.tree.map(np.asarray, adapters)
    return _TUNIX[qtype]


# --- what qwix does: the reason for the check --------------------------------------------


def test_qwix_lora_adapters_and_qlora_base_layout():
    model = lora("int8")
    assert variable_types(model) == {
        "head/bias": "Param",
        "head/kernel": "Param",
        "l1/bias": "Param",
        "l1/kernel/array/qvalue": "Param",
        "l1/kernel/array/scale": "Param",
        "l1/kernel_lora_a": "LoRAParam",
        "l1/kernel_lora_b": "LoRAParam",
        "mix/bias": "Param",
        "mix/kernel/array/qvalue": "Param",
        "mix/kernel/array/scale": "Param",
        "mix/kernel_lora_a": "LoRAParam",
        "mix/kernel_lora_b": "LoRAParam",
    }
    assert model.l1.kernel.array.qvalue.get_value().dtype == jnp.int8
    qvalue = model.l1.kernel.array.qvalue  # a quantized base is a qwix container of variables
    assert not is_qwix_lora_base(model, ("l1", "kernel", "array", "qvalue"), qvalue)
    plain = lora()
    bases = [p for v, (p,) in selection(plain) if is_qwix_lora_base(plain, p, v)]
    assert bases == [("l1", "kernel"), ("mix", "kernel")]


def test_qwix_ignores_the_adapters_of_a_frozen_param_base():
    # Built by hand (ff.freeze refuses): qwix looks the base up among nnx.Param attributes.
    model, plain = lora(), Net(nnx.Rngs(0))  # the same base weights, one without adapters
    for layer in (model.l1, model.mix):
        layer.kernel_lora_b[...] = layer.kernel_lora_b[...] + 0.5  # adapters that do something
    assert not np.allclose(model(X), plain(X))
    for layer in (model.l1, model.mix):
        layer.kernel = ff.FrozenParam(layer.kernel.get_value())
    np.testing.assert_array_equal(model(X), plain(X))  # the adapters are ignored
    grads = ff.grad(loss_fn, wrt=nnx.LoRAParam)(model, X, Y)
    assert float(optax.tree.norm(grads)) == 0.0


# --- the working recipe: trains exactly like tunix ---------------------------------------


@pytest.mark.parametrize("qtype", [None, "int8", "nf4"], ids=["lora", "qlora-int8", "qlora-nf4"])
def test_ff_with_wrt_lora_param_trains_exactly_like_tunix(qtype):
    expected, adapters = tunix_trajectory(qtype)
    model = lora(qtype)
    before = base(model)
    assert ff_way(model, nnx.LoRAParam) == expected  # losses and gradient norms, bit for bit
    assert bit_identical(base(model), before)
    final = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
    assert jax.tree.all(jax.tree.map(np.array_equal, final, adapters))
    losses = [loss for loss, _ in expected]
    assert losses[-1] < losses[0] - 0.1
    assert all(norm > 0 for _, norm in expected)


@pytest.mark.parametrize("qtype", ["int8", "nf4"], ids=["int8", "nf4"])
def test_qlora_frozen_base_trains_exactly_like_tunix(qtype):
    expected, adapters = tunix_trajectory(qtype)
    model = lora(qtype)
    before = base(model)
    ff.freeze(model, nnx.Not(nnx.LoRAParam))
    assert model.l1.kernel.array.qvalue.get_value().dtype == jnp.dtype(
        {"int8": jnp.int8, "nf4": jnp.uint4}[qtype]
    )
    assert {t for p, t in variable_types(model).items() if "lora" not in p} == {"FrozenParam"}
    assert ff_way(model, ff.Trainable) == expected
    assert bit_identical(base(model), before)
    final = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
    assert jax.tree.all(jax.tree.map(np.array_equal, final, adapters))
    s = ff.summary(model)
    # adapters: l1 8*2 + 2*16, mix 16*2 + 2*2*8; frozen: the rest, the head included
    assert (s.trainable_count, s.frozen_count) == (112, 516)


# --- the loud failure ---------------------------------------------------------------------


def test_check_qwix_refuses_a_lora_base():
    model = lora()
    with pytest.raises(ValueError, match=REFUSED) as info:
        check_qwix(model, selection(model), nnx.Not(nnx.LoRAParam))
    message = str(info.value)
    assert message.startswith("`filter` Not(OfType(<class 'flax.nnx.nn.lora.LoRAParam'>)) selects")
    for part in (
        "finds the weight of each adapted layer among the module's nnx.Param attributes",
        "(kernel_lora_a, kernel_lora_b) would silently add nothing (zero gradient)",
        "ff.Optimizer(model, tx, wrt=nnx.LoRAParam) with ff.grad(loss_fn, wrt=nnx.LoRAParam)",
        "nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)",
        "A quantized base (QLoRA, qwix.LoraProvider(..., weight_qtype='nf4')) may be frozen.",
    ):
        assert part in message


def test_check_qwix_names_only_the_bases_selected():
    model = lora()
    with pytest.raises(ValueError, match=r"selects 1 base weight\(s\) of .*: \[mix/kernel\]"):
        check_qwix(model, selection(model, "mix/.*"), ff.PathRegex("mix/.*"))
    check_qwix(model, selection(model, ".*/bias|head/.*"), ff.PathRegex(".*/bias|head/.*"))
    check_qwix(model, selection(model, ".*_lora_.*"), nnx.LoRAParam)
    check_qwix(model, [], None)


def test_check_qwix_sees_frozen_adapters_and_submodules():
    model = lora()
    ff.freeze(model, nnx.LoRAParam)  # adapters frozen: still adapters of a qwix base
    with pytest.raises(ValueError, match=r"1 base weight\(s\) of qwix LoRA adapters: \[kernel\]"):
        check_qwix(model.l1, selection(model.l1), ff.Trainable)
    pair = (Net(nnx.Rngs(2)), model)
    with pytest.raises(ValueError, match=r": \[1/l1/kernel, 1/mix/kernel\]"):
        check_qwix(pair, selection(pair), ff.Trainable)


class Containers(nnx.Module):
    """Adapted layers in an nnx.Dict, a list in a dict, a tuple and an nnx.List."""

    def __init__(self):
        self.d = nnx.Dict({"a": nnx.Linear(8, 4, rngs=nnx.Rngs(0))})
        self.p = nnx.data({"b": [nnx.Linear(4, 4, rngs=nnx.Rngs(1))]})
        self.t = nnx.data((nnx.Linear(4, 4, rngs=nnx.Rngs(2)),))
        self.seq = nnx.Sequential(nnx.Linear(4, 2, rngs=nnx.Rngs(3)))

    def __call__(self, x):
        return self.seq(self.t[0](self.p["b"][0](self.d["a"](x))))


def test_check_qwix_finds_bases_in_containers():
    provider = qwix.LoraProvider(module_path=".*", rank=2, alpha=4.0)
    model = qwix.apply_lora_to_model(Containers(), provider, X[:1], rngs=nnx.Rngs(1))
    paths = r"\[d/a/kernel, p/b/0/kernel, seq/layers/0/kernel, t/0/kernel\]"
    with pytest.raises(ValueError, match=r"4 base weight\(s\) of qwix LoRA adapters: " + paths):
        check_qwix(model, selection(model), ff.Trainable)


def test_check_qwix_needs_qwix_wrapping():
    class Own(nnx.Module):  # the same attribute names, but no qwix model
        def __init__(self):
            self.kernel = nnx.Param(jnp.ones((2, 2)))
            self.kernel_lora_a = nnx.LoRAParam(jnp.ones((2, 1)))
            self.kernel_lora_b = nnx.LoRAParam(jnp.ones((1, 2)))

    own = Own()
    check_qwix(own, selection(own), ff.Trainable)
    assert not is_qwix_lora_base(own, ("kernel",), own.kernel)


def test_check_qwix_costs_nothing_without_qwix(monkeypatch):
    model = lora()
    monkeypatch.delitem(sys.modules, "qwix")
    check_qwix(model, selection(model), ff.Trainable)


# --- ff.freeze calls the check (fails until flax_freeze/_retype.py wires it in) ------------


@pytest.mark.parametrize(
    "filter",
    [nnx.Not(nnx.LoRAParam), ff.Trainable, ff.PathRegex("(l1|mix)/kernel")],
    ids=["not-lora", "everything", "path"],
)
def test_freeze_refuses_a_lora_base(filter):
    model = lora()
    before = variable_types(model)
    with pytest.raises(ValueError, match=REFUSED):
        ff.freeze(model, filter)
    assert variable_types(model) == before  # nothing re-typed
    with pytest.raises(ValueError, match=REFUSED):
        with ff.freezing(model, filter):
            pass
    assert variable_types(model) == before


def test_freeze_allows_what_qwix_does_not_look_up():
    model = lora()
    ff.freeze(model, ff.PathRegex(".*/bias|head/.*"))
    ff.freeze(model, nnx.LoRAParam)
    assert variable_types(model)["l1/kernel"] == "Param"
    assert variable_types(model)["l1/kernel_lora_a"] == "FrozenParam"


def test_freeze_with_mixed_rules_refuses_only_the_float_base():
    rules = [
        qwix.LoraRule(module_path="l1", rank=2, alpha=4.0, weight_qtype="nf4"),
        qwix.LoraRule(module_path="mix", rank=2, alpha=4.0),
    ]
    model = lora(rules=rules)
    with pytest.raises(ValueError, match=r"selects 1 base weight\(s\) of .*: \[mix/kernel\]"):
        ff.freeze(model, nnx.Not(nnx.LoRAParam))
    ff.freeze(model, ff.PathRegex("l1/kernel/.*"))  # the quantized base
    assert variable_types(model)["l1/kernel/array/qvalue"] == "FrozenParam"


# --- the example --------------------------------------------------------------------------


def test_example_lora_qwix(capsys):
    import lora_qwix

    results = lora_qwix.main(steps=80)
    assert results["pretrain"] > 0.95
    assert results["before_lora"] < 0.6  # digits 5-9 never seen
    assert results["lora"] > 0.85
    assert results["qlora"] > 0.85
    assert results["lora_base_unchanged"]
    assert results["qlora_base_unchanged"]
    out = capsys.readouterr().out
    assert "total: trainable 1,320 (5.2 KiB), frozen 9,108 (9.7 KiB)" in out
    assert "base weights bit-identical after LoRA and QLoRA training" in out
