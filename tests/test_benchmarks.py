"""Smoke tests for benchmarks/: tiny sizes, correctness checks and output format, no timings."""

import json
import xml.etree.ElementTree as ET

import chart  # pyright: ignore[reportMissingImports]
import numpy as np
import pytest
import step  # pyright: ignore[reportMissingImports]
import train_step_host  # pyright: ignore[reportMissingImports]

import _models  # pyright: ignore[reportMissingImports]
import _variants  # pyright: ignore[reportMissingImports]

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
    result = step.main(quick=True, models=("mlp", "gp"), out=out, torch=HAS_TORCH, gp_flag=False)
    return result, out


def svg_texts(root):
    """The text of every ``<text>`` element of an SVG drawing, stripped."""
    return {"".join(t.itertext()).strip() for t in root.iter("{http://www.w3.org/2000/svg}text")}


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
    assert saved["gp_sequential"] is None
    text = (out / "step.md").read_text()
    assert text == step.markdown(result)
    assert "Quick smoke run" in text
    assert text.count("| setting | variant | GFLOP | FLOPs × split |") == 2
    assert "| linear probe | flax_freeze |" in text
    assert "| lengthscales frozen | flax_freeze pytree |" in text
    assert "| lengthscales frozen | split + step count |" in text
    assert "| linear probe | flax_freeze nnx.jit |" in text
    assert "side by side" not in text
    assert "### Targets" in text
    assert "**met**: flax_freeze FLOPs / split — mlp" in text


def test_transformer_variants_agree():
    setting = "bottom half frozen"  # backpropagates through the top blocks only
    plan = step.plans(quick=True)["transformer"]
    spec = plan.spec
    chosen = next(s for s in spec.settings if s.name == setting)
    init = {k: np.asarray(v) for k, v in _models.param_paths(spec.build())}
    names = [
        _variants.SPLIT,
        _variants.FLAX_FREEZE,
        _variants.NNX,
        _variants.STOP,
        _variants.NNX_JIT,
    ]
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


def test_gp_runs_again_under_the_sequential_scheduler_flag(tmp_path):
    variants = (_variants.FLAX_FREEZE,)
    result = step.main(quick=True, models=("gp",), variants=variants, torch=False, out=tmp_path)
    flagged = result["gp_sequential"]
    assert flagged["xla_flags"].split()[-1] == step.SEQUENTIAL_FLAG
    keys = [(r["model"], r["setting"], r["variant"]) for r in result["rows"]]
    assert [(r["model"], r["setting"], r["variant"]) for r in flagged["rows"]] == keys
    assert keys == [
        ("gp", setting, variant)
        for setting in ("lengthscales frozen", "nothing frozen")
        for variant in (_variants.SPLIT, _variants.FLAX_FREEZE)
    ]
    assert all(r["check"]["ok"] for r in flagged["rows"])
    under = [t for t in result["targets"] if t["target"].endswith(step.SEQUENTIAL_FLAG)]
    assert [(t["target"], t["setting"]) for t in under] == [
        (f"flax_freeze median time / split under {step.SEQUENTIAL_FLAG}", setting)
        for setting in ("lengthscales frozen", "nothing frozen")
    ]
    text = (tmp_path / "step.md").read_text()
    header = f"### GP: default XLA flags and `{flagged['xla_flags']}` side by side"
    table = text.split(header)[1].split("### Targets")[0].strip().splitlines()
    assert table[0] == (
        "| setting | variant | median ms | time × split | median ms, flag | time × split, flag |"
    )
    assert [line.split(" | ")[:2] for line in table[2:]] == [
        ["| " + setting, variant]
        for setting in ("lengthscales frozen", "nothing frozen")
        for variant in (_variants.SPLIT, _variants.FLAX_FREEZE)
    ]
    assert json.loads((tmp_path / "step.json").read_text())["gp_sequential"] == flagged


def _second_run(first, factor):
    """A copy of a run's results with every time × ``factor`` and another date."""
    second = json.loads(json.dumps(first))
    second["date"] = "2099-01-01"
    for row in second["rows"]:
        row["time_ratio"] *= factor
        row["median_s"] *= factor
    gp = [r for r in second["rows"] if r["model"] == "gp"]
    second["gp_sequential"] = {"xla_flags": step.SEQUENTIAL_FLAG, "rows": gp}
    return second


def test_chart_and_summary_from_two_runs(quick_run, tmp_path):
    result, out = quick_run
    (tmp_path / "b.json").write_text(json.dumps(_second_run(result, 2.0)))
    paths = [out / "step.json", tmp_path / "b.json"]
    svg, summary = tmp_path / "chart.svg", tmp_path / "summary.md"
    chart.main(paths, svg_path=svg, summary_path=summary)

    text = svg.read_text()
    assert text == chart.svg(chart.load(paths))  # the same bytes for the same runs
    root = ET.fromstring(text)
    labels = svg_texts(root)
    assert {
        "MLP 4x64: step time × split",
        "MLP 4x64: FLOPs (XLA) × split",
        "GP: step time × split",
        "GP: FLOPs (XLA) × split",
        "split + step count",
        "flax_freeze nnx.jit",
        "GP under --xla_cpu_enable_concurrency_optimized_scheduler=false",
    } <= labels

    rows = {(r["model"], r["setting"], r["variant"]): r for r in result["rows"]}

    def span(model, setting, variant):
        a = rows[(model, setting, variant)]["time_ratio"]
        return f"{a:.2f}–{2 * a:.2f}×"

    lines = summary.read_text().splitlines()
    assert lines[0].startswith(f"2 runs ({result['date']}, 2099-01-01) on ")
    assert lines[2] == (
        "| model | setting | split, ms | flax_freeze | @nnx.jit | multi_transform + clip, FLOPs |"
    )
    probe = rows[("mlp", "linear probe", _variants.MULTI_CLIP)]["flops_ratio"]
    assert lines[4].split(" | ")[3:] == [
        span("mlp", "linear probe", _variants.FLAX_FREEZE),
        span("mlp", "linear probe", _variants.NNX_JIT),
        f"{probe:.2f}× |",
    ]
    assert len([line for line in lines if line.startswith("| MLP 4x64 |")]) == 3
    assert len([line for line in lines if line.startswith("| GP |")]) == 2
    flag_table = lines[lines.index("| setting | split, µs | split + step count | flax_freeze |") :]
    ff_default = span("gp", "lengthscales frozen", _variants.FLAX_FREEZE)
    ff_under = (
        f"{2 * rows[('gp', 'lengthscales frozen', _variants.FLAX_FREEZE)]['time_ratio']:.2f}×"
    )
    assert flag_table[2].startswith("| lengthscales frozen | ")
    assert flag_table[2].endswith(f" | {ff_default} → {ff_under} |")


def test_chart_refuses_runs_that_do_not_compare(quick_run, tmp_path):
    result, out = quick_run
    other = json.loads(json.dumps(result))
    other["rows"] = [r for r in other["rows"] if r["model"] != "gp"]
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"other\.json is not comparable with .*step\.json"):
        chart.load([out / "step.json", tmp_path / "other.json"])
    with pytest.raises(ValueError, match=r"`paths` is empty"):
        chart.load([])


def test_train_step_host_quick_run_writes_its_results(tmp_path):
    results = train_step_host.main(quick=True, models=("mlp",), out=tmp_path)
    saved = json.loads((tmp_path / "train_step_host.json").read_text())
    assert saved["results"] == json.loads(json.dumps(results))
    assert saved["machine"]["quick"] is True
    (r,) = saved["results"]
    assert (r["model"], r["setting"], r["timed_calls"]) == ("mlp", "bottom half frozen", 3)
    # 4 trainable params (2 layers) + 2 of the head; Adam's mu and nu for those; two counters.
    assert r["arrays"]["donated"] == 6 + 12 + 2
    assert r["arrays"]["frozen"] == 4
    assert r["first_losses_equal"] is True
    ways = [train_step_host.TRAIN_STEP, train_step_host.BARE, train_step_host.NNX_JIT]
    assert list(r["median_us"]) == list(r["p25_us"]) == [*ways, train_step_host.CACHED]
    assert list(r["memory"]) == ways  # nnx.cached_partial runs the @nnx.jit program
    assert all(v > 0 for v in r["median_us"].values())
    assert list(r["parts_us"]) == [
        "arrays read (slot, as TrainStep does)",
        "arrays read (public get_raw_value)",
        "check that no donated array is held elsewhere",
        "arrays written back (slot, as TrainStep does)",
        "arrays written back (public set_raw_value)",
        "change check (freeze count + structure)",
        "one new split (after a change)",
    ]
    memory = r["memory"]
    ours, bare = memory[train_step_host.TRAIN_STEP], memory[train_step_host.BARE]
    assert {k: v for k, v in ours.items() if k != "bytes_accessed"} == {
        k: v for k, v in bare.items() if k != "bytes_accessed"
    }
    # the step count, computed after the loss: reads the loss and writes a flag, 12 B
    assert ours["bytes_accessed"] == bare["bytes_accessed"] + 12
    assert memory[train_step_host.NNX_JIT]["alias"] == 0  # nnx.jit donates nothing
    # Written in place: the trainable float32 arrays (layers 2 and 3, the head), Adam's
    # two moments of each, and the two step counts.
    trainable = 2 * (64 * 64 + 64) + 64 * 10 + 10
    assert memory[train_step_host.TRAIN_STEP]["alias"] == 3 * 4 * trainable + 4 + 4
    assert r["train_step_over_bare"] == r["median_us"]["TrainStep"] / r["median_us"]["bare jax.jit"]

    other = json.loads(json.dumps(saved))
    other["machine"]["date"] = "2099-01-01"
    for key in ("median_us", "p25_us"):
        other["results"][0][key] = {k: 2 * v for k, v in r[key].items()}
    lines = chart.host_summary([saved, other]).splitlines()
    assert lines[0].startswith(f"2 runs ({saved['machine']['date']}, 2099-01-01), ")
    assert lines[2] == (
        "| model | TrainStep | bare jax.jit | @nnx.jit | nnx.cached_partial "
        "| TrainStep / bare | @nnx.jit / TrainStep |"
    )
    ms = [r["p25_us"][way] / 1e3 for way in (*ways, train_step_host.CACHED)]
    assert lines[4] == (
        "| MLP 4x64 | "
        + " | ".join(f"{m:.2f}–{2 * m:.2f} ms" for m in ms)
        + f" | {r['p25_train_step_over_bare']:.2f}× | {r['p25_nnx_jit_over_train_step']:.1f}× |"
    )
    assert lines[6] == (
        f"Ratios of the medians: MLP 4x64: TrainStep / bare {r['train_step_over_bare']:.2f}×, "
        f"@nnx.jit / TrainStep {r['nnx_jit_over_train_step']:.1f}×."
    )
    total = memory[train_step_host.TRAIN_STEP]["total"]
    assert lines[8] == (
        f"XLA memory of the compiled step, TrainStep and bare split: mlp {total:,} B = {total:,} B."
    )


def test_unfreeze_dynamics_prints_the_jumps_and_draws_a_panel_per_optimizer(tmp_path, capsys):
    import unfreeze_dynamics  # pyright: ignore[reportMissingImports]

    svg = tmp_path / "dynamics.svg"
    jumps = unfreeze_dynamics.main(steps=20, seeds=(0,), svg=svg)
    assert list(jumps) == ["shared count", "own counts", "own counts + warm-up 50"]
    for runs in jumps.values():
        assert len(runs) == 1
        assert len(runs[0]) == 3
        assert all(np.isfinite(j) and j > 0 for j in runs[0])
    out = capsys.readouterr().out
    assert "| optimizer | block 2 | block 1 | block 0 |" in out
    assert "Halfway through a phase, nothing changing:" in out
    root = ET.parse(svg).getroot()
    labels = svg_texts(root)
    assert {
        "shared count",
        "own counts",
        "own counts + warm-up 50",
        "unfreeze block 2",
        "unfreeze block 1",
        "unfreeze block 0",
    } <= labels
