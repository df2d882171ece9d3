"""The partly frozen examples: examples/vocab_extension.py and examples/gp_ard.py."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))


def test_vocab_extension_trains_only_the_new_rows(capsys):
    import vocab_extension

    results = vocab_extension.main(pretrain_steps=100, steps=150)
    n_old, n_new, dim = results["n_old"], results["n_new"], results["dim"]
    assert (n_old, n_new, dim) == (36, 4, 24)
    # the new tokens' embedding rows and output biases, nothing else
    assert results["trainable_count"] == n_new * dim + n_new
    # MLP (72*64 + 64 + 64*24 + 24) and the old rows of the embedding and the bias
    assert results["frozen_count"] == 72 * 64 + 64 + 64 * 24 + 24 + n_old * dim + n_old
    # AdamW's moments: the new rows only
    assert results["opt_state_shapes"] == {
        "0/mu/embed/embedding/trainable": (n_new, dim),
        "0/mu/out_bias/trainable": (n_new,),
        "0/nu/embed/embedding/trainable": (n_new, dim),
        "0/nu/out_bias/trainable": (n_new,),
    }
    assert results["opt_state_count"] == 2 * (n_new * dim + n_new)
    assert results["old_identical"] is True
    assert results["new_rows_moved"] is True
    # the model has learned the grammar (a uniform guess over 36 tokens is 3.58)
    assert results["pretrain_loss"] < 2.0
    assert results["new_loss_after"] < results["new_loss_before"] - 1.0
    # the old sentences are still predicted about as well: the new words take little mass
    assert results["old_loss_after"] < results["old_loss_before"] + 0.5

    out = capsys.readouterr().out
    assert "embed/embedding/trainable  Param           (4, 24)" in out
    assert "total: trainable 100 (400 B), frozen 7,132 (28.2 KiB), state 8 (32 B)" in out
    assert "old rows and every other weight bit-identical: True" in out


def test_gp_ard_fits_the_free_lengthscales_only(capsys):
    import gp_ard

    results = gp_ard.main(n=150, steps=100)
    fixed = results["fixed"]
    assert fixed.tolist() == [True, True, False, False, False, True, False, False, False, False]
    assert results["n_free"] == 7
    # 7 free lengthscales, the variance and the noise
    assert results["trainable_count"] == 7 + 2
    # Adam's count, and mu and nu of the 7 free dimensions, the variance and the noise
    assert results["opt_state_shapes"] == {
        "0/count": (),
        "0/mu/log_lengthscale/trainable/value": (7,),
        "0/mu/log_noise": (),
        "0/mu/log_variance": (),
        "0/nu/log_lengthscale/trainable/value": (7,),
        "0/nu/log_noise": (),
        "0/nu/log_variance": (),
    }
    assert results["opt_state_count"] == 1 + 2 * (7 + 2)
    assert results["fixed_identical"] is True
    lengthscales = results["lengthscales"]
    want = np.exp(np.log([3.0, 3.0, 2.0]).astype(np.float32))  # as main() computes them
    np.testing.assert_array_equal(lengthscales[fixed], want)
    assert np.all(np.abs(np.log(lengthscales[~fixed])) > 1e-3)  # every free one moved from 1
    assert results["nll_after"] < results["nll_before"] - 0.1

    out = capsys.readouterr().out
    assert "trainable 7 of 10" in out
    assert "sex: lengthscale    3.000  (fixed)" in out
    assert "fixed lengthscales bit-identical: True" in out


def test_vocab_extension_check_catches_a_moved_old_row_or_weight():
    import vocab_extension

    before = {
        "embed/embedding": np.zeros((5, 2), np.float32),
        "embed/embedding/trainable": np.zeros((2, 2), np.float32),
        "hidden/kernel": np.ones((2, 2), np.float32),
    }
    moved_new_rows = {k: v.copy() for k, v in before.items()}
    moved_new_rows["embed/embedding"][3:] = 1.0  # rows 3 and 4 are new: they may move
    moved_new_rows["embed/embedding/trainable"][:] = 1.0
    assert vocab_extension.check_old_weights_identical(before, moved_new_rows, n_old=3)
    moved_old_row = {k: v.copy() for k, v in before.items()}
    moved_old_row["embed/embedding"][2, 0] = -0.0  # equal as a number, not bit-identical
    with pytest.raises(RuntimeError, match=r"\['embed/embedding'\]"):
        vocab_extension.check_old_weights_identical(before, moved_old_row, n_old=3)
    moved_weight = {k: v.copy() for k, v in before.items()}
    moved_weight["hidden/kernel"][0, 0] = np.nextafter(np.float32(1), np.float32(2))
    with pytest.raises(RuntimeError, match=r"\['hidden/kernel'\]"):
        vocab_extension.check_old_weights_identical(before, moved_weight, n_old=3)
