"""Part of an array trainable: freeze/unfreeze with where=, ff.Rows, ff.PartlyFrozen."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import flax_freeze as ff

V, D = 10, 4
NEW = [7, 8, 9]  # the rows of "new tokens"
TOKENS = jnp.array([[1, 7, 9, 9], [0, 8, 3, 7]])


class LM(nnx.Module):
    """A tiny language model: embedding, a dense layer, logits tied to the embedding."""

    def __init__(self, seed=0):
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.dense = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, tokens):
        h = jnp.tanh(self.dense(self.embed(tokens)))
        return self.embed.attend(h)


def lm_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def new_token_model(seed=0):
    model = LM(seed)
    ff.freeze(model)
    ff.unfreeze(model, "embed/embedding", where=ff.Rows(NEW))
    return model


def whole(x):
    return np.asarray(x[...])


# ----------------------------------------------------------------------------- structure


def test_unfreeze_rows_makes_a_partly_frozen_array_that_reads_as_the_whole():
    model = LM()
    table = whole(model.embed.embedding)
    ff.freeze(model)
    ff.unfreeze(model, "embed/embedding", where=ff.Rows([9, 7, 8, 7]))
    part = model.embed.embedding
    assert isinstance(part, ff.PartlyFrozen)
    assert part.axis == 0
    assert part.shape == (V, D)
    assert part.dtype == jnp.float32
    assert part.index[...].tolist() == NEW
    assert type(part.trainable) is nnx.Param
    assert isinstance(part.frozen, ff.FrozenParam)
    np.testing.assert_array_equal(part.trainable[...], table[NEW])
    np.testing.assert_array_equal(whole(part), table)
    np.testing.assert_array_equal(np.asarray(part), table)
    np.testing.assert_array_equal(part * 2, table * 2)
    assert part.frozen.get_raw_value() is not None
    mask = np.zeros((V, D), bool)
    mask[NEW] = True
    np.testing.assert_array_equal(part.trainable_mask(), mask)
    assert repr(part) == (
        "PartlyFrozen(shape=(10, 4), dtype=float32, trainable 12 of 40 (3 rows along axis 0))"
    )


def test_the_frozen_part_is_the_same_array_object_zero_copy():
    model = LM()
    raw = model.embed.embedding.get_raw_value()
    ff.freeze(model, "embed/embedding", where=ff.Rows(range(7)))
    assert model.embed.embedding.frozen.get_raw_value() is raw
    assert model.embed.embedding.index[...].tolist() == NEW


def test_a_mask_selects_elements_and_the_trainable_part_is_a_flat_vector():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    kernel = whole(model.kernel)
    mask = np.array([[True, False], [False, False], [True, True]])
    ff.freeze(model, "kernel", where=~mask)
    part = model.kernel
    assert part.axis is None
    assert part.index[...].tolist() == [0, 4, 5]
    np.testing.assert_array_equal(part.trainable[...], kernel[mask])
    np.testing.assert_array_equal(whole(part), kernel)


def test_a_mask_of_whole_rows_is_held_as_rows():
    model = LM()
    rows = np.zeros((V, 1), bool)
    rows[NEW] = True  # broadcasts along the features
    ff.freeze(model)
    ff.unfreeze(model, "embed/embedding", where=rows)
    assert model.embed.embedding.axis == 0
    assert model.embed.embedding.trainable.shape == (3, D)


def test_rows_along_another_axis():
    model = nnx.Linear(3, 5, rngs=nnx.Rngs(0))
    kernel = whole(model.kernel)
    ff.freeze(model, "kernel")
    ff.unfreeze(model, "kernel", where=ff.Rows([1, 4], axis=1))
    part = model.kernel
    assert part.axis == 1
    np.testing.assert_array_equal(part.trainable[...], kernel[:, [1, 4]])
    np.testing.assert_array_equal(whole(part), kernel)


def test_composition_freeze_more_unfreeze_all_and_round_trips():
    model = LM()
    table = whole(model.embed.embedding)
    ff.freeze(model, "embed/embedding", where=ff.Rows(range(5)))  # rows 5-9 train
    assert model.embed.embedding.index[...].tolist() == [5, 6, 7, 8, 9]
    ff.freeze(model, "embed/embedding", where=ff.Rows([5, 6]))  # freezing more
    assert model.embed.embedding.index[...].tolist() == NEW
    ff.unfreeze(model, "embed/embedding", where=ff.Rows([0]))
    assert model.embed.embedding.index[...].tolist() == [0, *NEW]
    element = np.zeros((V, D), bool)
    element[1, 2] = True  # one element: no longer whole rows
    ff.unfreeze(model, "embed/embedding", where=element)
    part = model.embed.embedding
    assert part.axis is None
    assert part.trainable.shape == (4 * D + 1,)
    np.testing.assert_array_equal(whole(part), table)
    ff.unfreeze(model, "embed/embedding")  # all of it
    assert type(model.embed.embedding) is nnx.Param
    np.testing.assert_array_equal(whole(model.embed.embedding), table)
    ff.freeze(model, "embed/embedding", where=ff.Rows(range(V)))  # every row: frozen whole
    assert type(model.embed.embedding) is ff.FrozenParam
    ff.unfreeze(model, "embed/embedding", where=ff.Rows(range(V)))
    assert type(model.embed.embedding) is nnx.Param


def test_default_filters_select_partly_frozen_arrays_as_a_unit():
    model = new_token_model()
    ff.freeze(model)  # Trainable selects it: it has trainable elements
    assert type(model.embed.embedding) is ff.FrozenParam
    ff.unfreeze(model, "embed/embedding", where=ff.Rows(NEW))
    ff.unfreeze(model)  # FrozenParam selects it: it has frozen elements
    assert type(model.embed.embedding) is nnx.Param


def test_where_that_changes_nothing_leaves_the_array_as_it_is():
    model = new_token_model()
    part = model.embed.embedding
    ff.unfreeze(model, "embed/embedding", where=ff.Rows([8]))  # trainable already
    assert model.embed.embedding is part
    ff.freeze(model, "embed/embedding", where=ff.Rows([0]))  # frozen already
    assert model.embed.embedding is part


def test_lora_param_type_is_kept_for_the_trainable_part():
    model = nnx.LoRA(3, 2, 4, rngs=nnx.Rngs(0))
    ff.freeze(model, "lora_a", where=ff.Rows([0]))
    assert type(model.lora_a.trainable) is nnx.LoRAParam
    ff.unfreeze(model, "lora_a")
    assert type(model.lora_a) is nnx.LoRAParam


def test_a_tied_array_stays_tied():
    shared = nnx.Param(jnp.ones((V, D)))
    a, b = nnx.Embed(V, D, rngs=nnx.Rngs(0)), nnx.Embed(V, D, rngs=nnx.Rngs(1))
    a.embedding = shared
    b.embedding = shared
    pair = nnx.List([a, b])
    ff.freeze(pair, "0/embedding", where=ff.Rows([0]))
    assert pair[0].embedding is pair[1].embedding
    assert isinstance(pair[1].embedding, ff.PartlyFrozen)


# ----------------------------------------------------------------------------- gradients


def test_grad_holds_only_the_trainable_rows_with_exact_values():
    model = new_token_model()
    full = LM()  # the same weights, all trainable
    grads = ff.grad(lm_loss)(model, TOKENS)
    assert [path for path, _ in nnx.to_flat_state(grads)] == [("embed", "embedding", "trainable")]
    g = grads["embed"]["embedding"]["trainable"][...]
    assert g.shape == (3, D)
    want = nnx.grad(lm_loss)(full, TOKENS)["embed"]["embedding"][...]
    np.testing.assert_allclose(g, np.asarray(want)[NEW], rtol=1e-6, atol=1e-7)


def test_optimizer_state_holds_the_trainable_rows_only():
    model = new_token_model()
    opt = ff.Optimizer(model, optax.adamw(0.1, weight_decay=0.5))
    shapes = {
        "/".join(map(str, p)): v.shape
        for p, v in nnx.to_flat_state(nnx.state(opt.opt_state))
        if np.ndim(v.get_raw_value()) > 0
    }
    assert shapes == {
        "0/mu/embed/embedding/trainable": (3, D),
        "0/nu/embed/embedding/trainable": (3, D),
    }
    tree_state = optax.adam(0.1).init(ff.trainable_tree(model))
    assert [x.shape for x in jax.tree.leaves(tree_state)] == [(), (3, D), (3, D)]


def test_training_moves_only_the_trainable_rows_frozen_rows_bit_identical():
    model = new_token_model()
    before = whole(model.embed.embedding)
    dense = whole(model.dense.kernel)
    opt = ff.Optimizer(model, optax.adamw(0.1, weight_decay=0.5))
    step = ff.TrainStep(model, opt, lm_loss)
    losses = [float(step(TOKENS)) for _ in range(5)]
    assert losses[-1] < losses[0]
    after = whole(model.embed.embedding)
    old = [i for i in range(V) if i not in NEW]
    np.testing.assert_array_equal(after[old], before[old])
    assert np.all(after[NEW] != before[NEW])
    np.testing.assert_array_equal(whole(model.dense.kernel), dense)


def test_nnx_jit_step_and_plain_nnx_grad_see_the_trainable_part():
    model = new_token_model()
    opt = ff.Optimizer(model, optax.sgd(0.5))
    before = whole(model.embed.embedding)

    @nnx.jit
    def step(model, opt, tokens):
        loss, grads = ff.value_and_grad(lm_loss)(model, tokens)
        opt.update(model, grads)
        return loss

    step(model, opt, TOKENS)
    step(model, opt, TOKENS)
    after = whole(model.embed.embedding)
    np.testing.assert_array_equal(np.delete(after, NEW, 0), np.delete(before, NEW, 0))
    plain = nnx.grad(lm_loss)(model, TOKENS)  # nnx.Param only: the trainable part
    assert [p for p, _ in nnx.to_flat_state(plain)] == [("embed", "embedding", "trainable")]


def test_clip_by_global_norm_sees_only_the_trainable_elements():
    max_norm, lr = 1e-3, 1.0
    model = new_token_model()
    grads = ff.grad(lm_loss)(model, TOKENS)
    g = np.asarray(grads["embed"]["embedding"]["trainable"][...], np.float64)
    norm = np.sqrt((g**2).sum())
    assert norm > 10 * max_norm
    table = np.asarray(nnx.grad(lm_loss)(LM(), TOKENS)["embed"]["embedding"][...], np.float64)
    assert np.sqrt((table**2).sum()) > 1.05 * norm  # a norm over the whole table would not pass
    tx = optax.chain(optax.clip_by_global_norm(max_norm), optax.sgd(lr))
    opt = ff.Optimizer(model, tx)
    before = whole(model.embed.embedding)
    opt.update(model, grads)
    delta = whole(model.embed.embedding) - before
    np.testing.assert_allclose(delta[NEW], -lr * g * max_norm / norm, rtol=1e-3, atol=1e-7)
    np.testing.assert_array_equal(np.delete(delta, NEW, 0), 0)


# ----------------------------------------------------------------------------- pytrees


def test_pytree_lengthscale_with_some_dimensions_held_fixed():
    params = {"lengthscale": jnp.array([1.0, 2.0, 3.0, 4.0]), "variance": 1.5}
    fixed = np.array([False, True, False, True])
    params = ff.freeze(params, "lengthscale", where=fixed)
    ls = params["lengthscale"]
    assert isinstance(ls, ff.PartlyFrozen)
    assert ls.trainable.shape == (2,)

    def loss(p, x):
        return jnp.sum(x / p["lengthscale"]) * p["variance"]

    x = jnp.ones(4)
    grads = ff.grad(loss)(params, x)
    np.testing.assert_allclose(grads["lengthscale"].trainable[...], [-1.5, -1.5 / 9])
    assert grads["lengthscale"].frozen is None
    tx = optax.adam(0.1)
    state = tx.init(ff.trainable_tree(params))
    shapes = sorted(x.shape for x in jax.tree.leaves(state))
    assert shapes == [(), (), (), (2,), (2,)]  # the count; mu and nu of variance and of 2 dims
    for _ in range(3):
        grads = jax.jit(ff.grad(loss))(params, x)
        updates, state = tx.update(grads, state)
        params = ff.apply_updates(params, updates)
    value = np.asarray(params["lengthscale"])
    np.testing.assert_array_equal(value[fixed], [2.0, 4.0])
    assert np.all(value[~fixed] != [1.0, 3.0])
    bare = ff.unfreeze(params, "lengthscale")
    assert isinstance(bare["lengthscale"], jax.Array)
    np.testing.assert_array_equal(bare["lengthscale"], value)


# ----------------------------------------------------------------------------- property

OPTIMIZERS = {
    "adamw": lambda: optax.adamw(0.1, weight_decay=0.5),
    "clip-adamw": lambda: optax.chain(
        optax.clip_by_global_norm(0.01), optax.adamw(0.1, weight_decay=0.5)
    ),
    "decay-sgd": lambda: optax.chain(optax.add_decayed_weights(0.5), optax.sgd(0.1)),
    "lion": lambda: optax.lion(0.1, weight_decay=0.5),
    "sgd-momentum": lambda: optax.sgd(0.1, momentum=0.9),
}


@settings(max_examples=15, deadline=None)
@given(
    mask=st.lists(st.booleans(), min_size=V * D, max_size=V * D),
    rows=st.booleans(),
    tx_name=st.sampled_from(sorted(OPTIMIZERS)),
)
def test_property_frozen_elements_never_move(mask, rows, tx_name):
    model = LM()
    ff.freeze(model, "dense/.*")
    trainable = np.array(mask).reshape(V, D)
    if rows:
        trainable = np.broadcast_to(trainable[:, :1], (V, D))
    before = whole(model.embed.embedding)
    ff.freeze(model, "embed/embedding", where=~trainable, missing_ok=True)
    opt = ff.Optimizer(model, OPTIMIZERS[tx_name]())
    for _ in range(2):
        opt.update(model, ff.grad(lm_loss)(model, TOKENS))
    after = whole(model.embed.embedding)
    np.testing.assert_array_equal(after[~trainable], before[~trainable])
    sizes = [x.size for x in jax.tree.leaves(nnx.state(opt.opt_state)) if np.ndim(x) > 0]
    assert all(size == trainable.sum() for size in sizes)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("where", "error", "match"),
    [
        (np.array([1, 2]), TypeError, r"must be a boolean mask.*For row numbers pass ff\.Rows"),
        ("rows", TypeError, r"`where` passed to freeze\(\) must be a boolean mask"),
        (
            np.ones((3,), bool),
            ValueError,
            r"shape \(3,\), which does not broadcast to 'embed/embedding' of shape \(10, 4\)",
        ),
        (
            ff.Rows([3, 12]),
            ValueError,
            r"rows \[12\] out of range for 'embed/embedding', which has 10 along axis 0",
        ),
        (ff.Rows([1], axis=2), ValueError, r"has an axis out of range for 'embed/embedding'"),
    ],
    ids=["integers", "string", "shape", "rows-out-of-range", "axis-out-of-range"],
)
def test_bad_where(where, error, match):
    with pytest.raises(error, match=match):
        ff.freeze(LM(), "embed/embedding", where=where)


@pytest.mark.parametrize(
    ("ids", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, r"`ids` must be a non-empty list of row numbers"),
        ([[1, 2]], {}, ValueError, r"`ids` must be a non-empty list"),
        ([True, False], {}, TypeError, r"got a boolean array.*where=mask itself"),
        ([1.5], {}, TypeError, r"`ids` must be whole row numbers"),
        ([1], {"axis": "0"}, TypeError, r"`axis` must be an int"),
    ],
    ids=["empty", "2d", "bools", "floats", "axis"],
)
def test_bad_rows(ids, kwargs, error, match):
    with pytest.raises(error, match=match):
        ff.Rows(ids, **kwargs)


def test_where_with_dtype_is_an_error():
    with pytest.raises(ValueError, match=r"`dtype` .* cannot be combined with `where`"):
        ff.freeze(LM(), "embed/embedding", where=ff.Rows([0]), dtype=jnp.bfloat16)


def test_where_on_an_array_frozen_in_another_dtype_is_an_error():
    model = ff.freeze(LM(), "embed/embedding", dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"which was frozen in bfloat16: unfreeze it whole"):
        ff.unfreeze(model, "embed/embedding", where=ff.Rows([0]))


def test_a_partly_frozen_array_frozen_whole_in_another_dtype_unfreezes_to_its_type():
    model = new_token_model()
    model.embed.embedding.trainable[...] += 1.0
    assembled = whole(model.embed.embedding)
    ff.freeze(model, "embed/embedding", dtype=jnp.bfloat16)
    frozen = model.embed.embedding
    assert type(frozen) is ff.FrozenParam
    assert frozen.dtype == jnp.bfloat16
    np.testing.assert_array_equal(whole(frozen), assembled.astype(jnp.bfloat16))
    ff.unfreeze(model, "embed/embedding")
    back = model.embed.embedding
    assert type(back) is nnx.Param
    assert back.dtype == jnp.float32
    np.testing.assert_array_equal(whole(back), assembled.astype(jnp.bfloat16).astype(np.float32))


def test_traced_where_is_an_error():
    model = LM()

    @jax.jit
    def f(mask):
        ff.freeze(model, "embed/embedding", where=mask)
        return mask

    with pytest.raises(TypeError, match=r"`where` passed to freeze\(\) must be concrete"):
        f(np.ones((V, D), bool))


def test_summary_counts_trainable_and_frozen_elements_separately():
    model = new_token_model()
    rows = {r.path: (r.status, r.count, r.bytes) for r in ff.summary(model).rows}
    assert rows["embed/embedding/trainable"] == ("trainable", 3 * D, 3 * D * 4)
    assert rows["embed/embedding/frozen"] == ("frozen", (V - 3) * D, V * D * 4)
    assert rows["embed/embedding/index"] == ("state", 3, 12)
    assert ff.summary(model).trainable_count == 3 * D


# ----------------------------------------------------------------------------- checkpoints


def _trained_run(tmp_path):
    model = new_token_model()
    opt = ff.Optimizer(model, optax.adam(0.05))
    step = ff.TrainStep(model, opt, lm_loss)
    for _ in range(3):
        step(TOKENS)
    ff.checkpoint.save(tmp_path / "ckpt", (model, opt))
    return model, opt, step


def test_checkpoint_restores_the_partition_into_a_model_that_holds_the_array_whole(tmp_path):
    model, opt, step = _trained_run(tmp_path)
    fresh = LM(seed=5)  # all trainable, other values
    fresh_opt = ff.Optimizer(fresh, optax.adam(0.05))
    fresh, fresh_opt = ff.checkpoint.restore(tmp_path / "ckpt", (fresh, fresh_opt))
    part = fresh.embed.embedding
    assert isinstance(part, ff.PartlyFrozen)
    assert part.axis == 0
    assert part.index[...].tolist() == NEW
    np.testing.assert_array_equal(whole(part), whole(model.embed.embedding))
    assert type(fresh.dense.kernel) is ff.FrozenParam
    mu = fresh_opt.opt_state[0].mu["embed"]["embedding"]["trainable"][...]
    np.testing.assert_array_equal(mu, opt.opt_state[0].mu["embed"]["embedding"]["trainable"][...])
    resumed = ff.TrainStep(fresh, fresh_opt, lm_loss)
    assert float(resumed(TOKENS)) == float(step(TOKENS))  # training resumes bit-exactly
    np.testing.assert_array_equal(whole(fresh.embed.embedding), whole(model.embed.embedding))


def test_checkpoint_replaces_a_target_split_another_way(tmp_path):
    model, _, _ = _trained_run(tmp_path)
    target = LM(seed=5)
    ff.freeze(target, "embed/embedding", where=~np.eye(V, D, dtype=bool))  # elements
    with pytest.warns(ff.checkpoint.PartialRestoreWarning, match="1/opt_state"):
        restored = ff.checkpoint.restore(tmp_path / "ckpt", (target,), partial=True)[0]
    assert restored.embed.embedding.axis == 0
    assert restored.embed.embedding.index[...].tolist() == NEW
    np.testing.assert_array_equal(whole(restored.embed.embedding), whole(model.embed.embedding))


def test_checkpoint_saved_whole_makes_a_partly_frozen_target_whole(tmp_path):
    model = LM()
    ff.freeze(model, "dense/.*")
    ff.checkpoint.save(tmp_path / "whole", model)
    target = new_token_model(seed=3)
    restored = ff.checkpoint.restore(tmp_path / "whole", target)
    assert type(restored.embed.embedding) is nnx.Param
    np.testing.assert_array_equal(whole(restored.embed.embedding), whole(model.embed.embedding))
    assert type(restored.dense.kernel) is ff.FrozenParam


def test_checkpoint_of_a_pytree_with_fixed_dimensions(tmp_path):
    params = {"lengthscale": jnp.array([1.0, 2.0, 3.0, 4.0]), "variance": jnp.asarray(1.5)}
    saved = ff.freeze(params, "lengthscale", where=np.array([False, True, False, True]))
    ff.checkpoint.save(tmp_path / "gp", saved)
    fresh = {"lengthscale": jnp.zeros(4), "variance": jnp.asarray(0.0)}
    restored = ff.checkpoint.restore(tmp_path / "gp", fresh)
    ls = restored["lengthscale"]
    assert isinstance(ls, ff.PartlyFrozen)
    assert ls.index[...].tolist() == [0, 2]
    np.testing.assert_array_equal(np.asarray(ls), [1.0, 2.0, 3.0, 4.0])


def test_checkpoint_restores_into_an_abstract_model(tmp_path):
    model, _, _ = _trained_run(tmp_path)
    abstract = nnx.eval_shape(lambda: LM(seed=1))
    with pytest.warns(ff.checkpoint.PartialRestoreWarning, match="1/opt_state"):
        restored = ff.checkpoint.restore(tmp_path / "ckpt", (abstract,), partial=True)[0]
    assert restored.embed.embedding.index[...].tolist() == NEW
    np.testing.assert_array_equal(whole(restored.embed.embedding), whole(model.embed.embedding))


def test_describe_counts_trainable_and_frozen_elements_separately(tmp_path):
    _trained_run(tmp_path)
    rows = {
        r.path: (r.status, r.count, r.bytes) for r in ff.checkpoint.describe(tmp_path / "ckpt").rows
    }
    assert rows["0/embed/embedding/trainable"] == ("trainable", 3 * D, 3 * D * 4)
    assert rows["0/embed/embedding/frozen"] == ("frozen", (V - 3) * D, V * D * 4)
    assert rows["0/embed/embedding/index"] == ("state", 3, 12)


def test_freezing_gives_a_partly_frozen_array_back_on_exit():
    model = new_token_model()
    part = model.embed.embedding
    ff.unfreeze(model, "dense/.*")
    with ff.freezing(model):
        assert type(model.embed.embedding) is ff.FrozenParam
        assert type(model.dense.kernel) is ff.FrozenParam
    assert model.embed.embedding is part
    assert type(model.dense.kernel) is nnx.Param


def test_one_optimizer_and_step_follow_a_change_to_part_of_an_array():
    model = LM()
    ff.freeze(model, "dense/.*")
    opt = ff.Optimizer(model, optax.adamw(0.05, weight_decay=0.1))
    step = ff.TrainStep(model, opt, lm_loss)
    for _ in range(2):
        step(TOKENS)
    ff.freeze(model, "embed/embedding", where=ff.Rows(range(7)))  # keep training rows 7-9
    before = whole(model.embed.embedding)
    for _ in range(3):
        step(TOKENS)
    after = whole(model.embed.embedding)
    np.testing.assert_array_equal(after[:7], before[:7])
    assert np.all(after[NEW] != before[NEW])
    mu = opt.opt_state[0].mu
    assert [p for p, _ in nnx.to_flat_state(mu)] == [("embed", "embedding", "trainable")]
    assert opt.own_paths == (("embed", "embedding", "trainable"),)  # a fresh start for it


# ----------------------------------------------------------------------------- nnx.Embed


def test_embed_with_trainable_rows_looks_them_up_apart_and_switches_back():
    embed = ff.freeze(nnx.Embed(V, D, rngs=nnx.Rngs(0)))
    plain = nnx.Embed(V, D, rngs=nnx.Rngs(0))
    ff.unfreeze(embed, where=ff.Rows(NEW))
    assert isinstance(embed, nnx.Embed)
    assert type(embed) is not nnx.Embed  # the lookup that reads the trainable rows apart
    tokens = jnp.array([[0, 7, 9, V], [8, 8, 1, 2]])  # V: out of range, NaN as in Flax
    np.testing.assert_array_equal(embed(tokens), plain(tokens))

    def loss(m):
        return (jnp.tanh(m(tokens[:, :3])) ** 2).sum()

    g = ff.grad(loss)(embed)["embedding"]["trainable"][...]
    want = nnx.grad(loss)(plain)["embedding"][...]
    np.testing.assert_allclose(g, np.asarray(want)[NEW], rtol=1e-6, atol=1e-7)
    query = jnp.linspace(-1.0, 1.0, 2 * D).reshape(2, D)
    np.testing.assert_allclose(embed.attend(query), plain.attend(query), rtol=1e-6)

    def tied(m):
        return (jax.nn.log_softmax(m.attend(jnp.tanh(m(tokens[:, :3])))) ** 2).sum()

    g = ff.grad(tied)(embed)["embedding"]["trainable"][...]
    want = nnx.grad(tied)(plain)["embedding"][...]
    np.testing.assert_allclose(g, np.asarray(want)[NEW], rtol=1e-5, atol=1e-6)
    hlo = jax.jit(ff.grad(loss)).lower(embed).compile().as_text() or ""
    lines = [line for line in hlo.splitlines() if " scatter(" in line]
    scatters = [line.split("=", 1)[1].split("scatter(")[0] for line in lines]
    assert any(f"f32[{len(NEW)},{D}]" in result for result in scatters)  # into the rows
    assert not any(f"f32[{V},{D}]" in result for result in scatters)  # never into the table
    ff.unfreeze(embed)
    assert type(embed) is nnx.Embed


def test_an_embed_subclass_with_its_own_call_keeps_it():
    class Scaled(nnx.Embed):
        def __call__(self, inputs, out_sharding=None):
            return 2 * super().__call__(inputs, out_sharding)

    embed = ff.freeze(Scaled(V, D, rngs=nnx.Rngs(0)))
    ff.unfreeze(embed, where=ff.Rows(NEW))
    assert type(embed) is Scaled
    np.testing.assert_array_equal(embed(jnp.array([7])), 2 * embed.embedding[...][7][None])


def test_flags_target_refuses_a_checkpoint_split_otherwise(tmp_path):
    _trained_run(tmp_path)
    target = LM(seed=5)
    before = whole(target.embed.embedding)
    with pytest.raises(
        ValueError, match=r"`flags` is 'target', but checkpoint .* splits \[0/embed/embedding\]"
    ):
        ff.checkpoint.restore(tmp_path / "ckpt", (target,), flags="target", partial=True)
    assert type(target.embed.embedding) is nnx.Param  # nothing changed
    np.testing.assert_array_equal(whole(target.embed.embedding), before)
