"""Likely user mistakes and what they get: a message that names the problem and the fix.

A catalogue of bad inputs to the public functions of filters, re-typing, grad,
summary and Linen support. Each entry asserts the exception type and a
``match=`` on the text that names the argument and the problem. ``before``
records what the same input gave before these checks existed: a clear
message, an unclear one (raised deep in JAX/Flax/optax, or with no hint), or a
silent wrong result.
"""

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flax_freeze as ff
from flax_freeze import linen as ffl

X = jnp.ones((1, 2))
TREE = {"a": jnp.ones(3), "b": ff.FrozenParam(jnp.ones(2))}


def lin() -> nnx.Linear:
    return nnx.Linear(2, 3, rngs=nnx.Rngs(0))


def loss_nnx(m: Any) -> Any:
    return m(X).sum()


def dense_variables() -> Any:
    return nn.Dense(3).init(jax.random.key(0), X)


def dense_params() -> Any:
    return dense_variables()["params"]


def loss_linen(params: Any) -> Any:
    out: Any = nn.Dense(3).apply({"params": params}, X)
    return (out**2).sum()


def loss_variables(variables: Any) -> Any:
    out: Any = nn.Dense(3).apply(variables, X)
    return out.sum()


def state(frozen: str | None = "kernel", tx: Any = None) -> ffl.TrainState:
    params = dense_params()
    if frozen is not None:
        params = ffl.freeze(params, frozen)
    return ffl.TrainState.create(
        apply_fn=nn.Dense(3).apply, params=params, tx=tx or optax.adamw(0.1)
    )


def apply(grads_of: Any, st: ffl.TrainState | None = None) -> Any:
    st = st or state()
    return st.apply_gradients(grads=grads_of(st))


def ff_grads(st: ffl.TrainState) -> Any:
    return ff.grad(loss_linen)(st.params)


def with_attr(module: Any, **attrs: Any) -> Any:
    for name, value in attrs.items():
        setattr(module, name, value)
    return module


# --------------------------------------------------------------------------- helpers for cases


def grads_missing_bias(st: ffl.TrainState) -> Any:
    g = ff_grads(st)
    del g["bias"]
    return g


def grads_wrong_shape(shape: tuple[int, ...]):
    def make(st: ffl.TrainState) -> Any:
        g = ff_grads(st)
        g["bias"] = jnp.ones(shape)
        return g

    return make


def stale_after(change: str) -> Any:
    st = state()
    grads = ff_grads(st)
    st = st.unfreeze("kernel") if change == "unfreeze" else st.freeze("bias")
    return st.apply_gradients(grads=grads)


def opt_state_not_migrated() -> Any:
    st = state(frozen=None)
    st = st.replace(params=ffl.freeze(st.params, "kernel"))  # not st.freeze(...)
    return st.apply_gradients(grads=ff_grads(st))


def freezing(node: Any, filter: Any) -> None:
    with ff.freezing(node, filter):
        pass


def has_no_frozen_param() -> Any:
    return ff.unfreeze(lin())


GOT_F = r"`f` must be the function to differentiate, got"
NNX_FILTER_ON_LINEN = (
    r"`filter` .* is an NNX filter that selects variables by type or tag, but Linen params "
    r"are plain arrays .* ff\.PathRegex\('Dense_0/\.\*'\), a regex string .* or a callable"
)

# (call, exception, match, before): before is what this input gave before these checks.
CASES = [
    # ----------------------------------------------------------------- ffl.TrainState gradients
    pytest.param(
        lambda: apply(lambda st: jax.grad(loss_linen)(st.params)),
        ValueError,
        r"`grads` has a gradient at frozen parameter\(s\) \[kernel\]: use ff\.grad / ffl\.grad, "
        r"which returns None at frozen leaves",
        "unclear",
        id="ts-apply-jax-grad-boxed",
    ),
    pytest.param(
        lambda: apply(lambda st: jax.grad(loss_linen)(nn.meta.unbox(st.params))),
        ValueError,
        r"`grads` has a gradient at frozen parameter\(s\) \[kernel\]: use ff\.grad / ffl\.grad",
        "unclear",
        id="ts-apply-jax-grad-unboxed",
    ),
    pytest.param(
        lambda: stale_after("freeze"),
        ValueError,
        r"`grads` has a gradient at frozen parameter\(s\) \[bias\].*computed before "
        r"state\.freeze\(\.\.\.\) must be computed again",
        "unclear",
        id="ts-apply-grads-from-before-freeze",
    ),
    pytest.param(
        lambda: stale_after("unfreeze"),
        ValueError,
        r"`grads` has no gradient \(None\) at trainable parameter\(s\) \[kernel\]: were they "
        r"computed before state\.unfreeze",
        "unclear",
        id="ts-apply-grads-from-before-unfreeze",
    ),
    pytest.param(
        lambda: apply(grads_missing_bias),
        ValueError,
        r"`grads` does not mirror the params: missing \[bias\]\. Pass the gradients of "
        r"state\.params",
        "unclear",
        id="ts-apply-grads-missing-a-key",
    ),
    pytest.param(
        lambda: apply(lambda st: {**ff_grads(st), "extra": jnp.ones(2)}),
        ValueError,
        r"`grads` does not mirror the params: unexpected \[extra\]",
        "unclear",
        id="ts-apply-grads-extra-key",
    ),
    pytest.param(
        lambda: apply(lambda st: {"params": ff_grads(st), "batch_stats": {}}),
        ValueError,
        r"`grads` is the gradient of a whole variables dict \(collections \['batch_stats', "
        r"'params'\]\): pass grads\['params'\], or use ffl\.grad",
        "unclear",
        id="ts-apply-grads-of-variables-dict",
    ),
    pytest.param(
        lambda: apply(lambda st: None),
        TypeError,
        r"`grads` must mirror the Linen params dict, got None\. Compute them with "
        r"ff\.grad\(loss\)\(state\.params\)",
        "unclear",
        id="ts-apply-grads-none",
    ),
    pytest.param(
        lambda: apply(lambda st: ff.grad(loss_nnx)(lin())),
        TypeError,
        r"`grads` must mirror the Linen params dict, got State\(",
        "unclear",
        id="ts-apply-grads-nnx-state",
    ),
    pytest.param(
        lambda: apply(grads_wrong_shape((5,))),
        ValueError,
        r"`grads` has the wrong shape at \[bias \(gradient \(5,\), parameter \(3,\)\)\]",
        "unclear",
        id="ts-apply-grads-wrong-shape",
    ),
    pytest.param(
        lambda: apply(grads_wrong_shape((1, 3))),
        ValueError,
        r"`grads` has the wrong shape at \[bias \(gradient \(1, 3\), parameter \(3,\)\)\]",
        "silent",  # broadcast: the parameter silently became (1, 3)
        id="ts-apply-grads-broadcastable-shape",
    ),
    pytest.param(
        opt_state_not_migrated,
        ValueError,
        r"`opt_state` does not match the trainable parameters.*state\.freeze\(\.\.\.\) / "
        r"state\.unfreeze\(\.\.\.\), which migrate the optimizer state, not with "
        r"state\.replace\(params=ffl\.freeze",
        "unclear",
        id="ts-apply-opt-state-not-migrated",
    ),
    # ----------------------------------------------------------------- ffl.TrainState.create
    pytest.param(
        lambda: ffl.TrainState.create(apply_fn=None, params=dense_params(), tx=0.1),
        TypeError,
        r"`tx` must be an optax GradientTransformation such as optax\.adam\(1e-3\), got 0\.1",
        "unclear",
        id="ts-create-tx-learning-rate",
    ),
    pytest.param(
        lambda: ffl.TrainState.create(apply_fn=None, params=dense_params(), tx=optax.adam),
        TypeError,
        r"`tx` must be an optax GradientTransformation .* Call the factory: optax\.adam\(1e-3\)",
        "unclear",
        id="ts-create-tx-factory-not-called",
    ),
    pytest.param(
        lambda: ffl.TrainState.create(apply_fn=None, params=None, tx=optax.adam(0.1)),
        TypeError,
        r"`params` must be a Linen params dict, got None",
        "silent",
        id="ts-create-params-none",
    ),
    pytest.param(
        lambda: ffl.TrainState.create(apply_fn=None, params=lin(), tx=optax.adam(0.1)),
        TypeError,
        r"`params` is an NNX Linear; ffl\.TrainState holds Linen params dicts\. For NNX "
        r"models use ff\.Optimizer\(model, tx\)",
        "silent",
        id="ts-create-params-nnx-module",
    ),
    pytest.param(
        lambda: ffl.TrainState.create(
            apply_fn=None,
            params={**dense_variables(), "batch_stats": {"mean": jnp.zeros(3)}},
            tx=optax.adam(0.1),
        ),
        ValueError,
        r"`params` looks like a whole variables dict \(collections \['batch_stats', "
        r"'params'\]\).*Pass variables\['params'\]",
        "silent",  # optimizer state for the batch statistics
        id="ts-create-params-whole-variables-dict",
    ),
    pytest.param(
        lambda: state().freeze(nnx.Param),
        TypeError,
        NNX_FILTER_ON_LINEN,
        "unclear",
        id="ts-freeze-nnx-param-filter",
    ),
    # ----------------------------------------------------------------- ffl.freeze / unfreeze
    pytest.param(
        lambda: ffl.freeze(dense_params(), nnx.Param),
        TypeError,
        NNX_FILTER_ON_LINEN,
        "unclear",
        id="ffl-freeze-nnx-param-filter",
    ),
    pytest.param(
        lambda: ffl.unfreeze(ffl.freeze(dense_params()), ff.FrozenParam),
        TypeError,
        NNX_FILTER_ON_LINEN,
        "unclear",
        id="ffl-unfreeze-frozenparam-filter",
    ),
    pytest.param(
        lambda: ffl.freeze(dense_params(), ff.Trainable),
        TypeError,
        NNX_FILTER_ON_LINEN,
        "unclear",
        id="ffl-freeze-trainable-filter",
    ),
    pytest.param(
        lambda: ffl.freeze(dense_params(), nnx.All(nnx.Param, nnx.PathContains("kernel"))),
        TypeError,
        NNX_FILTER_ON_LINEN,
        "unclear",
        id="ffl-freeze-nnx-all-with-type",
    ),
    pytest.param(
        lambda: ffl.freeze(dense_params(), lambda path: True),
        TypeError,
        r"`filter` .* must be callable as \(path, value\) -> bool, but its signature is "
        r"\(path\)",
        "unclear",
        id="ffl-freeze-one-argument-lambda",
    ),
    pytest.param(
        lambda: ffl.freeze(dense_params(), 3),
        TypeError,
        r"`filter` must be ff\.PathRegex, a regex string or a callable \(path, value\) -> "
        r"bool, got 3",
        "clear",
        id="ffl-freeze-int-filter",
    ),
    pytest.param(
        lambda: ffl.freeze(dense_params(), "kernel("),
        ValueError,
        r"`pattern` 'kernel\(' is not a valid regular expression",
        "clear",
        id="ffl-freeze-bad-regex",
    ),
    pytest.param(
        lambda: ffl.freeze(dense_params(), "Dense_0/.*"),
        ValueError,
        r"`filter` 'Dense_0/\.\*' passed to ffl\.freeze\(\) matched no parameter of dict\. "
        r"Its parameter paths are: bias",
        "clear",
        id="ffl-freeze-matches-nothing",
    ),
    pytest.param(
        lambda: ffl.freeze(lin()),
        TypeError,
        r"`tree` passed to ffl\.freeze\(\) must be a Linen params or variables dict, got "
        r"Linear\(.*For NNX modules use ff\.freeze\(model, filter\)",
        "silent",  # boxed the values inside the nnx.Param variables
        id="ffl-freeze-nnx-module",
    ),
    pytest.param(
        lambda: ffl.freeze({"encoder": lin()}),
        TypeError,
        r"`tree` passed to ffl\.freeze\(\) holds an NNX Linear at encoder: ffl\.freeze works "
        r"on Linen params dicts",
        "silent",
        id="ffl-freeze-dict-holding-nnx-module",
    ),
    pytest.param(
        lambda: ffl.freeze(state()),
        TypeError,
        r"`tree` passed to ffl\.freeze\(\) must be a Linen params or variables dict, got "
        r"TrainState\(.*call state\.freeze\(filter\), which also migrates the optimizer state",
        "silent",  # boxed the optimizer moments too, left opt_state unmigrated
        id="ffl-freeze-trainstate",
    ),
    pytest.param(
        lambda: ffl.unfreeze(None),
        TypeError,
        r"`tree` passed to ffl\.unfreeze\(\) must be a Linen params or variables dict, got None",
        "unclear",
        id="ffl-unfreeze-none",
    ),
    pytest.param(
        lambda: ffl.freeze(nn.Dense(3)),
        TypeError,
        r"`tree` passed to ffl\.freeze\(\) must be .* got Dense\(.*A Linen module holds no "
        r"parameters: pass module\.init\(key, x\)\['params'\]",
        "unclear",
        id="ffl-freeze-linen-module",
    ),
    # ----------------------------------------------------------------- ffl.grad / frozen / to_nnx
    pytest.param(
        lambda: ffl.grad(loss_linen)(dense_params()),
        TypeError,
        r"`argnums` names argument 0, which is not a Linen variables dict",
        "clear",
        id="ffl-grad-of-params-dict",
    ),
    pytest.param(
        lambda: ffl.grad(dense_variables()),  # type: ignore[arg-type]
        TypeError,
        GOT_F + r" \{'params'",
        "unclear",
        id="ffl-grad-variables-instead-of-function",
    ),
    pytest.param(
        lambda: ffl.grad(loss_variables, has_aux=True)(dense_variables()),
        TypeError,
        r"With `has_aux=True`, `f` must return a pair \(loss, aux\), but it returned an array "
        r"of shape \(\)\. Return \(loss, aux\), or pass has_aux=False",
        "unclear",
        id="ffl-grad-has-aux-but-scalar",
    ),
    pytest.param(
        lambda: ffl.frozen(jnp.ones(3)),  # type: ignore[arg-type]
        TypeError,
        r"`init` must be an initializer function, e\.g\. nn\.initializers\.lecun_normal\(\), "
        r"got Array",
        "unclear",
        id="ffl-frozen-array",
    ),
    pytest.param(
        lambda: nn.Dense(3, kernel_init=ffl.frozen(nn.initializers.lecun_normal)).init(
            jax.random.key(0), X
        ),
        TypeError,
        r"`init` <function lecun_normal .*> returned a function, not an array: it is an "
        r"initializer factory\. Call it first",
        "unclear",
        id="ffl-frozen-factory-not-called",
    ),
    pytest.param(
        lambda: ffl.to_nnx(nn.Dense(3)),
        TypeError,
        r"`node` must be an NNX module holding nnx\.bridge\.ToNNX wrappers, got Dense\(.*"
        r"Wrap a Linen module first: model = nnx\.bridge\.ToNNX\(module",
        "silent",  # returned the Linen module unchanged
        id="ffl-to-nnx-linen-module",
    ),
    pytest.param(
        lambda: ffl.to_nnx(ffl.freeze(dense_params())),
        TypeError,
        r"`node` must be an NNX module holding nnx\.bridge\.ToNNX wrappers, got \{",
        "silent",
        id="ffl-to-nnx-params-dict",
    ),
    # ----------------------------------------------------------------- ff.freeze / unfreeze
    pytest.param(
        lambda: ff.freeze(None),
        TypeError,
        r"`node` passed to freeze\(\) must be an NNX module or a pytree of modules, variables "
        r"or arrays, got None",
        "unclear",
        id="freeze-none",
    ),
    pytest.param(
        lambda: ff.freeze("model"),
        TypeError,
        r"`node` passed to freeze\(\) must be .* got 'model'",
        "unclear",
        id="freeze-string",
    ),
    pytest.param(
        lambda: ff.freeze(nnx.Linear),
        TypeError,
        r"`node` passed to freeze\(\) must be .* got <class .*Linear'>\. Pass an instance",
        "unclear",
        id="freeze-module-class",
    ),
    pytest.param(
        lambda: ff.freeze(nn.Dense(3)),
        TypeError,
        r"`node` passed to freeze\(\) must be .*A Linen module holds no parameters: freeze its "
        r"params dict with ffl\.freeze\(variables\['params'\], filter\)",
        "unclear",
        id="freeze-linen-module",
    ),
    pytest.param(
        lambda: ff.freeze(ffl.freeze(dense_params())),
        ValueError,
        r"`filter` Trainable passed to freeze\(\) matched no parameter of dict.*It holds Linen "
        r"frozen parameters \(ffl\.FrozenBox\): use ffl\.freeze / ffl\.unfreeze",
        "unclear",
        id="freeze-linen-params-with-boxes",
    ),
    pytest.param(
        lambda: ff.freeze(nnx.Optimizer(lin(), optax.adam(0.1), wrt=nnx.Param)),
        ValueError,
        r"matched no parameter of Optimizer.*An nnx\.Optimizer holds no model parameters: "
        r"freeze the model itself",
        "unclear",
        id="freeze-optimizer",
    ),
    pytest.param(
        lambda: ff.freeze({"steps": 3, "name": "run"}),
        ValueError,
        r"matched no parameter of dict.*It holds no parameter at all: .*integers, booleans and "
        r"strings are never parameters",
        "unclear",
        id="freeze-pytree-without-parameters",
    ),
    pytest.param(
        lambda: ff.freeze(lin(), "kernal"),
        ValueError,
        r"`filter` 'kernal' passed to freeze\(\) matched no parameter of Linear.*A plain string "
        r"is a path regex here, as ff\.PathRegex\('kernal'\); to select by NNX tag pass "
        r"nnx\.WithTag\('kernal'\)",
        "unclear",
        id="freeze-string-filter-is-a-path-regex",
    ),
    pytest.param(
        lambda: ff.freeze(lin(), int),
        TypeError,
        r"`filter` int is a class but not an nnx\.Variable type, so it would select nothing",
        "unclear",
        id="freeze-non-variable-class-filter",
    ),
    pytest.param(
        lambda: ff.freeze(lin(), ff.PathRegex),
        TypeError,
        r"`filter` PathRegex is a class but not an nnx\.Variable type.*"
        r"ff\.PathRegex\('encoder/\.\*'\)",
        "unclear",
        id="freeze-pathregex-class-not-instance",
    ),
    pytest.param(
        lambda: ff.freeze(lin(), ff.FrozenParam),
        ValueError,
        r"matched no parameter of Linear.*The filter selects which trainable parameters to "
        r"freeze; FrozenParam selects parameters that are frozen already",
        "unclear",
        id="freeze-frozenparam-filter",
    ),
    pytest.param(
        lambda: ff.freeze(lin(), lambda path: path[-1] == "kernel"),
        TypeError,
        r"`filter` .* must be callable as \(path, variable\) -> bool, but its signature is "
        r"\(path\)",
        "unclear",
        id="freeze-one-argument-lambda",
    ),
    pytest.param(
        lambda: ff.freeze(lin(), 3),
        TypeError,
        r"`filter` must be an NNX filter .* got 3",
        "clear",
        id="freeze-int-filter",
    ),
    pytest.param(
        lambda: ff.freeze(lin(), {"kernel"}),
        TypeError,
        r"`filter` must be an NNX filter .* got \{'kernel'\}",
        "clear",
        id="freeze-set-filter",
    ),
    pytest.param(
        lambda: ff.freeze(lin(), [nnx.Param, 3]),
        TypeError,
        r"`filter` must be an NNX filter .* got 3",
        "clear",
        id="freeze-list-filter-with-bad-item",
    ),
    pytest.param(
        lambda: ff.freeze(lin(), ff.PathRegex("layers.0.kernel")),
        ValueError,
        r"`filter` PathRegex\('layers\.0\.kernel'\) passed to freeze\(\) matched no parameter "
        r"of Linear\. Its parameter paths are: bias, kernel",
        "clear",
        id="freeze-pathregex-matches-nothing",
    ),
    pytest.param(
        lambda: ff.freeze(lin(), dtype=jnp.int8),
        TypeError,
        r"`dtype` must be a floating dtype such as jnp\.bfloat16, got .*int8",
        "clear",
        id="freeze-integer-dtype",
    ),
    pytest.param(
        lambda: ff.freeze(lin(), dtype="bfloat"),
        TypeError,
        r"`dtype` must be a floating dtype such as jnp\.bfloat16, got 'bfloat'",
        "clear",
        id="freeze-dtype-typo",
    ),
    pytest.param(
        lambda: ff.freeze(lin(), dtype=True),
        TypeError,
        r"`dtype` must be a floating dtype such as jnp\.bfloat16, got True",
        "clear",
        id="freeze-dtype-bool-value",
    ),
    pytest.param(
        lambda: ff.freeze(lin(), dtype=jnp.ones(2, jnp.bfloat16)),
        TypeError,
        r"`dtype` must be a floating dtype such as jnp\.bfloat16, got an array .*Pass a dtype, "
        r"e\.g\. dtype=x\.dtype",
        "silent",  # the array's dtype was taken
        id="freeze-dtype-array",
    ),
    pytest.param(
        lambda: ff.unfreeze(ff.freeze(lin()), nnx.Param),
        ValueError,
        r"passed to unfreeze\(\) matched no parameter of Linear.*nnx\.Param and ff\.Trainable "
        r"select trainable ones",
        "unclear",
        id="unfreeze-param-filter",
    ),
    pytest.param(
        has_no_frozen_param,
        ValueError,
        r"`filter` <class .*FrozenParam'> passed to unfreeze\(\) matched no parameter of "
        r"Linear.*None of its parameters is frozen.*missing_ok=True",
        "clear",
        id="unfreeze-nothing-frozen",
    ),
    pytest.param(
        lambda: ff.unfreeze(None),
        TypeError,
        r"`node` passed to unfreeze\(\) must be an NNX module .* got None",
        "unclear",
        id="unfreeze-none",
    ),
    pytest.param(
        lambda: freezing(lin(), 3),
        TypeError,
        r"`filter` must be an NNX filter .* got 3",
        "clear",
        id="freezing-int-filter",
    ),
    pytest.param(
        lambda: freezing(lin(), ff.PathRegex("head/.*")),
        ValueError,
        r"`filter` PathRegex\('head/\.\*'\) passed to freeze\(\) matched no parameter",
        "clear",
        id="freezing-matches-nothing",
    ),
    pytest.param(
        lambda: ff.FrozenParam(nnx.Param(jnp.ones(2))),
        TypeError,
        r"`value` is already a variable \(Param\): FrozenParam\(v\) would nest one variable in "
        r"another.*ff\.freeze\(model, ff\.PathRegex",
        "silent",  # a Param nested in a FrozenParam; unfreeze gave Param(Param(...))
        id="frozenparam-of-a-param",
    ),
    # ----------------------------------------------------------------- ff.grad / value_and_grad
    pytest.param(
        lambda: ff.value_and_grad(3),  # type: ignore[arg-type]
        TypeError,
        GOT_F + r" 3\. Pass the function first",
        "unclear",
        id="grad-f-not-callable",
    ),
    pytest.param(
        lambda: ff.grad(loss_nnx, argnums="0"),  # type: ignore[arg-type]
        TypeError,
        r"`argnums` must be a non-negative int or a non-empty tuple of them, got '0'",
        "clear",
        id="grad-argnums-string",
    ),
    pytest.param(
        lambda: ff.grad(loss_nnx, argnums=-1),
        TypeError,
        r"`argnums` must be a non-negative int .* got -1",
        "clear",
        id="grad-argnums-negative",
    ),
    pytest.param(
        lambda: ff.grad(loss_nnx, argnums=[0]),  # type: ignore[arg-type]
        TypeError,
        r"`argnums` must be a non-negative int .* got \[0\]",
        "clear",
        id="grad-argnums-list",
    ),
    pytest.param(
        lambda: ff.grad(loss_nnx, argnums=()),
        TypeError,
        r"`argnums` must be a non-negative int or a non-empty tuple of them, got \(\)",
        "clear",
        id="grad-argnums-empty",
    ),
    pytest.param(
        lambda: ff.grad(loss_nnx, argnums=(0, 0)),
        ValueError,
        r"`argnums` \(0, 0\) repeats a position",
        "clear",
        id="grad-argnums-repeated",
    ),
    pytest.param(
        lambda: ff.grad(loss_nnx, lin()),  # type: ignore[arg-type]
        TypeError,
        r"`argnums` must be a non-negative int .* got Linear\(.*\.\.\. The arguments go to the "
        r"returned function: ff\.grad\(loss_fn\)\(model, x\)",
        "clear",
        id="grad-model-passed-as-argnums",
    ),
    pytest.param(
        lambda: ff.grad(loss_nnx, argnums=1)(lin()),
        ValueError,
        r"`argnums` 1 names positional argument 1, but loss_nnx was called with 1 positional",
        "clear",
        id="grad-argnums-out-of-range",
    ),
    pytest.param(
        lambda: ff.grad(loss_nnx)(m=lin()),
        ValueError,
        r"`argnums` 0 names positional argument 0.*Pass the differentiated values positionally",
        "clear",
        id="grad-model-as-keyword",
    ),
    pytest.param(
        lambda: ff.grad(loss_nnx, has_aux=True)(lin()),
        TypeError,
        r"With `has_aux=True`, `f` must return a pair \(loss, aux\), but it returned an array "
        r"of shape \(\)",
        "unclear",
        id="grad-has-aux-but-scalar",
    ),
    pytest.param(
        lambda: ff.grad(lambda m: (loss_nnx(m), 1, 2), has_aux=True)(lin()),
        TypeError,
        r"With `has_aux=True`, `f` must return a pair \(loss, aux\), but it returned a tuple of "
        r"length 3",
        "clear",
        id="grad-has-aux-triple",
    ),
    pytest.param(
        lambda: ff.grad(lambda m: (loss_nnx(m), {"n": 1}))(lin()),
        TypeError,
        r"`f` returned a tuple of length 2, not a scalar loss\. If it returns \(loss, aux\), "
        r"pass has_aux=True",
        "unclear",
        id="grad-aux-without-has-aux",
    ),
    pytest.param(
        lambda: ff.grad(loss_nnx, has_aux="no"),  # type: ignore[arg-type]
        TypeError,
        r"`has_aux` must be True or False, got 'no'",
        "unclear",
        id="grad-has-aux-string",
    ),
    pytest.param(
        lambda: ff.grad(lambda m: m(X))(lin()),
        TypeError,
        r"Gradient only defined for scalar-output functions\. Output had shape: \(1, 3\)",
        "clear",
        id="grad-non-scalar-loss",
    ),
    pytest.param(
        lambda: ff.grad(loss_nnx, wrt=3),
        TypeError,
        r"`wrt` must be an NNX filter .* got 3",
        "clear",
        id="grad-wrt-int",
    ),
    pytest.param(
        lambda: ff.grad(loss_nnx, wrt="kernal")(lin()),
        ValueError,
        r"`wrt` 'kernal' passed to grad\(\) matched no parameter of Linear\. Its parameter "
        r"paths are: bias, kernel\. A string filter is an NNX tag",
        "silent",  # empty gradients: nothing trained
        id="grad-wrt-string-typo",
    ),
    pytest.param(
        lambda: ff.value_and_grad(loss_nnx, wrt=ff.PathRegex("kernal"))(lin()),
        ValueError,
        r"`wrt` PathRegex\('kernal'\) passed to value_and_grad\(\) matched no parameter of "
        r"Linear\. Its parameter paths are: bias, kernel\. Check the filter against these "
        r"paths\.$",
        "silent",
        id="grad-wrt-pathregex-typo",
    ),
    pytest.param(
        lambda: ff.grad(loss_nnx, wrt=lambda path: True)(lin()),
        TypeError,
        r"`wrt` .* must be callable as \(path, variable\) -> bool",
        "unclear",
        id="grad-wrt-one-argument-lambda",
    ),
    pytest.param(
        lambda: ff.grad(loss_nnx)(with_attr(lin(), steps=nnx.Param(jnp.arange(3)))),
        TypeError,
        r"`wrt` selected value\(s\) that have no gradient: \[steps \(int32\)\]\. Only inexact",
        "unclear",
        id="grad-integer-param",
    ),
    pytest.param(
        lambda: ff.grad(loss_nnx)(with_attr(lin(), name=nnx.Param("encoder"))),
        TypeError,
        r"`wrt` selected value\(s\) that have no gradient: \[name \(str\)\]",
        "unclear",
        id="grad-string-param",
    ),
    pytest.param(
        lambda: ff.grad(lambda m: 0.0)(nn.Dense(3)),
        TypeError,
        r"Argument 0 \(named by `argnums`\) is a Linen module, which holds no parameters: "
        r"differentiate its params dict",
        "silent",  # returned None
        id="grad-of-linen-module",
    ),
    # ----------------------------------------------------------------- PathRegex, trainable_tree
    pytest.param(
        lambda: ff.PathRegex(None),  # type: ignore[arg-type]
        TypeError,
        r"`pattern` must be a regular expression string, got None",
        "clear",
        id="pathregex-none",
    ),
    pytest.param(
        lambda: ff.PathRegex(re.compile(b"a/.*")),
        TypeError,
        r"`pattern` must match text, got a bytes pattern re\.compile\(b'a/\.\*'\)",
        "clear",
        id="pathregex-bytes-pattern",
    ),
    pytest.param(
        lambda: ff.PathRegex("blocks/[0-2/.*"),
        ValueError,
        r"`pattern` 'blocks/\[0-2/\.\*' is not a valid regular expression",
        "clear",
        id="pathregex-bad-regex",
    ),
    pytest.param(
        lambda: ff.trainable_tree({"a": 1.0}, wrt=3),
        TypeError,
        r"`wrt` must be an NNX filter .* got 3",
        "clear",
        id="trainable-tree-wrt-int",
    ),
    pytest.param(
        lambda: ff.trainable_tree({"a": 1.0}, wrt=float),
        TypeError,
        r"`wrt` float is a class but not an nnx\.Variable type",
        "silent",  # every leaf None
        id="trainable-tree-wrt-python-type",
    ),
    # ----------------------------------------------------------------- summary
    pytest.param(
        lambda: ff.summary(None),
        TypeError,
        r"`node` passed to summary\(\) must be an NNX module or a pytree .* got None",
        "silent",  # an empty table
        id="summary-none",
    ),
    pytest.param(
        lambda: ff.summary("model"),
        TypeError,
        r"`node` passed to summary\(\) must be .* got 'model'",
        "silent",
        id="summary-string",
    ),
    pytest.param(
        lambda: ff.summary(nnx.Linear),
        TypeError,
        r"`node` passed to summary\(\) must be .* Pass an instance",
        "silent",
        id="summary-module-class",
    ),
    pytest.param(
        lambda: ff.summary(nn.Dense(3)),
        TypeError,
        r"`node` passed to summary\(\) must be .*A Linen module holds no parameters: pass its "
        r"variables dict instead, ff\.summary\(module\.init\(key, x\)\)",
        "silent",
        id="summary-linen-module",
    ),
    pytest.param(
        lambda: ff.apply_updates(TREE, {"a": jnp.ones(3), "b": jnp.ones(2)}),
        ValueError,
        r"`updates` has a value at 'b', which is frozen \(ff\.FrozenParam\): frozen values are "
        r"never updated\. Compute the gradients with ff\.grad",
        "silent",
        id="apply-updates-at-frozen",
    ),
    pytest.param(
        lambda: ff.apply_updates(TREE, {"a": jnp.ones((2, 3)), "b": None}),
        ValueError,
        r"`updates` at 'a' has shape \(2, 3\), but the parameter has shape \(3,\)",
        "silent",
        id="apply-updates-broadcast",
    ),
    pytest.param(
        lambda: ff.apply_updates(TREE, {"a": jnp.ones(3)}),
        ValueError,
        r"`updates` does not mirror `tree`: updates PyTreeDef\(\{'a': \*\}\), tree",
        "unclear",
        id="apply-updates-missing-key",
    ),
    pytest.param(
        lambda: ff.apply_updates({"a": jnp.ones(3)}, TREE),
        ValueError,
        r"`updates` does not mirror `tree`",
        "unclear",
        id="apply-updates-swapped",
    ),
]


@pytest.mark.parametrize(("call", "error", "match", "before"), CASES)
def test_bad_input_gives_a_clear_error(call, error, match, before):
    del before
    with pytest.raises(error, match=match):
        call()


def test_the_catalogue_is_broad():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------- handled, not raised


def summary_row(node: Any, path: str) -> tuple[Any, ...]:
    row = next(r for r in ff.summary(node).rows if r.path == path)
    return row.type, row.shape, row.dtype, row.status, row.count, row.bytes


@pytest.mark.parametrize(
    ("node", "path", "expected"),
    [
        pytest.param(
            {"a": ff.FrozenParam("x")},
            "a",
            ("FrozenParam", (), "str", "frozen", 0, 0),
            id="frozenparam-string-in-dict",
        ),
        pytest.param(
            with_attr(lin(), name=ff.FrozenParam("encoder")),
            "name",
            ("FrozenParam", (), "str", "frozen", 0, 0),
            id="frozenparam-string-module-attribute",
        ),
        pytest.param(
            {"params": {"tag": ffl.FrozenBox("x")}},
            "params/tag",
            ("FrozenBox", (), "str", "frozen", 0, 0),
            id="frozenbox-string",
        ),
        pytest.param(
            {"a": nnx.BatchStat(None)},
            "a",
            ("BatchStat", (), "NoneType", "state", 0, 0),
            id="variable-holding-none",  # was counted as one float32
        ),
        pytest.param(
            {"a": nnx.Variable({"u": jnp.ones(3), "v": 2.0})},
            "a",
            ("Variable", (), "dict", "state", 4, 16),
            id="variable-holding-a-dict-of-arrays",
        ),
    ],
)
def test_summary_lists_non_array_values_with_their_python_type(node, path, expected):
    assert summary_row(node, path) == expected


def test_summary_of_string_frozenparam_keeps_the_totals_of_the_arrays():
    model = with_attr(lin(), name=ff.FrozenParam("encoder"))
    s = ff.summary(model)
    assert (s.trainable_count, s.frozen_count) == (9, 0)
    assert re.search(r"\nname +FrozenParam +\(\) +str +frozen +0 +0\n", str(s))


def test_stop_frozen_keeps_non_array_frozen_values():
    tag = ff.FrozenParam("x")
    assert ff.stop_frozen({"tag": tag, "none": ff.FrozenParam(None)})["tag"].get_value() == "x"

    def loss(tree):
        stopped = ff.stop_frozen({**tree, "tag": tag})
        assert stopped["tag"].get_value() == "x"
        return stopped["w"] * stopped["scale"][...]

    g = jax.grad(loss)({"w": 2.0, "scale": ff.FrozenParam(3.0)})
    assert float(g["w"]) == 3.0
    assert float(g["scale"][...]) == 0.0


def test_to_nnx_before_lazy_init_freezes_as_the_parameters_are_created():
    dense = nn.Dense(2, kernel_init=ffl.frozen(nn.initializers.lecun_normal()))
    model = ffl.to_nnx(nnx.bridge.ToNNX(dense, rngs=nnx.Rngs(0)))
    model: Any = nnx.bridge.lazy_init(model, jnp.ones((1, 3)))
    assert type(model.kernel) is ff.FrozenParam
    assert type(model.bias) is nnx.Param
    assert model(jnp.ones((1, 3))).shape == (1, 2)
    grads = ff.grad(lambda m: m(jnp.ones((1, 3))).sum())(model)
    assert set(grads.keys()) == {"bias"}


def test_apply_gradients_accepts_good_grads_under_jit():
    st = state()

    @jax.jit
    def step(st):
        return st.apply_gradients(grads=ff.grad(loss_linen)(st.params))

    new = step(st)
    kernel: Any = new.params["kernel"]
    old_kernel: Any = st.params["kernel"]
    np.testing.assert_array_equal(np.asarray(kernel.value), np.asarray(old_kernel.value))
    assert not np.array_equal(np.asarray(new.params["bias"]), np.asarray(st.params["bias"]))


def test_apply_gradients_checks_grads_under_jit_too():
    st = state()

    @jax.jit
    def step(st):
        return st.apply_gradients(grads=jax.grad(loss_linen)(nn.meta.unbox(st.params)))

    with pytest.raises(ValueError, match=r"`grads` has a gradient at frozen parameter\(s\)"):
        step(st)


def test_grad_with_explicit_wrt_still_allows_a_partly_frozen_model():
    model = ff.freeze(lin(), ff.PathRegex("kernel"))
    grads = ff.grad(loss_nnx, wrt=nnx.Param)(model)
    assert set(grads.keys()) == {"bias"}


def test_grad_with_default_wrt_on_a_fully_frozen_model_returns_empty_grads():
    # The default filter on a fully frozen model is a legitimate empty selection.
    assert ff.grad(loss_nnx)(ff.freeze(lin())) == nnx.State({})


def test_ffl_grad_of_fully_frozen_variables_is_all_none():
    variables = ffl.freeze(dense_variables())
    grads = ffl.grad(loss_variables)(variables)
    assert grads == {"params": {"bias": None, "kernel": None}}


def test_stop_frozen_of_a_python_float_stays_indexable_under_grad():
    # stop_gradient of a traced Python number used to give a bare literal that
    # FrozenParam's [...] could not index.
    def loss(tree):
        stopped = ff.stop_frozen(tree)
        return stopped["w"] * stopped["scale"][...]

    g = jax.grad(loss)({"w": 2.0, "scale": ff.FrozenParam(3.0)})
    assert (float(g["w"]), float(g["scale"][...])) == (3.0, 0.0)
