"""Models, data and helpers shared by several test files (``from helpers import ...``).

Only what more than one test file uses lives here; a model that one file alone
uses stays in that file, even when it has a common name such as ``Net``.
"""

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import flax_freeze as ff
from flax_freeze import linen as ffl
from flax_freeze._filters import path_str

ROOT = Path(__file__).parent.parent

#: AdamW with weight decay: it would move a frozen weight that it held state for.
ADAMW = optax.adamw(0.05, weight_decay=0.1)


# --------------------------------------------------------------------------- NNX model


class Net(nnx.Module):
    """Linear(3, width) -> BatchNorm -> ReLU -> Dropout -> Linear(width, 2).

    Every kind of NNX state: parameters in an ``nnx.List``, batch statistics
    and an RNG key and count.
    """

    def __init__(self, seed=0, width=4):
        rngs = nnx.Rngs(seed)
        self.layers = nnx.List([nnx.Linear(3, width, rngs=rngs), nnx.Linear(width, 2, rngs=rngs)])
        self.norm = nnx.BatchNorm(width, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)

    def __call__(self, x):
        x = self.drop(jax.nn.relu(self.norm(self.layers[0](x))))
        return self.layers[1](x)


#: The first layer of :class:`Net`.
FROZEN0 = ff.PathRegex("layers/0/.*")


def net_and_optimizer(seed=0, frozen=True):
    """A :class:`Net` (first layer frozen unless ``frozen`` is False) and its ``ff.Optimizer``."""
    model = Net(seed)
    if frozen:
        ff.freeze(model, FROZEN0)
    return model, ff.Optimizer(model, ADAMW)


def loss_fn(model, x, y):
    """Mean squared error of ``model(x)`` against ``y``."""
    return ((model(x) - y) ** 2).mean()


# --------------------------------------------------------------------------- NNX state by path


def variable_types(node):
    """``'/'``-joined path -> type name of every ``nnx.Variable`` of ``node``."""
    return {
        path_str(p): type(v).__name__
        for p, v in nnx.iter_graph(node, graph=True)
        if isinstance(v, nnx.Variable)
    }


def variable_values(node):
    """``'/'``-joined path -> numpy value of every ``nnx.Variable`` (PRNG keys as key data)."""
    return {
        path_str(p): np.asarray(
            jax.random.key_data(v[...]) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v[...]
        )
        for p, v in nnx.iter_graph(node, graph=True)
        if isinstance(v, nnx.Variable)
    }


def assert_same(a, b):
    """Same variable paths in ``a`` and ``b``, bit-identical values."""
    va, vb = variable_values(a), variable_values(b)
    assert va.keys() == vb.keys()
    for k in va:
        np.testing.assert_array_equal(va[k], vb[k], err_msg=k)


def param_types(node):
    """``'/'``-joined path -> type name of every parameter, trainable or frozen."""
    return {
        path_str(p): type(v).__name__
        for p, v in nnx.iter_graph(node, graph=True)
        if isinstance(v, nnx.Param | ff.FrozenParam)
    }


def param_values(node):
    """``'/'``-joined path -> numpy copy of every parameter, trainable or frozen."""
    return {
        path_str(p): np.array(v.get_raw_value())
        for p, v in nnx.iter_graph(node, graph=True)
        if isinstance(v, nnx.Param | ff.FrozenParam)
    }


# --------------------------------------------------------------------------- pytrees


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RBF:
    """A kernel as a dataclass pytree; either field may be a ``ff.FrozenParam``."""

    variance: Any
    lengthscale: Any


# --------------------------------------------------------------------------- Linen model


#: Images and regression targets for :class:`CNN`.
CNN_X = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
CNN_Y = jax.random.normal(jax.random.key(1), (4, 2))


class CNN(nn.Module):
    """Conv -> BatchNorm -> mean pool -> Dense(8) -> Dense(2)."""

    frozen_dense: bool = True  # Dense_0's kernel declared frozen at init

    @nn.compact
    def __call__(self, x, train=True):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x).mean((1, 2))
        init = nn.initializers.lecun_normal()
        x = nn.Dense(8, kernel_init=ffl.frozen(init) if self.frozen_dense else init)(x)
        return nn.Dense(2)(nn.relu(x))


class CNNState(ffl.TrainState):
    batch_stats: Any


def cnn_state(model, seed, frozen=None):
    """A :class:`CNNState` of ``model`` with ``frozen`` (a path regex) frozen and AdamW."""
    variables = model.init(jax.random.key(seed), CNN_X)
    params = variables["params"]
    if frozen:
        params = ffl.freeze(params, ff.PathRegex(frozen))
    return CNNState.create(
        apply_fn=model.apply, params=params, tx=ADAMW, batch_stats=variables["batch_stats"]
    )


@jax.jit
def cnn_step(state, x, y):
    def loss(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        out, updates = state.apply_fn(variables, x, mutable=["batch_stats"])
        return ((out - y) ** 2).mean(), updates

    grads, updates = ff.grad(loss, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])


def cnn_train(state, steps, start=0):
    """``steps`` jitted steps of ``state``, on ``CNN_X + i`` for ``i`` from ``start``."""
    for i in range(start, start + steps):
        state = cnn_step(state, CNN_X + i, CNN_Y)
    return state


# --------------------------------------------------------------------------- checkpoints


def mixed_tree(value=1.0, frozen=True):
    """``{"w": 3 x value, "b": 2 x value}``, ``b`` frozen unless ``frozen`` is False."""
    b = jnp.full(2, value)
    return {"w": jnp.full(3, value), "b": ff.FrozenParam(b) if frozen else b}


def mixed_target():
    """An all-trainable restore target for :func:`mixed_tree`."""
    return {"w": jnp.zeros(3), "b": jnp.zeros(2)}


def saved(tmp_path, tree=None, name="ckpt"):
    """The path of a flax_freeze checkpoint of ``tree`` (by default two arrays, one frozen)."""
    path = tmp_path / name
    ff.checkpoint.save(
        path, tree if tree is not None else {"a": jnp.ones(3), "b": ff.FrozenParam(jnp.zeros(2))}
    )
    return path


def plain_standard(path, model):
    """Saves ``nnx.state(model)`` with plain orbax, as a Flax user does."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, nnx.state(model))


def flags_json(path):
    """The flags item of checkpoint ``path``, as JSON data."""
    return json.loads((path / "flags" / "metadata").read_text())


def write_flags(path, data):
    """Replaces the flags item of checkpoint ``path`` by ``data`` (JSON data or text)."""
    (path / "flags" / "metadata").write_text(data if isinstance(data, str) else json.dumps(data))


def set_array(path, name, shape, dtype):
    data = flags_json(path)
    data["arrays"][name] = {"shape": shape, "dtype": dtype}
    write_flags(path, data)


def _remove_flags(path):
    for file in (path / "flags").iterdir():
        file.unlink()
    (path / "flags").rmdir()


#: Damage to the flags item of a :func:`mixed_tree` checkpoint, and the error it gives.
FLAGS_DAMAGE = [
    pytest.param(
        lambda p: write_flags(p, None),
        r"is not a flax_freeze flags item \(format 'NoneType'\)",
        id="null",
    ),
    pytest.param(
        _remove_flags,
        r"was written by flax_freeze but has no 'flags' item, so its frozen flags are lost",
        id="missing",
    ),
    pytest.param(
        lambda p: write_flags(p, {**flags_json(p), "trained_dtypes": {"b": "int8"}}),
        r"malformed 'trained_dtypes' entry \(parameters are trained in floating dtypes\)",
        id="int-trained-dtype",
    ),
    pytest.param(
        lambda p: set_array(p, "w", [4], "float32"),
        r"does not match its stored arrays: \[w \(flags \(4,\) float32, stored \(3,\) "
        r"float32\)\]",
        id="shape",
    ),
    pytest.param(
        lambda p: set_array(p, "w", [3], "int32"),
        r"does not match its stored arrays: \[w \(flags \(3,\) int32, stored \(3,\) "
        r"float32\)\]",
        id="dtype",
    ),
    pytest.param(
        lambda p: write_flags(p, {**flags_json(p), "keys": {"w": "threefry2x32"}}),
        r"says 'w' holds threefry2x32 keys, but its stored data \(\(3,\) float32\) is not key",
        id="key-on-floats",
    ),
    pytest.param(
        lambda p: write_flags(p, {**flags_json(p), "keys": {"w": "nokey"}}),
        r"names an unknown PRNG key implementation 'nokey' for 'w'",
        id="unknown-key-impl",
    ),
    pytest.param(
        lambda p: write_flags(p, {**flags_json(p), "save_id": "f" * 32}),
        r"holds flags and arrays of different saves \(save ids 'f{32}' and '[0-9a-f]{32}'\)",
        id="other-save",
    ),
    pytest.param(
        lambda p: write_flags(p, {**flags_json(p), "checksums": {"w": "x"}}),
        r"malformed 'checksums' entry",
        id="checksums",
    ),
]

FLAGS_FILE, METADATA_FILE = "flags/metadata", "state/_METADATA"

#: Files of a checkpoint replaced by something crafted: ``(file, craft, error)``.
CRAFTED_FILES = [
    pytest.param(
        FLAGS_FILE, os.mkfifo, r"holds 'flags/metadata', which is a FIFO", id="fifo-flags"
    ),
    pytest.param(
        METADATA_FILE, os.mkfifo, r"holds 'state/_METADATA', which is a FIFO", id="fifo-metadata"
    ),
    pytest.param(
        FLAGS_FILE,
        lambda f: os.symlink("/dev/zero", f),
        r"holds 'flags/metadata', which is a symbolic link out of the checkpoint "
        r"\(to '/dev/zero'\)",
        id="dev-zero",
    ),
    pytest.param(
        FLAGS_FILE,
        lambda f: os.symlink("/etc/passwd", f),
        r"which is a symbolic link out of the checkpoint \(to '/etc/passwd'\)",
        id="outside",
    ),
    pytest.param(
        FLAGS_FILE,
        lambda f: os.symlink(f.parent / "nowhere", f),
        r"holds 'flags/metadata', which is a broken symbolic link",
        id="broken-link",
    ),
    pytest.param(
        FLAGS_FILE,
        lambda f: f.write_text("[" * 100_000 + "]" * 100_000),
        r"The flags item of checkpoint '.*' is JSON nested too deeply to read",
        id="deep-flags",
    ),
    pytest.param(
        METADATA_FILE,
        lambda f: f.write_text("[" * 100_000),
        r"The array metadata of checkpoint '.*' is JSON nested too deeply to read",
        id="deep-metadata",
    ),
]


def craft(path, name, make):
    """Replaces the file ``name`` of checkpoint ``path`` by what ``make(file)`` creates."""
    (path / name).unlink()
    make(path / name)


def data_files(path):
    """The files of a checkpoint that hold array data."""
    return sorted(p for p in (path / "state").rglob("*") if p.is_file() and p.parent.name == "d")


#: Damage to the array data of a checkpoint (:func:`damage_arrays`).
ARRAY_DAMAGE = ["truncate", "delete", "garbage-manifest"]


def damage_arrays(path, damage):
    """Truncates or deletes the data files of ``path``, or overwrites its manifests."""
    if damage == "truncate":
        for file in data_files(path):
            file.write_bytes(file.read_bytes()[:10])
    elif damage == "delete":
        for file in data_files(path):
            file.unlink()
    else:
        for file in (path / "state").rglob("manifest.ocdbt"):
            file.write_bytes(b"garbage" * 10)


# --------------------------------------------------------------------------- measuring, processes


def flops(fn, *args):
    """FLOPs of ``jax.jit(fn)`` compiled for ``args``, as XLA counts them."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost["flops"])


def child_env(**extra):
    """Environment of a child Python process: JAX on one CPU device, plus ``extra``."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **extra}
