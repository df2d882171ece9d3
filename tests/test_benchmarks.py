"""Smoke tests for benchmarks/: tiny sizes, correctness checks and output format, no timings."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flax_freeze as ff

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

import _models  # noqa: E402  # pyright: ignore[reportMissingImports]
import _variants  # noqa: E402  # pyright: ignore[reportMissingImports]
import step  # noqa: E402  # pyright: ignore[reportMissingImports]
from fast_step import TrainStep  # noqa: E402  # pyright: ignore[reportMissingImports]

HAS_TORCH = step.torch_peer() is not None
DETERMINISTIC_TARGETS = {
    "variants failing the update/frozen check",
    "flax_freeze FLOPs / split",
    "flax_freeze optimizer state / split's",
    "with clipping: multi_transform FLOPs / flax_freeze FLOPs",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    result = step.main(quick=True, models=("mlp", "gp"), out=out, torch=HAS_TORCH)
    return result, out


def test_quick_run_has_a_row_per_model_setting_and_variant(quick_run):
    result, _ = quick_run
    expected = set()
    for model, plan in step.plans(quick=True).items():
        if model not in ("mlp", "gp"):
            continue
        names = [n for n in _variants.JAX_VARIANTS if n not in plan.skip]
        names += [_variants.TORCH] if HAS_TORCH else []
        expected |= {(model, s.name, n) for s in plan.spec.settings for n in names}
    assert {(r["model"], r["setting"], r["variant"]) for r in result["rows"]} == expected
    for row in result["rows"]:
        assert row["steps"] == 4
        assert row["median_s"] > 0
        assert row["opt_state_bytes"] > 0
        assert np.isfinite(row["loss"])
        if row["variant"] == _variants.TORCH:
            assert row["flops"] is None
            assert row["flops_ratio"] is None
        else:
            assert row["flops"] > 0
            assert row["bytes_accessed"] > 0


def test_quick_run_passes_its_checks(quick_run):
    result, _ = quick_run
    for row in result["rows"]:
        assert row["check"]["ok"], row
        assert row["check"]["frozen_identical"], row


def test_quick_run_meets_the_targets_that_do_not_depend_on_timing(quick_run):
    result, _ = quick_run
    targets = result["targets"]
    assert {t["target"] for t in targets} >= DETERMINISTIC_TARGETS
    for target in targets:
        assert isinstance(target["met"], bool)
        if target["target"] in DETERMINISTIC_TARGETS:
            assert target["met"], target
    clip = [t for t in targets if t["target"].startswith("with clipping")]
    assert [(t["model"], t["setting"]) for t in clip] == [("mlp", "linear probe")]


def test_frozen_variants_hold_optimizer_state_for_trainable_parameters_only(quick_run):
    result, _ = quick_run
    rows = {(r["model"], r["setting"], r["variant"]): r for r in result["rows"]}
    probe = ("mlp", "linear probe")
    split = rows[(*probe, _variants.SPLIT)]["opt_state_bytes"]
    for name in (_variants.FLAX_FREEZE, _variants.MULTI, _variants.NNX, _variants.NNX_JIT):
        assert rows[(*probe, name)]["opt_state_bytes"] == split
    for name in (_variants.STOP, _variants.OPTAX_FREEZE):
        assert rows[(*probe, name)]["opt_state_bytes"] > 10 * split
    clipped = rows[(*probe, _variants.MULTI_CLIP)]["flops"]
    assert clipped > 2 * rows[(*probe, _variants.FLAX_FREEZE_CLIP)]["flops"]


def test_quick_run_writes_json_and_markdown(quick_run):
    result, out = quick_run
    saved = json.loads((out / "step.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert saved["machine"]["cores"] >= 1
    assert saved["machine"]["cpu"]
    assert saved["timed_steps"] == {"mlp": 4, "gp": 4}
    text = (out / "step.md").read_text()
    assert text == step.markdown(result)
    assert "Quick smoke run" in text
    assert text.count("| setting | variant | GFLOP | FLOPs × split |") == 2
    assert "| linear probe | flax_freeze |" in text
    assert "| lengthscales frozen | flax_freeze pytree |" in text
    assert "### Targets" in text
    assert "**met**: flax_freeze FLOPs / split — mlp" in text


def test_transformer_variants_agree():
    setting = "bottom half frozen"  # backpropagates through the top blocks only
    plan = step.plans(quick=True)["transformer"]
    spec = plan.spec
    chosen = next(s for s in spec.settings if s.name == setting)
    init = {k: np.asarray(v) for k, v in _models.param_paths(spec.build())}
    names = [_variants.SPLIT, _variants.FLAX_FREEZE, _variants.NNX, _variants.STOP]
    peer = step.torch_peer() if HAS_TORCH else None
    rows = step.run_setting(plan, chosen, init, variants=names, peer=peer)
    assert [r["variant"] for r in rows] == names + ([_variants.TORCH] if HAS_TORCH else [])
    for row in rows:
        assert row["check"]["ok"], row
        assert row["check"]["update_matches"], row


def test_compare_catches_a_moved_frozen_array_and_a_wrong_update():
    setting = _models.Setting("probe", "frozen")
    init = {"frozen": np.zeros(3, np.float32), "head": np.zeros(3, np.float32)}
    good = {"frozen": init["frozen"], "head": np.full(3, -1e-3, np.float32)}
    assert step.compare(good, good, init, setting, 1e-3)["ok"]

    moved = dict(good, frozen=np.full(3, 1e-9, np.float32))
    check = step.compare(moved, good, init, setting, 1e-3)
    assert not check["ok"]
    assert not check["frozen_identical"]
    assert "frozen arrays moved: ['frozen']" in check["why"]

    wrong = dict(good, head=np.array([-1e-3, 1e-3, -1e-3], np.float32))
    check = step.compare(wrong, good, init, setting, 1e-3)
    assert not check["ok"]
    assert check["why"] == "update differs"
    assert check["update_max_abs_over_lr"] == pytest.approx(2.0)

    check = step.compare(wrong, good, init, setting, 1e-3, "by design")
    assert check["ok"]
    assert check["why"] == "by design"
    assert not check["update_matches"]

    check = step.compare({"head": good["head"]}, good, init, setting, 1e-3)
    assert not check["ok"]
    assert "parameter paths differ: ['frozen']" in check["why"]


def test_main_rejects_unknown_models_and_variants():
    with pytest.raises(ValueError, match=r"`models` has unknown names \['resnet'\]"):
        step.main(quick=True, models=("resnet",))
    with pytest.raises(ValueError, match=r"`variants` has unknown names \['sgd'\]"):
        step.main(quick=True, models=("gp",), variants=("sgd",))


def test_settings_freeze_what_their_names_say():
    mlp = _models.mlp_spec(width=8, depth=4, batch=2)
    paths = [p for p, _ in _models.param_paths(mlp.build())]
    frozen = {s.name: {p for p in paths if s.is_frozen(p)} for s in mlp.settings}
    assert frozen["linear probe"] == {p for p in paths if p.startswith("layers/")}
    assert frozen["bottom half frozen"] == {
        f"layers/{i}/{k}" for i in (0, 1) for k in ("bias", "kernel")
    }
    assert frozen["nothing frozen"] == set()

    encoder = _models.encoder_spec(d_model=8, heads=2, depth=2, seq=4, batch=1, vocab=8)
    paths = [p for p, _ in _models.param_paths(encoder.build())]
    frozen = {s.name: {p for p in paths if s.is_frozen(p)} for s in encoder.settings}
    assert set(paths) - frozen["linear probe"] == {"head/bias", "head/kernel"}
    tops = {
        "/".join(p.split("/")[:2]) if p.startswith("blocks/") else p.split("/")[0]
        for p in frozen["bottom half frozen"]
    }
    assert tops == {"embed", "pos", "blocks/0"}
    assert frozen["nothing frozen"] == set()


class _Net(nnx.Module):
    def __init__(self):
        self.body = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
        self.head = nnx.Linear(4, 1, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.head(jnp.tanh(self.body(x)))


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def test_train_step_trains_keeps_frozen_weights_and_writes_back():
    model = ff.freeze(_Net(), ff.PathRegex("body/.*"))
    optimizer = ff.Optimizer(model, optax.adam(0.05))
    body = np.asarray(model.body.kernel[...])
    x = jax.random.normal(jax.random.key(0), (16, 3))
    y = jax.random.normal(jax.random.key(1), (16, 1))
    train = TrainStep(model, optimizer, _loss)
    losses = [float(train(x, y)) for _ in range(30)]
    assert losses[-1] < losses[0]
    train.write_back()
    assert float(_loss(model, x, y)) < losses[0]
    assert np.array_equal(np.asarray(model.body.kernel[...]), body)
    assert sorted(optimizer.opt_state[0].mu.keys()) == ["head"]

    ff.unfreeze(model)
    train = TrainStep(model, optimizer, _loss)  # migrates the optimizer state
    assert sorted(optimizer.opt_state[0].mu.keys()) == ["body", "head"]
    for _ in range(5):
        train(x, y)
    train.write_back()
    assert not np.array_equal(np.asarray(model.body.kernel[...]), body)


def test_train_step_state_is_the_split_state():
    model = ff.freeze(_Net(), ff.PathRegex("body/.*"))
    optimizer = ff.Optimizer(model, optax.sgd(0.1))
    train = TrainStep(model, optimizer, _loss)
    state = train.state()
    assert isinstance(state, nnx.State)
    assert jax.tree.structure(state) == jax.tree.structure(nnx.state((model, optimizer)))
