"""UnfreezeSchedule, own step counts and warm-up of parameters unfrozen during training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flax_freeze as ff

X = jnp.linspace(-1.0, 1.0, 8).reshape(4, 2)


def make():
    model = nnx.Sequential(
        nnx.Linear(2, 4, rngs=nnx.Rngs(0)),
        nnx.Linear(4, 4, rngs=nnx.Rngs(1)),
        nnx.Linear(4, 1, rngs=nnx.Rngs(2)),
    )
    ff.freeze(model, "layers/(0|1)/.*")
    return model, ff.Optimizer(model, optax.adam(1e-2))


def loss(model, x):
    return ((model(x) - 1.0) ** 2).mean()


def schedule():
    return ff.UnfreezeSchedule({3: "layers/1/.*", 6: "layers/0/.*"}, freeze={8: "layers/1/.*"})


def frozen(model):
    return sorted(r.path for r in ff.summary(model).rows if r.status == "frozen")


def test_changes_apply_at_their_steps_freezing_first():
    model, _ = make()
    plan = ff.UnfreezeSchedule({2: "layers/.*"}, freeze={2: "layers/2/.*"})
    assert [plan(model, step) for step in range(4)] == [False, False, True, False]
    assert frozen(model) == []  # at one step, freezing comes first, then unfreezing
    model, _ = make()
    plan = schedule()
    seen = []
    for step in range(10):
        plan(model, step)
        seen.append(frozen(model))
    assert seen[2] == ["layers/0/bias", "layers/0/kernel", "layers/1/bias", "layers/1/kernel"]
    assert seen[3] == seen[5] == ["layers/0/bias", "layers/0/kernel"]
    assert seen[6] == seen[7] == []
    assert seen[8] == seen[9] == ["layers/1/bias", "layers/1/kernel"]
    assert int(plan.done[...]) == 9


def test_a_late_call_applies_everything_due_once():
    model, _ = make()
    plan = schedule()
    assert plan(model, 7)
    assert frozen(model) == []
    assert not plan(model, 7)  # nothing more is due
    assert not plan(model, 3)  # an earlier step changes nothing


def test_resumed_run_unfreezes_at_the_same_steps_bit_identically(tmp_path):
    model, opt = make()
    plan = schedule()
    step = ff.TrainStep(model, opt, loss)
    for i in range(12):
        plan(model, i)
        step(X + i)
        if i == 4:
            ff.checkpoint.save(tmp_path / "ckpt", (model, opt, plan))
    again, again_opt, again_plan = ff.checkpoint.restore(tmp_path / "ckpt", (*make(), schedule()))
    assert int(again_plan.done[...]) == 4
    assert again_opt.own_paths == ((("layers", 1, "bias")), ("layers", 1, "kernel"))
    resumed = ff.TrainStep(again, again_opt, loss)
    for i in range(5, 12):
        again_plan(again, i)
        resumed(X + i)
    for a, b in zip(
        jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert frozen(again) == ["layers/1/bias", "layers/1/kernel"]


def test_warmup_scales_the_first_updates_of_unfrozen_parameters_only():
    lr, warmup = 1e-2, 4
    model, _ = make()
    opt = ff.Optimizer(model, optax.sgd(lr), warmup_steps=warmup)
    twin, _ = make()
    twin_opt = ff.Optimizer(twin, optax.sgd(lr))
    ff.unfreeze(model, "layers/1/.*")
    ff.unfreeze(twin, "layers/1/.*")
    for i in range(6):
        g = ff.grad(loss)(model, X)
        before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        opt.update(model, g)
        twin_opt.update(twin, ff.grad(loss)(twin, X))
        flat_g = dict(nnx.to_flat_state(g))
        for key, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            delta = np.asarray(value) - before[key]
            factor = min(1.0, (i + 1) / warmup) if key[1] == 1 else 1.0
            np.testing.assert_allclose(
                delta, -lr * factor * np.asarray(flat_g[key]), rtol=1e-4, atol=1e-7
            )
    assert [c[...].tolist()[0] for c in opt.own_counts] == [6, 6]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"unfreeze": [3]}, TypeError, r"`unfreeze` must map steps to filters"),
        ({"unfreeze": {-1: "a"}}, ValueError, r"`unfreeze` has the step -1"),
        ({"unfreeze": {2: 3.5}}, TypeError, r"`unfreeze` must be an NNX filter"),
        ({"unfreeze": {}}, ValueError, r"`unfreeze` and `freeze` are both empty"),
        ({"unfreeze": {1: "a"}, "freeze": {True: "a"}}, ValueError, r"`freeze` has the step True"),
    ],
    ids=["not-a-mapping", "negative", "not-a-filter", "empty", "bool-step"],
)
def test_bad_plans(kwargs, error, match):
    with pytest.raises(error, match=match):
        ff.UnfreezeSchedule(**kwargs)


def test_bad_step():
    with pytest.raises(ValueError, match=r"`step` must be the number of the step"):
        schedule()(make()[0], -2)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"warmup_steps": -1}, ValueError, r"`warmup_steps` must be a whole number"),
        ({"warmup_steps": 2.5}, ValueError, r"`warmup_steps` must be a whole number"),
        ({"group_schedules": "yes"}, TypeError, r"`group_schedules` must be True or False"),
    ],
)
def test_bad_optimizer_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        ff.Optimizer(make()[0], optax.adam(1e-3), **kwargs)


def test_own_counts_of_parameters_unfrozen_together_are_separate_buffers():
    model, opt = make()
    ff.unfreeze(model)
    assert opt.migrate(model)
    pointers = {c.get_raw_value().unsafe_buffer_pointer() for c in opt.own_counts}
    assert len(opt.own_counts) == 4
    assert len(pointers) == 4  # a step that donates each of them cannot donate one twice
    graphdef, state = nnx.split((model, opt))
    donate = jax.jit(lambda s: jax.tree.map(lambda x: x + 0, s), donate_argnums=0)
    donate(state)


def _flat(state):
    return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(state)}


def test_clip_by_global_norm_clips_by_one_norm_over_old_and_newly_trainable_gradients():
    """With own counts in play, the clip still sees every trainable gradient at once."""
    lr, max_norm = 0.1, 0.01
    ramp = optax.linear_schedule(init_value=1.0, end_value=0.0, transition_steps=10)
    tx = optax.chain(
        optax.clip_by_global_norm(max_norm), optax.scale_by_schedule(ramp), optax.scale(-lr)
    )
    model, _ = make()
    opt = ff.Optimizer(model, tx, group_schedules=True)
    for _ in range(4):
        opt.update(model, ff.grad(loss)(model, X))
    ff.unfreeze(model, "layers/1/.*")
    grads = _flat(ff.grad(loss)(model, X))
    assert sorted(grads) == ["layers/1/bias", "layers/1/kernel", "layers/2/bias", "layers/2/kernel"]
    norm = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads.values()))
    assert norm > 10 * max_norm  # the clip acts
    older = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for k, g in grads.items() if "/2/" in k))
    assert norm > 1.05 * older  # a norm over the older parameters alone would not pass
    before = _flat(nnx.state(model, nnx.Param))
    opt.update(model, ff.grad(loss)(model, X))
    after = _flat(nnx.state(model, nnx.Param))
    for path, g in grads.items():
        position = 1.0 if path.startswith("layers/1") else 0.6  # own schedule from 0; shared at 4
        np.testing.assert_allclose(
            after[path] - before[path], -lr * position * g * max_norm / norm, rtol=1e-3, atol=1e-7
        )  # float32 parameters near 0.5: the difference of two is exact to about 6e-8
    assert [c[...].tolist() for c in opt.own_counts] == [[1, 1], [1, 1]]


def test_multisteps_accumulates_one_window_and_an_unfrozen_layer_starts_adam_afresh():
    lr = 1e-2

    def build():
        model, _ = make()
        return model, ff.Optimizer(model, optax.MultiSteps(optax.adam(lr), every_k_schedule=2))

    model, opt = build()
    twin, twin_opt = build()  # the same run without the change
    for i in range(6):  # three windows: Adam's count is 3
        opt.update(model, ff.grad(loss)(model, X + i))
        twin_opt.update(twin, ff.grad(loss)(twin, X + i))
    ff.unfreeze(model, "layers/1/.*")
    start, twin_start = _flat(nnx.state(model, nnx.Param)), _flat(nnx.state(twin, nnx.Param))
    layer1 = []
    for i in range(6, 8):  # one window of two mini-steps
        grads = ff.grad(loss)(model, X + i)
        layer1.append(_flat(grads))
        opt.update(model, grads)
        twin_opt.update(twin, ff.grad(loss)(twin, X + i))
        if i == 6:  # nothing is applied within a window
            for path, value in _flat(nnx.state(model, nnx.Param)).items():
                np.testing.assert_array_equal(value, start[path])
    end, twin_end = _flat(nnx.state(model, nnx.Param)), _flat(nnx.state(twin, nnx.Param))
    fresh = optax.adam(lr)
    for path in ["layers/1/bias", "layers/1/kernel"]:  # Adam's first step on the window's mean
        mean = (layer1[0][path] + layer1[1][path]) / 2
        expected, _ = fresh.update(mean, fresh.init(mean))
        np.testing.assert_allclose(end[path] - start[path], expected, rtol=1e-4, atol=1e-9)
        assert np.abs(end[path] - start[path]).max() <= lr * 1.001
    for path in ["layers/2/bias", "layers/2/kernel"]:  # as without the change
        np.testing.assert_array_equal(end[path], twin_end[path])
        assert np.any(end[path] != twin_start[path])
    assert int(opt.opt_state.mini_step[...]) == 0
    assert int(opt.opt_state.inner_opt_state[0].count[...]) == 4
    assert [c[...].tolist() for c in opt.own_counts] == [[2, 1], [2, 1]]
