"""One jitted training step (loss, gradients, optax update) written each way compared.

Every variant builds its model from the same seed, so all start from the same
parameters, and runs on the same batch. ``flax_freeze`` is ``ff.TrainStep``,
the step the README shows: one ``jax.jit`` over the model's and optimizer's
arrays, frozen arrays passed undonated. The other JAX variants but one are a
``jax.jit`` of a pure function over flat lists of arrays, which are donated:
they pay the same small host cost per call, and the table compares what they
compute. ``flax_freeze nnx.jit`` is the same step under ``@nnx.jit``, the simple
alternative, kept to show what graph-mode dispatch costs per call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flax_freeze as ff
from _models import Setting, Spec, gp_nll

LEARNING_RATE = 1e-3
CLIP_NORM = 1.0

SPLIT = "split"
SPLIT_CLIP = "split + clip"
SPLIT_COUNT = "split + step count"
FLAX_FREEZE = "flax_freeze"
FLAX_FREEZE_CLIP = "flax_freeze + clip"
MULTI = "multi_transform"
MULTI_CLIP = "multi_transform + clip"
OPTAX_FREEZE = "optax freeze"
NNX = "nnx DiffState"
STOP = "stop_gradient"
NNX_JIT = "flax_freeze nnx.jit"
PYTREE = "flax_freeze pytree"
TORCH = "PyTorch"

#: What each variant is, for the table's legend.
DESCRIPTIONS: dict[str, str] = {
    SPLIT: "hand-written split (the ideal): `jax.value_and_grad` of the trainable arrays "
    "only, frozen arrays a separate argument, Adam on the trainable arrays",
    SPLIT_CLIP: "the same with `optax.clip_by_global_norm(1.0)` before Adam",
    SPLIT_COUNT: "the split that also counts its steps in a uint32, as `ff.Optimizer` does: "
    "the same program with one more output (GP only)",
    FLAX_FREEZE: "`ff.freeze` + `ff.Optimizer`, run by `ff.TrainStep` (`loss = step(x, y)`): "
    "one `jax.jit` over the model's arrays, frozen ones passed undonated, model kept current",
    FLAX_FREEZE_CLIP: "the same with `optax.clip_by_global_norm(1.0)` before Adam",
    MULTI: "full gradient, `optax.multi_transform` (which `optax.transforms.selective_transform` "
    "is) with Adam for trainable and `set_to_zero` for frozen leaves",
    MULTI_CLIP: "the same with `optax.clip_by_global_norm(1.0)` first in the chain",
    OPTAX_FREEZE: "full gradient, `optax.transforms.freeze(mask)` then Adam over every leaf",
    NNX: "plain Flax: `nnx.value_and_grad(argnums=nnx.DiffState(0, trainable))` + "
    "`nnx.Optimizer(wrt=trainable)`, run the same way as flax_freeze",
    STOP: "`lax.stop_gradient` on frozen leaves, Adam over every leaf",
    NNX_JIT: "`ff.value_and_grad` + `ff.Optimizer.update` in a step under `@nnx.jit` "
    "(graph mode): the simple alternative to `ff.TrainStep`",
    PYTREE: "the GP as a dataclass pytree with `ff.FrozenParam` leaves: `ff.value_and_grad`, "
    "`tx.init(ff.trainable_tree(gp))`, `ff.apply_updates` (as in examples/gp_kernels.py)",
    TORCH: "PyTorch: `requires_grad_(False)` on frozen parameters, `torch.optim.Adam` over the "
    "trainable ones; eager, CPU",
}


def adam(*, clip: bool = False) -> optax.GradientTransformation:
    """Adam, optionally after global-norm clipping: the optimizer of every variant."""
    tx = optax.adam(LEARNING_RATE)
    return optax.chain(optax.clip_by_global_norm(CLIP_NORM), tx) if clip else tx


@dataclasses.dataclass
class Variant:
    """One way to write the step, built and ready to run on a batch ``(x, y)``."""

    name: str
    run: Callable[[Any, Any], Any]  # one step; returns the loss, maybe not yet computed
    params: Callable[[], dict[str, np.ndarray]]  # the model's parameters now, by path
    opt_state: Callable[[], Any]  # the optimizer's state now (a pytree of arrays)
    lower: Callable[[Any, Any], Any] | None = None  # a jax ``Lowered`` step, for XLA's cost

    def cost(self, x: Any, y: Any) -> tuple[float | None, float | None]:
        """XLA's FLOPs and bytes accessed for one step, from the compiled program."""
        if self.lower is None:
            return None, None
        analysis = self.lower(x, y).compile().cost_analysis()
        if isinstance(analysis, list | tuple):
            analysis = analysis[0]
        return float(analysis["flops"]), float(analysis["bytes accessed"])

    def opt_state_bytes(self) -> int:
        return sum(int(a.nbytes) for a in jax.tree.leaves(self.opt_state()))


class _Carried:
    """A jitted ``loss, carry = step(carry, *const, x, y)`` and its current carry (donated)."""

    def __init__(self, step: Callable[..., Any], carry: Any, *const: Any) -> None:
        self.step = jax.jit(step, donate_argnums=0)
        self.carry, self.const = carry, const

    def run(self, x: Any, y: Any) -> Any:
        loss, self.carry = self.step(self.carry, *self.const, x, y)
        return loss

    def lower(self, x: Any, y: Any) -> Any:
        return self.step.lower(self.carry, *self.const, x, y)


def path_str(path: tuple[Any, ...]) -> str:
    """An NNX or JAX key path as ``a/0/b``."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def state_arrays(state: Any) -> dict[str, np.ndarray]:
    """Every variable of an ``nnx.State`` (or of a module), as numpy arrays by path."""
    if not isinstance(state, nnx.State):
        state = nnx.state(state)
    flat = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    return {path_str(p): np.asarray(v.get_raw_value()) for p, v in flat}


@dataclasses.dataclass
class _Flat:
    """A freshly built model as a graph definition and flat lists of paths and arrays."""

    graphdef: Any
    treedef: Any
    paths: list[str]
    arrays: list[jax.Array]
    frozen: list[bool]

    @classmethod
    def build(cls, spec: Spec, setting: Setting) -> _Flat:
        graphdef, state = nnx.split(spec.build())
        flat, treedef = jax.tree_util.tree_flatten_with_path(state)
        # A Variable flattens to one leaf, its value: the last key is that slot.
        paths = [path_str(p[:-1]) for p, _ in flat]
        frozen = [setting.is_frozen(p) for p in paths]
        return cls(graphdef, treedef, paths, [a for _, a in flat], frozen)

    def loss(self, spec: Spec) -> Callable[..., jax.Array]:
        def loss(arrays: list[jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
            return spec.loss_fn(
                nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, arrays)), x, y
            )

        return loss

    def by_path(self, arrays: list[Any]) -> dict[str, np.ndarray]:
        return {p: np.asarray(a) for p, a in zip(self.paths, arrays, strict=True)}


def split_variant(
    spec: Spec, setting: Setting, *, clip: bool = False, count: bool = False
) -> Variant:
    """The hand-written split: only the trainable arrays are differentiated and optimized.

    With ``count`` the step also adds one to a uint32 step count it carries, as
    ``ff.Optimizer`` (an ``nnx.Optimizer``) does: one more output, nothing else.
    """
    flat = _Flat.build(spec, setting)
    loss_of = flat.loss(spec)
    train_idx = [i for i, f in enumerate(flat.frozen) if not f]
    frozen_idx = [i for i, f in enumerate(flat.frozen) if f]
    tx = adam(clip=clip)

    def join(trainable: list[Any], fixed: list[Any]) -> list[Any]:
        out: list[Any] = [None] * len(flat.paths)
        for i, a in zip(train_idx, trainable, strict=True):
            out[i] = a
        for i, a in zip(frozen_idx, fixed, strict=True):
            out[i] = a
        return out

    def step(carry: Any, fixed: list[jax.Array], x: jax.Array, y: jax.Array) -> Any:
        trainable, opt_state, *steps = carry
        loss, grads = jax.value_and_grad(lambda t: loss_of(join(t, fixed), x, y))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return loss, (optax.apply_updates(trainable, updates), opt_state, *(n + 1 for n in steps))

    trainable = [flat.arrays[i] for i in train_idx]
    fixed = [flat.arrays[i] for i in frozen_idx]
    steps = [jnp.zeros((), jnp.uint32)] if count else []
    carried = _Carried(step, (trainable, tx.init(trainable), *steps), fixed)
    return Variant(
        name=SPLIT_COUNT if count else SPLIT_CLIP if clip else SPLIT,
        run=carried.run,
        params=lambda: flat.by_path(join(carried.carry[0], fixed)),
        opt_state=lambda: carried.carry[1],
        lower=carried.lower,
    )


def _full_gradient_variant(
    name: str,
    spec: Spec,
    setting: Setting,
    tx_of: Callable[[list[bool]], optax.GradientTransformation],
    *,
    stop_gradient: bool = False,
) -> Variant:
    """Gradient of every array; frozen ones left to the optimizer or to ``stop_gradient``."""
    flat = _Flat.build(spec, setting)
    loss_of = flat.loss(spec)
    tx = tx_of(flat.frozen)

    def loss(arrays: list[jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
        if stop_gradient:
            arrays = [
                jax.lax.stop_gradient(a) if f else a
                for a, f in zip(arrays, flat.frozen, strict=True)
            ]
        return loss_of(arrays, x, y)

    def step(carry: Any, x: jax.Array, y: jax.Array) -> Any:
        arrays, opt_state = carry
        value, grads = jax.value_and_grad(loss)(arrays, x, y)
        updates, opt_state = tx.update(grads, opt_state, arrays)
        return value, (optax.apply_updates(arrays, updates), opt_state)

    carried = _Carried(step, (flat.arrays, tx.init(flat.arrays)))
    return Variant(
        name=name,
        run=carried.run,
        params=lambda: flat.by_path(carried.carry[0]),
        opt_state=lambda: carried.carry[1],
        lower=carried.lower,
    )


def multi_transform_variant(spec: Spec, setting: Setting, *, clip: bool = False) -> Variant:
    def tx_of(frozen: list[bool]) -> optax.GradientTransformation:
        labels = ["frozen" if f else "train" for f in frozen]
        tx = optax.multi_transform({"train": adam(), "frozen": optax.set_to_zero()}, labels)
        return optax.chain(optax.clip_by_global_norm(CLIP_NORM), tx) if clip else tx

    return _full_gradient_variant(MULTI_CLIP if clip else MULTI, spec, setting, tx_of)


def optax_freeze_variant(spec: Spec, setting: Setting) -> Variant:
    def tx_of(frozen: list[bool]) -> optax.GradientTransformation:
        return optax.chain(optax.transforms.freeze(frozen), adam())

    return _full_gradient_variant(OPTAX_FREEZE, spec, setting, tx_of)


def stop_gradient_variant(spec: Spec, setting: Setting) -> Variant:
    return _full_gradient_variant(STOP, spec, setting, lambda _: adam(), stop_gradient=True)


def flax_freeze_model(spec: Spec, setting: Setting) -> nnx.Module:
    """The model with the setting's parameters re-typed ``ff.FrozenParam``."""
    model = spec.build()
    if setting.frozen is not None:
        ff.freeze(model, ff.PathRegex(setting.frozen))
    return model


def _opt_state_of(state: nnx.State) -> Any:
    # The optax state only: nnx.Optimizer's own step counter is left out, as for the others.
    return nnx.as_pure(state[1]["opt_state"])


def flax_freeze_variant(spec: Spec, setting: Setting, *, clip: bool = False) -> Variant:
    """flax_freeze as the README shows it: ``ff.TrainStep``, the model kept current."""
    model = flax_freeze_model(spec, setting)
    optimizer = ff.Optimizer(model, adam(clip=clip))
    step = ff.TrainStep(model, optimizer, spec.loss_fn)
    return Variant(
        name=FLAX_FREEZE_CLIP if clip else FLAX_FREEZE,
        run=step,
        params=lambda: state_arrays(model),
        opt_state=lambda: nnx.as_pure(optimizer.opt_state),
        lower=step.lower,
    )


def nnx_variant(spec: Spec, setting: Setting) -> Variant:
    """Plain Flax, no flax_freeze: a path filter selects the trainable ``nnx.Param``s."""

    def trainable(path: tuple[Any, ...], x: Any) -> bool:
        return isinstance(x, nnx.Param) and not setting.is_frozen(path_str(path))

    model = spec.build()
    graphdef, state = nnx.split((model, nnx.Optimizer(model, adam(), wrt=trainable)))
    treedef = jax.tree.structure(state)

    def step(arrays: list[jax.Array], x: jax.Array, y: jax.Array) -> Any:
        model, optimizer = nnx.merge(graphdef, jax.tree.unflatten(treedef, arrays))
        grad_fn = nnx.value_and_grad(spec.loss_fn, argnums=nnx.DiffState(0, trainable))
        loss, grads = grad_fn(model, x, y)
        optimizer.update(model, grads)
        return loss, jax.tree.leaves(nnx.state((model, optimizer)))

    carried = _Carried(step, jax.tree.leaves(state))
    return Variant(
        name=NNX,
        run=carried.run,
        params=lambda: state_arrays(jax.tree.unflatten(treedef, carried.carry)[0]),
        opt_state=lambda: _opt_state_of(jax.tree.unflatten(treedef, carried.carry)),
        lower=carried.lower,
    )


def nnx_jit_step(loss_fn: Callable[..., Any]) -> Callable[..., Any]:
    """The README's simple step: ``step(model, optimizer, x, y)`` under ``@nnx.jit``."""

    @nnx.jit
    def step(model: nnx.Module, optimizer: ff.Optimizer, x: jax.Array, y: jax.Array) -> Any:
        loss, grads = ff.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    return step


def nnx_jit_variant(spec: Spec, setting: Setting) -> Variant:
    """The simple alternative to ``ff.TrainStep``: module and optimizer passed to ``@nnx.jit``."""
    model = flax_freeze_model(spec, setting)
    optimizer = ff.Optimizer(model, adam())
    step = nnx_jit_step(spec.loss_fn)
    return Variant(
        name=NNX_JIT,
        run=lambda x, y: step(model, optimizer, x, y),
        params=lambda: state_arrays(model),
        opt_state=lambda: nnx.as_pure(optimizer.opt_state),
        lower=lambda x, y: step.lower(model, optimizer, x, y),
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GPTree:
    """The GP's hyperparameters as a plain pytree; a frozen one is an ``ff.FrozenParam``."""

    log_variance: Any
    log_lengthscale: Any
    log_noise: Any


def _value(x: Any) -> Any:
    return x.get_raw_value() if isinstance(x, nnx.Variable) else x


def _gp_tree_loss(gp: GPTree, x: jax.Array, y: jax.Array) -> jax.Array:
    return gp_nll(_value(gp.log_variance), _value(gp.log_lengthscale), _value(gp.log_noise), x, y)


def pytree_variant(spec: Spec, setting: Setting) -> Variant:
    """The GP as in ``examples/gp_kernels.py``: a dataclass with ``ff.FrozenParam`` leaves."""
    gp = GPTree(**{k: jnp.asarray(v) for k, v in state_arrays(spec.build()).items()})
    if setting.frozen is not None:
        gp = ff.freeze(gp, ff.PathRegex(setting.frozen))  # pytrees are immutable: a new tree
    tx = adam()

    def step(carry: Any, x: jax.Array, y: jax.Array) -> Any:
        gp, opt_state = carry
        loss, grads = ff.value_and_grad(_gp_tree_loss)(gp, x, y)  # None at frozen leaves
        updates, opt_state = tx.update(grads, opt_state)
        return loss, (ff.apply_updates(gp, updates), opt_state)

    carried = _Carried(step, (gp, tx.init(ff.trainable_tree(gp))))
    fields = [f.name for f in dataclasses.fields(GPTree)]
    return Variant(
        name=PYTREE,
        run=carried.run,
        params=lambda: {f: np.asarray(_value(getattr(carried.carry[0], f))) for f in fields},
        opt_state=lambda: carried.carry[1],
        lower=carried.lower,
    )


#: The JAX variants in table order, each built as ``make(spec, setting)``; the
#: pytree variant and the split with a step count only for the GP.
JAX_VARIANTS: dict[str, Callable[[Spec, Setting], Variant]] = {
    SPLIT: split_variant,
    SPLIT_CLIP: lambda spec, setting: split_variant(spec, setting, clip=True),
    SPLIT_COUNT: lambda spec, setting: split_variant(spec, setting, count=True),
    FLAX_FREEZE: flax_freeze_variant,
    FLAX_FREEZE_CLIP: lambda spec, setting: flax_freeze_variant(spec, setting, clip=True),
    MULTI: multi_transform_variant,
    MULTI_CLIP: lambda spec, setting: multi_transform_variant(spec, setting, clip=True),
    OPTAX_FREEZE: optax_freeze_variant,
    NNX: nnx_variant,
    STOP: stop_gradient_variant,
    NNX_JIT: nnx_jit_variant,
    PYTREE: pytree_variant,
}
