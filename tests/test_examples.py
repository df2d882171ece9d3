import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))


def test_quickstart_trains_checkpoints_and_plots(tmp_path, capsys):
    import quickstart

    results = quickstart.main(steps=150, out=tmp_path)  # as the README runs it
    # Chance is 0.2 on five classes; the frozen-backbone check raises inside main().
    assert results["pretrain"] > 0.8
    assert results["head"] > 0.5
    # the restored model is the saved one, bit for bit
    assert results["restored"] == results["block_1"]
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    assert (tmp_path / "checkpoint").is_dir()
    out = capsys.readouterr().out
    assert "total: trainable 645 (2.5 KiB), frozen 42,112 (164.5 KiB)" in out
    assert "total: trainable 17,413 (68.0 KiB), frozen 25,344 (99.0 KiB)" in out
    assert "restored " in out
    # The schedule unfroze each block at its step; each started with its own step
    # counts and a warm-up, so the loss did not jump (with the optimizer's shared
    # count it jumps 43-129x at block 0: benchmarks/unfreeze_dynamics.py).
    assert "unfreeze block 2 (step 150): " in out
    assert "unfreeze block 0 (step 450): " in out
    assert max(results[f"jump_{block}"] for block in (2, 1, 0)) < 2.0
    assert f"wrote {tmp_path / 'loss.png'}" in out
