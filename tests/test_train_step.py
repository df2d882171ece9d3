"""TrainStep: one jax.jit per frozen set, frozen arrays never copied, the model always current."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import flax_freeze as ff
from flax_freeze import _train_step as train_step
from flax_freeze import _version
from flax_freeze._train_step import TrainStep, _Split

ATOL = 1e-6


class Net(nnx.Module):
    """Linear, BatchNorm, ReLU, Dropout, Linear: batch statistics and RNG state in the step."""

    def __init__(self, seed=0):
        rngs = nnx.Rngs(seed, dropout=seed + 1)
        self.body = nnx.Linear(4, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.drop(nnx.relu(self.bn(self.body(x)))))


class Plain(nnx.Module):
    """Two linear layers, nothing stateful."""

    def __init__(self, seed=0, width=8):
        rngs = nnx.Rngs(seed)
        self.body = nnx.Linear(4, width, rngs=rngs)
        self.head = nnx.Linear(width, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.body(x)))


def xent(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def batch(i=0, n=16):
    key = jax.random.key(100 + i)
    x = jax.random.normal(key, (n, 4))
    y = jax.random.randint(jax.random.fold_in(key, 1), (n,), 0, 3)
    return x, y


def flat(node):
    """Every variable of ``node`` as a numpy array (RNG keys as their data), by path."""
    out = {}
    for path, v in nnx.to_flat_state(nnx.state(node)):
        value = v.get_raw_value() if isinstance(v, nnx.Variable) else v
        if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        out["/".join(map(str, path))] = np.asarray(value)
    return out


def assert_same_state(a, b, atol=ATOL):
    got, want = flat(a), flat(b)
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=0, atol=atol, err_msg=path)


def nnx_jit_step(loss_fn=xent, has_aux=False, static_argnames=()):
    """The README's step under @nnx.jit in graph mode: the reference."""

    @functools.partial(nnx.jit, static_argnames=static_argnames)
    def step(model, opt, *args, **kwargs):
        value, grads = ff.value_and_grad(loss_fn, has_aux=has_aux)(model, *args, **kwargs)
        opt.update(model, grads)
        return value

    return step


@pytest.fixture
def compiles():
    """How many times XLA has compiled a TrainStep's step since the test began."""
    names = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield lambda: names.count("jit(train_step)")
    jax.monitoring.unregister_event_duration_listener(listener)


def counting(loss_fn):
    """``loss_fn`` and a list that grows by one each time it is traced."""
    traces = []

    def counted(model, *args, **kwargs):
        traces.append(1)
        return loss_fn(model, *args, **kwargs)

    return counted, traces


# --- the model is always current, freeze changes followed, same as @nnx.jit ----------------


def test_interleaved_steps_eval_checkpoints_and_freeze_changes_match_nnx_jit(tmp_path):
    model, ref = Net(), Net()
    opt = ff.Optimizer(model, optax.adamw(1e-2, weight_decay=0.1))
    ref_opt = ff.Optimizer(ref, optax.adamw(1e-2, weight_decay=0.1))
    step, ref_step = TrainStep(model, opt, xent), nnx_jit_step()
    x_eval, _ = batch(99)

    def both(i):
        loss, ref_loss = step(*batch(i)), ref_step(ref, ref_opt, *batch(i))
        np.testing.assert_allclose(loss, ref_loss, atol=ATOL)

    def evaluate():
        outs = []
        for m in (model, ref):
            m.eval()
            outs.append(np.asarray(m(x_eval)))
            m.train()
        np.testing.assert_allclose(outs[0], outs[1], atol=ATOL)
        assert str(ff.summary(model)) == str(ff.summary(ref))

    for i in range(3):
        both(i)
    evaluate()
    for m in (model, ref):
        ff.freeze(m, ff.PathRegex("body/.*"))
    body = np.array(model.body.kernel[...])
    for i in range(3, 6):
        both(i)
    np.testing.assert_array_equal(model.body.kernel[...], body)  # frozen: bit-identical
    assert sorted(opt.opt_state[0].mu.keys()) == ["bn", "head"]  # migrated by the step
    evaluate()
    ff.checkpoint.save(tmp_path / "a", (model, opt))
    ff.checkpoint.save(tmp_path / "b", (ref, ref_opt))
    for m in (model, ref):
        ff.unfreeze(m)
    for i in range(6, 8):
        both(i)
    assert sorted(opt.opt_state[0].mu.keys()) == ["bn", "body", "head"]
    # Back to step 6, body frozen again (the checkpoint's flags), the optimizer state as saved.
    model, opt = ff.checkpoint.restore(tmp_path / "a", (model, opt))
    ref, ref_opt = ff.checkpoint.restore(tmp_path / "b", (ref, ref_opt))
    assert (int(opt.step[...]), type(model.body.kernel)) == (6, ff.FrozenParam)
    for i in range(6, 8):
        both(i)
    assert sorted(opt.opt_state[0].mu.keys()) == ["bn", "head"]
    np.testing.assert_array_equal(model.body.kernel[...], body)
    with ff.freezing(model, ff.PathRegex("head/bias")), ff.freezing(ref, ff.PathRegex("head/bias")):
        both(8)
    for m in (model, ref):
        ff.unfreeze(m)
    both(9)
    evaluate()
    assert_same_state(model, ref)
    assert_same_state(opt, ref_opt)
    assert int(opt.step[...]) == 10


def test_one_compile_per_distinct_frozen_set(compiles):
    model = Plain()
    opt = ff.Optimizer(model, optax.adam(1e-2))
    loss_fn, traces = counting(xent)
    step = TrainStep(model, opt, loss_fn)
    x, y = batch()
    sets = ["none", "body", "none", "body", "head", "body", "none"]
    for name in sets:
        if name != "none":
            ff.freeze(model, ff.PathRegex(f"{name}/.*"))
        for _ in range(2):
            step(x, y)
        if name != "none":
            ff.unfreeze(model)
    assert len(traces) == compiles() == 3  # none, body, head


def test_freeze_change_migrates_optimizer_state_eagerly():
    model = Plain()
    opt = ff.Optimizer(model, optax.adam(1e-2))
    step = TrainStep(model, opt, xent)
    step(*batch())
    mu_head = np.asarray(opt.opt_state[0].mu["head"]["kernel"][...])
    ff.freeze(model, ff.PathRegex("body/.*"))
    step(*batch(1))
    assert [p for p in opt.trained_paths] == [("head", "bias"), ("head", "kernel")]
    assert sorted(opt.opt_state[0].mu.keys()) == ["head"]
    assert not np.array_equal(opt.opt_state[0].mu["head"]["kernel"][...], mu_head)
    assert int(opt.opt_state[0].count[...]) == 2


def test_freeze_count_change_makes_a_new_split_without_a_new_compile(monkeypatch):
    model = Plain()
    loss_fn, traces = counting(xent)
    step = TrainStep(model, ff.Optimizer(model, optax.sgd(0.1)), loss_fn)
    step(*batch())
    splits = step._splits
    _version.bump()
    step(*batch())
    assert (step._splits, len(traces)) == (splits + 1, 1)
    # The count alone follows a freeze change, even with the structure check off.
    monkeypatch.setattr(_Split, "unchanged", lambda self: True)
    before = _version.current()
    ff.freeze(model, ff.PathRegex("body/.*"))
    assert _version.current() > before
    kernel = np.array(model.body.kernel[...])
    step(*batch())
    np.testing.assert_array_equal(model.body.kernel[...], kernel)
    assert (step._splits, len(traces)) == (splits + 2, 2)


@pytest.mark.parametrize("change", ["freeze", "unfreeze", "freezing"])
def test_freeze_unfreeze_and_freezing_bump_the_freeze_count(change):
    model = Plain()
    if change == "unfreeze":
        ff.freeze(model)
    before = _version.current()
    if change == "freezing":
        with ff.freezing(model, ff.PathRegex("head/.*")):
            assert _version.current() > before
    else:
        getattr(ff, change)(model)
    assert _version.current() > before


def test_looking_at_the_model_makes_no_new_split(tmp_path):
    model = Net()
    opt = ff.Optimizer(model, optax.adam(1e-2))
    step = TrainStep(model, opt, xent)
    step(*batch())

    @nnx.jit
    def predict(model, x):
        return model(x)

    predict(model, batch()[0])  # nnx.jit writes the RNG count back into the model
    model.eval()
    model(batch()[0])
    model.train()
    nnx.state(model)
    str(ff.summary(model))
    ff.checkpoint.save(tmp_path / "c", (model, opt))
    step(*batch(1))
    assert step._splits == 1


def test_model_holds_live_current_arrays_and_held_arrays_are_copied_not_deleted(monkeypatch):
    copies = []
    copy = train_step._own_copy
    monkeypatch.setattr(train_step, "_own_copy", lambda value: copies.append(1) or copy(value))
    model = Plain()
    opt = ff.Optimizer(model, optax.adam(1e-2))
    step = TrainStep(model, opt, xent)
    for i in range(2):
        step(*batch(i))
    assert copies == []  # nothing else holds the model's arrays: all donated, none copied
    kernel = model.head.kernel[...]
    kept = np.array(kernel)
    step(*batch(2))
    assert copies == [1]  # held by `kernel`: copied, then the copy donated
    assert not kernel.is_deleted()
    np.testing.assert_array_equal(kernel, kept)
    assert not np.array_equal(model.head.kernel[...], kept)
    del kernel
    step(*batch(3))
    assert copies == [1]
    assert int(opt.step[...]) == 4
    assert all(not v.get_raw_value().is_deleted() for _, v in nnx.to_flat_state(nnx.state(opt)))


# --- changes made by the user between steps are picked up ------------------------------------


def test_arrays_assigned_between_steps_are_picked_up_not_overwritten():
    model, ref = Plain(), Plain()
    opt, ref_opt = ff.Optimizer(model, optax.adam(1e-2)), ff.Optimizer(ref, optax.adam(1e-2))
    step, ref_step = TrainStep(model, opt, xent), nnx_jit_step()
    for i in range(2):
        step(*batch(i))
        ref_step(ref, ref_opt, *batch(i))
    new_kernel = jnp.full((8, 3), 0.5)
    for m in (model, ref):
        m.head.kernel[...] = new_kernel
        nnx.update(m.body, {"bias": nnx.Param(jnp.ones(8))})
    splits = step._splits
    step(*batch(2))
    ref_step(ref, ref_opt, *batch(2))
    assert step._splits == splits  # values, not structure: no new split
    assert_same_state(model, ref)
    assert np.abs(np.asarray(model.head.kernel[...]) - 0.5).max() < 0.02  # one Adam step away


@pytest.mark.parametrize("change", ["variable", "submodule", "static", "new_attribute"])
def test_structural_changes_between_steps_are_followed(change):
    module = Net if change == "static" else Plain  # dropout to turn off, or nothing stateful
    model, ref = module(), module()
    opt, ref_opt = ff.Optimizer(model, optax.adam(1e-2)), ff.Optimizer(ref, optax.adam(1e-2))
    step, ref_step = TrainStep(model, opt, xent), nnx_jit_step()
    step(*batch())
    ref_step(ref, ref_opt, *batch())
    for m in (model, ref):  # what is trained changes too: both migrate by themselves
        if change == "variable":
            m.head.bias = nnx.Param(jnp.full(3, 2.0))
        elif change == "submodule":
            m.head = nnx.Linear(8, 3, rngs=nnx.Rngs(7))
        elif change == "static":
            m.set_attributes(deterministic=True)  # dropout off
        else:
            m.extra = nnx.Param(jnp.zeros(3))
    for i in range(1, 3):
        loss = step(*batch(i))
        np.testing.assert_allclose(loss, ref_step(ref, ref_opt, *batch(i)), atol=ATOL)
    assert step._splits == 2
    assert_same_state(model, ref)
    assert_same_state(opt, ref_opt)


class WithList(nnx.Module):
    """A module with a plain list of parameters."""

    def __init__(self):
        self.net = Plain()
        self.extras = nnx.data([nnx.Param(jnp.zeros(3))])

    def __call__(self, x):
        return self.net(x) + sum(p[...] for p in self.extras)


@pytest.mark.parametrize("change", ["append", "pop", "replace-item", "delete", "rename"])
def test_changes_of_length_or_names_anywhere_are_seen(change):
    model = WithList()
    step = TrainStep(model, ff.Optimizer(model, optax.sgd(0.1)), xent)
    assert step._split.unchanged()
    if change == "append":
        model.extras.append(nnx.Param(jnp.ones(3)))
    elif change == "pop":
        model.extras.pop()
    elif change == "replace-item":
        model.extras[0] = nnx.Param(jnp.ones(3))
    elif change == "delete":
        del model.net.head.bias
    else:
        bias = model.net.head.bias
        del model.net.head.bias
        model.net.head.other = bias
    assert not step._split.unchanged()


def loss_with_offset(model, x, y, offset):
    return xent(model, x, y) + (offset**2).sum()


@pytest.mark.parametrize("where", ["two-trainable", "trainable-and-frozen", "trainable-and-batch"])
def test_one_array_at_two_places_gets_a_copy_where_it_is_donated(where):
    model, ref = Plain(width=3), Plain(width=3)
    for m in (model, ref):
        if where == "trainable-and-frozen":
            ff.freeze(m, ff.PathRegex("body/.*"))
        shared = jnp.linspace(-1.0, 1.0, 3)  # one array object in two places
        m.body.bias.set_raw_value(shared)
        m.head.bias.set_raw_value(shared)
    opt, ref_opt = ff.Optimizer(model, optax.adam(1e-2)), ff.Optimizer(ref, optax.adam(1e-2))
    step, ref_step = TrainStep(model, opt, loss_with_offset), nnx_jit_step(loss_with_offset)
    x, y = batch()
    offset = model.head.bias.get_raw_value() if where == "trainable-and-batch" else jnp.ones(3)
    ref_offset = ref.head.bias.get_raw_value() if where == "trainable-and-batch" else jnp.ones(3)
    for _ in range(2):
        loss = step(x, y, offset)
        np.testing.assert_allclose(loss, ref_step(ref, ref_opt, x, y, ref_offset), atol=ATOL)
    assert_same_state(model, ref)
    assert model.body.bias.get_raw_value() is not model.head.bias.get_raw_value()
    assert not offset.is_deleted()


# --- frozen arrays are never copied ------------------------------------------------------------


def hlo_parameters(text):
    entry = text[text.index("\nENTRY ") :]
    body = entry[: entry.index("\n}")]
    params = dict(
        (int(n), name) for name, n in re.findall(r"\n\s*(\S+) = [^\n]*? parameter\((\d+)\)", body)
    )
    root = re.search(r"\n\s*ROOT [^\n]*", body).group(0)
    return body, params, root


def copied(body, root, name):
    """Whether the entry computation copies the instruction ``name`` or returns it."""
    ref = re.escape(name) + r"(?![\w.])"
    return bool(re.search(r"copy(-start)?\([^\n]*" + ref, body)) or bool(re.search(ref, root))


def hand_written_split(model, opt, loss_fn):
    """The ideal: frozen arrays a separate argument, everything else donated, as flat lists."""
    graphdef, frozen, rest = nnx.split((model, opt), ff.FrozenParam, ...)
    frozen_def, rest_def = jax.tree.structure(frozen), jax.tree.structure(rest)

    def step(rest, frozen, x, y):
        m, o = nnx.merge(
            graphdef, jax.tree.unflatten(frozen_def, frozen), jax.tree.unflatten(rest_def, rest)
        )
        loss, grads = ff.value_and_grad(loss_fn)(m, x, y)
        o.update(m, grads)
        return loss, jax.tree.leaves(nnx.state((m, o), nnx.Not(ff.FrozenParam)))

    return jax.jit(step, donate_argnums=0), jax.tree.leaves(rest), jax.tree.leaves(frozen)


def total_bytes(compiled):
    m = compiled.memory_analysis()
    return (
        m.argument_size_in_bytes,
        m.output_size_in_bytes,
        m.alias_size_in_bytes,
        m.temp_size_in_bytes,
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes,
    )


@pytest.mark.parametrize("module", [Net, Plain], ids=["batchnorm-dropout", "plain"])
def test_compiled_step_never_copies_frozen_arrays_and_matches_the_split_in_memory(module):
    model = module()
    ff.freeze(model, ff.PathRegex("body/.*"))
    opt = ff.Optimizer(model, optax.adam(1e-2))
    step = TrainStep(model, opt, xent)
    x, y = batch()
    compiled = step.lower(x, y).compile()
    donated = len(step._split.donated)
    frozen = len(step._split.frozen)
    assert frozen == 2
    body, params, root = hlo_parameters(compiled.as_text())
    for i in range(donated, donated + frozen):
        assert not copied(body, root, params[i]), params[i]
    aliased = re.findall(r"\{(\d+)\}: \((\d+), \{\}, may-alias\)", compiled.as_text())
    assert sorted(int(p) for _, p in aliased) == list(range(donated))  # all donated, in place
    ref_model = module()
    ff.freeze(ref_model, ff.PathRegex("body/.*"))
    ref_opt = ff.Optimizer(ref_model, optax.adam(1e-2))
    split, rest, fixed = hand_written_split(ref_model, ref_opt, xent)
    assert total_bytes(compiled) == total_bytes(split.lower(rest, fixed, x, y).compile())
    # The check is not vacuous: @nnx.jit donates nothing and hands every array back out,
    # the frozen ones included.
    graph_mode = nnx_jit_step().lower(ref_model, ref_opt, x, y).compile()
    body, params, root = hlo_parameters(graph_mode.as_text())
    assert any(copied(body, root, name) for name in params.values())
    frozen_bytes = sum(v.get_raw_value().nbytes for v in step._split.frozen)
    pointers = 8 * frozen  # XLA:CPU counts an 8-byte entry per array of the output tuple
    assert total_bytes(graph_mode)[1] - total_bytes(compiled)[1] == frozen_bytes + pointers
    assert total_bytes(graph_mode)[2] == 0


@pytest.mark.parametrize(
    "loss", [0.5, np.nan, np.inf, -np.inf], ids=["finite", "nan", "inf", "-inf"]
)
def test_step_count_counts_every_step_whatever_the_loss(loss):
    model = Plain()
    opt = ff.Optimizer(model, optax.sgd(0.0))
    step = TrainStep(model, opt, lambda m, x: (m.body(x) * 0.0).sum() + loss)  # no ReLU
    for i in range(1, 4):
        out = step(jnp.ones((2, 4)))
        assert int(opt.step[...]) == i
        np.testing.assert_equal(float(out), loss)
    hlo = step.lower(jnp.ones((2, 4))).compile().as_text()
    # Tied to the loss: the one comparison of the program is the loss's, in the count.
    assert len(re.findall(r"direction=GT", hlo)) == 1


# --- what steps meet in practice -----------------------------------------------------------------


def xent_with_metrics(model, x, y):
    logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, {"accuracy": (logits.argmax(-1) == y).mean(), "logits": logits}


def test_has_aux_returns_loss_and_metrics_as_nnx_jit_does():
    model, ref = Net(), Net()
    opt, ref_opt = ff.Optimizer(model, optax.adam(1e-2)), ff.Optimizer(ref, optax.adam(1e-2))
    step = TrainStep(model, opt, xent_with_metrics, has_aux=True)
    ref_step = nnx_jit_step(xent_with_metrics, has_aux=True)
    for i in range(2):
        (loss, aux), (ref_loss, ref_aux) = step(*batch(i)), ref_step(ref, ref_opt, *batch(i))
        np.testing.assert_allclose(loss, ref_loss, atol=ATOL)
        assert aux.keys() == {"accuracy", "logits"}
        np.testing.assert_allclose(aux["logits"], ref_aux["logits"], atol=ATOL)
        np.testing.assert_array_equal(aux["accuracy"], ref_aux["accuracy"])
    assert_same_state(model, ref)


def weighted(model, x, y, *, weight, train=True, reduction="mean"):
    if not train:  # a Python branch: `train` reaches the loss as a bool
        model = nnx.view(model, deterministic=True, use_running_average=True)
    losses = optax.softmax_cross_entropy_with_integer_labels(model(x), y) * weight
    return losses.mean() if reduction == "mean" else losses.sum()


def test_keyword_arguments_reach_the_loss_static_or_traced():
    model, ref = Net(), Net()
    opt, ref_opt = ff.Optimizer(model, optax.sgd(0.1)), ff.Optimizer(ref, optax.sgd(0.1))
    loss_fn, traces = counting(weighted)
    step = TrainStep(model, opt, loss_fn)
    ref_step = nnx_jit_step(weighted, static_argnames=("train", "reduction"))
    calls = [
        {"weight": jnp.float32(1.0), "train": True},
        {"weight": jnp.float32(0.5), "train": True},  # another traced value: no new trace
        {"weight": jnp.float32(2.0), "train": False},
        {"weight": jnp.float32(2.0), "train": False, "reduction": "sum"},
        {"weight": jnp.float32(3.0), "train": True},
    ]
    for i, kwargs in enumerate(calls):
        loss = step(*batch(i), **kwargs)
        np.testing.assert_allclose(loss, ref_step(ref, ref_opt, *batch(i), **kwargs), atol=1e-5)
    assert len(traces) == 3  # one per distinct (train, reduction)
    assert_same_state(model, ref, atol=1e-5)


def momentum():
    """SGD with momentum: per-parameter state, and no Adam normalisation to magnify the
    last-bit differences of sums taken over several devices."""
    return optax.sgd(0.1, momentum=0.9)


def replicate(node, mesh, spec_of=lambda path, value: P()):
    """Puts every variable of ``node`` on ``mesh``: ``spec_of(path, value)``, replicated."""
    for path, variable in nnx.to_flat_state(nnx.state(node)):
        value = variable.get_raw_value()
        variable.set_raw_value(jax.device_put(value, NamedSharding(mesh, spec_of(path, value))))


def shardings(node):
    return {
        "/".join(map(str, p)): v.get_raw_value().sharding
        for p, v in nnx.to_flat_state(nnx.state(node))
    }


def assert_same_layouts(node, before):
    """Every variable of ``node`` laid out as in ``before`` (``P()`` and ``P(None)`` alike)."""
    now = {"/".join(map(str, p)): v.get_raw_value() for p, v in nnx.to_flat_state(nnx.state(node))}
    assert now.keys() == before.keys()
    for path, value in now.items():
        assert value.sharding.is_equivalent_to(before[path], value.ndim), path


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_data_parallel_batch_keeps_replicated_state_and_matches_one_device(axis_type, compiles):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    model, ref = Net(), Net()
    for m in (model, ref):
        ff.freeze(m, ff.PathRegex("body/kernel"))
    opt, ref_opt = ff.Optimizer(model, momentum()), ff.Optimizer(ref, momentum())
    replicate((model, opt), mesh)
    before = shardings((model, opt))
    assert all(s.spec == P() for s in before.values())
    step, ref_step = TrainStep(model, opt, xent), nnx_jit_step()
    for i in range(2):
        x, y = batch(i)
        xs, ys = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y))
        loss = step(xs, ys)
        np.testing.assert_allclose(loss, ref_step(ref, ref_opt, x, y), atol=1e-5)
    assert_same_layouts((model, opt), before)
    assert compiles() == 1
    assert_same_state(model, ref, atol=1e-5)


def test_two_dimensional_mesh_keeps_sharded_parameters_and_optimizer_state(compiles):
    # Auto axes: XLA partitions the contractions over "model" (explicit axes would need
    # out_sharding in the model's dot products).
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)

    def spec_of(path, value):  # parameters and their Adam moments alike
        if path[-1] == "kernel":
            return P(None, "model") if path[-2] == "body" else P("model", None)
        return P("model") if path[-2:] == ("body", "bias") else P()

    model, ref = Plain(), Plain()
    for m in (model, ref):
        ff.freeze(m, ff.PathRegex("head/bias"))
    opt, ref_opt = ff.Optimizer(model, momentum()), ff.Optimizer(ref, momentum())
    replicate((model, opt), mesh, spec_of)
    before = shardings((model, opt))
    assert before["0/body/kernel"].spec == P(None, "model")
    assert before["1/opt_state/0/trace/head/kernel"].spec == P("model", None)
    step, ref_step = TrainStep(model, opt, xent), nnx_jit_step()
    for i in range(2):
        x, y = batch(i)
        xs, ys = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y))
        np.testing.assert_allclose(step(xs, ys), ref_step(ref, ref_opt, x, y), atol=1e-5)
    assert_same_layouts((model, opt), before)
    assert compiles() == 1
    assert_same_state(model, ref, atol=1e-5)


def test_shard_map_inside_the_loss():
    mesh = jax.make_mesh((8,), ("data",))

    def sharded_loss(model, x, y):
        graphdef, state = nnx.split(model)

        def local(state, x, y):  # JAX sums the cotangents of the replicated state
            return jax.lax.pmean(xent(nnx.merge(graphdef, state), x, y), "data")

        specs = (P(), P("data"), P("data"))
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(state, x, y)

    model, ref = Plain(), Plain()
    for m in (model, ref):
        ff.freeze(m, ff.PathRegex("body/.*"))
    opt, ref_opt = ff.Optimizer(model, momentum()), ff.Optimizer(ref, momentum())
    replicate((model, opt), mesh)
    step, ref_step = TrainStep(model, opt, sharded_loss), nnx_jit_step()
    body = np.array(model.body.kernel[...])
    for i in range(2):
        x, y = batch(i)
        xs, ys = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y))
        np.testing.assert_allclose(step(xs, ys), ref_step(ref, ref_opt, x, y), atol=1e-5)
    assert_same_state(model, ref, atol=1e-5)
    np.testing.assert_array_equal(model.body.kernel[...], body)


class WithBuffer(nnx.Module):
    """A module holding a plain array attribute that is no variable."""

    def __init__(self):
        self.net = Plain()
        self.scale = jnp.full((3,), 2.0)

    def __call__(self, x):
        return self.net(x) * self.scale


def test_array_attributes_that_are_no_variables_are_read_not_donated():
    model, ref = WithBuffer(), WithBuffer()
    opt, ref_opt = ff.Optimizer(model, momentum()), ff.Optimizer(ref, momentum())
    step, ref_step = TrainStep(model, opt, xent), nnx_jit_step()
    scale = model.scale
    for i in range(2):
        np.testing.assert_allclose(step(*batch(i)), ref_step(ref, ref_opt, *batch(i)), atol=ATOL)
    assert model.scale is scale
    assert not scale.is_deleted()
    model.scale = ref.scale = jnp.full((3,), 0.5)  # a new array: followed
    np.testing.assert_allclose(step(*batch(2)), ref_step(ref, ref_opt, *batch(2)), atol=ATOL)
    assert_same_state(model, ref)


# --- errors ---------------------------------------------------------------------------------------


class Dense(linen.Module):
    @linen.compact
    def __call__(self, x):
        return linen.Dense(3)(x)


@pytest.mark.parametrize(
    ("model", "match"),
    [
        pytest.param(
            None,
            r"`model` must be an NNX module \(nnx.Module\), got None\. Pass the model first",
            id="none",
        ),
        pytest.param(Plain, r"got <class .*Plain'>\. Pass an instance", id="class"),
        pytest.param(
            Dense(), r"got Dense\(.*A Linen module holds no state: TrainStep is for NNX", id="linen"
        ),
        pytest.param({"w": jnp.ones(2)}, r"got \{'w': Array\(.*Pass the model first", id="dict"),
    ],
)
def test_model_must_be_an_nnx_module(model, match):
    with pytest.raises(TypeError, match=match):
        TrainStep(model, ff.Optimizer(Plain(), optax.sgd(0.1)), xent)


def test_optimizer_passed_as_model_is_refused():
    model = Plain()
    opt = ff.Optimizer(model, optax.sgd(0.1))
    with pytest.raises(TypeError, match=r"`model` must be an NNX module .*got Optimizer"):
        TrainStep(opt, model, xent)


@pytest.mark.parametrize(
    ("optimizer", "match"),
    [
        pytest.param(
            lambda m: nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.Param),
            r"`optimizer` must be an ff.Optimizer of `model`, got Optimizer\(.*A plain "
            r"nnx.Optimizer cannot follow freeze changes: build ff.Optimizer\(model, tx\)",
            id="nnx-optimizer",
        ),
        pytest.param(
            lambda m: optax.sgd(0.1),
            r"`optimizer` must be an ff.Optimizer of `model`, got GradientTransformation.*"
            r"Build one with ff.Optimizer\(model, tx\)",
            id="optax",
        ),
    ],
)
def test_optimizer_must_be_an_ff_optimizer(optimizer, match):
    model = Plain()
    with pytest.raises(TypeError, match=match):
        TrainStep(model, optimizer(model), xent)


def test_optimizer_of_another_model_is_refused():
    other = Net()
    with pytest.raises(
        ValueError,
        match=r"`optimizer` was not built for `model`: it trains \[bn/bias, bn/scale\], which "
        r"`model` has no parameter at\. Build the optimizer for this model",
    ):
        TrainStep(Plain(), ff.Optimizer(other, optax.sgd(0.1)), xent)


def test_optimizer_of_the_model_before_a_freeze_change_is_accepted():
    model = Plain()
    opt = ff.Optimizer(model, optax.adam(0.1))
    ff.freeze(model, ff.PathRegex("body/.*"))
    TrainStep(model, opt, xent)
    assert sorted(opt.opt_state[0].mu.keys()) == ["head"]  # migrated at once


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param(
            {"loss_fn": "xent"},
            TypeError,
            r"`loss_fn` must be a function loss_fn\(model, \*batch\) returning the loss, got "
            r"'xent'\. Pass model, optimizer and loss function in this order",
            id="loss-not-callable",
        ),
        pytest.param(
            {"has_aux": "yes"},
            TypeError,
            r"`has_aux` must be True or False, got 'yes'\.",
            id="has-aux-not-bool",
        ),
    ],
)
def test_bad_arguments(kwargs, error, match):
    model = Plain()
    arguments = {"loss_fn": xent, **kwargs}
    with pytest.raises(error, match=match):
        TrainStep(model, ff.Optimizer(model, optax.sgd(0.1)), **arguments)


@pytest.mark.parametrize(
    ("loss_fn", "has_aux", "match"),
    [
        pytest.param(
            xent,
            True,
            r"`loss_fn` returned an array of shape \(\), but `has_aux=True` needs a pair "
            r"\(loss, aux\)\. Return \(loss, aux\), or build the TrainStep with has_aux=False",
            id="aux-expected",
        ),
        pytest.param(
            xent_with_metrics,
            False,
            r"`loss_fn` returned a tuple of length 2, not a scalar loss\. If it returns "
            r"\(loss, aux\), build the TrainStep with has_aux=True",
            id="aux-unexpected",
        ),
        pytest.param(
            lambda m, x, y: m(x).mean(-1),
            False,
            r"`loss_fn` must return a scalar loss, but its loss is an array of shape \(16,\)\. "
            r"Reduce it to one number",
            id="not-scalar",
        ),
    ],
)
def test_what_loss_fn_returns_is_checked(loss_fn, has_aux, match):
    model = Plain()
    opt = ff.Optimizer(model, optax.sgd(0.1))
    step = TrainStep(model, opt, loss_fn, has_aux=has_aux)
    kernel = model.head.kernel[...]  # held here: the step copies it before donating
    with pytest.raises(TypeError, match=match):
        step(*batch())
    assert not kernel.is_deleted()
    np.testing.assert_array_equal(model.head.kernel[...], kernel)  # nothing ran


def test_frozen_parameter_written_inside_the_step_raises():
    def writes(model, x, y):
        model.body.kernel[...] = model.body.kernel[...] * 0.5
        return xent(model, x, y)

    model = ff.freeze(Plain(), ff.PathRegex("body/kernel"))
    step = TrainStep(model, ff.Optimizer(model, optax.sgd(0.1)), writes)
    with pytest.raises(
        ValueError,
        match=r"`loss_fn` wrote to frozen parameters \(or array attributes that are no "
        r"variables\) inside the step: \[0/body/kernel\]\. A TrainStep passes these in unchanged",
    ):
        step(*batch())


@pytest.mark.parametrize(
    ("variable", "error", "match"),
    [
        pytest.param(
            lambda: nnx.Variable(jnp.zeros(3), ref=True),
            ValueError,
            r"The variable at 'extra' of `model` is a Variable with ref=True: TrainStep passes "
            r"arrays in and out of one jax.jit",
            id="ref",
        ),
        pytest.param(
            lambda: nnx.Variable(jnp.zeros(3), hijax=True),
            ValueError,
            r"The variable at 'extra' of `model` is a HijaxVariable with hijax=True: TrainStep "
            r"passes arrays in and out of one jax.jit and needs variables that hold plain arrays",
            id="hijax",
        ),
        pytest.param(
            lambda: nnx.Variable("notes"),
            TypeError,
            r"The variable at 'extra' of `model` holds 'notes', which is no array: TrainStep "
            r"passes every variable's value through jax.jit",
            id="string",
        ),
    ],
)
def test_variables_a_jitted_step_cannot_pass_are_refused(variable, error, match):
    model = Plain()
    model.extra = variable()
    with pytest.raises(error, match=match):
        TrainStep(model, ff.Optimizer(model, optax.sgd(0.1)), xent)


def test_model_passed_to_the_call_is_refused():
    model = Plain()
    step = TrainStep(model, ff.Optimizer(model, optax.sgd(0.1)), xent)
    with pytest.raises(
        TypeError,
        match=r"The step holds the model and optimizer itself: call step\(\*batch\), e\.g\. "
        r"step\(x, y\), not step\(model, \.\.\.\)",
    ):
        step(model, *batch())


@pytest.mark.parametrize("when", ["steady", "held-array", "after-a-change"])
def test_call_inside_a_transformation_raises_and_changes_nothing(when):
    model = Plain()
    opt = ff.Optimizer(model, optax.adam(0.1))
    step = TrainStep(model, opt, xent)
    held = model.head.kernel[...] if when == "held-array" else None  # the step would copy it
    if when == "after-a-change":
        ff.freeze(model, ff.PathRegex("body/.*"))
    before = flat((model, opt))
    with pytest.raises(
        RuntimeError,
        match=r"A TrainStep was called inside a JAX transformation \(jax.jit, nnx.jit, "
        r"jax.vmap, jax.grad\.\.\.\), where it cannot put new arrays into the model\. Call it "
        r"eagerly",
    ):
        jax.jit(step)(*batch())
    after = flat((model, opt))
    assert after.keys() == before.keys()
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    del held
