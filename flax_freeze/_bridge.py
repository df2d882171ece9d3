"""``nnx.bridge.ToNNX`` modules holding frozen parameters.

``nnx.bridge.ToNNX`` hands each variable to its Linen module in the Linen
collection of its type, and ``ff.FrozenParam``'s is ``frozen_params``, while
the Linen module looks its parameters up in ``params``. A wrapper that holds
a frozen parameter therefore gets a class that knows about them:
:func:`sync_bridge_class` gives it one when re-typing puts a
``FrozenParam`` in it, and the plain class back when none is left.

What this module relies on (Flax 0.12, JAX 0.10): ``ToNNX.__call__`` reads
the Linen variables from the instance ``__dict__`` (attributes not starting
with ``to_nnx__``/``_pytree__``: variables, or plain dicts of them), and
writes the updates of mutable collections back with ``setattr``; NNX
modules have the instance layout of ``ToNNX`` in every subclass that adds
no slots.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from flax import nnx

from ._boxes import FrozenBox
from ._filters import path_str
from ._nnx_compat import in_transformation
from ._swap import is_made, set_class, subclass
from ._variables import PARAM_TYPE_KEY, TRAINED_DTYPE_KEY, FrozenParam

Path = tuple[Any, ...]

#: Prefixes of ``ToNNX``'s own attributes; every other attribute is Linen state.
_OWN = ("to_nnx__", "_pytree__")


def _linen_state(module: Any) -> dict[str, Any]:
    """The Linen variables a ``ToNNX`` holds: attribute -> variable or nested dict."""
    return {k: v for k, v in vars(module).items() if not k.startswith(_OWN)}


def _walk(x: Any, path: Path) -> Iterator[tuple[Path, Any]]:
    """``(path, variable)`` for each variable in a ``ToNNX`` attribute (nested dicts)."""
    if isinstance(x, dict):
        for key, child in x.items():
            yield from _walk(child, (*path, key))
    elif isinstance(x, nnx.Variable):
        yield path, x


def bridge_variables(module: Any) -> Iterator[tuple[Path, nnx.Variable]]:
    """``(path, variable)`` for every Linen variable a ``ToNNX`` module holds."""
    for name, value in _linen_state(module).items():
        yield from _walk(value, (name,))


def _param_view(frozen: FrozenParam) -> nnx.Variable:
    """The trainable-typed view of a frozen parameter that Linen gets: same array, same box."""
    metadata = frozen.get_metadata()
    param_type = metadata.pop(PARAM_TYPE_KEY, None) or nnx.Param
    metadata.pop(TRAINED_DTYPE_KEY, None)
    return param_type.from_metadata(frozen.get_raw_value(), metadata)


def _frozen_copy(variable: nnx.Variable) -> FrozenParam:
    metadata = variable.get_metadata()
    metadata[PARAM_TYPE_KEY] = type(variable)
    return FrozenParam.from_metadata(variable.get_raw_value(), metadata)  # type: ignore[return-value]


def from_frozen_box(variable: nnx.Variable) -> bool:
    """Whether a parameter was made by a Linen initializer wrapped in ``ffl.frozen``."""
    return (
        isinstance(variable, nnx.Param)
        and variable.get_metadata().get("linen_meta_type") is FrozenBox
    )


def _set(module: Any, path: Path, value: Any) -> None:
    """Puts ``value`` at ``path`` of a ``ToNNX``'s Linen state (attribute, then dict keys)."""
    if len(path) == 1:
        setattr(module, path[0], value)
        return
    container = getattr(module, path[0])
    for key in path[1:-1]:
        container = container[key]
    container[path[-1]] = value


class FrozenParamsToNNX(nnx.bridge.ToNNX):
    """``nnx.bridge.ToNNX`` that hands its frozen parameters to Linen in ``params``.

    For a call, the Linen module gets every :class:`FrozenParam` in ``params``
    as an ``nnx.Param`` view of the same array (and box), built on a shallow
    copy of the wrapper: the wrapper itself is not changed, so a call under
    any JAX transformation reads it as plain ``ToNNX`` would. Updates of
    mutable collections come back onto the wrapper, the frozen parameters
    as they were (same objects). On lazy initialisation the parameters made
    by an ``ffl.frozen`` initializer, or at a path frozen before, are frozen.

    Instances are not built directly: a ``ToNNX`` switches to this class (or,
    for a subclass of ``ToNNX``, to one made the same way) and back, which
    needs the same instance layout, hence the empty ``__slots__``.
    """

    __slots__ = ()
    _ff_plain: type = nnx.bridge.ToNNX  # the class this one adds frozen parameters to

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the Linen module with the frozen parameters shown in ``params``."""
        plain = type(self)._ff_plain
        if self._pytree__state.initializing:
            return _initialize(self, plain, args, kwargs)
        views: dict[Path, tuple[FrozenParam, nnx.Variable]] = {}

        def show(x: Any, path: Path) -> Any:
            if isinstance(x, FrozenParam):
                view = _param_view(x)
                views[path] = (x, view)
                return view
            if isinstance(x, dict):
                return {key: show(child, (*path, key)) for key, child in x.items()}
            return x

        shown = {name: show(value, (name,)) for name, value in _linen_state(self).items()}
        if not views:
            return plain.__call__(self, *args, **kwargs)
        copy = object.__new__(plain)
        before = {**vars(self), **shown}
        vars(copy).update(before)
        out = copy(*args, **kwargs)
        for name, value in vars(copy).items():
            if name.startswith(_OWN) or value is before.get(name, _MISSING):
                continue
            setattr(self, name, nnx.data(_restore(value, (name,), views)))
        return out


_MISSING = object()


def _initialize(module: Any, plain: type, args: Any, kwargs: Any) -> Any:
    """Lazy initialisation; then freezes what ``ffl.frozen`` made or what was frozen before."""
    was_frozen = {p for p, v in bridge_variables(module) if isinstance(v, FrozenParam)}
    out = plain.__call__(module, *args, **kwargs)
    for path, variable in list(bridge_variables(module)):
        if isinstance(variable, nnx.Param) and (path in was_frozen or from_frozen_box(variable)):
            _set(module, path, _frozen_copy(variable))
    return out


def _restore(x: Any, path: Path, views: dict[Path, tuple[FrozenParam, nnx.Variable]]) -> Any:
    """``x`` (an updated attribute) with the frozen parameters back in place of their views."""
    if path in views:
        frozen, view = views[path]
        if x is view:
            return frozen
        if isinstance(x, nnx.Variable):
            # The Linen module returned this parameter (``params`` was mutable).
            value = x.get_raw_value()
            if value is not view.get_raw_value():
                frozen.set_raw_value(value)
            return frozen
        return x
    if isinstance(x, dict):
        return {key: _restore(child, (*path, key), views) for key, child in x.items()}
    return x


_AWARE: dict[type, type] = {nnx.bridge.ToNNX: FrozenParamsToNNX}


def _aware_class(plain: type) -> type:
    """The class for ``plain`` (``ToNNX`` or a subclass) that holds frozen parameters."""
    namespace = {
        "__slots__": (),
        "__module__": __name__,
        "__doc__": FrozenParamsToNNX.__doc__,
        "__call__": FrozenParamsToNNX.__call__,
    }
    return subclass(_AWARE, plain, f"FrozenParams{plain.__name__}", namespace)


def _is_aware(cls: type) -> bool:
    return is_made(_AWARE, cls)


def _swap_refused(path: Path) -> ValueError:
    where = path_str(path) or "the node itself"
    return ValueError(
        f"`node` holds an nnx.bridge.ToNNX module ({where}) whose parameters would become "
        "frozen inside a JAX transformation (nnx.jit, nnx.grad, nnx.eval_shape...). Such a "
        "wrapper changes its class to hand frozen parameters to its Linen module, and a "
        "class change cannot leave a transformation. Freeze eagerly, before the transformation "
        "(e.g. ff.freeze(model, filter) before the first step); while the wrapper holds a "
        "frozen parameter, freeze/unfreeze inside transformations work."
    )


def make_aware(module: Any, path: Path = ()) -> None:
    """Gives a ``ToNNX`` module the class that hands frozen parameters to Linen.

    Raises:
        ValueError: inside a JAX transformation, where a class change would not
            reach the caller's module.
    """
    cls = type(module)
    if _is_aware(cls):
        return
    if in_transformation():
        raise _swap_refused(path)
    set_class(module, _aware_class(cls))


def sync_bridge_class(module: Any) -> None:
    """Gives a ``ToNNX`` module the class that matches what it holds; other nodes: nothing.

    A wrapper holding a ``FrozenParam`` gets the frozen-aware class. One that
    holds parameters but none frozen gets its plain class back, outside JAX
    transformations (inside one, the aware class stays: it behaves as the
    plain one). A wrapper without parameters (not yet initialised, e.g. after
    ``ffl.to_nnx``) keeps its class.
    """
    if not isinstance(module, nnx.bridge.ToNNX):
        return
    variables = [v for _, v in bridge_variables(module)]
    if any(isinstance(v, FrozenParam) for v in variables):
        make_aware(module)
        return
    cls = type(module)
    if (
        _is_aware(cls)
        and any(isinstance(v, nnx.Param) for v in variables)
        and not in_transformation()
    ):
        set_class(module, cls._ff_plain)  # type: ignore[attr-defined]


def check_bridge_retype(node: Any, becomes_frozen: Callable[[nnx.Variable], bool]) -> None:
    """Inside a JAX transformation, refuses a re-typing that needs a ``ToNNX`` class change.

    Called before anything changes, so a refused call leaves ``node`` as it was.

    Args:
        node: what is being re-typed.
        becomes_frozen: whether a variable is about to become a ``FrozenParam``.

    Raises:
        ValueError: if a plain ``ToNNX`` in ``node`` would get a frozen parameter.
    """
    if not in_transformation():
        return
    for path, x in nnx.iter_graph(node, graph=True):
        if not isinstance(x, nnx.bridge.ToNNX) or _is_aware(type(x)):
            continue
        if any(becomes_frozen(v) for _, v in bridge_variables(x)):
            raise _swap_refused(path)
