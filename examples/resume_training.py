"""Resume training after the process is killed: CheckpointManager with frozen flags.

Trains a classifier on scikit-learn's digits (shipped with the package, no
download) with its backbone frozen, saving every ``--every`` steps
asynchronously with ``ocp.CheckpointManager`` (the 3 latest kept), through
``ff.checkpoint.save_args``.

1. An uninterrupted run gives the reference weights.
2. A child process runs the same training and is killed (``SIGKILL``) right
   after it starts saving step ``--kill-at``, so that save may never finish.
3. This process builds a *fresh* model and optimizer (all trainable: it does
   not repeat the freeze), restores the latest complete step with
   ``ff.checkpoint.restore_args`` (frozen flags, optimizer state and step
   count, dropout RNG state) and trains on to the end.

The resumed run ends with the same weights as the uninterrupted one, bit for bit.

    python examples/resume_training.py [--steps N] [--every K] [--kill-at S]
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from sklearn.datasets import load_digits

import flax_freeze as ff

BATCH = 64


class Classifier(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.backbone = nnx.Sequential(
            nnx.Linear(64, 128, rngs=rngs), nnx.gelu, nnx.Linear(128, 128, rngs=rngs), nnx.gelu
        )
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.head = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.dropout(self.backbone(x)))


def loss_fn(model: Classifier, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model: Classifier, opt: ff.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    loss, grads = ff.value_and_grad(loss_fn)(model, x, y)
    opt.update(model, grads)
    return loss


def build() -> tuple[Classifier, ff.Optimizer]:
    """A fresh model and optimizer, everything trainable."""
    model = Classifier(nnx.Rngs(0))
    return model, ff.Optimizer(model, optax.adamw(1e-3, weight_decay=1e-2))


@functools.cache
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int32)


def batch(step: int) -> tuple[jax.Array, jax.Array]:
    """The minibatch of a step: the same in every run."""
    x, y = digits()
    idx = np.random.default_rng(step).integers(0, len(y), BATCH)
    return jnp.asarray(x[idx]), jnp.asarray(y[idx])


def train(
    model: Classifier,
    opt: ff.Optimizer,
    start: int,
    stop: int,
    mngr: ocp.CheckpointManager | None = None,
    every: int = 0,
    kill_at: int | None = None,
) -> float:
    loss = float("nan")
    for step in range(start, stop):
        loss = float(train_step(model, opt, *batch(step)))
        done = step + 1
        if mngr is not None and done % every == 0:
            mngr.save(done, args=ff.checkpoint.save_args((model, opt)), metrics={"loss": loss})
        if done == kill_at:  # killed while that save may still be writing
            os.kill(os.getpid(), signal.SIGKILL)
    return loss


def weights(model: Classifier) -> dict[str, np.ndarray]:
    return {
        "/".join(map(str, path)): np.asarray(v.get_raw_value())
        for path, v in nnx.iter_graph(model)
        if isinstance(v, nnx.Param | ff.FrozenParam)
    }


def manager(directory: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=3, enable_async_checkpointing=True)
    return ocp.CheckpointManager(directory, options=options)


def child(directory: str, steps: int, every: int, kill_at: int) -> None:
    """The run that gets killed: freeze the backbone, train, save every `every` steps."""
    model, opt = build()
    ff.freeze(model, ff.PathRegex("backbone/.*"))
    opt.migrate(model)
    train(model, opt, 0, steps, manager(directory), every, kill_at)


def main(steps: int = 200, every: int = 20, kill_at: int = 140) -> dict[str, object]:
    # 1. The uninterrupted reference run.
    model, opt = build()
    ff.freeze(model, ff.PathRegex("backbone/.*"))
    opt.migrate(model)
    train(model, opt, 0, steps)
    reference = weights(model)

    with tempfile.TemporaryDirectory() as directory:
        # 2. A run killed mid-training (and maybe mid-save).
        done = subprocess.run(
            [sys.executable, __file__, "--child", directory, str(steps), str(every), str(kill_at)],
            check=False,
        )
        print(f"training process killed at step {kill_at} (exit status {done.returncode})")

        # 3. Resume in a fresh model and optimizer: nothing frozen until restored.
        mngr = manager(directory)
        print(f"complete steps on disk: {sorted(mngr.all_steps())}")
        model, opt = build()
        args = ff.checkpoint.restore_args(mngr, (model, opt))
        model, opt = args.finish(mngr.restore(args.step, args=args))
        resumed = args.step
        print(f"resumed from step {resumed}:")
        print(ff.summary(model))
        loss = train(model, opt, int(opt.step[...]), steps, mngr, every)
        mngr.wait_until_finished()
        mngr.close()

    final = weights(model)
    identical = final.keys() == reference.keys() and all(
        np.array_equal(final[k], reference[k]) for k in reference
    )
    print(f"final loss {loss:.4f}; weights identical to the uninterrupted run: {identical}")
    return {
        "killed": done.returncode == -signal.SIGKILL,
        "resumed_from": resumed,
        "identical": identical,
        "frozen": isinstance(model.backbone.layers[0].kernel, ff.FrozenParam),
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], *map(int, sys.argv[3:6]))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps in all")
    parser.add_argument("--every", type=int, default=20, help="save every K steps")
    parser.add_argument("--kill-at", type=int, default=140, help="kill the first run here")
    args = parser.parse_args()
    result = main(args.steps, args.every, args.kill_at)
    sys.exit(0 if result["identical"] else 1)
