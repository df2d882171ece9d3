"""TrainStep: one compiled training step that follows freeze changes and keeps the model current."""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import operator
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx
from flax.errors import TraceContextError
from jax.core import Tracer
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from . import _version
from ._filters import Path, listing, path_str, short_repr
from ._grad import _describe, value_and_grad
from ._nnx_compat import BOOKKEEPING, flatten, raw_slot
from ._optimizer import Optimizer
from ._variables import FrozenParam, is_any_param

_chain = itertools.chain.from_iterable
_refcount = sys.getrefcount
#: Runs an iterator to its end, keeping nothing.
_consume = collections.deque(maxlen=0).extend


@functools.cache
def _unshared_refcount() -> int:
    """``sys.getrefcount`` of a variable's value that nothing else holds, read as a step reads it.

    A step reads the donated values into a list and counts references to
    each: the variable's slot, the list and the count's own argument. Any
    more means something else holds the array (a name in the caller's code,
    another variable or model, a checkpoint being written, the batch), and
    donating it would delete it there: such an array is copied first.
    """
    probe = nnx.Variable(np.zeros(1))
    values = list(map(raw_slot()[0], [probe]))
    return max(map(sys.getrefcount, values))


def _own_copy(value: Any) -> Any:
    """A copy of a variable's value, on the same devices with the same sharding."""
    return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, value)


def _is_static(value: Any) -> bool:
    """Whether a keyword argument is passed to the loss as a Python value (one compile each)."""
    return value is None or isinstance(value, bool | np.bool_ | str)


def _split_kwargs(kwargs: dict[str, Any]) -> tuple[tuple[tuple[str, Any], ...], dict[str, Any]]:
    """``(static, traced)``: bools, strings and None are static, the rest traced."""
    static = tuple(sorted((k, v) for k, v in kwargs.items() if _is_static(v)))
    if not static:
        return (), kwargs
    return static, {k: v for k, v in kwargs.items() if not _is_static(v)}


def _objective(loss_fn: Callable[..., Any], has_aux: bool) -> Callable[..., Any]:
    """``loss_fn`` returning ``(loss, aux)`` always, with clear errors for what it returns."""

    def objective(model: Any, *batch: Any, **kwargs: Any) -> tuple[Any, Any]:
        out = loss_fn(model, *batch, **kwargs)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    f"`loss_fn` returned {_describe(out)}, but `has_aux=True` needs a pair "
                    "(loss, aux). Return (loss, aux), or build the TrainStep with has_aux=False."
                )
            loss, aux = out
        else:
            if isinstance(out, tuple):
                raise TypeError(
                    f"`loss_fn` returned {_describe(out)}, not a scalar loss. If it returns "
                    "(loss, aux), build the TrainStep with has_aux=True."
                )
            loss, aux = out, None
        if np.shape(loss) != ():
            raise TypeError(
                f"`loss_fn` must return a scalar loss, but its loss is {_describe(loss)}. "
                "Reduce it to one number, e.g. with .mean()."
            )
        return loss, aux

    return objective


def _placed(x: Any, sharding: NamedSharding | None) -> Any:
    """``x`` given ``sharding`` as the step's output (no-op for None)."""
    if sharding is None:
        return x
    if any(t == AxisType.Explicit for t in sharding.mesh.axis_types):
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def _constraint(value: Any) -> NamedSharding | None:
    """The sharding an output keeps: that of its input, when it is laid out over a mesh.

    On a mesh with explicit axes the output's type spells the partition spec
    out to the array's rank (``P()`` comes back as ``P(None, None)``): the
    same layout, but another sharding to ``jax.jit``'s cache. That spelling is
    the one returned, so that inputs and outputs agree from the first call.
    """
    if not (isinstance(value, jax.Array) and isinstance(value.sharding, NamedSharding)):
        return None
    sharding = value.sharding
    if any(t == AxisType.Explicit for t in sharding.mesh.axis_types):
        spec = (*sharding.spec, *(None,) * (value.ndim - len(sharding.spec)))
        sharding = NamedSharding(
            sharding.mesh, PartitionSpec(*spec), memory_kind=sharding.memory_kind
        )
    return sharding


def _after(count: jax.Array, loss: jax.Array) -> jax.Array:
    """``count`` unchanged, computed after ``loss``: the step count as the step's last output.

    A count that depends on nothing but its own input is an output apart from
    the rest of the program, and XLA:CPU's default scheduler then runs a tiny
    step (the GP of ``benchmarks/step.py``) about 1.5x slower than the same
    program without it; tied to the loss, it is the split's speed again. The
    term added is zero for every loss, NaN and infinities included.
    """
    return count + (loss > jnp.inf).astype(count.dtype)


def _make_step(
    graphdef: Any,
    paths: Sequence[Path],
    donated_idx: Sequence[int],
    fixed_idx: Sequence[int],
    constraints: Sequence[NamedSharding | None],
    objective: Callable[..., Any],
    wrt: Any,
    has_aux: bool,
) -> Callable[..., Any]:
    """The jitted pure step for one split: ``out, donated = fn(donated, fixed, static, batch, kw)``.

    ``donated`` are the values of every variable that is not frozen (trainable
    parameters, optimizer state, batch statistics, RNG state), in the order of
    ``donated_idx`` in the split; ``fixed`` the frozen parameters' values and
    the module attributes that are arrays but no variables, in the order of
    ``fixed_idx``. Only ``donated`` is donated and returned; ``fixed`` is read.
    """
    n = len(paths)

    def train_step(
        donated: list[Any],
        fixed: list[Any],
        static: tuple[tuple[str, Any], ...],
        batch: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[Any, list[Any]]:
        leaves: list[Any] = [None] * n
        for i, value in zip(donated_idx, donated, strict=True):
            leaves[i] = value
        for i, value in zip(fixed_idx, fixed, strict=True):
            leaves[i] = value
        model, optimizer = nnx.merge(graphdef, leaves)
        grad_fn = value_and_grad(objective, wrt=wrt, has_aux=True)
        (loss, aux), grads = grad_fn(model, *batch, **kwargs, **dict(static))
        optimizer.update(model, grads)
        optimizer.step[...] = _after(optimizer.step[...], loss)
        _, out = flatten((model, optimizer), graph=True, with_paths=False)
        written = [path_str(paths[i]) for i in fixed_idx if out[i] is not leaves[i]]
        if written:
            raise ValueError(
                f"`loss_fn` wrote to frozen parameters (or array attributes that are no "
                f"variables) inside the step: {listing(written)}. A TrainStep passes these "
                "in unchanged and never copies them back. Keep state the step updates in a "
                "variable that is not frozen (nnx.Variable, nnx.BatchStat)."
            )
        new = [_placed(out[i], s) for i, s in zip(donated_idx, constraints, strict=True)]
        return ((loss, aux) if has_aux else loss), new

    return jax.jit(train_step, donate_argnums=0, static_argnums=2)


#: Closes a snapshot of the watched views; the views end in an endless run of it.
_END = object()
_ENDLESS = itertools.repeat(_END)


def _keyed(container: Any) -> dict[Any, Any]:
    """What a watched container holds, by key, without Flax's bookkeeping."""
    if isinstance(container, list):
        return dict(enumerate(container))
    return {k: v for k, v in container.items() if k != BOOKKEEPING}


def _watched(node: tuple[Any, Any]) -> tuple[list[Any], list[Any]]:
    """The mutable containers of ``(model, optimizer)``, and live views of what they hold.

    A change of the graph's structure goes through one of them. NNX objects
    (modules, ``nnx.List``, ``nnx.Dict``, the optimizer) give their
    ``__dict__``: every attribute, static ones included, and the record of
    which attribute names exist (a new mapping whenever a name is added or
    deleted); their view is the dict's values. Plain lists and dicts inside
    them give themselves; a plain dict's keys are viewed too. Tuples and
    other immutable containers are reached through the container that holds
    them. The optimizer state's containers are left out: the optimizer
    replaces its ``opt_state`` whole (a migration, a restore), which its own
    ``__dict__`` shows, and changes the variables inside only in place.
    """
    containers: list[Any] = []
    views: list[Any] = []
    for path, x in nnx.iter_graph(node, graph=True):
        if path[:2] == (1, "opt_state") and len(path) > 2:
            continue  # optimizer state: replaced whole (migrate, restore), seen at the optimizer
        if isinstance(x, nnx.Pytree):
            containers.append(vars(x))
            views.append(vars(x).values())
        elif type(x) is list:
            containers.append(x)
            views.append(x)
        elif type(x) is dict:
            containers.append(x)
            views += [x.keys(), x.values()]
    return containers, views


@dataclasses.dataclass(eq=False)
class _Split:
    """What each call needs from one split of ``(model, optimizer)``."""

    fn: Any  # the jitted step
    get: Callable[[Any], Any]  # reads a variable's value
    put: Callable[[Any, Any], Any]  # writes it
    unshared: int  # the reference count of a value nothing else holds, as read
    donated: list[nnx.Variable[Any]]  # variables whose arrays are donated and replaced
    frozen: list[nnx.Variable[Any]]  # frozen parameters: read every call, never written
    consts: list[Any]  # array attributes that are no variables, as split
    containers: list[Any]  # the attribute dicts of NNX objects, plain lists and dicts
    views: list[Any]  # live views of what they hold, then an endless run of _END
    keyed: list[dict[Any, Any]] = dataclasses.field(default_factory=list)  # that, by key
    objects: tuple[Any, ...] = ()  # what the views showed, in order, then one _END

    def __post_init__(self) -> None:
        self.keyed = [_keyed(c) for c in self.containers]
        self.views = [*self.views, _ENDLESS]
        self._snapshot()

    def _snapshot(self) -> None:
        # Compared in step with the views, ``_END`` closes the snapshot: an object more
        # in the views meets it, an object fewer makes the views reach their own _END
        # early. So one pass of identity tests also sees every change of length.
        self.objects = (*_chain(self.views[:-1]), _END)

    def unchanged(self) -> bool:
        """Whether every watched container holds the same objects as at the split.

        The fast test compares, in order, every object the views show. When it
        fails, the keyed test ignores Flax's bookkeeping and the order of a
        module's attributes (``nnx.jit`` re-sets attributes when it writes back
        into a module); if that was all, the fast test's snapshot is renewed.
        """
        if all(map(operator.is_, _chain(self.views), self.objects)):
            return True
        for container, before in zip(self.containers, self.keyed, strict=True):
            now = _keyed(container)
            if now.keys() != before.keys() or not all(
                map(operator.is_, now.values(), map(before.__getitem__, now))
            ):
                return False
        self._snapshot()
        return True


_IN_TRACE = (
    "A TrainStep was called inside a JAX transformation (jax.jit, nnx.jit, jax.vmap, "
    "jax.grad...), where it cannot put new arrays into the model. Call it eagerly: it "
    "compiles its own step."
)


def _check_eager(variable: nnx.Variable[Any]) -> None:
    """Raises if the model's variables cannot be written here: inside a JAX transformation.

    Flax's own test, done once: writing a variable its own value.
    """
    try:
        variable.set_raw_value(variable.get_raw_value())
    except TraceContextError:
        raise RuntimeError(_IN_TRACE) from None


def _check_model(model: Any) -> None:
    if isinstance(model, nnx.Pytree) and not isinstance(model, nnx.Optimizer):
        return
    hint = "Pass the model first, then its ff.Optimizer and the loss function."
    if isinstance(model, type):
        hint = "Pass an instance, e.g. MyModel(nnx.Rngs(0)), not the class."
    elif isinstance(model, linen.Module):
        hint = (
            "A Linen module holds no state: TrainStep is for NNX modules. For Linen use "
            "ffl.TrainState (from flax_freeze import linen as ffl)."
        )
    raise TypeError(f"`model` must be an NNX module (nnx.Module), got {short_repr(model)}. {hint}")


def _check_optimizer(model: Any, optimizer: Any) -> None:
    if not isinstance(optimizer, Optimizer):
        if isinstance(optimizer, nnx.Optimizer):
            hint = (
                "A plain nnx.Optimizer cannot follow freeze changes: build "
                "ff.Optimizer(model, tx) instead."
            )
        else:
            hint = "Build one with ff.Optimizer(model, tx), e.g. tx = optax.adamw(1e-3)."
        raise TypeError(
            f"`optimizer` must be an ff.Optimizer of `model`, got {short_repr(optimizer)}. {hint}"
        )
    params = {
        path
        for path, x in nnx.iter_graph(model, graph=True)
        if isinstance(x, nnx.Variable) and is_any_param(x)
    }
    foreign = sorted(map(path_str, set(optimizer.trained_paths) - params))
    if foreign:
        raise ValueError(
            f"`optimizer` was not built for `model`: it trains {listing(foreign)}, "
            "which `model` has no parameter at. Build the optimizer for this model: "
            "ff.Optimizer(model, tx)."
        )


def _check_variable(path: Path, variable: nnx.Variable[Any]) -> None:
    """Raises for a variable whose value a compiled step cannot take and hand back."""
    where = path_str(path[1:]) or "(root)"
    owner = "`model`" if path[0] == 0 else "`optimizer`"
    if variable.hijax or variable.ref:
        kind = "hijax=True" if variable.hijax else "ref=True"
        raise ValueError(
            f"The variable at {where!r} of {owner} is a {type(variable).__name__} with {kind}: "
            "TrainStep passes arrays in and out of one jax.jit and needs variables that hold "
            "plain arrays. Create it with the default hijax=False, ref=False, or train with "
            "nnx.jit."
        )
    for leaf in jax.tree.leaves(variable.get_raw_value()):
        if not isinstance(leaf, jax.Array | np.ndarray | np.generic | bool | int | float | complex):
            raise TypeError(
                f"The variable at {where!r} of {owner} holds {short_repr(leaf)}, which is no "
                "array: TrainStep passes every variable's value through jax.jit. Keep such "
                "values as static module attributes, or in an nnx.Variable of an array."
            )


class TrainStep:
    """One compiled training step that follows freeze changes and keeps the model current.

    ``loss = step(*batch)`` computes ``loss_fn(model, *batch)``, its gradient for
    the trainable parameters only (:func:`~flax_freeze.value_and_grad`) and the
    optimizer's update, as one ``jax.jit`` of a pure function over the arrays
    of ``model`` and ``optimizer``: host time per call is that of any jitted
    function over the same arrays, not that of ``nnx.jit``'s graph walk.

    - **Frozen parameters are never copied.** They go in as a separate,
      non-donated argument and do not come back out. Everything else the step
      may change (trainable parameters, optimizer state, batch statistics, RNG
      state) is donated and updated in place.
    - **The model is always current.** After each call the returned arrays are
      put back into the very ``Variable`` objects of ``model`` and
      ``optimizer``, so evaluation, :func:`~flax_freeze.summary`,
      ``ff.checkpoint.save`` and ``nnx.state`` see the latest values. Values
      you assign to the model's variables between steps (``model.w[...] = x``,
      ``nnx.update``, ``ff.checkpoint.restore``) are what the next step
      starts from.
    - **It follows freezing by itself.** After ``ff.freeze``, ``ff.unfreeze``
      or ``ff.freezing``, the next call migrates the optimizer state
      (:meth:`Optimizer.migrate <flax_freeze.Optimizer.migrate>`) and uses the
      new split. Each distinct frozen set is compiled once: going back to one
      seen before reuses its compiled step.

    Each call first checks a count of freeze changes (one integer comparison)
    and then, without walking the graph, whether any attribute of the model's
    and optimizer's modules (and of the lists and dicts among them) is another
    object than at the last split: one identity comparison per attribute, in
    one pass over a flat snapshot made at the split (about 20 µs for a
    transformer of fifty modules and 600 attributes on a 2-core CPU; more
    right after a long step, as for any host work; see
    ``benchmarks/train_step_host.py``).
    Replacing a variable or a submodule, adding or deleting one, replacing the
    optimizer state (``ff.checkpoint.restore``) or changing a static attribute
    (``model.eval()``, ``model.set_attributes(...)``) is therefore followed as
    well, with a new split and, for a structure not seen before, a compile.

    Keyword arguments that are ``bool``, ``str`` or ``None`` (``train=True``)
    reach ``loss_fn`` as Python values, so it may branch on them (one compile
    per value); all other arguments are traced, as with ``jax.jit``. Arrays
    laid out over a mesh (a ``NamedSharding``) keep their sharding: each
    output gets the sharding its input had at the split.

    Limits:

    - Call it eagerly, not inside ``jax.jit``, ``nnx.jit`` or ``jax.vmap``:
      it compiles its own step.
    - The arrays of the model and optimizer are donated to the step, except
      those something else still holds: an array you keep a reference to
      (``w = model.kernel[...]``), or that another variable or model, the
      batch or a checkpoint being written holds too, is copied first and
      keeps its value. Holding a reference across steps thus costs one copy
      of that array per step; reading one for a moment costs nothing.
    - Inside ``loss_fn`` the model's structure cannot change: a variable or
      submodule added or replaced there is lost, as with
      :func:`~flax_freeze.grad`. Writing to a frozen parameter there raises.
    - Changes the check cannot see are not followed: the inside of a custom
      graph node type, a static attribute's object mutated in place (the
      items of a list held as a static attribute), a variable's metadata
      changed in place (``set_metadata``). After such a change build a new
      ``TrainStep``.
    - Gradients are taken for the variables the optimizer's ``wrt`` selects.

    Args:
        model: the NNX module to train.
        optimizer: its :class:`~flax_freeze.Optimizer`.
        loss_fn: ``loss_fn(model, *batch, **kwargs)`` returning a scalar loss,
            or ``(loss, aux)`` with ``has_aux``.
        has_aux: whether ``loss_fn`` returns ``(loss, aux)``; the step then
            returns ``(loss, aux)`` too (metrics, predictions).

    Raises:
        TypeError: if ``model`` is not an NNX module, ``optimizer`` not an
            :class:`~flax_freeze.Optimizer`, ``loss_fn`` not callable or
            ``has_aux`` not a bool, or a variable holds something that is no
            array. When called: if ``loss_fn`` returns no scalar loss, or not
            what ``has_aux`` says.
        ValueError: if ``optimizer`` trains parameters ``model`` does not have,
            or a variable is a hijax or ref variable. When traced: if
            ``loss_fn`` writes to a frozen parameter.
        RuntimeError: if called inside a JAX transformation.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from flax import nnx
        >>> import flax_freeze as ff
        >>> model = nnx.Sequential(nnx.Linear(2, 4, rngs=nnx.Rngs(0)),
        ...                        nnx.Linear(4, 1, rngs=nnx.Rngs(1)))
        >>> opt = ff.Optimizer(model, optax.sgd(0.1))
        >>> def loss_fn(model, x, y):
        ...     return ((model(x) - y) ** 2).mean()
        >>> step = ff.TrainStep(model, opt, loss_fn)
        >>> x, y = jnp.ones((8, 2)), jnp.zeros((8, 1))
        >>> _ = ff.freeze(model, ff.PathRegex("layers/0/.*"))
        >>> kernel = jnp.copy(model.layers[0].kernel[...])
        >>> for _ in range(3):
        ...     loss = step(x, y)
        >>> bool((model.layers[0].kernel[...] == kernel).all()), int(opt.step[...])
        (True, 3)
    """

    def __init__(
        self,
        model: Any,
        optimizer: Optimizer[Any],
        loss_fn: Callable[..., Any],
        *,
        has_aux: bool = False,
    ) -> None:
        """Checks the arguments and splits ``model`` and ``optimizer`` for the first call."""
        _check_model(model)
        _check_optimizer(model, optimizer)
        if not callable(loss_fn):
            raise TypeError(
                f"`loss_fn` must be a function loss_fn(model, *batch) returning the loss, got "
                f"{short_repr(loss_fn)}. Pass model, optimizer and loss function in this order."
            )
        if not isinstance(has_aux, bool | np.bool_):
            raise TypeError(f"`has_aux` must be True or False, got {short_repr(has_aux)}.")
        self._model = model
        self._optimizer = optimizer
        self._loss_fn = loss_fn
        self._has_aux = bool(has_aux)
        self._objective = _objective(loss_fn, self._has_aux)
        self._steps: dict[Any, Any] = {}  # one jitted step per distinct split
        self._splits = 0  # how many times the model was split, for tests
        self._seen = -1
        self._split = self._build()

    @property
    def model(self) -> Any:
        """The module this step trains."""
        return self._model

    @property
    def optimizer(self) -> Optimizer[Any]:
        """The optimizer this step updates."""
        return self._optimizer

    def _build(self) -> _Split:
        """Migrates the optimizer, splits, and finds or makes the jitted step for the split."""
        model, optimizer = self._model, self._optimizer
        seen = _version.current()
        _check_eager(optimizer.step)
        optimizer.migrate(model)
        graphdef, flat = flatten((model, optimizer), graph=True)
        paths, leaves = list(flat.paths), list(flat.leaves)
        donated_idx: list[int] = []
        frozen_idx: list[int] = []
        const_idx: list[int] = []
        for i, (path, leaf) in enumerate(zip(paths, leaves, strict=True)):
            if not isinstance(leaf, nnx.Variable):
                const_idx.append(i)
                continue
            _check_variable(path, leaf)
            (frozen_idx if isinstance(leaf, FrozenParam) else donated_idx).append(i)
        get, put = raw_slot()
        constraints = tuple(_constraint(leaves[i].get_raw_value()) for i in donated_idx)
        for i, sharding in zip(donated_idx, constraints, strict=True):
            value = leaves[i].get_raw_value()
            if sharding is not None and value.sharding != sharding:
                # The same layout spelled as outputs will be: a copy, once per split.
                put(leaves[i], jax.device_put(value, sharding, may_alias=False))
        key = (graphdef, constraints)
        fn = self._steps.get(key)
        if fn is None:
            fn = _make_step(
                graphdef,
                paths,
                donated_idx,
                frozen_idx + const_idx,
                constraints,
                self._objective,
                optimizer.wrt,
                self._has_aux,
            )
            self._steps[key] = fn
        containers, views = _watched((model, optimizer))
        self._splits += 1
        self._seen = seen
        return _Split(
            fn=fn,
            get=get,
            put=put,
            unshared=_unshared_refcount(),
            donated=[leaves[i] for i in donated_idx],
            frozen=[leaves[i] for i in frozen_idx],
            consts=[leaves[i] for i in const_idx],
            containers=containers,
            views=views,
        )

    def _current(self) -> _Split:
        """The split for the model as it is now: the last one, unless something changed."""
        split = self._split
        if self._seen != _version.current() or not split.unchanged():
            split = self._split = self._build()
        return split

    def _check_batch(self, batch: tuple[Any, ...]) -> None:
        if batch and (batch[0] is self._model or batch[0] is self._optimizer):
            raise TypeError(
                "The step holds the model and optimizer itself: call step(*batch), e.g. "
                f"step(x, y), not step(model, ...). Got {short_repr(batch[0])} first."
            )

    @staticmethod
    def _read(split: _Split) -> tuple[list[Any], list[Any]]:
        """The donated and the fixed values, each donated one held by its variable alone."""
        get = split.get
        donated = list(map(get, split.donated))
        if max(map(_refcount, donated), default=0) > split.unshared:
            TrainStep._own(split, donated)
        return donated, [*map(get, split.frozen), *split.consts]

    @staticmethod
    def _own(split: _Split, donated: list[Any]) -> None:
        """Copies each donated value that something else holds too, in its variable and list.

        Donating such an array would delete it for its other holders; the copy
        is donated instead and the other holders keep the value they had.
        """
        counts = list(map(_refcount, donated))
        held = [i for i, count in enumerate(counts) if count > split.unshared]
        _check_eager(split.donated[held[0]])
        for i in held:
            donated[i] = _own_copy(donated[i])
            split.put(split.donated[i], donated[i])

    def __call__(self, *batch: Any, **kwargs: Any) -> Any:
        """Runs one training step on ``batch``; the model and optimizer are updated in place.

        Args:
            *batch: positional arguments after the model for ``loss_fn``.
            **kwargs: keyword arguments for ``loss_fn``; bools, strings and
                None are passed as Python values, the rest traced.

        Returns:
            The loss (computed asynchronously, as any jitted result), or
            ``(loss, aux)`` with ``has_aux``.

        Raises:
            TypeError: if ``loss_fn`` returns no scalar loss, or not what
                ``has_aux`` says, or the model is passed as first argument.
            ValueError: if ``loss_fn`` writes to a frozen parameter.
            RuntimeError: if called inside a JAX transformation.
        """
        # The hot path is written out in one function: host time is what this is for.
        split = self._split
        if self._seen != _version._changes or not all(
            map(operator.is_, _chain(split.views), split.objects)
        ):
            split = self._current()
        if batch and (batch[0] is self._model or batch[0] is self._optimizer):
            self._check_batch(batch)
        static: tuple[tuple[str, Any], ...] = ()
        if kwargs:
            static, kwargs = _split_kwargs(kwargs)
        get = split.get
        donated = list(map(get, split.donated))
        if max(map(_refcount, donated), default=0) > split.unshared:
            self._own(split, donated)
        out, new = split.fn(
            donated, [*map(get, split.frozen), *split.consts], static, batch, kwargs
        )
        if new and isinstance(new[0], Tracer):
            raise RuntimeError(_IN_TRACE)
        _consume(map(split.put, split.donated, new))
        return out

    def lower(self, *batch: Any, **kwargs: Any) -> jax.stages.Lowered:
        """The step for ``batch``, lowered for the model as it is now, without running it.

        ``step.lower(x, y).compile()`` gives XLA's ``cost_analysis()``,
        ``memory_analysis()`` and ``as_text()`` of exactly what a call runs.
        Nothing is donated, and no value of the model changes.

        Args:
            *batch: positional arguments for ``loss_fn``, as for a call.
            **kwargs: keyword arguments for ``loss_fn``, as for a call.

        Returns:
            The ``jax.stages.Lowered`` step.

        Raises:
            TypeError: if the model is passed as first argument.
            RuntimeError: if called inside a JAX transformation.

        Example:
            >>> import jax.numpy as jnp, optax
            >>> from flax import nnx
            >>> import flax_freeze as ff
            >>> model = ff.freeze(nnx.Linear(3, 1, rngs=nnx.Rngs(0)), ff.PathRegex("kernel"))
            >>> step = ff.TrainStep(model, ff.Optimizer(model, optax.sgd(0.1)),
            ...                  lambda m, x: m(x).sum())
            >>> memory = step.lower(jnp.ones((4, 3))).compile().memory_analysis()
            >>> memory.alias_size_in_bytes  # bias and the step count, updated in place
            8
        """
        split = self._current()
        self._check_batch(batch)
        static, kwargs = _split_kwargs(kwargs)
        donated, fixed = self._read(split)
        return split.fn.lower(donated, fixed, static, batch, kwargs)

    def __repr__(self) -> str:
        """The step's model type, loss function and options."""
        name = getattr(self._loss_fn, "__name__", short_repr(self._loss_fn))
        return (
            f"TrainStep(model={type(self._model).__name__}, optimizer=ff.Optimizer, "
            f"loss_fn={name}, has_aux={self._has_aux})"
        )
