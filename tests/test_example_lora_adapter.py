import sys
from pathlib import Path

import flax_freeze as ff

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))


def test_lora_adapter_saves_small_and_restores_bit_identical(tmp_path, capsys):
    import lora_adapter

    results = lora_adapter.main(steps=150, rank=2, out=tmp_path)
    # Ten classes: chance is 0.1. The base reads upright digits, not turned ones;
    # the adapters alone teach it to.
    assert results["pretrain"] > 0.9
    assert results["before"] < 0.3
    assert results["finetuned"] > results["before"] + 0.5
    assert results["starts_equal"] is True  # lora_b starts at zero
    # base + adapter rebuilt from the two checkpoints is the fine-tuned model, bit for bit
    assert results["identical"] is True
    assert results["base_identical"] is True
    assert results["resumed_identical"] is True
    assert results["restored"] == results["finetuned"]
    assert results["refused"] is True
    # about 1.1 MB against 70 KB (16x) on disk
    assert results["base_bytes"] > 1_000_000
    assert results["base_bytes"] >= 10 * results["adapter_bytes"]
    description = ff.checkpoint.describe(tmp_path / "adapter")
    assert description.is_adapter
    assert not ff.checkpoint.describe(tmp_path / "base").is_adapter

    out = capsys.readouterr().out
    assert "an adapter: holds 20 path(s), expects 6 from a base" in out
    assert "predictions bit-identical: True; base bit-identical: True" in out
    assert "refused: Checkpoint" in out
    assert "is an adapter for another base" in out
    assert "0/hidden2/base_module/kernel (other values)" in out
    assert "checkpoint sizes on disk: base " in out
    assert "x smaller)" in out
