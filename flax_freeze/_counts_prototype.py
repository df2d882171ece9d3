import jax, jax.numpy as jnp, optax, numpy as np
from jax._src.interpreters import partial_eval as pe
from jax._src import core
from flax_freeze._groups import count_paths, owner

def per_param_update(tx, grads, state, params, counts):
    """counts: {param keypath: [count values]} -> (updates, new_state, new_counts)."""
    flat_s, sdef = jax.tree_util.tree_flatten_with_path(state)
    ckeys = set(count_paths(state, False))
    cidx = [i for i, (k, _) in enumerate(flat_s) if k in ckeys]
    oidx = [i for i in range(len(flat_s)) if i not in cidx]
    g_leaves, gdef = jax.tree_util.tree_flatten(grads)
    p_flat, pdef = jax.tree_util.tree_flatten_with_path(params)
    p_keys = [k for k, _ in p_flat]
    out_keys = []
    def f(cs, others, g, p):
        leaves = [None] * len(flat_s)
        for i, c in zip(cidx, cs): leaves[i] = c
        for i, o in zip(oidx, others): leaves[i] = o
        u, s = tx.update(jax.tree.unflatten(gdef, g), jax.tree.unflatten(sdef, leaves), jax.tree.unflatten(pdef, p))
        uk, s_flat = jax.tree_util.tree_flatten_with_path(u)[0], jax.tree_util.tree_flatten_with_path(s)[0]
        out_keys[:] = [("u", k) for k, _ in uk] + [("s", k) for k, _ in s_flat]
        f.trees = (jax.tree.structure(u), jax.tree.structure(s))
        return [v for _, v in uk] + [v for _, v in s_flat]
    counts = dict(zip(p_keys, counts))
    first = counts[p_keys[0]]
    others = [flat_s[i][1] for i in oidx]
    p_leaves = [v for _, v in p_flat]
    closed = jax.make_jaxpr(f)(list(first), others, g_leaves, p_leaves)
    unknowns = [True] * len(cidx) + [False] * (len(closed.in_avals) - len(cidx))
    known, unknown, out_uk, _ = pe.partial_eval_jaxpr_nounits(closed, unknowns, instantiate=False)
    kout = core.eval_jaxpr(known.jaxpr, known.consts, *others, *g_leaves, *p_leaves)
    n_known = out_uk.count(False)
    kvals, res = kout[:n_known], kout[n_known:]
    uk_positions = [i for i, u in enumerate(out_uk) if u]
    # owner of each unknown output
    pset = {k: None for k in p_keys}
    def own(i):
        kind, k = out_keys[i]
        return k if kind == "u" else owner(k, pset)
    count_out = [i for i in uk_positions if out_keys[i][0] == "s" and out_keys[i][1] in ckeys]
    outs = [None] * len(out_keys)
    kit = iter(kvals)
    for i, u in enumerate(out_uk):
        if not u: outs[i] = next(kit)
    new_counts = {}
    shared = None
    for p in p_keys:
        mine = [j for j, i in enumerate(uk_positions) if own(i) == p or i in count_out]
        used = [j in set(mine) for j in range(len(uk_positions))]
        dced, _ = pe.dce_jaxpr(unknown.jaxpr, used, instantiate=True)
        vals = core.eval_jaxpr(dced, unknown.consts, *res, *counts[p])
        for j, v in zip([j for j in range(len(uk_positions)) if used[j]], vals):
            i = uk_positions[j]
            if i in count_out:
                new_counts.setdefault(p, []).append(v)
            else:
                outs[i] = v
    # count outputs in the state: from the first param's
    first_p = p_keys[0]
    for n, i in enumerate(count_out):
        outs[i] = new_counts[first_p][n]
    # unknown outputs owned by no param and not counts: evaluate with the first param's counts
    rest = [j for j, i in enumerate(uk_positions) if outs[i] is None]
    if rest:
        used = [j in set(rest) for j in range(len(uk_positions))]
        dced, _ = pe.dce_jaxpr(unknown.jaxpr, used, instantiate=True)
        vals = core.eval_jaxpr(dced, unknown.consts, *res, *counts[first_p])
        for j, v in zip(rest, vals): outs[uk_positions[j]] = v
    utree, stree = f.trees
    nu = len(jax.tree.leaves(utree, is_leaf=lambda x: x is None)) if False else utree.num_leaves
    return jax.tree.unflatten(utree, outs[:nu]), jax.tree.unflatten(stree, outs[nu:]), [new_counts[p] for p in p_keys]

params = {"a": jnp.arange(3.0), "b": jnp.ones((2, 2))}
g = {"a": jnp.array([0.1, -0.2, 0.3]), "b": jnp.full((2, 2), 0.05)}
for name, tx in [("adam", optax.adam(1e-2)), ("clip-adamw", optax.chain(optax.clip_by_global_norm(0.1), optax.adamw(1e-2)))]:
    st = tx.init(params)
    ka, kb = jax.tree_util.tree_flatten_with_path(params)[0][0][0], jax.tree_util.tree_flatten_with_path(params)[0][1][0]
    counts = [[jnp.int32(120)], [jnp.int32(0)]]
    u, s, nc = jax.jit(lambda g, st, p, c: per_param_update(tx, g, st, p, c))(g, st, params, counts)
    # reference: a with count 120, b fresh
    st_a = jax.tree.map(lambda x: x, st)
    def with_count(st, c):
        return jax.tree_util.tree_map_with_path(lambda k, x: jnp.int32(c) if k in set(count_paths(st, False)) else x, st)
    ua, _ = tx.update(g, with_count(st, 120), params)
    ub, _ = tx.update(g, with_count(st, 0), params)
    print(name, np.allclose(u["a"], ua["a"]), np.allclose(u["b"], ub["b"]), [[int(x) for x in v] for v in nc])
    f1 = jax.jit(lambda g, st, p, c: per_param_update(tx, g, st, p, c)).lower(g, st, params, counts).compile().cost_analysis()
    f0 = jax.jit(lambda g, st, p: tx.update(g, st, p)).lower(g, st, params).compile().cost_analysis()
    print("flops", f1["flops"], f0["flops"])
