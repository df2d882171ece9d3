"""Benchmark: host time per call of ``ff.TrainStep`` against a bare ``jax.jit`` and ``@nnx.jit``.

Host time is the time a call takes to return, with every step before it
finished (its loss and all the state it wrote): what Python and JAX's dispatch
cost before XLA runs the step, which on a big model runs on asynchronously.
Four ways to run the same training step (``ff.value_and_grad`` and
``ff.Optimizer.update``, Adam, the same frozen parameters) are timed in
interleaved rounds, each round in a fresh random order, with the garbage
collector off:

* **TrainStep**: ``loss = step(x, y)``, the model and optimizer objects
  current after every call;
* **bare jax.jit**: the hand-written split, a ``jax.jit`` of a pure function
  over the same arrays (trainable parameters and optimizer state donated,
  frozen parameters a separate argument), its state kept in a Python list:
  no model object is kept current;
* **@nnx.jit**: the same step under ``@nnx.jit`` in graph mode (the simple
  alternative), which walks the module graph in Python on every call;
* **nnx.cached_partial**: that ``@nnx.jit`` step with the model and optimizer
  bound by ``nnx.cached_partial``, which caches the graph traversal.

It prints the medians and lower quartiles (a shared machine slows some calls
of every variant alike), their ratios, and what a TrainStep call costs on top
of the bare call, part by part (measured alone, median of many repetitions,
so with warm caches: a real call, right after a step, pays more): reading the
arrays from the variables, checking that no donated array is held elsewhere,
putting the new ones back (with the slot write TrainStep uses, and with the
public ``get_raw_value``/``set_raw_value`` for comparison), the check for
freeze and structure changes, and one new split.
It also compares XLA's memory analysis of the compiled steps
(``nnx.cached_partial`` runs the ``@nnx.jit`` program).

    python benchmarks/train_step_host.py [--quick] [--models mlp,transformer] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax
import jax
import numpy as np
import optax
from flax import nnx

import flax_freeze as ff
from _models import Setting, Spec, encoder_spec, mlp_spec
from _variants import nnx_jit_step
from flax_freeze._nnx_compat import raw_slot
from flax_freeze._train_step import TrainStep

TRAIN_STEP = "TrainStep"
BARE = "bare jax.jit"
NNX_JIT = "@nnx.jit"
CACHED = "nnx.cached_partial"
#: Targets: TrainStep within this factor of the bare call, @nnx.jit at least this factor slower.
BARE_TARGET = 1.2
NNX_TARGET = 3.0


def build(spec: Spec, setting: Setting) -> tuple[nnx.Module, ff.Optimizer]:
    """The model with the setting's parameters frozen, and its Adam optimizer."""
    model = spec.build()
    if setting.frozen is not None:
        ff.freeze(model, ff.PathRegex(setting.frozen))
    return model, ff.Optimizer(model, optax.adam(1e-3))


class Bare:
    """The hand-written split over flat lists of arrays: ``loss, rest = f(rest, frozen, x, y)``.

    ``rest`` (trainable parameters and optimizer state) is donated; ``frozen`` is
    read only. The arrays live in Python lists, so nothing but JAX's dispatch
    runs per call: the floor any step over these arrays can reach.
    """

    def __init__(self, spec: Spec, setting: Setting) -> None:
        model, optimizer = build(spec, setting)
        graphdef, frozen, rest = nnx.split((model, optimizer), ff.FrozenParam, ...)
        frozen_def, rest_def = jax.tree.structure(frozen), jax.tree.structure(rest)
        loss_fn = spec.loss_fn

        def step(rest: list[Any], frozen: list[Any], x: jax.Array, y: jax.Array) -> Any:
            model, optimizer = nnx.merge(
                graphdef, jax.tree.unflatten(frozen_def, frozen), jax.tree.unflatten(rest_def, rest)
            )
            loss, grads = ff.value_and_grad(loss_fn)(model, x, y)
            optimizer.update(model, grads)
            return loss, jax.tree.leaves(nnx.state((model, optimizer), nnx.Not(ff.FrozenParam)))

        self.jitted = jax.jit(step, donate_argnums=0)
        self.rest, self.frozen = jax.tree.leaves(rest), jax.tree.leaves(frozen)

    def __call__(self, x: jax.Array, y: jax.Array) -> Any:
        loss, self.rest = self.jitted(self.rest, self.frozen, x, y)
        return loss

    def lower(self, x: jax.Array, y: jax.Array) -> Any:
        return self.jitted.lower(self.rest, self.frozen, x, y)


def nnx_jit(
    spec: Spec, setting: Setting, *, cached: bool = False
) -> tuple[Callable[..., Any], Callable[..., Any], Callable[[], Any]]:
    """The ``@nnx.jit`` step, bound to its model: ``(call, lower, state)``.

    With ``cached`` the call is ``nnx.cached_partial(step, model, optimizer)``.
    """
    model, optimizer = build(spec, setting)
    step = nnx_jit_step(spec.loss_fn)

    call = nnx.cached_partial(step, model, optimizer) if cached else None
    return (
        call if call is not None else (lambda x, y: step(model, optimizer, x, y)),
        lambda x, y: step.lower(model, optimizer, x, y),
        lambda: nnx.state((model, optimizer)),
    )


def time_host(
    calls: dict[str, Callable[[], Any]],
    states: dict[str, Callable[[], Any]],
    rounds: int,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Seconds each call takes to return, every step before it finished; interleaved.

    After each call the whole state it produced is waited for (``states``),
    not just the loss: a step still writing its outputs would hold up the
    next dispatch, which would then time the previous step's tail.
    """
    rng = np.random.default_rng(seed)
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            for i in rng.permutation(len(names)):
                call = calls[names[i]]
                start = time.perf_counter()
                out = call()
                times[names[i]].append(time.perf_counter() - start)
                jax.block_until_ready((out, states[names[i]]()))
    finally:
        gc.enable()
    return times


def median_us(fn: Callable[[], Any], repeat: int) -> float:
    """Median microseconds of ``fn()`` over ``repeat`` runs, garbage collector off."""
    times = []
    gc.disable()
    try:
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    finally:
        gc.enable()
    return float(np.median(times)) * 1e6


def parts(step: TrainStep, repeat: int) -> dict[str, float]:
    """What a TrainStep call does besides the jitted call, each part timed alone (µs)."""
    split = step._current()
    get, set_slot = raw_slot()
    donated = list(map(get, split.donated))

    def read() -> Any:
        return list(map(get, split.donated)), [*map(get, split.frozen), *split.consts]

    def read_public() -> Any:
        public = nnx.Variable.get_raw_value
        return list(map(public, split.donated)), [*map(public, split.frozen), *split.consts]

    def held_elsewhere() -> Any:
        return max(map(sys.getrefcount, donated))

    def write_slot() -> None:
        collections.deque(map(set_slot, split.donated, donated), maxlen=0)

    def write_public() -> None:
        for variable, value in zip(split.donated, donated, strict=True):
            variable.set_raw_value(value)

    def check() -> Any:
        return step._current()

    splits_before = step._splits
    result = {
        "arrays read (slot, as TrainStep does)": median_us(read, repeat),
        "arrays read (public get_raw_value)": median_us(read_public, repeat),
        "check that no donated array is held elsewhere": median_us(held_elsewhere, repeat),
        "arrays written back (slot, as TrainStep does)": median_us(write_slot, repeat),
        "arrays written back (public set_raw_value)": median_us(write_public, repeat),
        "change check (freeze count + structure)": median_us(check, repeat),
        "one new split (after a change)": median_us(step._build, max(3, repeat // 100)),
    }
    step._split = step._build()
    assert step._splits > splits_before
    return result


def memory(lowered: Any) -> dict[str, int]:
    """XLA's memory analysis and bytes accessed of a lowered step."""
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {
        "argument": m.argument_size_in_bytes,
        "output": m.output_size_in_bytes,
        "alias": m.alias_size_in_bytes,
        "temp": m.temp_size_in_bytes,
        "total": m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes,
        "bytes_accessed": int(cost["bytes accessed"]),
    }


def run_model(spec: Spec, setting: Setting, *, rounds: int, repeat: int) -> dict[str, Any]:
    """Times the three ways on one model and setting; returns the results."""
    x, y = spec.batch()
    model, optimizer = build(spec, setting)
    step = TrainStep(model, optimizer, spec.loss_fn)
    bare = Bare(spec, setting)
    nnx_call, nnx_lower, nnx_state = nnx_jit(spec, setting)
    cached_call, _, cached_state = nnx_jit(spec, setting, cached=True)
    memories = {
        TRAIN_STEP: memory(step.lower(x, y)),
        BARE: memory(bare.lower(x, y)),
        NNX_JIT: memory(nnx_lower(x, y)),
    }
    calls = {
        TRAIN_STEP: lambda: step(x, y),
        BARE: lambda: bare(x, y),
        NNX_JIT: lambda: nnx_call(x, y),
        CACHED: lambda: cached_call(x, y),
    }
    losses = {}
    for name, call in calls.items():  # compile, then one warm step
        losses[name] = float(call())
        jax.block_until_ready(call())
    states = {
        TRAIN_STEP: lambda: nnx.state((model, optimizer)),
        BARE: lambda: bare.rest,
        NNX_JIT: nnx_state,
        CACHED: cached_state,
    }
    times = time_host(calls, states, rounds)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    quartiles = {name: float(np.percentile(t, 25)) for name, t in times.items()}
    split = step._current()
    return {
        "model": spec.name,
        "title": spec.title,
        "setting": setting.name,
        "arrays": {
            "donated": len(split.donated),
            "frozen": len(split.frozen),
            "watched containers": len(split.containers),
            "watched objects": len(split.objects),
        },
        "first_losses_equal": len(set(losses.values())) == 1,
        "median_us": {k: v * 1e6 for k, v in medians.items()},
        "p25_us": {k: v * 1e6 for k, v in quartiles.items()},
        "train_step_over_bare": medians[TRAIN_STEP] / medians[BARE],
        "nnx_jit_over_train_step": medians[NNX_JIT] / medians[TRAIN_STEP],
        "cached_over_train_step": medians[CACHED] / medians[TRAIN_STEP],
        "p25_train_step_over_bare": quartiles[TRAIN_STEP] / quartiles[BARE],
        "p25_nnx_jit_over_train_step": quartiles[NNX_JIT] / quartiles[TRAIN_STEP],
        "timed_calls": rounds,
        "parts_us": parts(step, repeat),
        "memory": memories,
    }


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "### Host time per call (every step before it finished; µs)",
        "",
        "Median, and in brackets the 25th percentile: on a shared machine, bursts of "
        "other work slow some calls of every variant alike, and the lower quartile "
        "shows the cost of the call itself.",
        "",
        f"| model | setting | {TRAIN_STEP} | {BARE} | {NNX_JIT} | {CACHED} "
        f"| {TRAIN_STEP} / bare | {NNX_JIT} / {TRAIN_STEP} | {CACHED} / {TRAIN_STEP} |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        m, q = r["median_us"], r["p25_us"]
        ways = (TRAIN_STEP, BARE, NNX_JIT, CACHED)
        lines.append(
            f"| {r['title']} | {r['setting']} "
            + " ".join(f"| {m[k]:,.0f} ({q[k]:,.0f})" for k in ways)
            + f" | {r['train_step_over_bare']:.3f} ({r['p25_train_step_over_bare']:.3f}) "
            f"| {r['nnx_jit_over_train_step']:.1f} ({r['p25_nnx_jit_over_train_step']:.1f}) "
            f"| {r['cached_over_train_step']:.1f} |"
        )
    lines += ["", "### What a TrainStep call adds, part by part (µs, median)", ""]
    names = list(results[0]["parts_us"])
    lines.append("| part | " + " | ".join(r["model"] for r in results) + " |")
    lines.append("|---|" + "--:|" * len(results))
    for name in names:
        lines.append(
            f"| {name} | " + " | ".join(f"{r['parts_us'][name]:,.1f}" for r in results) + " |"
        )
    lines.append(
        "| arrays donated / frozen / watched objects | "
        + " | ".join(
            f"{r['arrays']['donated']} / {r['arrays']['frozen']} / {r['arrays']['watched objects']}"
            for r in results
        )
        + " |"
    )
    lines += [
        "",
        "### XLA memory of the compiled step (MB; total = argument + output - alias + temp)",
        "",
        "| model | way | argument | output | alias | temp | total | accessed |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        for way, mem in r["memory"].items():
            lines.append(
                f"| {r['model']} | {way} | "
                + " | ".join(
                    f"{mem[k] / 1e6:,.3f}"
                    for k in ("argument", "output", "alias", "temp", "total", "bytes_accessed")
                )
                + " |"
            )
    lines += ["", "### Targets", ""]
    for r in results:
        a, b = r["train_step_over_bare"], r["nnx_jit_over_train_step"]
        qa, qb = r["p25_train_step_over_bare"], r["p25_nnx_jit_over_train_step"]
        lines.append(
            f"- **{'met' if a <= BARE_TARGET else 'NOT met'}**: {TRAIN_STEP} / bare ≤ "
            f"{BARE_TARGET} — {r['model']}: median {a:.3f}, lower quartile {qa:.3f}"
        )
        lines.append(
            f"- **{'met' if b >= NNX_TARGET else 'NOT met'}**: {NNX_JIT} / {TRAIN_STEP} ≥ "
            f"{NNX_TARGET} — {r['model']}: median {b:.1f}, lower quartile {qb:.1f}"
        )
        same = r["memory"][TRAIN_STEP]["total"] == r["memory"][BARE]["total"]
        lines.append(
            f"- **{'met' if same else 'NOT met'}**: {TRAIN_STEP} memory = bare split's — "
            f"{r['model']}: {r['memory'][TRAIN_STEP]['total']:,} B vs "
            f"{r['memory'][BARE]['total']:,} B"
        )
    return "\n".join(lines) + "\n"


def main(
    *, quick: bool = False, models: tuple[str, ...] = ("mlp", "transformer"), out: Path | None
) -> list[dict[str, Any]]:
    """Runs the benchmark, prints its tables, writes ``train_step_host.json`` to ``out``.

    Args:
        quick: tiny models and a few calls, for a smoke run.
        models: which of ``mlp`` and ``transformer`` to run.
        out: folder for the JSON; nothing is written when None.

    Returns:
        One result per model.

    Raises:
        ValueError: if ``models`` names something unknown.
    """
    specs = {
        "mlp": mlp_spec(width=64, depth=4, batch=8) if quick else mlp_spec(),
        "transformer": (
            encoder_spec(d_model=32, heads=4, depth=2, seq=8, batch=2, vocab=64)
            if quick
            else encoder_spec()
        ),
    }
    unknown = [m for m in models if m not in specs]
    if unknown:
        raise ValueError(f"`models` has unknown names {unknown}; choose from {list(specs)}.")
    rounds, repeat = (3, 20) if quick else (80, 2000)
    results = []
    for name in models:
        spec = specs[name]
        setting = spec.settings[1]  # bottom half frozen: frozen and trainable arrays both
        started = time.perf_counter()
        results.append(run_model(spec, setting, rounds=rounds, repeat=repeat))
        print(f"{spec.title}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    text = markdown(results)
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        meta = {
            "date": datetime.date.today().isoformat(),
            "python": platform.python_version(),
            "jax": jax.__version__,
            "flax": flax.__version__,
            "cores": os.cpu_count(),
            "quick": quick,
        }
        data = {"machine": meta, "results": results}
        (out / "train_step_host.json").write_text(json.dumps(data, indent=2) + "\n")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, a few calls")
    parser.add_argument("--models", default="mlp,transformer", help="comma-separated")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON")
    args = parser.parse_args()
    main(quick=args.quick, models=tuple(args.models.split(",")), out=args.out)
