"""Where restored arrays go: the target's shardings, or where fresh arrays would go."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from .._nnx_compat import get_var_pspec
from .._walk import Entry, Key, join


def _default_sharding() -> jax.sharding.Sharding:
    """Where a fresh array would go: replicated on the mesh in context, else the default device."""
    mesh = jax.sharding.get_mesh()
    if not mesh.empty:
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _concrete_mesh(mesh: Any, where: str) -> jax.sharding.Mesh:
    if isinstance(mesh, jax.sharding.Mesh):
        return mesh
    context = jax.sharding.get_mesh()
    if not context.empty and context.abstract_mesh == mesh:
        return context
    try:
        return jax.make_mesh(mesh.axis_sizes, mesh.axis_names, axis_types=mesh.axis_types)
    except ValueError as err:
        raise ValueError(
            f"`target` places {where} on the abstract mesh {mesh}, and no device mesh of "
            f"that shape can be made here ({err}). Restore inside `with jax.set_mesh(mesh):`."
        ) from err


def _sharding(entry: Entry) -> jax.sharding.Sharding | None:
    """The sharding to restore an entry onto; None restores a NumPy array."""
    value = entry.value
    if isinstance(value, jax.Array):
        return value.sharding
    if not isinstance(value, jax.ShapeDtypeStruct):
        return None
    where = repr(join(entry.key))
    sharding = value.sharding
    variable = entry.variable
    if sharding is None and variable is not None and variable.get_metadata().get("out_sharding"):
        # nnx.eval_shape drops shardings on meshes with Auto axes: rebuild from metadata.
        mesh = variable.get_metadata().get("mesh")
        if mesh is None:
            mesh = jax.sharding.get_mesh()
            if mesh.empty:
                mesh = jax.sharding.get_abstract_mesh()
            if mesh.empty:
                raise ValueError(
                    f"`target` variable {where} is sharded by its metadata "
                    f"(out_sharding={variable.get_metadata()['out_sharding']!r}) but names no "
                    "mesh, and none is in context. Restore inside `with jax.set_mesh(mesh):`."
                )
        spec = get_var_pspec(variable) or jax.sharding.PartitionSpec()
        return jax.sharding.NamedSharding(_concrete_mesh(mesh, where), spec)
    if sharding is None:
        return _default_sharding()
    if isinstance(sharding, jax.sharding.NamedSharding) and not isinstance(
        sharding.mesh, jax.sharding.Mesh
    ):
        mesh = _concrete_mesh(sharding.mesh, where)
        return jax.sharding.NamedSharding(mesh, sharding.spec, memory_kind=sharding.memory_kind)
    return sharding


def _state_sharding(
    key: Key,
    shape: tuple[int, ...],
    params: Mapping[Key, tuple[tuple[int, ...], jax.sharding.Sharding | None]],
    old: Mapping[Key, Any],
) -> jax.sharding.Sharding:
    """Where a rebuilt optimizer-state leaf goes: like its parameter, else like the old leaf."""
    for param, (param_shape, sharding) in params.items():
        if key[len(key) - len(param) :] == param and param_shape == shape and sharding:
            return sharding
    previous = old.get(key)
    if isinstance(previous, jax.Array) and previous.shape == shape:
        return previous.sharding
    return _default_sharding()
