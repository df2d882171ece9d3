"""Optimizer-state migration never hands one parameter's state to another; clear errors.

Property: over a catalogue of optax transforms and random freeze/unfreeze
sequences, every state leaf of a parameter that stayed trainable is
bit-identical to before the change, every leaf of a newly trainable parameter
is its fresh ``tx.init`` value, shared counters run on, and state that cannot
be attributed to one parameter (``optax.flatten``'s flat vector) is fresh.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import flax_freeze as ff
from flax_freeze._optimizer import migrate_opt_state
from helpers import loss_fn, param_values

X = jax.random.normal(jax.random.key(0), (6, 3))
Y = jax.random.normal(jax.random.key(1), (6, 2))

# Parameter paths of Zoo as '/'-joined strings and as the key strings optax state shows.
PARAMS = ["a", "b", "k", "lin/bias", "lin/kernel", "s"]


def keystr(path: str) -> str:
    return "".join(f"[{p!r}]" for p in path.split("/"))


class Zoo(nnx.Module):
    """`a` and `b` have the same size, so a mix-up between them would go unnoticed by shape."""

    def __init__(self, seed=0):
        keys = jax.random.split(jax.random.key(seed), 4)
        self.a = nnx.Param(jax.random.normal(keys[0], (3,)))
        self.b = nnx.Param(jax.random.normal(keys[1], (3,)))
        self.s = nnx.Param(jnp.asarray(0.5))
        self.k = nnx.Param(jax.random.normal(keys[2], (3, 3)) * 0.3)
        self.lin = nnx.Linear(3, 2, rngs=nnx.Rngs(seed + 1))

    def __call__(self, x):
        h = jnp.tanh((x * self.a + self.b) @ self.k) * self.s
        return self.lin(h)


def step(model, opt):
    opt.update(model, ff.grad(loss_fn)(model, X, Y))


# MultiSteps' lax.cond compiles at every eager call; jitted, once per transform and trained set.
jit_step = nnx.jit(step)


def trainable(model):
    return {
        "/".join(map(str, p))
        for p, v in nnx.iter_graph(model)
        if isinstance(v, nnx.Param) and not isinstance(v, ff.FrozenParam)
    }


def state_leaves(state):
    """keystr -> numpy copy of every array in an optimizer state."""
    flat = jax.tree_util.tree_flatten_with_path(nnx.as_pure(state))[0]
    return {jax.tree_util.keystr(k): np.array(v) for k, v in flat}


def owner(key: str) -> str | None:
    """The parameter a state leaf belongs to, by its key string (test's own attribution)."""
    named = [p for p in PARAMS if keystr(p) in key]
    assert len(named) <= 1, (key, named)
    return named[0] if named else None


def set_frozen(model, frozen):
    ff.unfreeze(model, missing_ok=True)
    if frozen:
        ff.freeze(model, ff.PathRegex("|".join(sorted(frozen))))


# Built once: the same transform objects let jit_step's cache serve every example.
CATALOGUE = {
    "adam": optax.adam(0.05),
    "flatten-adam": optax.flatten(optax.adam(0.05)),
    "masked-callable": optax.chain(
        optax.masked(
            optax.add_decayed_weights(0.1), lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
        ),
        optax.adam(0.05),
    ),
    "multi-transform-callable": optax.multi_transform(
        {"matrix": optax.adamw(0.05, weight_decay=0.1), "vector": optax.sgd(0.05, momentum=0.9)},
        lambda p: jax.tree.map(lambda x: "matrix" if x.ndim > 1 else "vector", p),
    ),
    "multisteps-adam": optax.MultiSteps(optax.adam(0.05), every_k_schedule=2),
    "inject-hyperparams-adamw": optax.inject_hyperparams(optax.adamw)(
        learning_rate=0.05, weight_decay=0.1
    ),
    "chain-clip-adamw": optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(0.05, weight_decay=0.1)
    ),
    "adafactor-factored": optax.adafactor(0.05, min_dim_size_to_factor=2),
    "lion": optax.lion(0.01, weight_decay=0.1),
    "schedule-free-adamw": optax.contrib.schedule_free_adamw(0.05, warmup_steps=2),
    "multisteps-flatten-sgd": optax.MultiSteps(
        optax.flatten(optax.sgd(0.05, momentum=0.9)), every_k_schedule=2
    ),
}


def check_migration(old, new, fresh, stayed, newly):
    """Every leaf of ``new``: kept from ``old``, or fresh, by whom it belongs to."""
    assert set(new) == set(fresh)
    for key, leaf in new.items():
        p = owner(key)
        if p is not None:
            assert p in stayed | newly, key
            want = old[key] if p in stayed else fresh[key]
        elif leaf.shape == ():  # shared counters and hyperparameters run on
            want = old[key]
        else:  # cannot be attributed to one parameter (a flat vector): fresh
            want = fresh[key]
        np.testing.assert_array_equal(leaf, want, err_msg=key)
        assert leaf.dtype == want.dtype, key


def run_sequence(name, frozen_sets, steps):
    tx = CATALOGUE[name]
    model = Zoo()
    set_frozen(model, frozen_sets[0])
    opt = ff.Optimizer(model, tx)
    run = jit_step if isinstance(tx, optax.MultiSteps) else step
    for _ in range(steps):
        run(model, opt)
    changes = 0
    for frozen in frozen_sets[1:]:
        before = trainable(model)
        old = state_leaves(opt.opt_state)
        set_frozen(model, frozen)
        after = trainable(model)
        fresh = state_leaves(tx.init(nnx.state(model, ff.Trainable)))
        assert opt.migrate(model) is (before != after)
        if before == after:
            continue
        changes += 1
        check_migration(old, state_leaves(opt.opt_state), fresh, before & after, after - before)
        for _ in range(steps):
            frozen_values = {k: v for k, v in param_values(model).items() if k not in after}
            run(model, opt)
            for k, v in frozen_values.items():
                np.testing.assert_array_equal(param_values(model)[k], v, err_msg=k)
    return changes


# Not everything frozen at once: optax.flatten cannot init on no parameters at all.
frozen_set = st.sets(st.sampled_from(PARAMS), max_size=len(PARAMS) - 1)


@pytest.mark.parametrize("name", sorted(CATALOGUE))
@settings(max_examples=6, deadline=None)
@given(frozen_sets=st.lists(frozen_set, min_size=2, max_size=4), steps=st.integers(1, 3))
def test_property_migration_keeps_own_state_and_gives_fresh_state_to_the_rest(
    name, frozen_sets, steps
):
    run_sequence(name, frozen_sets, steps)


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_swap_of_same_size_parameters_in_every_catalogue_transform(name):
    """The case a path-blind migration gets wrong: freeze `a`, unfreeze `b` (same size)."""
    assert run_sequence(name, [{"b"}, {"a"}, {"a", "k"}, set()], 2) == 3


# ----------------------------------------------------------------------------- optax.flatten


def test_flatten_swap_gives_b_fresh_moments_not_those_of_a():
    model = Zoo()
    ff.freeze(model, ff.PathRegex("b"))
    tx = optax.flatten(optax.adam(0.05))
    opt = ff.Optimizer(model, tx)
    for _ in range(3):
        step(model, opt)
    mu_before = np.array(opt.opt_state[0].mu[...])
    assert np.all(mu_before[:3] != 0)  # `a` comes first in the flat vector and has moments
    ff.unfreeze(model, ff.PathRegex("b"))
    ff.freeze(model, ff.PathRegex("a"))
    assert opt.migrate(model)
    s = opt.opt_state[0]
    assert int(s.count[...]) == 3  # the shared count runs on
    # The flat vectors cannot be attributed to parameters: all fresh, b's slot included.
    np.testing.assert_array_equal(s.mu[...], np.zeros_like(mu_before))
    np.testing.assert_array_equal(s.nu[...], np.zeros_like(mu_before))
    a = np.array(model.a[...])
    step(model, opt)
    np.testing.assert_array_equal(model.a[...], a)
    assert int(opt.opt_state[0].count[...]) == 4


def test_flatten_on_plain_pytrees_with_and_without_old_params():
    tx = optax.flatten(optax.adam(0.1))
    with_a = {"a": jnp.ones(2), "b": None}
    with_b = {"a": None, "b": jnp.ones(2)}
    state = tx.init(with_a)
    _, state = tx.update({"a": jnp.ones(2), "b": None}, state, with_a)
    assert np.all(np.asarray(state[0].mu) != 0)

    swapped = migrate_opt_state(tx, state, with_b)
    np.testing.assert_array_equal(swapped[0].mu, np.zeros(2))
    assert int(swapped[0].count) == 1
    told = migrate_opt_state(tx, state, with_b, old_params=with_a)
    np.testing.assert_array_equal(told[0].mu, np.zeros(2))
    # Without knowing the old set, an unchanged set still restarts the flat state ...
    np.testing.assert_array_equal(migrate_opt_state(tx, state, with_a)[0].mu, np.zeros(2))
    # ... told that it is the same set, all of it is kept.
    same = migrate_opt_state(tx, state, with_a, old_params=with_a)
    np.testing.assert_array_equal(same[0].mu, state[0].mu)
    np.testing.assert_array_equal(same[0].nu, state[0].nu)


def test_old_params_restricts_named_state_to_parameters_trained_before():
    tx = optax.adam(0.1)
    both = {"a": jnp.ones(2), "b": jnp.ones(3)}
    state = tx.init(both)
    _, state = tx.update({"a": jnp.ones(2), "b": jnp.ones(3)}, state, both)
    kept = migrate_opt_state(tx, state, both, old_params=both)
    for k in both:
        np.testing.assert_array_equal(kept[0].mu[k], state[0].mu[k])
    # `old_params` says `b` was frozen: its (stale) state is not taken, whatever `old_state` holds.
    told = migrate_opt_state(tx, state, both, old_params={"a": jnp.ones(2), "b": None})
    np.testing.assert_array_equal(told[0].mu["a"], state[0].mu["a"])
    np.testing.assert_array_equal(told[0].mu["b"], np.zeros(3))
    assert int(told[0].count) == 1


def test_linen_style_none_leaves_keep_own_moments_and_count():
    tx = optax.adam(0.1)
    p1 = {"enc": {"w": jnp.ones((2, 2))}, "w": jnp.ones(2), "head": None}
    state = tx.init(p1)
    _, state = tx.update(jax.tree.map(jnp.ones_like, p1), state, p1)
    p2 = {"enc": {"w": jnp.ones((2, 2))}, "w": None, "head": jnp.ones(2)}
    new = migrate_opt_state(tx, state, p2)
    np.testing.assert_array_equal(new[0].mu["enc"]["w"], state[0].mu["enc"]["w"])
    np.testing.assert_array_equal(new[0].mu["head"], np.zeros(2))  # not `w`'s, same size
    assert new[0].mu["w"] is None
    assert int(new[0].count) == 1


def test_probe_tells_shared_vectors_from_parameter_sized_ones():
    """Unattributed state: kept where its shape does not follow the parameters' shapes."""

    def init(params):
        size = sum(np.size(x) for x in jax.tree.leaves(params))
        return {"table": jnp.zeros(4), "flat": jnp.zeros(size), "count": jnp.zeros([], jnp.int32)}

    def update(updates, state, params=None):
        del params
        return updates, jax.tree.map(lambda x: x + 1, state)

    tx = optax.GradientTransformation(init, update)
    p1 = {"a": jnp.ones(2), "b": None}
    _, state = tx.update(p1, tx.init(p1))
    new = migrate_opt_state(tx, state, {"a": None, "b": jnp.ones(2)})
    np.testing.assert_array_equal(new["table"], np.ones(4))  # shared: kept
    assert int(new["count"]) == 1
    np.testing.assert_array_equal(new["flat"], np.zeros(2))  # follows the parameters: fresh


def test_flatten_of_scalar_parameters_is_not_mistaken_for_shared_state():
    tx = optax.flatten(optax.adam(0.1))
    p1 = {"a": jnp.asarray(1.0), "b": None}
    _, state = tx.update({"a": jnp.asarray(1.0), "b": None}, tx.init(p1), p1)
    new = migrate_opt_state(tx, state, {"a": None, "b": jnp.asarray(1.0)})
    assert new[0].mu.shape == (1,)
    np.testing.assert_array_equal(new[0].mu, np.zeros(1))
    assert int(new[0].count) == 1


def test_state_a_probe_cannot_init_keeps_scalars_only():
    """A transform whose init rejects other shapes: scalar state kept, vectors fresh."""

    def init(params):
        assert all(np.shape(x) == (2,) for x in jax.tree.leaves(params))
        return {"count": jnp.zeros([], jnp.int32), "buffer": jnp.zeros(2)}

    def update(updates, state, params=None):
        del params
        return updates, {"count": state["count"] + 1, "buffer": state["buffer"] + 1.0}

    tx = optax.GradientTransformation(init, update)
    p1 = {"a": jnp.ones(2), "b": None}
    state = tx.init(p1)
    _, state = tx.update(p1, state)
    new = migrate_opt_state(tx, state, {"a": None, "b": jnp.ones(2)})
    assert int(new["count"]) == 1
    np.testing.assert_array_equal(new["buffer"], np.zeros(2))


def copy_values(source, target):
    variables = {p: v for p, v in nnx.iter_graph(target) if isinstance(v, nnx.Variable)}
    for p, v in nnx.iter_graph(source):
        if isinstance(v, nnx.Param | ff.FrozenParam):
            variables[p].set_raw_value(jnp.array(v.get_raw_value()))


def test_migration_inside_nnx_jit_gives_flatten_fresh_state():
    model = ff.freeze(Zoo(), ff.PathRegex("b"))
    opt = ff.Optimizer(model, optax.flatten(optax.adam(0.05)))

    @nnx.jit
    def swap_and_step(model, opt):
        ff.unfreeze(model, ff.PathRegex("b"))
        ff.freeze(model, ff.PathRegex("a"))
        grads = ff.grad(loss_fn)(model, X, Y)
        opt.update(model, grads)

    for _ in range(2):
        step(model, opt)
    # Twins with the same values and fresh flat state: the parameters that stayed trainable
    # at count 2, the newly trainable `b` in a group of its own, from count 0.
    twins = {}
    for count in (2, 0):
        twin = ff.freeze(Zoo(), ff.PathRegex("a"))
        twin_opt = ff.Optimizer(twin, optax.flatten(optax.adam(0.05)))
        copy_values(model, twin)
        twin_opt.opt_state[0].count[...] = jnp.asarray(count, jnp.int32)
        step(twin, twin_opt)
        twins[count] = param_values(twin)
    swap_and_step(model, opt)
    got = param_values(model)
    for k in got:
        want = twins[0 if k == "b" else 2][k]
        np.testing.assert_allclose(got[k], want, rtol=1e-6, atol=1e-7, err_msg=k)
    assert int(opt.opt_state[0].count[...]) == 3
    assert [c[...].tolist() for c in opt.own_counts] == [[1, 1]]  # b's own


# ----------------------------------------------------------------------------- MultiSteps


def test_optimizer_accepts_multisteps_and_extra_args_transforms():
    model = Zoo()
    opt = ff.Optimizer(model, optax.MultiSteps(optax.adam(0.05), every_k_schedule=2))
    assert isinstance(opt.tx, optax.MultiSteps)
    step(model, opt)
    assert int(opt.opt_state.mini_step[...]) == 1
    extra = ff.Optimizer(Zoo(), optax.contrib.schedule_free_adamw(0.05))
    assert isinstance(extra.tx, optax.GradientTransformationExtraArgs)


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_multisteps_freeze_change_mid_window_loses_and_repeats_nothing(mode):
    """k=3 mini-steps; after the first, `a` is unfrozen and `b` frozen.

    Stayed trainable: their 3 gradients average into one update, each once.
    `a`: its 2 gradients since the change, over 3. `b`: what it had is dropped.
    """
    lr = 0.1
    model = ff.freeze(Zoo(), ff.PathRegex("a"))
    opt = ff.Optimizer(model, optax.MultiSteps(optax.sgd(lr), every_k_schedule=3))
    run = nnx.jit(step) if mode == "jit" else step
    start = param_values(model)

    grads = [{k: np.asarray(v) for k, v in _flat_grads(model).items()}]
    run(model, opt)
    assert param_values(model).keys() == start.keys()
    for k, v in param_values(model).items():  # nothing applied within a window
        np.testing.assert_array_equal(v, start[k], err_msg=k)
    ff.unfreeze(model, ff.PathRegex("a"))
    ff.freeze(model, ff.PathRegex("b"))
    for _ in range(2):
        grads.append({k: np.asarray(v) for k, v in _flat_grads(model).items()})
        run(model, opt)
        if len(grads) < 3:
            for k, v in param_values(model).items():
                np.testing.assert_array_equal(v, start[k], err_msg=k)
    end = param_values(model)
    for k in ["k", "s", "lin/bias", "lin/kernel"]:  # stayed trainable through the window
        want = start[k] - lr * (grads[0][k] + grads[1][k] + grads[2][k]) / 3
        np.testing.assert_allclose(end[k], want, rtol=1e-5, atol=1e-7, err_msg=k)
    want_a = start["a"] - lr * (grads[1]["a"] + grads[2]["a"]) / 3
    np.testing.assert_allclose(end["a"], want_a, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(end["b"], start["b"])  # frozen mid-window: not moved
    assert int(opt.opt_state.gradient_step[...]) == 1
    assert int(opt.opt_state.mini_step[...]) == 0
    for v in jax.tree.leaves(nnx.as_pure(opt.opt_state.acc_grads)):
        np.testing.assert_array_equal(v, np.zeros_like(v))  # the window closed: reset


def _flat_grads(model):
    return {
        "/".join(map(str, p)): np.asarray(v.get_raw_value())
        for p, v in nnx.to_flat_state(ff.grad(loss_fn)(model, X, Y))
    }


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(3, id="int"),
        pytest.param(None, id="none"),
        pytest.param(jnp.ones(3), id="array"),
        pytest.param(nnx.Param(jnp.ones(3)), id="bare-variable"),
        pytest.param(optax.adam(0.1), id="tx-first"),
    ],
)
def test_model_must_be_a_graph_node(model):
    with pytest.raises(
        TypeError, match=r"(?s)`model` must be an NNX module.*got .*ff\.Optimizer\(model"
    ):
        ff.Optimizer(model, optax.adam(0.1))


def test_model_error_shows_the_value():
    with pytest.raises(TypeError, match=r"got 3\. "):
        ff.Optimizer(3, optax.adam(0.1))
    with pytest.raises(TypeError, match=r"got 'x{196}\.\.\.\. Pass"):
        ff.Optimizer("x" * 1000, optax.adam(0.1))


def test_tx_error_names_multisteps():
    with pytest.raises(TypeError, match=r"`tx` must be .*\(or optax\.MultiSteps\), got 'adam'"):
        ff.Optimizer(Zoo(), "adam")


def pure_labels(model, fn):
    """A pytree of labels built for the model's whole parameter tree (the fragile form)."""
    return jax.tree.map(fn, nnx.as_pure(nnx.state(model, nnx.Param)))


PYTREE_LABELLED = {
    "multi-transform": lambda labels: optax.multi_transform(
        {"matrix": optax.adam(0.1), "vector": optax.sgd(0.1)}, labels
    ),
    "masked": lambda labels: optax.masked(
        optax.adam(0.1), jax.tree.map(lambda label: label == "matrix", labels)
    ),
}


def _label(x):
    return "matrix" if x.ndim > 1 else "vector"


@pytest.mark.parametrize("name", sorted(PYTREE_LABELLED))
def test_pytree_labels_after_a_freeze_raise_a_clear_error(name):
    model = Zoo()
    tx = PYTREE_LABELLED[name](pure_labels(model, _label))
    opt = ff.Optimizer(model, tx)
    step(model, opt)  # fine while the trainable tree is the one the labels were built for
    ff.freeze(model, ff.PathRegex("lin/.*"))
    grads = ff.grad(loss_fn)(model, X, Y)
    with pytest.raises(ValueError, match=r"`tx` cannot build optimizer state for the") as info:
        opt.update(model, grads)
    assert "Pass a callable label/mask function" in str(info.value)
    assert "which follows freeze changes" in str(info.value)
    assert "pytree structure error" in str(info.value.__cause__)
    with pytest.raises(ValueError, match=r"optax\.multi_transform and optax\.masked given"):
        opt.migrate(model)


@pytest.mark.parametrize("name", sorted(PYTREE_LABELLED))
def test_pytree_labels_with_a_frozen_model_raise_at_construction(name):
    model = Zoo()
    tx = PYTREE_LABELLED[name](pure_labels(model, _label))
    ff.freeze(model, ff.PathRegex("a"))
    with pytest.raises(ValueError, match=r"`tx` cannot build optimizer state") as info:
        ff.Optimizer(model, tx)
    assert "['b']" in str(info.value)
    assert "['a']" not in str(info.value).split("Got tx=")[0]


def test_pytree_labels_keep_working_with_none_at_frozen_leaves():
    """Linen-style trees keep their structure (None where frozen): pytree labels still fit."""
    params = {"w": jnp.ones((2, 2)), "v": jnp.ones(2), "u": jnp.ones(2)}
    tx = optax.multi_transform(
        {"matrix": optax.adam(0.1), "vector": optax.sgd(0.1, momentum=0.9)},
        jax.tree.map(_label, params),
    )
    state = tx.init(params)
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    new = migrate_opt_state(tx, state, {"w": jnp.ones((2, 2)), "v": None, "u": jnp.ones(2)})
    old, got = state_leaves(state), state_leaves(new)
    assert not any("['v']" in k for k in got)
    for k in got:
        np.testing.assert_array_equal(got[k], old[k], err_msg=k)


def test_callable_labels_follow_the_same_freeze_change():
    model = Zoo()
    tx = PYTREE_LABELLED["multi-transform"](lambda p: jax.tree.map(_label, p))
    opt = ff.Optimizer(model, tx)
    step(model, opt)
    ff.freeze(model, ff.PathRegex("lin/.*"))
    step(model, opt)
    assert int(opt.step[...]) == 2


def test_other_init_errors_pass_through_unchanged():
    model = ff.freeze(Zoo(), ff.PathRegex("a|b|k|s|lin/bias"))
    opt = ff.Optimizer(model, optax.flatten(optax.adam(0.1)))
    ff.freeze(model)
    with pytest.raises(ValueError, match=r"^Need at least one array to concatenate"):
        opt.migrate(model)
