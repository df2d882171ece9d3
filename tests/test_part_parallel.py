"""Partly frozen arrays (``where=``) on 8 fake CPU devices: data parallel and sharded tables.

What is communicated per step for a partly trainable table, measured in the
compiled HLO (f32, V=96 rows of D=24, K=3 trainable rows; the embedding is the
only trainable array, so its gradient is 288 bytes):

- ``jax.jit`` with shardings (batch on ``data``, state replicated), through
  ``ff.TrainStep`` or ``nnx.jit``: an ``nnx.Embed`` whose table has trainable
  rows looks tokens up in the frozen table and in the trainable rows apart, so
  the lookup's gradient is scatter-added into the K rows and ``f32[3,24]``
  (288 bytes) is all XLA all-reduces for it; ``attend`` (tied logits) computes
  the K rows' logits apart, and adds one more ``f32[3,24]``. A read of the
  whole table by any other module has the whole table's cotangent,
  ``f32[96,24]``, all-reduced, and the K rows taken afterwards.
- ``jax.shard_map`` with ``check_vma=True`` (the default), the gradient taken by
  ``ff.grad``: it reads a partly frozen array as varying along the axes its
  batch varies on, casting the trainable part and the frozen array before
  assembling the whole, so the ``psum`` JAX puts at the transpose of that cast
  is the trainable part's gradient: ``f32[3,24]`` (288 bytes), one per read
  (``attend`` adds one). Without that cast the table assembled from replicated
  inputs would be cast at the lookup, and its transpose would sum the whole
  table's cotangent.
- ``jax.shard_map`` with ``check_vma=False`` and ``jax.pmap`` (local gradient,
  then ``pmean``): the gradient is K rows when it is reduced, and ``f32[3,24]``
  is all that is all-reduced for it.

An element mask (the trainable part a flat vector) is read whole: its whole
array's cotangent is all-reduced under ``jax.jit``, the trainable elements only
under ``shard_map`` and ``pmap``. Every style trains the same weights as one
device does.

On a table sharded over a "model" mesh axis (batch on "data") the lookup's
all-reduce over "data" is the trainable rows' gradient, per device: ``f32[3,6]``
for a feature-sharded table, ``f32[3,24]`` for a vocabulary-sharded one (plus
the lookup's own ``f32[16,8,24]``); columns of a vocabulary-sharded table and a
mask are read whole (``f32[24,24]``, ``f32[96,24]``).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_freeze as ff

V, D, C = 96, 24, 5  # vocabulary, features, classes
NEW = [5, 40, 77]  # the trainable rows ("new tokens")
K = len(NEW)
N = 8  # fake devices
BATCH, LENGTH = 32, 8
MASK = np.random.default_rng(1).random((D, D)) < 0.2  # elements of the dense kernel, no rows
EMBED_INIT = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)  # nnx.Embed's


class Classifier(nnx.Module):
    """Embedding, dense layer, mean pooling and head; ``tied``: next-token logits by ``attend``."""

    def __init__(self, tied=False, embedding_spec=None):
        rngs = nnx.Rngs(0)
        init = (
            EMBED_INIT
            if embedding_spec is None
            else nnx.with_partitioning(EMBED_INIT, embedding_spec)
        )
        self.embed = nnx.Embed(V, D, embedding_init=init, rngs=rngs)
        self.dense = nnx.Linear(D, D, rngs=rngs)
        self.head = nnx.Linear(D, C, rngs=rngs)
        self.tied = tied

    def __call__(self, tokens):
        h = jnp.tanh(self.dense(self.embed(tokens)))
        if self.tied:
            return self.embed.attend(h)
        return self.head(h.mean(1))


def loss_fn(model, tokens, labels):
    logits = model(tokens)
    if model.tied:
        targets = tokens[:, 1:]
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets).mean()
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, (BATCH, LENGTH)).astype(np.int32)
    tokens[:, 0] = np.resize(NEW, BATCH)  # every shard reads every trainable row
    labels = rng.integers(0, C, BATCH).astype(np.int32)
    return jnp.asarray(tokens), jnp.asarray(labels)


#: What is made trainable, all else frozen: (path, where, tied).
CASES = {
    "rows": ("embed/embedding", ff.Rows(NEW), False),
    "rows-tied": ("embed/embedding", ff.Rows(NEW), True),
    "mask": ("dense/kernel", MASK, False),
}


def make(case, embedding_spec=None):
    path, where, tied = CASES[case]
    model = Classifier(tied, embedding_spec)
    ff.freeze(model)
    ff.unfreeze(model, path, where=where)
    return model, ff.Optimizer(model, optax.adam(1e-2))


def part_of(model, case):
    module, name = CASES[case][0].split("/")
    return getattr(getattr(model, module), name)


def params_of(model):
    """Every variable of ``model`` by path (the part's trainable, frozen and index apart)."""
    return {
        "/".join(map(str, p)): np.asarray(v.get_raw_value())
        for p, v in nnx.to_flat_state(nnx.state(model))
    }


@functools.cache
def single_device(case, steps=3):
    """``(params, losses)`` after ``steps`` steps on one device."""
    model, opt = make(case)
    step = ff.TrainStep(model, opt, loss_fn)
    losses = [float(step(*batch())) for _ in range(steps)]
    return params_of(model), losses


# ------------------------------------------------------------------------------ HLO parsing

_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}  # fmt: skip


def all_reduced(hlo):
    """``(dtype, shape)`` of each array all-reduced in compiled HLO text, tuple parts apart."""
    out = []
    for line in hlo.splitlines():
        if not re.search(r"\ball-reduce(-start)?\(", line) or "=" not in line:
            continue
        result = line.split("=", 1)[1].split("all-reduce", 1)[0]
        for dtype, dims in _SHAPE.findall(result):
            out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
    return out


def nbytes(dtype, shape):
    return int(np.prod(shape, dtype=np.int64)) * _BYTES[dtype]


def test_all_reduced_parses_tuples():
    hlo = "  %ar = (f32[96,24]{1,0}, f32[3,24]{1,0}, f32[]) all-reduce(%a, %b, %c), channel_id=1"
    assert all_reduced(hlo) == [("f32", (96, 24)), ("f32", (3, 24)), ("f32", ())]
    assert sum(nbytes(*a) for a in all_reduced(hlo)) == (96 * 24 + 3 * 24 + 1) * 4
    assert all_reduced("%x = f32[8]{0} all-gather(%a)") == []


# ------------------------------------------------------------------------------ data parallel


def data_mesh():
    return jax.make_mesh((N,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def shard_batch(arrays, mesh):
    return tuple(jax.device_put(a, NamedSharding(mesh, P("data"))) for a in arrays)


@nnx.jit
def nnx_jit_step(model, opt, tokens, labels):
    loss, grads = ff.value_and_grad(loss_fn)(model, tokens, labels)
    opt.update(model, grads)
    return loss


def local_step(graphdef, state, tokens, labels, *, summed):
    """One step on a device's shard; ``summed``: JAX sums the replicated state's cotangents."""
    model, opt = nnx.merge(graphdef, state)
    if summed:

        def global_loss(m, tokens, labels):
            return jax.lax.pmean(loss_fn(m, tokens, labels), "data")

        loss, grads = ff.value_and_grad(global_loss)(model, tokens, labels)
    else:  # the pmap habit: local gradient, then pmean
        loss, grads = ff.value_and_grad(loss_fn)(model, tokens, labels)
        loss, grads = jax.lax.pmean((loss, grads), "data")
    opt.update(model, grads)
    return nnx.state((model, opt)), loss


class DataParallel:
    """One style of data-parallel step: ``step()`` runs it, ``hlo()`` is its compiled text."""

    def __init__(self, style, case):
        self.style = style
        self.model, self.opt = make(case)
        tokens, labels = batch()
        mesh = data_mesh()
        if style in ("train_step", "nnx_jit"):  # XLA partitions the step from the shardings
            node = (self.model, self.opt)
            nnx.update(node, jax.device_put(nnx.state(node), NamedSharding(mesh, P())))
            data = shard_batch((tokens, labels), mesh)
            if style == "train_step":
                train_step = ff.TrainStep(self.model, self.opt, loss_fn)
                self._run, self._lower = train_step, train_step.lower
            else:
                self._run = functools.partial(nnx_jit_step, self.model, self.opt)
                self._lower = functools.partial(nnx_jit_step.lower, self.model, self.opt)
            self._data = data
            return
        self.graphdef, state = nnx.split((self.model, self.opt))
        if style == "pmap":
            fn = jax.pmap(
                functools.partial(local_step, self.graphdef, summed=False), axis_name="data"
            )
            self.state = jax.tree.map(lambda a: jnp.broadcast_to(a, (N, *jnp.shape(a))), state)
            self._data = (tokens.reshape(N, -1, LENGTH), labels.reshape(N, -1))
        else:
            summed = style == "shard_map"
            mapped = jax.shard_map(
                functools.partial(local_step, self.graphdef, summed=summed),
                mesh=mesh,
                in_specs=(P(), P("data"), P("data")),
                out_specs=(P(), P()),
                check_vma=summed,
            )
            fn = jax.jit(mapped)
            self.state = jax.device_put(state, NamedSharding(mesh, P()))
            self._data = shard_batch((tokens, labels), mesh)

        def run(*data):
            self.state, loss = fn(self.state, *data)
            return loss[0] if style == "pmap" else loss

        self._run = run
        self._lower = lambda *data: fn.lower(self.state, *data)

    def step(self):
        return float(self._run(*self._data))

    def hlo(self):
        return self._lower(*self._data).compile().as_text()

    def trained(self):
        """The model after the steps run (device 0's copy under pmap)."""
        if self.style in ("train_step", "nnx_jit"):
            return self.model
        state = self.state
        if self.style == "pmap":
            state = jax.tree.map(lambda a: a[0], state)
        return nnx.merge(self.graphdef, state)[0]


STYLES = ["train_step", "nnx_jit", "shard_map", "shard_map_no_vma", "pmap"]


def reduced_for_the_part(style, case):
    """The arrays all-reduced per step for the part's gradient, as measured (see the top)."""
    if style in ("shard_map", "shard_map_no_vma", "pmap"):  # the trainable elements' gradient
        if case == "mask":
            return [(int(MASK.sum()),)]
        return [(K, D), (K, D)] if case == "rows-tied" and style == "shard_map" else [(K, D)]
    if case == "mask":  # the whole kernel's cotangent
        return [(D, D)]
    if case == "rows-tied":  # the trainable rows' gradient of the lookup and of attend
        return [(K, D), (K, D)]
    return [(K, D)]  # nnx.Embed's lookup reads the trainable rows themselves


def test_eight_devices():
    assert jax.device_count() == N


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("style", STYLES)
def test_data_parallel_trains_as_one_device_and_all_reduces(style, case):
    run = DataParallel(style, case)
    start = params_of(run.model)
    mask = part_of(run.model, case).trainable_mask()
    trainable = ff.summary(run.model).trainable_bytes
    assert trainable == 4 * mask.sum()

    # what is all-reduced: the part's gradient (see the top) and the loss, nothing frozen
    arrays = all_reduced(run.hlo())
    assert all(dtype == "f32" for dtype, _ in arrays), arrays
    assert sorted(shape for _, shape in arrays) == sorted([(), *reduced_for_the_part(style, case)])
    reduced = sum(nbytes(*a) for a in arrays)
    if style == "shard_map":  # the trainable part's gradient, once per read
        assert reduced == trainable * (2 if case == "rows-tied" else 1) + 4
    elif style in ("shard_map_no_vma", "pmap"):
        assert reduced == trainable + 4
    elif case == "mask":  # the whole kernel's cotangent: as much as if all of it trained
        assert reduced == 4 * mask.size + 4
    elif case == "rows-tied":  # the trainable rows, for the lookup and for attend
        assert reduced == 2 * trainable + 4
    else:
        assert reduced == trainable + 4

    losses = [run.step() for _ in range(3)]
    want, want_losses = single_device(case)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    got = params_of(run.trained())
    assert got.keys() == want.keys() == start.keys()
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6, err_msg=path)
        if not path.endswith("/trainable"):  # frozen arrays and the index: bit-identical
            np.testing.assert_array_equal(got[path], start[path], err_msg=path)
    whole = np.asarray(part_of(run.trained(), case)[...])
    start_whole = np.asarray(part_of(make(case)[0], case)[...])
    np.testing.assert_array_equal(whole[~mask], start_whole[~mask])
    assert np.all(whole[mask] != start_whole[mask])


# ------------------------------------------------------------------------------ sharded tables

#: The table's spec, what is made trainable, the trainable part's spec, and the table's
#: gradient all-reduced over "data" per device (measured): the trainable rows' for rows that
#: nnx.Embed looks up apart, the whole table's cotangent (its shard) for what is read whole.
SHARDED = {
    "features": ((None, "model"), ff.Rows(NEW), P(None, "model"), (K, D // 4)),
    "vocabulary": (("model", None), ff.Rows(NEW), P(None, None), (K, D)),
    "vocabulary-columns": (("model", None), ff.Rows([1, 7], axis=1), P("model", None), (V // 4, D)),
    "features-mask": ((None, "model"), np.random.default_rng(2).random((V, D)) < 0.1, P(), (V, D)),
}


def selected(where):
    """The elements of the table ``where`` selects, as a mask."""
    if not isinstance(where, ff.Rows):
        return where
    mask = np.zeros((V, D), bool)
    mask[(slice(None),) * where.axis + (where.ids,)] = True
    return mask


def model_mesh():
    kinds = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=kinds)


def sharded_model(spec, mesh):
    with jax.set_mesh(mesh):
        return Classifier(embedding_spec=spec)


@pytest.mark.parametrize("how", ["unfreeze", "freeze"])
@pytest.mark.parametrize("name", list(SHARDED))
def test_where_on_a_sharded_table_keeps_the_frozen_array_and_places_the_part(name, how):
    spec, where, part_spec, _ = SHARDED[name]
    mesh = model_mesh()
    model = sharded_model(spec, mesh)
    raw = model.embed.embedding.get_raw_value()
    assert raw.sharding == NamedSharding(mesh, P(*spec))
    if how == "unfreeze":
        ff.freeze(model)
        ff.unfreeze(model, "embed/embedding", where=where)
    else:
        ff.freeze(model, "embed/embedding", where=~selected(where))
    part = model.embed.embedding
    assert isinstance(part, ff.PartlyFrozen)
    assert part.frozen.get_raw_value() is raw  # zero copy: the same array, on its sharding
    trainable = part.trainable.get_raw_value()
    assert trainable.sharding == NamedSharding(mesh, part_spec)
    names = part.trainable.get_metadata().get("out_sharding")
    assert names == (tuple(part_spec) if part.axis is not None else None)
    assert part.index.get_raw_value().sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(part), np.asarray(raw))


@pytest.mark.parametrize("name", list(SHARDED))
def test_training_a_sharded_partly_frozen_table_matches_one_device(name):
    spec, where, part_spec, gradient = SHARDED[name]
    mesh = model_mesh()
    tokens, labels = batch()

    def train(model, data, hlo=None):
        ff.freeze(model)
        ff.unfreeze(model, "embed/embedding", where=where)
        opt = ff.Optimizer(model, optax.adam(1e-2))
        step = ff.TrainStep(model, opt, loss_fn)
        if hlo is not None:
            hlo.append(step.lower(*data).compile().as_text())
        return opt, [float(step(*data)) for _ in range(3)]

    reference = Classifier()
    _, want_losses = train(reference, (tokens, labels))

    model = sharded_model(spec, mesh)
    raw = model.embed.embedding.get_raw_value()
    start = np.asarray(raw)
    hlo = []
    with jax.set_mesh(mesh):
        data = tuple(jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (tokens, labels))
        opt, losses = train(model, data, hlo)
    shapes = [shape for _, shape in all_reduced(hlo[0])]
    lookup = [(BATCH // 2, LENGTH, D)] if spec[0] == "model" else []  # the vocabulary-parallel read
    assert sorted(shapes) == sorted([(), gradient, *lookup])
    part = model.embed.embedding
    mask = part.trainable_mask()
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert part.frozen.get_raw_value() is raw  # a TrainStep never writes frozen arrays
    np.testing.assert_array_equal(np.asarray(raw), start)
    got, want = np.asarray(part), np.asarray(reference.embed.embedding)
    np.testing.assert_array_equal(got[~mask], start[~mask])  # bit-identical
    np.testing.assert_allclose(got[mask], want[mask], rtol=1e-5, atol=1e-6)
    read = mask & np.isin(np.arange(V), tokens)[:, None]  # rows of no token get no gradient
    assert read.any()
    assert np.all(got[read] != start[read])
    expected = NamedSharding(mesh, part_spec)
    assert part.trainable.get_raw_value().sharding.is_equivalent_to(expected, 2)
    adam = opt.opt_state[0]
    for moment in (adam.mu, adam.nu):
        moment_sharding = moment["embed"]["embedding"]["trainable"].get_raw_value().sharding
        assert moment_sharding.is_equivalent_to(expected, 2)
