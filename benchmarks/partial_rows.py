"""Benchmark: a training step in which only k rows of an embedding table train.

The model: an ``nnx.Embed`` table of V rows of width d, a dense layer
(tanh) and a small classification head per token, trained with
``optax.adamw`` (weight decay on) on a batch of token ids, of which a share
are the k "new" tokens whose rows train. The dense layer and the head are
frozen in every variant, so the variants differ only in how they train
the rows. Four ways to write one jitted step (loss, gradient, adamw update):

* **whole**: the whole table trains: gradient and adamw state for V x d;
* **masked update**: the gradient of the whole table, adamw over V x d, and
  its update zeroed outside the k rows (``jnp.where(row_mask, update, 0)``):
  what users write today. The mask is on the update, after adamw, so that
  weight decay spares the frozen rows too (a mask on the gradient would
  let weight decay move them);
* **flax_freeze rows**: ``ff.unfreeze(model, "embed/embedding",
  where=ff.Rows(ids))``, ``ff.Optimizer`` and ``ff.TrainStep``: gradient and
  adamw state for the k rows only; ``nnx.Embed`` looks tokens up in the
  frozen table and in the k rows apart;
* **hand split**: the ideal a lookup-aware split could reach: the k rows a
  separate (k, d) array and the lookup written as
  ``jnp.where(is_new[tokens], new_rows[pos[tokens]], table[tokens])``, so
  that the gradient is scattered into k rows.

Every variant is one ``jax.jit`` over arrays (``ff.TrainStep`` is one too),
its trainable arrays and optimizer state donated and the frozen ones passed
undonated. For each k it reports XLA's FLOPs and bytes accessed
(``cost_analysis()``), its temporary, argument and output bytes
(``memory_analysis()``), the optimizer state's bytes (the optax state), and
the median step time as a ratio to "whole", all variants timed in
interleaved rounds (a fresh random order each round). It checks that one
step from the same start gives the k rows the same update in every variant
as in "masked update" (relative L2 difference <= 1e-3; "whole" too) and leaves
every other row bit-identical (all but "whole"). It reads the optimized HLO
of each step (``compiled.as_text()``) and says what XLA does for the gradient
of the table: which buffers of V x d it makes, and its scatters and gathers.

    python benchmarks/partial_rows.py [--quick] [--ks 16,256,4096] [--rounds 15] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import gc
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from step import _bytes, machine, time_interleaved  # pyright: ignore[reportMissingImports]

import flax_freeze as ff
from _variants import _Carried  # pyright: ignore[reportMissingImports]

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.1
#: Relative L2 difference allowed between the k rows' update and the masked update's.
UPDATE_RTOL = 1e-3
#: Steps run before timing: the checked step, then one more so every timed step is warm.
WARMUP_STEPS = 2
RESULTS = Path(__file__).resolve().parent / "results"
STEM = "partial-rows"

WHOLE = "whole"
MASKED = "masked update"
ROWS = "flax_freeze rows"
HAND = "hand split"
VARIANTS = (WHOLE, MASKED, ROWS, HAND)

DESCRIPTIONS: dict[str, str] = {
    WHOLE: "the whole table trains: gradient and adamw state for V x d (the baseline)",
    MASKED: "gradient of the whole table, adamw over V x d, its update zeroed outside the k "
    "rows (`jnp.where(row_mask[:, None], update, 0)`, after adamw, so weight decay spares "
    "the frozen rows): what users write today",
    ROWS: '`ff.unfreeze(model, "embed/embedding", where=ff.Rows(ids))` + `ff.Optimizer` + '
    "`ff.TrainStep`: gradient and adamw state for the k rows; `nnx.Embed` looks tokens up in "
    "the frozen table and in the k rows apart",
    HAND: "hand-written lookup-aware split: the k rows a separate (k, d) array, the lookup "
    "`jnp.where(is_new[tokens], new_rows[pos[tokens]], table[tokens])`",
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The model, the batch, the numbers of trainable rows and how many rounds to time."""

    vocab: int  # V, rows of the table
    dim: int  # d, its width
    classes: int  # the head's outputs per token
    batch: int
    seq: int
    ks: tuple[int, ...]  # the numbers of trainable rows, one run each
    rounds: int  # timed steps per variant, one per round
    new_share: float = 0.1  # share of the batch's tokens that are the k new ones


FULL = Sizes(vocab=32768, dim=256, classes=16, batch=64, seq=128, ks=(16, 256, 4096), rounds=20)
QUICK = Sizes(vocab=256, dim=16, classes=4, batch=4, seq=16, ks=(3, 32), rounds=2)


class TokenModel(nnx.Module):
    """An embedding table, a dense tanh layer and a per-token classification head."""

    def __init__(self, sizes: Sizes, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(sizes.vocab, sizes.dim, rngs=rngs)
        self.dense = nnx.Linear(sizes.dim, sizes.dim, rngs=rngs)
        self.head = nnx.Linear(sizes.dim, sizes.classes, rngs=rngs)

    def body(self, x: jax.Array) -> jax.Array:
        """The logits of embedded tokens ``x`` (batch, seq, d)."""
        return self.head(jnp.tanh(self.dense(x)))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.body(self.embed(tokens))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def loss_fn(model: TokenModel, tokens: jax.Array, labels: jax.Array) -> jax.Array:
    return cross_entropy(model(tokens), labels)


def adamw() -> optax.GradientTransformation:
    return optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)


def build(sizes: Sizes) -> TokenModel:
    """The model, the same parameters in every variant."""
    return TokenModel(sizes, nnx.Rngs(0))


def data(sizes: Sizes, k: int, seed: int = 0) -> tuple[np.ndarray, jax.Array, jax.Array]:
    """The k trainable row ids (sorted) and a batch ``(tokens, labels)``.

    A share ``new_share`` of the tokens are drawn from the k ids, the rest from all V.
    """
    rng = np.random.default_rng(seed + k)
    ids = np.sort(rng.choice(sizes.vocab, size=k, replace=False))
    shape = (sizes.batch, sizes.seq)
    tokens = rng.integers(0, sizes.vocab, shape)
    new = rng.random(shape) < sizes.new_share
    tokens[new] = rng.choice(ids, size=int(new.sum()))
    labels = rng.integers(0, sizes.classes, shape)
    return ids, jnp.asarray(tokens, jnp.int32), jnp.asarray(labels, jnp.int32)


def _is_table(path: tuple[Any, ...], _: Any) -> bool:
    return tuple(map(str, path)) == ("embed", "embedding")


@dataclasses.dataclass
class Built:
    """One variant, built and ready to run on a batch ``(tokens, labels)``."""

    name: str
    run: Callable[[Any, Any], Any]  # one step; returns the loss
    lower: Callable[[Any, Any], Any]  # the jax ``Lowered`` step
    table: Callable[[], np.ndarray]  # the whole table now
    rest: Callable[[], dict[str, np.ndarray]]  # the other parameters now, by path
    opt_state: Callable[[], Any]  # the optax state now


def _arrays(state: nnx.State) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(state)
    return {"/".join(map(str, p)): np.asarray(v.get_raw_value()) for p, v in flat}


class _Parts:
    """The model split: its graph, the table (a raw array) and the other parameters."""

    def __init__(self, sizes: Sizes) -> None:
        self.graphdef, table_state, self.rest = nnx.split(build(sizes), _is_table, ...)
        [self.table], self.treedef = jax.tree.flatten(table_state)

    def model(self, table: jax.Array, rest: nnx.State) -> TokenModel:
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, [table]), rest)


def whole_variant(sizes: Sizes, ids: np.ndarray, *, masked: bool) -> Built:
    """The gradient of the whole table and adamw over it; ``masked``: the update zeroed off ids."""
    parts = _Parts(sizes)
    tx = adamw()
    row_mask = np.zeros(sizes.vocab, bool)
    row_mask[ids] = True

    def step(carry: Any, rest: nnx.State, mask: jax.Array, tokens: jax.Array, labels: Any) -> Any:
        table, opt_state = carry

        def loss(table: jax.Array) -> jax.Array:
            return loss_fn(parts.model(table, rest), tokens, labels)

        value, grad = jax.value_and_grad(loss)(table)
        update, opt_state = tx.update(grad, opt_state, table)
        if masked:
            update = jnp.where(mask[:, None], cast(jax.Array, update), 0)
        return value, (optax.apply_updates(table, update), opt_state)

    carried = _Carried(step, (parts.table, tx.init(parts.table)), parts.rest, jnp.asarray(row_mask))
    return Built(
        name=MASKED if masked else WHOLE,
        run=carried.run,
        lower=carried.lower,
        table=lambda: np.asarray(carried.carry[0]),
        rest=lambda: _arrays(parts.rest),
        opt_state=lambda: carried.carry[1],
    )


def rows_variant(sizes: Sizes, ids: np.ndarray) -> Built:
    """flax_freeze: the k rows unfrozen with ``where=ff.Rows(ids)``, run by ``ff.TrainStep``."""
    model = build(sizes)
    ff.freeze(model)
    ff.unfreeze(model, "embed/embedding", where=ff.Rows(ids))
    optimizer = ff.Optimizer(model, adamw())
    step = ff.TrainStep(model, optimizer, loss_fn)

    def rest() -> dict[str, np.ndarray]:
        return {p: a for p, a in _arrays(nnx.state(model)).items() if not p.startswith("embed/")}

    return Built(
        name=ROWS,
        run=step,
        lower=step.lower,
        table=lambda: np.asarray(model.embed.embedding),
        rest=rest,
        # The optax state only: ff.Optimizer's own step count is left out, as in step.py.
        opt_state=lambda: nnx.as_pure(optimizer.opt_state),
    )


def hand_variant(sizes: Sizes, ids: np.ndarray) -> Built:
    """The k rows a (k, d) array of their own, looked up beside the frozen table."""
    parts = _Parts(sizes)
    tx = adamw()
    is_new = np.zeros(sizes.vocab, bool)
    is_new[ids] = True
    pos = np.zeros(sizes.vocab, np.int32)
    pos[ids] = np.arange(len(ids))
    new_rows = jnp.take(parts.table, jnp.asarray(ids), axis=0)

    def lookup(new: jax.Array, table: jax.Array, is_new: jax.Array, pos: jax.Array, tokens: Any):
        old = jnp.take(table, tokens, axis=0)
        fresh = jnp.take(new, pos[tokens], axis=0)
        return jnp.where(is_new[tokens][..., None], fresh, old)

    def step(carry: Any, table: jax.Array, rest: nnx.State, is_new: Any, pos: Any, tokens, labels):
        new, opt_state = carry

        def loss(new: jax.Array) -> jax.Array:
            model = parts.model(table, rest)
            return cross_entropy(model.body(lookup(new, table, is_new, pos, tokens)), labels)

        value, grad = jax.value_and_grad(loss)(new)
        update, opt_state = tx.update(grad, opt_state, new)
        return value, (optax.apply_updates(new, update), opt_state)

    table = parts.table
    consts = (table, parts.rest, jnp.asarray(is_new), jnp.asarray(pos))
    carried = _Carried(step, (new_rows, tx.init(new_rows)), *consts)
    return Built(
        name=HAND,
        run=carried.run,
        lower=carried.lower,
        table=lambda: np.asarray(table.at[ids].set(carried.carry[0])),
        rest=lambda: _arrays(parts.rest),
        opt_state=lambda: carried.carry[1],
    )


def gradient_mask_moves_frozen_rows(sizes: Sizes, ids: np.ndarray, tokens, labels) -> float:
    """One step with the *gradient* masked instead of the update: the largest frozen row change.

    adamw adds weight decay after the gradient, so a gradient mask leaves the
    frozen rows decaying: ``lr * weight_decay * w`` per step.
    """
    parts = _Parts(sizes)
    tx = adamw()
    mask = np.zeros((sizes.vocab, 1), bool)
    mask[ids] = True

    @jax.jit
    def step(table: jax.Array, rest: nnx.State) -> Any:
        grad = jax.grad(lambda t: loss_fn(parts.model(t, rest), tokens, labels))(table)
        update, _ = tx.update(jnp.where(mask, grad, 0), tx.init(table), table)
        return optax.apply_updates(table, update)

    before = np.asarray(parts.table)
    after = np.asarray(step(parts.table, parts.rest))
    return float(np.abs(np.delete(after - before, ids, 0)).max())


# ----------------------------------------------------------------------------- HLO

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+) = (?P<dtype>\w+)\[(?P<shape>[\d,]*)\]\S* "
    r"(?P<op>[\w\-]+)\((?P<args>[^)]*)\)(?P<rest>.*)$"
)
_COMPUTATION = re.compile(r"^(?P<entry>ENTRY )?%(?P<name>[\w.\-]+) .*\{\s*$")


def hlo_instructions(text: str) -> list[dict[str, Any]]:
    """The array-valued instructions of an optimized HLO module, with operand shapes.

    Each: ``name``, ``op``, ``dtype``, ``shape``, ``operands`` (shapes, None
    for what is not an instruction), ``computation``, ``entry`` (whether it is
    in the entry computation), ``root`` (root op of a fusion's computation),
    ``backward`` (whether JAX's ``op_name`` says it comes from a transpose).
    """
    found: list[dict[str, Any]] = []
    shapes: dict[str, tuple[int, ...]] = {}
    roots: dict[str, str] = {}
    computation, entry = "", False
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation, entry = header["name"], bool(header["entry"])
            continue
        m = _INSTRUCTION.match(line)
        if m is None:
            continue
        shape = tuple(int(s) for s in m["shape"].split(",") if s)
        shapes[m["name"]] = shape
        if line.lstrip().startswith("ROOT"):
            roots[computation] = m["op"]
        op_name = re.search(r'op_name="([^"]*)"', m["rest"])
        calls = re.search(r"calls=%([\w.\-]+)", m["rest"])
        found.append(
            {
                "name": m["name"],
                "op": m["op"],
                "dtype": m["dtype"],
                "shape": shape,
                "args": [a.strip().lstrip("%") for a in m["args"].split(",") if a.strip()],
                "computation": computation,
                "entry": entry,
                "calls": calls[1] if calls else None,
                "op_name": op_name[1] if op_name else "",
            }
        )
    for ins in found:
        ins["operands"] = [shapes.get(a) for a in ins.pop("args")]
        ins["root"] = roots.get(ins.pop("calls") or "", None)
        ins["backward"] = "transpose(" in ins.pop("op_name")
    return found


def hlo_summary(text: str, vocab: int, dim: int, k: int) -> dict[str, Any]:
    """What a step's HLO does with the table: its V x d buffers, scatters and gathers.

    Only scatters into, and gathers from, arrays of shape (V, d) or (k, d)
    are kept. A scatter's rows are its updates' leading dimension, a
    gather's its result's.
    """
    table, part = (vocab, dim), (k, dim)
    instructions = hlo_instructions(text)
    buffers: list[str] = []
    scatters: list[dict[str, Any]] = []
    gathers: list[dict[str, Any]] = []
    for ins in instructions:
        if ins["entry"] and ins["shape"] == table and ins["op"] not in ("parameter", "bitcast"):
            what = ins["op"] if ins["op"] != "fusion" else ins["root"] or "fusion"
            buffers.append(what)
        direction = "backward" if ins["backward"] else "forward"
        if ins["op"] == "scatter" and ins["shape"] in (table, part):
            updates = ins["operands"][2] if len(ins["operands"]) > 2 else None
            scatters.append(
                {
                    "into": list(ins["shape"]),
                    "rows": None if not updates else updates[0],
                    "add": "scatter-add" in ins["name"] or ins["backward"],
                    "direction": direction,
                }
            )
        if ins["op"] == "gather" and ins["operands"] and ins["operands"][0] in (table, part):
            gathers.append(
                {"from": list(ins["operands"][0]), "rows": ins["shape"][0], "direction": direction}
            )
    return {
        "table_buffers": buffers,
        "scatters": scatters,
        "gathers": gathers,
        "op_counts": {
            op: sum(1 for i in instructions if i["op"] == op)
            for op in ("scatter", "gather", "broadcast", "copy", "fusion")
        },
    }


def _shape(s: Sequence[int]) -> str:
    return "[" + ",".join(map(str, s)) + "]"


def describe_hlo(summary: dict[str, Any]) -> str:
    """One line: the V x d buffers a step makes, then its scatters and gathers, in order."""
    counts = collections.Counter(summary["table_buffers"])
    made = ", ".join(f"{op} ×{n}" for op, n in counts.items()) or "none"
    parts = [f"V×d results: {made}"]
    for s in summary["scatters"]:
        kind = "scatter-add" if s["add"] else "scatter"
        parts.append(f"{s['direction']} {kind} of {s['rows']} rows into {_shape(s['into'])}")
    for g in summary["gathers"]:
        parts.append(f"{g['direction']} gather of {g['rows']} rows from {_shape(g['from'])}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- run


def _cost(compiled: Any) -> dict[str, Any]:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    memory = compiled.memory_analysis()
    return {
        "flops": float(analysis["flops"]),
        "bytes_accessed": float(analysis["bytes accessed"]),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "alias_bytes": int(memory.alias_size_in_bytes),
    }


def check(
    name: str,
    table: np.ndarray,
    rest: dict[str, np.ndarray],
    reference: np.ndarray,
    init_table: np.ndarray,
    init_rest: dict[str, np.ndarray],
    ids: np.ndarray,
) -> dict[str, Any]:
    """One step's table against the masked update's (the k rows) and the start (the others).

    The k rows' update (new minus initial) must match the masked update's within
    a relative L2 difference of ``UPDATE_RTOL``; every other row (all but in
    "whole", where the whole table trains) and every other parameter must be
    bit-identical to the start.
    """
    update = table[ids].astype(np.float64) - init_table[ids]
    expected = reference[ids].astype(np.float64) - init_table[ids]
    rel = float(np.linalg.norm(update - expected) / max(np.linalg.norm(expected), 1e-30))
    frozen_identical = bool(np.array_equal(np.delete(table, ids, 0), np.delete(init_table, ids, 0)))
    rest_identical = set(rest) == set(init_rest) and all(
        np.array_equal(rest[p], init_rest[p]) for p in rest
    )
    matches = rel <= UPDATE_RTOL
    trains_all = name == WHOLE
    why = ""
    if not matches:
        why = f"update of the k rows differs (relative L2 {rel:.2e})"
    elif not rest_identical:
        why = "a frozen parameter moved"
    elif not frozen_identical and not trains_all:
        why = "frozen rows moved"
    elif trains_all:
        why = "every row trains, by design"
    ok = matches and rest_identical and (frozen_identical or trains_all)
    return {
        "ok": ok,
        "why": why,
        "update_rel_l2": rel,
        "frozen_rows_identical": frozen_identical,
        "other_params_identical": rest_identical,
    }


def run_k(sizes: Sizes, k: int) -> dict[str, Any]:
    """Builds, checks, inspects and times the four variants for k trainable rows."""
    ids, tokens, labels = data(sizes, k)
    init_model = build(sizes)
    init_table = np.asarray(init_model.embed.embedding[...])
    init_rest = {
        p: a for p, a in _arrays(nnx.state(init_model)).items() if not p.startswith("embed/")
    }
    built = [
        whole_variant(sizes, ids, masked=False),
        whole_variant(sizes, ids, masked=True),
        rows_variant(sizes, ids),
        hand_variant(sizes, ids),
    ]
    rows: dict[str, dict[str, Any]] = {}
    tables: dict[str, np.ndarray] = {}
    rests: dict[str, dict[str, np.ndarray]] = {}
    for variant in built:
        compiled = variant.lower(tokens, labels).compile()
        hlo = hlo_summary(compiled.as_text(), sizes.vocab, sizes.dim, k)
        loss = float(variant.run(tokens, labels))
        tables[variant.name], rests[variant.name] = variant.table(), variant.rest()
        rows[variant.name] = {
            "k": k,
            "variant": variant.name,
            **_cost(compiled),
            "opt_state_bytes": sum(int(a.nbytes) for a in jax.tree.leaves(variant.opt_state())),
            "loss": loss,
            "hlo": hlo,
            "hlo_text": describe_hlo(hlo),
        }
        for _ in range(WARMUP_STEPS - 1):
            jax.block_until_ready(variant.run(tokens, labels))

    def waited(variant: Built) -> Callable[[], Any]:
        return lambda: jax.block_until_ready(variant.run(tokens, labels))

    timings = time_interleaved(
        {v.name: waited(v) for v in built}, rounds=sizes.rounds, steps_per_round=1, seed=k
    )
    base = rows[WHOLE]
    base_time = float(np.median(timings[WHOLE].times))
    for name, timing in timings.items():
        row = rows[name]
        median = float(np.median(timing.times))
        row.update(
            steps=len(timing.times),
            median_s=median,
            time_ratio=median / base_time,
            flops_ratio=row["flops"] / base["flops"],
            check=check(
                name, tables[name], rests[name], tables[MASKED], init_table, init_rest, ids
            ),
        )
    return {
        "k": k,
        "ids_head": ids[:8].tolist(),
        "new_tokens_in_batch": int(np.isin(np.asarray(tokens), ids).sum()),
        "gradient_mask_max_frozen_change": gradient_mask_moves_frozen_rows(
            sizes, ids, tokens, labels
        ),
        "rows": list(rows.values()),
    }


def conclusion(result: dict[str, Any]) -> str:
    """A paragraph of the findings, with the numbers of the run (the middle k)."""
    sizes = result["sizes"]
    runs = result["runs"]
    run = runs[len(runs) // 2]
    k, v, d = run["k"], sizes["vocab"], sizes["dim"]
    r = {row["variant"]: row for row in run["rows"]}
    share = (r[ROWS]["opt_state_bytes"] - 4) / max(r[WHOLE]["opt_state_bytes"] - 4, 1)
    times = ", ".join(f"{x['k']}: {_ratios(x)}" for x in runs)
    rows_hlo = r[ROWS]["hlo"]
    zero = any("broadcast" in b for b in rows_hlo["table_buffers"])
    back_add = [s for s in rows_hlo["scatters"] if s["direction"] == "backward" and s["add"]]
    back_gather = [
        g for g in rows_hlo["gathers"] if g["direction"] == "backward" and g["from"] == [v, d]
    ]
    if zero and back_add and back_gather:
        hlo = (
            f"For the gradient of the assembled table XLA does materialise it whole: a {v}×{d} "
            f"zero buffer (a broadcast), a scatter-add of the batch's "
            f"{back_add[0]['rows']} token rows into it, then a gather of the {k} trainable "
            f"rows out of it: {len(rows_hlo['table_buffers'])} V×d results per step "
            f"({', '.join(rows_hlo['table_buffers'])}), "
            f"{_bytes(r[ROWS]['temp_bytes'])} of temporaries in all. "
            + (
                "The forward pass builds no V×d array: the lookup reads the select of the "
                "frozen table and the k rows (spread out to every row) fused."
                if not any("copy" in b for b in rows_hlo["table_buffers"])
                else "The forward pass also copies the frozen table."
            )
        )
    elif not rows_hlo["table_buffers"]:
        back_rows = [s for s in rows_hlo["scatters"] if s["direction"] == "backward"]
        hlo = (
            "For flax_freeze rows XLA builds no V×d array: nnx.Embed looks tokens up in the "
            f"frozen table and in the {k} rows apart, and the gradient is a scatter-add of the "
            f"batch's {back_rows[0]['rows'] if back_rows else '?'} token rows into {k}×{d}, "
            "as in the hand split."
        )
    else:
        hlo = f"The HLO of flax_freeze rows: {r[ROWS]['hlo_text']}."
    return (
        f"With k = {k} of V = {v} rows (d = {d}), flax_freeze rows keeps adamw state for the "
        f"k rows only: {r[ROWS]['opt_state_bytes']:,} B against {r[WHOLE]['opt_state_bytes']:,} B "
        f"for the whole table and for the masked update ({share:.4f} of it, k/V = {k / v:.4f}). "
        f"XLA FLOPs: whole {r[WHOLE]['flops']:.3g}, masked update {r[MASKED]['flops']:.3g}, "
        f"flax_freeze rows {r[ROWS]['flops']:.3g}, hand split {r[HAND]['flops']:.3g}; temporary "
        f"memory {_bytes(r[WHOLE]['temp_bytes'])}, {_bytes(r[MASKED]['temp_bytes'])}, "
        f"{_bytes(r[ROWS]['temp_bytes'])}, {_bytes(r[HAND]['temp_bytes'])}. {hlo} The hand split "
        f"never makes a V×d array either (its gradient is a scatter-add into {k}×{d}): the "
        f"lookup written by hand for the split. Median step time × whole (masked update, "
        f"flax_freeze rows, hand split) by k: {times}. A mask on the gradient instead of the "
        f"update moves frozen rows by up to {run['gradient_mask_max_frozen_change']:.2e} per "
        f"step (adamw's weight decay {WEIGHT_DECAY})."
    )


def _ratios(run: dict[str, Any]) -> str:
    r = {row["variant"]: row for row in run["rows"]}
    return "/".join(f"{r[n]['time_ratio']:.2f}" for n in (MASKED, ROWS, HAND))


def markdown(result: dict[str, Any]) -> str:
    """The results as markdown: the table, the HLO findings, the conclusion and a legend."""
    meta, s = result["machine"], result["sizes"]
    lines = [
        f"Measured {result['date']} on {meta['cpu']} ({meta['cores']} cores), "
        f"JAX {meta['jax']} ({meta['jax_backend']}), Flax {meta['flax']}, optax {meta['optax']}. "
        f"Table V = {s['vocab']} × d = {s['dim']}, a {s['dim']}×{s['dim']} tanh layer and a "
        f"{s['classes']}-class head per token (both frozen), batch {s['batch']}×{s['seq']} tokens "
        f"({s['new_share']:.0%} of them new), adamw (lr {LEARNING_RATE}, weight decay "
        f"{WEIGHT_DECAY}); median of {s['rounds']} interleaved steps per variant"
        + (". Quick smoke run: tiny sizes, few steps." if result["quick"] else "."),
        "",
        "| k | variant | GFLOP | FLOPs × whole | MB accessed | temp | optimizer state "
        "| median ms | time × whole | check |",
        "|--:|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for run in result["runs"]:
        for r in run["rows"]:
            c = r["check"]
            shown = f"ok ({c['why']})" if c["ok"] and c["why"] else "ok" if c["ok"] else c["why"]
            shown = shown if c["ok"] else f"**{shown}**"
            lines.append(
                f"| {r['k']} | {r['variant']} | {r['flops'] / 1e9:.4f} | {r['flops_ratio']:.3f}× "
                f"| {r['bytes_accessed'] / 1e6:,.1f} | {_bytes(r['temp_bytes'])} "
                f"| {_bytes(r['opt_state_bytes'])} | {r['median_s'] * 1e3:,.2f} "
                f"| {r['time_ratio']:.3f}× | {shown} |"
            )
    lines += ["", "### What XLA does with the table (optimized HLO)", ""]
    for run in result["runs"]:
        for r in run["rows"]:
            lines.append(f"- k = {r['k']}, **{r['variant']}**: {r['hlo_text']}.")
    lines += ["", "### Conclusion", "", result["conclusion"], "", "### Variants", ""]
    lines += [f"- **{name}**: {text}" for name, text in DESCRIPTIONS.items()]
    return "\n".join(lines) + "\n"


def main(
    *,
    quick: bool = False,
    ks: Sequence[int] | None = None,
    rounds: int | None = None,
    out: Path | None = None,
) -> dict[str, Any]:
    """Runs the benchmark, prints the table, writes ``partial-rows.{json,md}`` to ``out``.

    Args:
        quick: tiny sizes and a few steps, for a smoke run.
        ks: the numbers of trainable rows (default: the sizes' own).
        rounds: timed steps per variant (default: the sizes' own).
        out: folder for the JSON and markdown; nothing is written when None.

    Returns:
        The results, as written to the JSON.

    Raises:
        ValueError: if a k is not in ``[1, V)``.
    """
    sizes = QUICK if quick else FULL
    sizes = dataclasses.replace(
        sizes,
        ks=sizes.ks if ks is None else tuple(ks),
        rounds=sizes.rounds if rounds is None else rounds,
    )
    bad = [k for k in sizes.ks if not 1 <= k < sizes.vocab]
    if bad:
        raise ValueError(f"`ks` {bad} must be in [1, {sizes.vocab}) for V = {sizes.vocab}.")
    load_before = os.getloadavg()
    started = time.perf_counter()
    runs = []
    for k in sizes.ks:
        t0 = time.perf_counter()
        runs.append(run_k(sizes, k))
        gc.collect()
        print(f"k = {k}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "quick": quick,
        "machine": dict(machine(None), load_average=[load_before[0], os.getloadavg()[0]]),
        "wall_s": time.perf_counter() - started,
        "sizes": dataclasses.asdict(sizes),
        "learning_rate": LEARNING_RATE,
        "weight_decay": WEIGHT_DECAY,
        "runs": runs,
        "descriptions": DESCRIPTIONS,
    }
    result["conclusion"] = conclusion(result)
    text = markdown(result)
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{STEM}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / f"{STEM}.md").write_text(text)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few steps")
    parser.add_argument("--ks", default=None, help="comma-separated numbers of trainable rows")
    parser.add_argument("--rounds", type=int, default=None, help="timed steps per variant")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"folder for {STEM}.json and {STEM}.md (default: benchmarks/results; none with "
        "--quick)",
    )
    args = parser.parse_args()
    main(
        quick=args.quick,
        ks=None if args.ks is None else [int(k) for k in args.ks.split(",")],
        rounds=args.rounds,
        out=args.out if args.out is not None or args.quick else RESULTS,
    )
