"""Smoke tests for benchmarks/partial_rows.py: tiny sizes, checks and exact facts, no timings."""

import json

import numpy as np
import partial_rows  # pyright: ignore[reportMissingImports]
import pytest

QUICK = partial_rows.QUICK
WHOLE, MASKED, ROWS, HAND = partial_rows.VARIANTS
COUNT_BYTES = 4  # adam's int32 step count


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    return partial_rows.main(quick=True, out=out), out


def by_variant(run):
    return {r["variant"]: r for r in run["rows"]}


def test_quick_run_has_a_row_per_k_and_variant(quick_run):
    result, _ = quick_run
    assert [run["k"] for run in result["runs"]] == list(QUICK.ks)
    for run in result["runs"]:
        assert [r["variant"] for r in run["rows"]] == list(partial_rows.VARIANTS)
        assert run["new_tokens_in_batch"] > 0
        for row in run["rows"]:
            assert row["k"] == run["k"]
            assert row["steps"] == QUICK.rounds
            assert row["median_s"] > 0
            assert row["time_ratio"] > 0
            assert row["flops"] > 0
            assert row["bytes_accessed"] > 0
            assert row["temp_bytes"] >= 0
            assert row["argument_bytes"] > 0
            assert np.isfinite(row["loss"])
            assert isinstance(row["hlo_text"], str)
            assert row["hlo_text"]
        whole = by_variant(run)[WHOLE]
        assert whole["time_ratio"] == 1.0
        assert whole["flops_ratio"] == 1.0


def test_quick_run_passes_its_checks(quick_run):
    result, _ = quick_run
    for run in result["runs"]:
        for row in run["rows"]:
            check = row["check"]
            assert check["ok"], row
            assert check["update_rel_l2"] <= partial_rows.UPDATE_RTOL
            assert check["other_params_identical"], row
            # Every row trains in "whole"; in the others the frozen rows stay bit-identical.
            assert check["frozen_rows_identical"] == (row["variant"] != WHOLE), row
        # adamw's weight decay moves the frozen rows when the gradient is masked.
        assert run["gradient_mask_max_frozen_change"] > 0


def test_optimizer_state_holds_k_rows_for_flax_freeze_and_the_hand_split(quick_run):
    result, _ = quick_run
    v, d = QUICK.vocab, QUICK.dim
    for run in result["runs"]:
        k, rows = run["k"], by_variant(run)
        state = {name: row["opt_state_bytes"] for name, row in rows.items()}
        assert state[ROWS] == 2 * k * d * 4 + COUNT_BYTES  # mu and nu of the k rows
        assert state[HAND] == state[ROWS]
        assert state[WHOLE] == state[MASKED] == 2 * v * d * 4 + COUNT_BYTES
        assert (state[ROWS] - COUNT_BYTES) * v == (state[WHOLE] - COUNT_BYTES) * k


def test_flax_freeze_rows_computes_no_more_than_the_masked_update(quick_run):
    result, _ = quick_run
    for run in result["runs"]:
        rows = by_variant(run)
        assert rows[ROWS]["flops"] <= rows[MASKED]["flops"]
        assert rows[ROWS]["flops"] <= rows[WHOLE]["flops"]


def test_hlo_summaries_find_the_table_lookup_and_the_hand_split_makes_no_whole_table(quick_run):
    result, _ = quick_run
    table = [QUICK.vocab, QUICK.dim]
    for run in result["runs"]:
        for row in run["rows"]:
            hlo = row["hlo"]
            assert set(hlo) == {"table_buffers", "scatters", "gathers", "op_counts"}
            # Every variant looks tokens up in the whole (or frozen) table.
            assert any(g["from"] == table and g["direction"] == "forward" for g in hlo["gathers"])
            assert hlo["op_counts"]["gather"] >= 1
        hand = by_variant(run)[HAND]["hlo"]
        assert hand["table_buffers"] == []  # the program computes no V x d array
        assert all(s["into"] == [run["k"], QUICK.dim] for s in hand["scatters"])


def test_outputs_are_written_and_name_the_findings(quick_run):
    result, out = quick_run
    assert json.loads((out / "partial-rows.json").read_text()) == json.loads(json.dumps(result))
    text = (out / "partial-rows.md").read_text()
    assert "| k | variant | GFLOP |" in text
    assert "### What XLA does with the table (optimized HLO)" in text
    assert result["conclusion"] in text
    assert all(name in text for name in partial_rows.VARIANTS)


SNIPPET = """\
HloModule jit_step, is_scheduled=true

%wrapped_scatter_computation (param_0.1: f32[10,4], param_1.1: s32[6,1], \
param_2.1: f32[6,1,4]) -> f32[10,4] {
  %param_0.1 = f32[10,4]{1,0} parameter(0)
  %param_1.1 = s32[6,1]{1,0} parameter(1)
  %param_2.1 = f32[6,1,4]{2,1,0} parameter(2)
  ROOT %scatter-add.1 = f32[10,4]{1,0} scatter(%param_0.1, %param_1.1, %param_2.1), \
to_apply=%region, metadata={op_name="jit(step)/transpose(jvp(jit(_take)))/scatter-add"}
}

%fused_gather (param_0.2: f32[10,4], param_1.2: s32[2]) -> f32[2,1,4] {
  %param_0.2 = f32[10,4]{1,0} parameter(0)
  %param_1.2 = s32[2,1]{1,0} parameter(1)
  ROOT %gather.1 = f32[2,1,4]{2,1,0} gather(%param_0.2, %param_1.2), \
metadata={op_name="jit(step)/transpose(jvp())/gather"}
}

ENTRY %main (p0: f32[10,4], p1: s32[6,1]) -> f32[2,1,4] {
  %p0 = f32[10,4]{1,0} parameter(0)
  %constant.1 = f32[] constant(0)
  %zeros = f32[10,4]{1,0} broadcast(%constant.1), dimensions={}, \
metadata={op_name="jit(step)/transpose(jvp(jit(_take)))/broadcast_in_dim"}
  %copy.1 = f32[10,4]{1,0} copy(%p0)
  %wrapped_scatter = f32[10,4]{1,0} fusion(%zeros, %p1, %p2), kind=kLoop, \
calls=%wrapped_scatter_computation
  ROOT %g = f32[2,1,4]{2,1,0} fusion(%wrapped_scatter, %p3), kind=kLoop, calls=%fused_gather
}
"""


def test_hlo_summary_of_a_known_module():
    summary = partial_rows.hlo_summary(SNIPPET, vocab=10, dim=4, k=2)
    assert summary["table_buffers"] == ["broadcast", "copy", "scatter"]
    assert summary["scatters"] == [
        {"into": [10, 4], "rows": 6, "add": True, "direction": "backward"}
    ]
    assert summary["gathers"] == [{"from": [10, 4], "rows": 2, "direction": "backward"}]
    assert summary["op_counts"]["scatter"] == 1
    assert summary["op_counts"]["fusion"] == 2
    assert partial_rows.describe_hlo(summary) == (
        "V×d results: broadcast ×1, copy ×1, scatter ×1; backward scatter-add of 6 rows into "
        "[10,4]; backward gather of 2 rows from [10,4]"
    )


def test_bad_k_is_an_error_before_anything_runs():
    with pytest.raises(ValueError, match=r"`ks` \[0\] must be in \[1, 256\)"):
        partial_rows.main(quick=True, ks=[0])
