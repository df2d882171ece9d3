"""The chart and summary table of the docs' benchmark page, made from the JSON of ``step.py`` runs.

Each run of ``step.py`` writes ``step.json``. Given one or more of them, this
draws, per model, every variant's step time and FLOPs as multiples of the
hand-written split, one marker per freeze setting: a time is drawn as the
range of the runs' ratios (a line from the lowest to the highest) with a dot
at their median; FLOPs are exact, the same in every run. The GP's times under
``--xla_cpu_enable_concurrency_optimized_scheduler=false`` are drawn beside the
default ones, as hollow markers. It also writes a narrow markdown table of the
numbers the docs quote, each a range over the runs, and one of the host time
per call measured by ``train_step_host.py`` (its ``train_step_host.json``, by
default those found next to the ``step.json`` files).

    python benchmarks/chart.py benchmarks/results/run-*/step.json
    python benchmarks/step.py --chart benchmarks/results/run-*/step.json   # the same
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: Where the chart and the table go by default: the docs include both.
SVG = ROOT / "docs" / "assets" / "step-chart.svg"
SUMMARY = ROOT / "benchmarks" / "results" / "summary.md"
HOST_SUMMARY = ROOT / "benchmarks" / "results" / "host-summary.md"

SPLIT = "split"
FLAX_FREEZE = "flax_freeze"
NNX_JIT = "flax_freeze nnx.jit"
MULTI_CLIP = "multi_transform + clip"
SPLIT_COUNT = "split + step count"

#: One colour and marker per freeze setting, the same in every panel.
STYLES: dict[str, tuple[str, str]] = {
    "linear probe": ("#1f77b4", "o"),
    "bottom half frozen": ("#ff7f0e", "s"),
    "nothing frozen": ("#555555", "D"),
    "lengthscales frozen": ("#2ca02c", "^"),
}
TICKS = (0.5, 0.75, 1, 1.25, 1.5, 2, 3, 5, 10, 20)


def load(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The runs' results, checked to be full runs of the same models and variants.

    Raises:
        ValueError: if no path is given, or the runs are not comparable.
    """
    if not paths:
        raise ValueError("`paths` is empty: pass the step.json of at least one run.")
    runs = [json.loads(Path(p).read_text()) for p in paths]
    keys = [{(r["model"], r["setting"], r["variant"]) for r in run["rows"]} for run in runs]
    for path, run, key in zip(paths, runs, keys, strict=True):
        if run["quick"] != runs[0]["quick"] or key != keys[0]:
            raise ValueError(
                f"{path} is not comparable with {paths[0]}: runs must be of the same kind "
                "(quick or full) and have the same models, settings and variants."
            )
    return runs


def _range(values: Sequence[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def collect(runs: Sequence[dict[str, Any]]) -> dict[tuple[str, str, str, bool], dict[str, Any]]:
    """Per ``(model, setting, variant, under the flag)``: time and FLOPs × split over the runs."""
    out: dict[tuple[str, str, str, bool], dict[str, Any]] = {}
    for run in runs:
        flagged = run.get("gp_sequential") or {"rows": []}
        for rows, flag in ((run["rows"], False), (flagged["rows"], True)):
            for r in rows:
                entry = out.setdefault(
                    (r["model"], r["setting"], r["variant"], flag),
                    {"time": [], "flops": [], "ms": []},
                )
                entry["time"].append(r["time_ratio"])
                entry["ms"].append(r["median_s"] * 1e3)
                if r["flops_ratio"] is not None:
                    entry["flops"].append(r["flops_ratio"])
    return out


def _x_axis(ax: Any, values: Sequence[float]) -> None:
    low, high = min([*values, 1.0]), max([*values, 1.0])
    ax.set_xscale("log")
    ax.set_xlim(low / 1.15, high * 1.15)
    ticks: list[float] = []
    gap = math.log(high * 1.15 / (low / 1.15)) / 9  # at most about nine labels
    for t in TICKS:
        if low / 1.15 <= t <= high * 1.15 and (not ticks or math.log(t / ticks[-1]) >= gap):
            ticks.append(t)
    if 1 not in ticks:
        ticks = sorted({*ticks, 1})
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.axvline(1.0, color="black", lw=0.8, zorder=0)
    ax.grid(axis="x", color="#dddddd", lw=0.6, zorder=0)


def figure(runs: Sequence[dict[str, Any]]) -> Any:
    """The chart: one row of panels per model, step time and FLOPs as multiples of the split."""
    data = collect(runs)
    first = runs[0]
    models = list(first["models"])
    variants = list(first["descriptions"])
    order = {name: i for i, name in enumerate(variants)}
    heights = []
    for model in models:
        heights.append(len({v for (m, _, v, _) in data if m == model}) + 1.5)
    fig, axes = plt.subplots(
        len(models),
        2,
        figsize=(9, 0.24 * sum(heights) + 1.6),
        gridspec_kw={"height_ratios": heights, "width_ratios": (3, 2)},
        squeeze=False,
    )
    flag_seen = False
    for row, model in enumerate(models):
        names = sorted({v for (m, _, v, _) in data if m == model}, key=order.__getitem__)
        settings = list(dict.fromkeys(s for (m, s, _, _) in data if m == model))
        y_of = {name: len(names) - 1 - i for i, name in enumerate(names)}
        for col, metric in enumerate(("time", "flops")):
            ax = axes[row][col]
            shown: list[float] = []
            for (m, setting, name, flag), entry in data.items():
                values = entry[metric]
                if m != model or not values or (flag and metric == "flops"):
                    continue
                color, marker = STYLES.get(setting, ("#9467bd", "v"))
                k = settings.index(setting)
                y = y_of[name] + 0.3 * (k - (len(settings) - 1) / 2) / max(len(settings) - 1, 1)
                y += 0.12 if flag else 0.0
                low, mid, high = _range(values)
                shown += [low, high]
                ax.plot([low, high], [y, y], color=color, lw=2.2, solid_capstyle="butt", zorder=2)
                face = "white" if flag else color
                ax.plot(mid, y, marker=marker, ms=5, color=color, mfc=face, mew=1.2, zorder=3)
                flag_seen |= flag
            _x_axis(ax, shown)
            ax.set_ylim(-0.7, len(names) - 0.3)
            ax.set_yticks(list(y_of.values()))
            ax.set_yticklabels(list(y_of) if col == 0 else [], fontsize=8)
            ax.tick_params(axis="x", labelsize=8)
            what = "step time" if metric == "time" else "FLOPs (XLA)"
            short = first["models"][model].split(",")[0]
            ax.set_title(f"{short}: {what} × split", fontsize=9, loc="left")
    handles = [
        Line2D([], [], color=c, marker=mk, lw=2.2, ms=5, label=name)
        for name, (c, mk) in STYLES.items()
        if any(s == name for (_, s, _, _) in data)
    ]
    if flag_seen:
        handles.append(
            Line2D(
                [],
                [],
                color="#2ca02c",
                marker="^",
                mfc="white",
                lw=2.2,
                ms=5,
                label="GP under --xla_cpu_enable_concurrency_optimized_scheduler=false",
            )
        )
    n = len(runs)
    fig.legend(handles=handles, loc="upper center", ncol=3, fontsize=8, frameon=False)
    fig.text(
        0.5,
        0.005,
        f"Dot: median over {n} run{'s' if n > 1 else ''}; line: lowest to highest run. "
        f"Each run's time is the median of its timed steps. Log scale; 1× is the split.",
        ha="center",
        fontsize=7.5,
    )
    fig.tight_layout(rect=(0, 0.02, 1, 1 - 0.45 / fig.get_figheight()))
    return fig


def svg(runs: Sequence[dict[str, Any]]) -> str:
    """The chart as SVG text, the same bytes for the same runs."""
    fig = figure(runs)
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "flax_freeze", "svg.fonttype": "none"}):
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    plt.close(fig)
    return buffer.getvalue()


def _fmt(values: Sequence[float], unit: str = "×", digits: int = 2) -> str:
    low, _, high = _range(values)
    a, b = f"{low:.{digits}f}", f"{high:.{digits}f}"
    return f"{a}{unit}" if a == b else f"{a}–{b}{unit}"


def summary(runs: Sequence[dict[str, Any]]) -> str:
    """The narrow table the docs show beside the chart: ranges over the runs."""
    data = collect(runs)
    first = runs[0]
    dates = sorted({run["date"] for run in runs})
    meta = first["machine"]
    lines = [
        f"{len(runs)} run{'s' if len(runs) > 1 else ''} ({', '.join(dates)}) on {meta['cpu']} "
        f"({meta['cores']} cores), JAX {meta['jax']} ({meta['jax_backend']}), "
        f"Flax {meta['flax']}, optax {meta['optax']}. Each cell is the lowest–highest of "
        "the runs' values (one value where all runs agree to the digits shown).",
        "",
        "| model | setting | split, ms | flax_freeze | @nnx.jit | multi_transform + clip, FLOPs |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for model, title in first["models"].items():
        settings = list(dict.fromkeys(s for (m, s, _, f) in data if m == model and not f))
        for setting in settings:

            def cell(variant: str, metric: str = "time", *, _k: tuple = (model, setting)) -> str:
                entry = data.get((*_k, variant, False))
                return "—" if entry is None or not entry[metric] else _fmt(entry[metric])

            split = data[(model, setting, SPLIT, False)]
            digits = 3 if max(split["ms"]) < 1 else 1
            lines.append(
                f"| {title.split(',')[0]} | {setting} | {_fmt(split['ms'], '', digits)} "
                f"| {cell(FLAX_FREEZE)} | {cell(NNX_JIT)} | {cell(MULTI_CLIP, 'flops')} |"
            )
    flagged = [k for k in data if k[3]]
    if flagged:
        flag = (first.get("gp_sequential") or {}).get("xla_flags", "the flag")
        lines += [
            "",
            f"GP step times, default XLA flags → `{flag}`:",
            "",
            "| setting | split, µs | split + step count | flax_freeze |",
            "|---|--:|--:|--:|",
        ]
        for setting in dict.fromkeys(s for (_, s, _, _) in flagged):
            cells = []
            for variant in (SPLIT, SPLIT_COUNT, FLAX_FREEZE):
                default = data.get(("gp", setting, variant, False))
                under = data.get(("gp", setting, variant, True))
                if default is None or under is None:
                    cells.append("—")
                elif variant == SPLIT:
                    us = [v * 1e3 for v in default["ms"]], [v * 1e3 for v in under["ms"]]
                    cells.append(f"{_fmt(us[0], '', 0)} → {_fmt(us[1], '', 0)}")
                else:
                    cells.append(f"{_fmt(default['time'])} → {_fmt(under['time'])}")
            lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def host_summary(runs: Sequence[dict[str, Any]]) -> str:
    """The host time per call of ``train_step_host.py`` runs, as ranges over the runs.

    The table gives each run's lower quartile: on a shared 2-core machine the
    step running on the other core slows some calls of every way alike, which
    moves medians far more than the calls' own cost; the medians follow it.
    """
    ways = ("TrainStep", "bare jax.jit", "@nnx.jit", "nnx.cached_partial")
    by_model: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        for r in run["results"]:
            by_model.setdefault(r["model"], []).append(r)
    dates = sorted({run["machine"].get("date", "?") for run in runs})
    lines = [
        f"{len(runs)} run{'s' if len(runs) > 1 else ''} ({', '.join(dates)}), "
        f"{runs[0]['machine']['cores']} cores; the lower quartile of each run's host times "
        "per call, lowest–highest over the runs.",
        "",
        "| model | " + " | ".join(ways) + " | TrainStep / bare | @nnx.jit / TrainStep |",
        "|---|" + "--:|" * (len(ways) + 2),
    ]
    medians = []
    for results in by_model.values():
        cells = []
        for way in ways:
            us = [r["p25_us"][way] for r in results if way in r["p25_us"]]
            cells.append("—" if not us else _fmt([u / 1e3 for u in us], " ms", 2))
        bare = _fmt([r["p25_train_step_over_bare"] for r in results])
        nnx = _fmt([r["p25_nnx_jit_over_train_step"] for r in results], "×", 1)
        title = results[0]["title"].split(",")[0]
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {bare} | {nnx} |")
        medians.append(
            f"{title}: TrainStep / bare {_fmt([r['train_step_over_bare'] for r in results])}, "
            f"@nnx.jit / TrainStep {_fmt([r['nnx_jit_over_train_step'] for r in results], '×', 1)}"
        )
    memory = []
    for results in by_model.values():
        totals = {
            (r["memory"]["TrainStep"]["total"], r["memory"]["bare jax.jit"]["total"])
            for r in results
        }
        (mine, bare_total), *more = sorted(totals)
        same = "=" if mine == bare_total and not more else "≠"
        memory.append(f"{results[0]['model']} {mine:,} B {same} {bare_total:,} B")
    lines += [
        "",
        "Ratios of the medians: " + "; ".join(medians) + ".",
        "",
        "XLA memory of the compiled step, TrainStep and bare split: " + "; ".join(memory) + ".",
    ]
    return "\n".join(lines) + "\n"


def main(
    paths: Sequence[Path],
    *,
    host_paths: Sequence[Path] | None = None,
    svg_path: Path = SVG,
    summary_path: Path = SUMMARY,
    host_summary_path: Path = HOST_SUMMARY,
) -> None:
    """Writes the chart and the summary tables made from the runs at ``paths``.

    ``host_paths`` are ``train_step_host.json`` files; by default those next to
    the ``step.json`` files. Without any, no host table is written.
    """
    runs = load(paths)
    svg_path.parent.mkdir(parents=True, exist_ok=True)
    svg_path.write_text(svg(runs))
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(summary(runs))
    written = [svg_path, summary_path]
    if host_paths is None:
        host_paths = [p.parent / "train_step_host.json" for p in map(Path, paths)]
        host_paths = [p for p in host_paths if p.exists()]
    if host_paths:
        hosts = [json.loads(Path(p).read_text()) for p in host_paths]
        host_summary_path.write_text(host_summary(hosts))
        written.append(host_summary_path)
    print(f"wrote {', '.join(map(str, written))} from {len(runs)} run(s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="step.json of each run")
    parser.add_argument("--svg", type=Path, default=SVG, help=f"default: {SVG.relative_to(ROOT)}")
    parser.add_argument(
        "--summary", type=Path, default=SUMMARY, help=f"default: {SUMMARY.relative_to(ROOT)}"
    )
    parser.add_argument(
        "--host",
        nargs="+",
        type=Path,
        default=None,
        help="train_step_host.json of each run (default: those next to the step.json files)",
    )
    args = parser.parse_args()
    main(args.paths, host_paths=args.host, svg_path=args.svg, summary_path=args.summary)
