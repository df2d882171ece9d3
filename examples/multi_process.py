"""Several processes: data-parallel training with a frozen backbone, a checkpoint, fine-tuning on.

Starts N local processes (``jax.distributed`` on localhost, CPU, D devices
each). All of them together:

1. train data-parallel for a few steps with the backbone frozen (only the
   head's gradients are all-reduced across processes);
2. save one checkpoint with the frozen flags through orbax, from all processes,
   and an adapter checkpoint of what trained (``only=ff.Trainable``), which
   they restore onto a fresh base;
3. restore it into a fresh model (which declares nothing frozen: the
   checkpoint brings the flags), unfreeze the top backbone layer, train on.

Process 0 writes the final weights to ``OUT/weights.npz``. With
``--processes 1`` the same run happens in one process over the same number
of devices, for comparison.

    python examples/multi_process.py --processes 2 --devices 4 --out out/multi_process
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(processes: int, devices: int, out: Path, steps: int) -> None:
    """Runs the workers as ``processes`` local processes and waits for them."""
    shutil.rmtree(out / "checkpoint", ignore_errors=True)  # a fresh run writes a fresh one
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    env["JAX_PLATFORMS"] = "cpu"
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(i), "--processes", str(processes),
             "--devices", str(devices), "--port", str(port), "--out", str(out),
             "--steps", str(steps)],
            env=env,
        )
        for i in range(processes)
    ]  # fmt: skip
    codes = [w.wait(timeout=600) for w in workers]
    if any(codes):
        raise RuntimeError(f"worker exit codes {codes}")


def worker(process_id: int, processes: int, port: int, out: Path, steps: int) -> None:
    """One process of the run (see the module docstring)."""
    import jax

    if processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{port}", processes, process_id)

    import numpy as np
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import flax_freeze as ff

    class MLP(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.layers = nnx.List([nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 32, rngs=rngs)])
            self.head = nnx.Linear(32, 4, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            for layer in self.layers:
                x = nnx.relu(layer(x))
            return self.head(x)

    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated, by_data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def global_replicated(node: object) -> None:
        """Puts every array of ``node`` on every device of every process, in place."""
        state = nnx.state(node)
        state = jax.tree.map(
            lambda a: jax.make_array_from_callback(a.shape, replicated, lambda i: a[i]), state
        )
        nnx.update(node, state)

    def global_batch(step: int) -> tuple[jax.Array, jax.Array]:
        """The step's global batch; each process contributes its own rows."""
        rng = np.random.default_rng(step)
        x = rng.normal(size=(32, 16)).astype(np.float32)
        y = rng.integers(0, 4, 32).astype(np.int32)
        rows = np.array_split(np.arange(32), jax.process_count())[jax.process_index()]
        return (
            jax.make_array_from_process_local_data(by_data, x[rows]),
            jax.make_array_from_process_local_data(by_data, y[rows]),
        )

    @nnx.jit
    def train_step(model: MLP, opt: ff.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
        def loss_fn(model: MLP) -> jax.Array:
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = ff.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    def make(frozen: bool) -> tuple[MLP, ff.Optimizer]:
        model = MLP(nnx.Rngs(0))
        if frozen:
            ff.freeze(model, ff.PathRegex("layers/.*"))
        opt = ff.Optimizer(model, optax.adam(1e-2))
        global_replicated((model, opt))
        return model, opt

    # 1. Data-parallel with the backbone frozen.
    model, opt = make(frozen=True)
    for step in range(steps):
        train_step(model, opt, *global_batch(step))

    # 2. One checkpoint from all processes, with the flags.
    checkpoint = (out / "checkpoint").absolute()
    ff.checkpoint.save(checkpoint, (model, opt))  # every process writes its part

    # 2b. An adapter checkpoint of what trained (the head and its optimizer state), from all
    # processes, restored onto a fresh base: the backbone is checked against its fingerprint.
    adapter = (out / "adapter").absolute()
    ff.checkpoint.save(adapter, (model, opt), only=ff.Trainable)
    fresh, fresh_opt = ff.checkpoint.restore(adapter, make(frozen=False))
    same = all(
        np.array_equal(jax.device_get(a), jax.device_get(b))
        for a, b in zip(
            jax.tree.leaves(nnx.state((fresh, fresh_opt))),
            jax.tree.leaves(nnx.state((model, opt))),
            strict=True,
        )
    )
    stored = len(ff.checkpoint.read_flags(adapter).arrays)

    # 3. Restore into a model that declares nothing frozen, unfreeze the top layer, go on.
    model, opt = ff.checkpoint.restore(checkpoint, make(frozen=False))
    frozen = sorted(r.path for r in ff.summary(model).rows if r.status == "frozen")
    ff.unfreeze(model, ff.PathRegex("layers/1/.*"))
    for step in range(steps, 2 * steps):
        loss = train_step(model, opt, *global_batch(step))

    if jax.process_index() == 0:
        weights = {
            "/".join(map(str, p)): np.asarray(jax.device_get(v.get_raw_value()))
            for p, v in nnx.to_flat_state(nnx.state(model))
        }
        np.savez(out / "weights.npz", **weights)
        print(
            f"{jax.process_count()} processes x {jax.local_device_count()} devices: "
            f"restored with frozen {frozen}; final loss {float(loss):.5f}; "
            f"wrote {out / 'weights.npz'}"
        )
        print(f"adapter of {stored} arrays restored onto a fresh base: identical {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices", type=int, default=4, help="CPU devices per process")
    parser.add_argument("--steps", type=int, default=3, help="steps per phase")
    parser.add_argument("--out", type=Path, default=Path("out/multi_process"))
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker is None:
        launch(args.processes, args.devices, args.out, args.steps)
    else:
        worker(args.worker, args.processes, args.port, args.out, args.steps)


if __name__ == "__main__":
    main()
