import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))


def test_quickstart_trains_and_keeps_the_backbone_frozen(capsys):
    import quickstart

    results = quickstart.main(steps=60)
    # Chance is 0.2 on five classes; the frozen-backbone check is an assert inside main().
    assert results["pretrain"] > 0.8
    assert results["head"] > 0.6
    assert results["last_block"] >= results["head"] - 0.05
    out = capsys.readouterr().out
    assert "summary with the backbone frozen" in out
    assert "total: trainable 645 (2.5 KiB), frozen 42,112 (164.5 KiB)" in out
    assert "total: trainable 17,413 (68.0 KiB), frozen 25,344 (99.0 KiB)" in out


if __name__ == "__main__":
    pytest.main([__file__])
