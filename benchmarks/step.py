"""Benchmark: one jitted training step with frozen parameters, written each way.

For each model and freeze setting, every variant (see ``_variants.py``) is
built, checked and timed in the same run:

* XLA's FLOPs and bytes accessed of the compiled step (exact, from
  ``cost_analysis()``), and the optimizer state's size in bytes;
* the median wall time of a step, waited for, as a ratio to the hand-written
  split; variants are timed in interleaved rounds (a fresh random order each
  round) so that drift of a noisy machine hits all of them alike;
* a check that one step from the same start gives every variant the same
  trainable update as its reference (the split, or the split with clipping
  for the clipped variants) and leaves every frozen array bit-identical;
* the PyTorch peer when torch is installed (``pip install -e ".[bench]"``).

``flax_freeze`` is ``ff.TrainStep`` itself; ``flax_freeze nnx.jit`` is the same
step under ``@nnx.jit``. The GP runs a second time in a child process under
``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false``, and its
ratios are reported beside the default ones.

It prints a markdown table per model and whether each target is met, and
writes ``step.json`` and ``step.md`` to ``--out``. ``--chart`` turns the JSON of
one or more runs into the chart and the summary table of the docs (see
``chart.py``).

    python benchmarks/step.py [--quick] [--models mlp,transformer,gp] [--out DIR]
    python benchmarks/step.py --chart benchmarks/results/run-*/step.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the PyTorch peer runs on the CPU too

import flax
import jax
import numpy as np
import optax

import flax_freeze as ff
from _models import Setting, Spec, encoder_spec, gp_spec, mlp_spec, param_paths
from _variants import (
    DESCRIPTIONS,
    FLAX_FREEZE,
    FLAX_FREEZE_CLIP,
    JAX_VARIANTS,
    LEARNING_RATE,
    MULTI_CLIP,
    PYTREE,
    SPLIT,
    SPLIT_CLIP,
    SPLIT_COUNT,
    TORCH,
    Variant,
)

#: Relative L2 difference allowed between a parameter's update and its reference's.
UPDATE_RTOL = 1e-3
#: The same for PyTorch, whose kernels sum in other orders.
TORCH_UPDATE_RTOL = 1e-2
#: Variants checked against the split with clipping rather than the plain split.
CLIPPED = {SPLIT_CLIP, FLAX_FREEZE_CLIP, MULTI_CLIP}
#: The XLA flag the GP is run under a second time, in a child process.
SEQUENTIAL_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
#: Variants only the GP runs: the pytree form, and the split with one more output.
GP_ONLY = frozenset({PYTREE, SPLIT_COUNT})
#: Variants whose update may differ from their reference's by design, and why.
EXPECTED_DIFFERENCES = {
    MULTI_CLIP: "update differs: its clipping norm counts the frozen gradients too",
}
#: Steps run before timing: the checked step, then one more so every timed step is warm.
WARMUP_STEPS = 2

FLOPS_TOLERANCE = 0.01
TIME_TARGET = 1.03
TIME_TARGET_TINY = 1.10  # the GP, where host overhead per call shows
CLIP_FLOPS_FACTOR = 2.0


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to run for one model: its spec and how many steps to time, in how many rounds."""

    spec: Spec
    rounds: int
    steps_per_round: int
    tiny: bool = False  # whether the looser time target applies
    skip: frozenset[str] = frozenset()  # variants not run for this model


def plans(*, quick: bool) -> dict[str, Plan]:
    """The full benchmark, or (``quick``) tiny models and a few steps for a smoke run."""
    if quick:
        return {
            "mlp": Plan(
                mlp_spec(width=64, depth=4, batch=8), rounds=2, steps_per_round=2, skip=GP_ONLY
            ),
            "transformer": Plan(
                encoder_spec(d_model=32, heads=4, depth=2, seq=8, batch=2, vocab=64),
                rounds=2,
                steps_per_round=2,
                skip=GP_ONLY,
            ),
            "gp": Plan(gp_spec(points=8, features=2), rounds=2, steps_per_round=2, tiny=True),
        }
    return {
        # One step per round, each round in a fresh order: drift on a shared machine then
        # reaches every variant alike. The GP's steps are too short for that to time well.
        "mlp": Plan(mlp_spec(), rounds=20, steps_per_round=1, skip=GP_ONLY),
        "transformer": Plan(encoder_spec(), rounds=20, steps_per_round=1, skip=GP_ONLY),
        "gp": Plan(gp_spec(), rounds=20, steps_per_round=50, tiny=True),
    }


@dataclasses.dataclass
class Timing:
    """The timed steps of one variant."""

    times: list[float] = dataclasses.field(default_factory=list)
    faults: int = 0  # minor page faults during the timed steps


def time_interleaved(
    steps: dict[str, Callable[[], Any]], *, rounds: int, steps_per_round: int, seed: int = 0
) -> dict[str, Timing]:
    """Times each step function ``rounds * steps_per_round`` times, interleaved by rounds.

    Each round runs every variant ``steps_per_round`` times in a fresh random
    order, with the garbage collector off.
    """
    rng = np.random.default_rng(seed)
    names = list(steps)
    timings = {name: Timing() for name in names}
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            for i in rng.permutation(len(names)):
                step, timing = steps[names[i]], timings[names[i]]
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                for _ in range(steps_per_round):
                    start = time.perf_counter()
                    step()
                    timing.times.append(time.perf_counter() - start)
                timing.faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    finally:
        gc.enable()
    return timings


def compare(
    params: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    init: dict[str, np.ndarray],
    setting: Setting,
    rtol: float,
    expect_difference: str = "",
) -> dict[str, Any]:
    """Checks one step's result against the reference variant's and the initial arrays.

    Frozen arrays must be bit-identical to their initial values. The update of
    each trainable array (new minus initial) must match the reference's within
    a relative L2 difference of ``rtol``: Adam's first step is about ``lr``
    per element, so a missing or wrong gradient shows as an O(1) difference.
    ``expect_difference`` names why a variant's update may legitimately differ;
    then only the frozen arrays decide.
    """
    if set(params) != set(init):
        return {"ok": False, "why": f"parameter paths differ: {sorted(set(params) ^ set(init))}"}
    moved = [p for p in params if setting.is_frozen(p) and not np.array_equal(params[p], init[p])]
    rel, worst = 0.0, 0.0
    for p in params:
        if setting.is_frozen(p):
            continue
        update = params[p].astype(np.float64) - init[p]
        expected = reference[p].astype(np.float64) - init[p]
        diff = float(np.linalg.norm(update - expected))
        rel = max(rel, diff / max(float(np.linalg.norm(expected)), 1e-30))
        worst = max(worst, float(np.abs(update - expected).max()) / LEARNING_RATE)
    matches = rel <= rtol
    if moved:
        why = f"frozen arrays moved: {moved[:4]}"
    elif not matches:
        why = expect_difference or "update differs"
    else:
        why = ""
    return {
        "ok": not moved and (matches or bool(expect_difference)),
        "why": why,
        "frozen_identical": not moved,
        "update_matches": matches,
        "update_rel_l2": rel,
        "update_max_abs_over_lr": worst,
    }


def torch_peer() -> ModuleType | None:
    """The PyTorch peer module, or None when torch is not installed."""
    try:
        import _torch_peer
    except ImportError:
        return None
    return _torch_peer


def run_setting(
    plan: Plan,
    setting: Setting,
    init: dict[str, np.ndarray],
    *,
    variants: Sequence[str],
    peer: ModuleType | None,
) -> list[dict[str, Any]]:
    """Builds, checks and times the variants for one setting; returns their table rows."""
    spec = plan.spec
    x, y = spec.batch()
    built: list[Variant] = [JAX_VARIANTS[name](spec, setting) for name in variants]
    if peer is not None:
        built.append(peer.torch_variant(spec, setting, init, (x, y)))
    rows: dict[str, dict[str, Any]] = {}
    results: dict[str, dict[str, np.ndarray]] = {}
    for variant in built:
        flops, bytes_accessed = variant.cost(x, y)  # compiles, so the first step does not
        loss = float(variant.run(x, y))
        results[variant.name] = variant.params()
        rows[variant.name] = {
            "model": spec.name,
            "setting": setting.name,
            "variant": variant.name,
            "flops": flops,
            "bytes_accessed": bytes_accessed,
            "opt_state_bytes": variant.opt_state_bytes(),
            "loss": loss,
        }
        for _ in range(WARMUP_STEPS - 1):
            jax.block_until_ready(variant.run(x, y))

    def waited(variant: Variant) -> Callable[[], Any]:
        # Each step reads the previous step's result, so waiting for the loss is enough:
        # unfinished work would hold up the next step and be timed there.
        return lambda: jax.block_until_ready(variant.run(x, y))

    timings = time_interleaved(
        {v.name: waited(v) for v in built},
        rounds=plan.rounds,
        steps_per_round=plan.steps_per_round,
    )
    split_time = float(np.median(timings[SPLIT].times))
    for name, timing in timings.items():
        row = rows[name]
        median = float(np.median(timing.times))
        reference = SPLIT_CLIP if name in CLIPPED and SPLIT_CLIP in results else SPLIT
        rtol = TORCH_UPDATE_RTOL if name == TORCH else UPDATE_RTOL
        row.update(
            steps=len(timing.times),
            median_s=median,
            time_ratio=median / split_time,
            flops_ratio=None if row["flops"] is None else row["flops"] / rows[SPLIT]["flops"],
            faults_per_step=timing.faults / len(timing.times),
            check=compare(
                results[name],
                results[reference],
                init,
                setting,
                rtol,
                EXPECTED_DIFFERENCES.get(name, ""),
            ),
        )
    return list(rows.values())


def _find(rows: list[dict[str, Any]], model: str, setting: str, variant: str) -> dict[str, Any]:
    for r in rows:
        if (r["model"], r["setting"], r["variant"]) == (model, setting, variant):
            return r
    raise KeyError((model, setting, variant))


def evaluate_targets(rows: list[dict[str, Any]], tiny: set[str]) -> list[dict[str, Any]]:
    """The targets, each with the measured value and whether it is met."""
    targets: list[dict[str, Any]] = []

    def add(target: str, model: str, setting: str, value: float, limit: float, met: bool) -> None:
        targets.append(
            {
                "target": target,
                "model": model,
                "setting": setting,
                "value": value,
                "limit": limit,
                "met": bool(met),
            }
        )

    cases = list(dict.fromkeys((r["model"], r["setting"]) for r in rows))
    names = {r["variant"] for r in rows}
    for model, setting in cases:
        split = _find(rows, model, setting, SPLIT)
        checked = [r for r in rows if (r["model"], r["setting"]) == (model, setting)]
        failed = [r["variant"] for r in checked if not r["check"]["ok"]]
        add("variants failing the update/frozen check", model, setting, len(failed), 0, not failed)
        if FLAX_FREEZE in names:
            mine = _find(rows, model, setting, FLAX_FREEZE)
            ratio = mine["flops"] / split["flops"]
            met = abs(ratio - 1) <= FLOPS_TOLERANCE
            add("flax_freeze FLOPs / split", model, setting, ratio, 1 + FLOPS_TOLERANCE, met)
            limit = TIME_TARGET_TINY if model in tiny else TIME_TARGET
            ratio = mine["time_ratio"]
            add("flax_freeze median time / split", model, setting, ratio, limit, ratio <= limit)
            ratio = mine["opt_state_bytes"] / split["opt_state_bytes"]
            met = mine["opt_state_bytes"] == split["opt_state_bytes"]
            add("flax_freeze optimizer state / split's", model, setting, ratio, 1.0, met)
        if setting == "linear probe" and {FLAX_FREEZE_CLIP, MULTI_CLIP} <= names:
            clipped = _find(rows, model, setting, FLAX_FREEZE_CLIP)
            masked = _find(rows, model, setting, MULTI_CLIP)
            factor = masked["flops"] / clipped["flops"]
            add(
                "with clipping: multi_transform FLOPs / flax_freeze FLOPs",
                model,
                setting,
                factor,
                CLIP_FLOPS_FACTOR,
                factor >= CLIP_FLOPS_FACTOR,
            )
    return targets


def machine(peer: ModuleType | None) -> dict[str, Any]:
    """Where this ran: CPU model, cores, versions."""
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in out.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "flax": flax.__version__,
        "optax": optax.__version__,
        "flax_freeze": ff.__version__,
        "torch": None if peer is None else peer.version(),
        "torch_threads": None if peer is None else peer.threads(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _bytes(n: float) -> str:
    if n < 1024:
        return f"{n:,.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}"
    raise AssertionError("unreachable")


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}×"


def markdown(result: dict[str, Any]) -> str:
    """The results as markdown: one table per model, then the targets and a legend."""
    meta = result["machine"]
    torch_note = f", PyTorch {meta['torch']} ({meta['torch_threads']} threads)"
    lines = [
        f"Measured {result['date']} on {meta['cpu']} ({meta['cores']} cores), "
        f"JAX {meta['jax']} ({meta['jax_backend']}), Flax {meta['flax']}, optax {meta['optax']}"
        + (torch_note if meta["torch"] else "")
        + (f", XLA_FLAGS={meta['xla_flags']}" if meta.get("xla_flags") else "")
        + (". Quick smoke run: tiny models, few steps." if result["quick"] else ".")
    ]
    for model, title in result["models"].items():
        steps = result["timed_steps"][model]
        lines += ["", f"### {title} (median of {steps} timed steps)", ""]
        lines.append(
            "| setting | variant | GFLOP | FLOPs × split | MB accessed | optimizer state "
            "| median ms | time × split | faults/step | check |"
        )
        lines.append("|---|---|--:|--:|--:|--:|--:|--:|--:|---|")
        for r in result["rows"]:
            if r["model"] != model:
                continue
            why = r["check"]["why"]
            check = ("ok" + (f" ({why})" if why else "")) if r["check"]["ok"] else f"**{why}**"
            gflop = "—" if r["flops"] is None else f"{r['flops'] / 1e9:.4f}"
            mb = "—" if r["bytes_accessed"] is None else f"{r['bytes_accessed'] / 1e6:,.1f}"
            lines.append(
                f"| {r['setting']} | {r['variant']} | {gflop} | {_ratio(r['flops_ratio'])} "
                f"| {mb} | {_bytes(r['opt_state_bytes'])} | {r['median_s'] * 1e3:,.3f} "
                f"| {_ratio(r['time_ratio'])} | {r['faults_per_step']:,.0f} | {check} |"
            )
    flagged = result.get("gp_sequential")
    if flagged is not None:
        lines += ["", *gp_flag_table(result["rows"], flagged)]
    lines += ["", "### Targets", ""]
    for t in result["targets"]:
        value = t["value"]
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(
            f"- **{'met' if t['met'] else 'NOT met'}**: {t['target']} — {t['model']}, "
            f"{t['setting']}: {shown} (limit {t['limit']})"
        )
    lines += ["", "### Variants", ""]
    lines += [f"- **{name}**: {text}" for name, text in result["descriptions"].items()]
    return "\n".join(lines) + "\n"


def gp_flag_table(rows: list[dict[str, Any]], flagged: dict[str, Any]) -> list[str]:
    """The GP's times under the default XLA flags and under ``SEQUENTIAL_FLAG``, side by side."""
    lines = [
        f"### GP: default XLA flags and `{flagged['xla_flags']}` side by side",
        "",
        "| setting | variant | median ms | time × split | median ms, flag | time × split, flag |",
        "|---|---|--:|--:|--:|--:|",
    ]
    other = {(r["setting"], r["variant"]): r for r in flagged["rows"]}
    for r in rows:
        if r["model"] != "gp" or (r["setting"], r["variant"]) not in other:
            continue
        f = other[(r["setting"], r["variant"])]
        lines.append(
            f"| {r['setting']} | {r['variant']} | {r['median_s'] * 1e3:,.3f} "
            f"| {_ratio(r['time_ratio'])} | {f['median_s'] * 1e3:,.3f} "
            f"| {_ratio(f['time_ratio'])} |"
        )
    return lines


def run_gp_with_flag(*, quick: bool, variants: Sequence[str] | None) -> dict[str, Any]:
    """The GP part of this benchmark, run again in a child process under ``SEQUENTIAL_FLAG``.

    XLA reads ``XLA_FLAGS`` once, when JAX starts its CPU backend: a flag can only
    be compared against the default in another process.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {SEQUENTIAL_FLAG}".strip()
    command = [sys.executable, str(Path(__file__).resolve()), "--models", "gp", "--no-torch"]
    command += ["--quick"] if quick else []
    command += [] if variants is None else ["--variants", ",".join(variants)]
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([*command, "--out", folder], env=env, check=True, stdout=subprocess.DEVNULL)
        child = json.loads((Path(folder) / "step.json").read_text())
    return {
        "xla_flags": child["machine"]["xla_flags"],
        "wall_s": child["wall_s"],
        "rows": child["rows"],
        "targets": child["targets"],
    }


def main(
    *,
    quick: bool = False,
    models: Sequence[str] = ("mlp", "transformer", "gp"),
    variants: Sequence[str] | None = None,
    torch: bool = True,
    gp_flag: bool = True,
    out: Path | None = None,
) -> dict[str, Any]:
    """Runs the benchmark, prints tables and targets, writes JSON and markdown to ``out``.

    Args:
        quick: tiny models and a few steps, for a smoke run.
        models: which of ``mlp``, ``transformer``, ``gp`` to run.
        variants: which JAX variants to run (the split always runs); all by default.
        torch: whether to time the PyTorch peer (when torch is installed).
        gp_flag: whether to run the GP again under ``SEQUENTIAL_FLAG``, in a child
            process (not when that flag is set already).
        out: folder for ``step.json`` and ``step.md``; nothing is written when None.

    Returns:
        The results, as written to ``step.json``.

    Raises:
        ValueError: if ``models`` or ``variants`` names something unknown.
    """
    available = plans(quick=quick)
    unknown = [m for m in models if m not in available]
    if unknown:
        raise ValueError(f"`models` has unknown names {unknown}; choose from {list(available)}.")
    chosen = list(JAX_VARIANTS) if variants is None else [SPLIT, *variants]
    unknown = [v for v in chosen if v not in JAX_VARIANTS]
    if unknown:
        raise ValueError(
            f"`variants` has unknown names {unknown}; choose from {list(JAX_VARIANTS)}."
        )
    chosen = list(dict.fromkeys(chosen))
    peer = torch_peer() if torch else None
    if torch and peer is None:
        print("torch is not installed: no PyTorch peer (pip install -e '.[bench]').")
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    started = time.perf_counter()
    for model in models:
        plan = available[model]
        init = {k: np.asarray(v) for k, v in param_paths(plan.spec.build())}
        names = [v for v in chosen if v not in plan.skip]
        for setting in plan.spec.settings:
            t0 = time.perf_counter()
            rows += run_setting(plan, setting, init, variants=names, peer=peer)
            gc.collect()
            elapsed = time.perf_counter() - t0
            print(f"{plan.spec.title}, {setting.name}: {elapsed:.0f} s", file=sys.stderr)
    flagged = None
    if gp_flag and "gp" in models and SEQUENTIAL_FLAG not in os.environ.get("XLA_FLAGS", ""):
        t0 = time.perf_counter()
        flagged = run_gp_with_flag(quick=quick, variants=variants)
        elapsed = time.perf_counter() - t0
        print(f"GP under {SEQUENTIAL_FLAG}: {elapsed:.0f} s", file=sys.stderr)
    targets = evaluate_targets(rows, {m for m in models if available[m].tiny})
    if flagged is not None:
        targets += [
            dict(t, target=f"{t['target']} under {SEQUENTIAL_FLAG}")
            for t in flagged["targets"]
            if t["target"] == "flax_freeze median time / split"
        ]
    result = {
        "date": datetime.date.today().isoformat(),
        "quick": quick,
        "machine": dict(machine(peer), load_average=[load_before[0], os.getloadavg()[0]]),
        "wall_s": time.perf_counter() - started,
        "models": {m: available[m].spec.title for m in models},
        "sizes": {m: available[m].spec.sizes for m in models},
        "timed_steps": {m: available[m].rounds * available[m].steps_per_round for m in models},
        "learning_rate": LEARNING_RATE,
        "rows": rows,
        "targets": targets,
        "gp_sequential": flagged,
        "descriptions": {
            k: v for k, v in DESCRIPTIONS.items() if k in chosen or (k == TORCH and peer)
        },
    }
    text = markdown(result)
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "step.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "step.md").write_text(text)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps")
    parser.add_argument("--models", default="mlp,transformer,gp", help="comma-separated")
    parser.add_argument(
        "--variants", default=None, help="comma-separated JAX variants (default: all)"
    )
    parser.add_argument("--no-torch", action="store_true", help="leave out the PyTorch peer")
    parser.add_argument(
        "--no-gp-flag",
        action="store_true",
        help=f"do not run the GP a second time under {SEQUENTIAL_FLAG}",
    )
    parser.add_argument(
        "--chart",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="make the docs' chart and summary table from these runs' step.json, run nothing",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for step.json and step.md (default: the next free benchmarks/results/run-N; "
        "none with --quick)",
    )
    args = parser.parse_args()
    if args.chart:
        import chart

        chart.main(args.chart)
        sys.exit()
    if args.out is None and not args.quick:
        results = Path(__file__).parent / "results"
        runs = 1
        while (results / f"run-{runs}").exists():
            runs += 1
        args.out = results / f"run-{runs}"
    main(
        quick=args.quick,
        models=args.models.split(","),
        variants=None if args.variants is None else args.variants.split(","),
        torch=not args.no_torch,
        gp_flag=not args.no_gp_flag,
        out=args.out,
    )
