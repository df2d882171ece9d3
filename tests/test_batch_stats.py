"""freeze(..., batch_stats=True): a BatchNorm with all its parameters frozen runs on averages."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import flax_freeze as ff

X = jax.random.normal(jax.random.key(0), (8, 3))


class Net(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.body = nnx.Linear(3, 4, rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x):
        return self.head(self.norm(self.body(x)))


def loss(model, x):
    return (model(x) ** 2).mean()


def stats(model):
    return np.asarray(model.norm.mean[...]).copy(), np.asarray(model.norm.var[...]).copy()


def test_default_keeps_batchnorm_training():
    model = Net()
    ff.freeze(model, "body/.*|norm/.*")
    assert model.norm.use_running_average is False
    before = stats(model)
    model(X)
    assert not np.array_equal(stats(model)[0], before[0])  # statistics still move


def test_batch_stats_true_freezes_statistics_and_unfreeze_undoes_it():
    model = Net()
    ff.freeze(model, "body/.*|norm/.*", batch_stats=True)
    assert model.norm.use_running_average is True
    before = stats(model)
    step = ff.TrainStep(model, ff.Optimizer(model, optax.adam(1e-2)), loss)
    for _ in range(3):
        step(X)
    np.testing.assert_array_equal(stats(model)[0], before[0])
    np.testing.assert_array_equal(stats(model)[1], before[1])
    ff.unfreeze(model, "body/.*")  # the BatchNorm's own parameters are still frozen
    assert model.norm.use_running_average is True
    ff.unfreeze(model, "norm/.*")
    assert model.norm.use_running_average is False
    step(X)
    assert not np.array_equal(stats(model)[0], before[0])


def test_a_batchnorm_with_a_trainable_parameter_keeps_training():
    model = Net()
    ff.freeze(model, "body/.*|norm/scale", batch_stats=True)  # norm/bias still trains
    assert model.norm.use_running_average is False


def test_batchnorm_already_in_inference_mode_stays_so_after_unfreeze():
    model = Net()
    model.eval()
    ff.freeze(model, "norm/.*", batch_stats=True)
    ff.unfreeze(model)
    assert model.norm.use_running_average is True


def test_bad_batch_stats():
    with pytest.raises(TypeError, match=r"`batch_stats` must be True or False, got 'yes'"):
        ff.freeze(Net(), batch_stats="yes")  # type: ignore[arg-type]


def test_a_batchnorm_with_a_partly_frozen_parameter_keeps_training():
    bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    ff.freeze(bn, "bias")
    ff.freeze(bn, "scale", where=np.array([True, False, True]), batch_stats=True)
    assert isinstance(bn.scale, ff.PartlyFrozen)
    assert bn.use_running_average is False
