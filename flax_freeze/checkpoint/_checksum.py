"""Content checksums of stored arrays: recorded at save time, verified on restore.

A checksum is a string that names its algorithm:

* ``crc32:<8 hex digits>``: the CRC-32 of the array's bytes (C order), for
  arrays a process holds whole: NumPy arrays, numbers and fully addressable
  JAX arrays (read in place on the CPU, copied to the host from an
  accelerator). It catches every change of up to 32 consecutive bits.
* ``sum:<16 hex digits>``: for a JAX array sharded over several processes,
  computed where it lives in one small jitted reduction, the same on every
  process: the sum of its 32-bit words and the sum of each word times an
  odd number that depends on its position, both modulo 2**32, so that a
  change of any one element is caught.

Both are integrity checks against damage, not cryptographic hashes.
"""

from __future__ import annotations

import functools
import re
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

_MASK = 0xFFFFFFFF


def _bits(dtype: Any) -> int:
    """The bit width of a non-bool, non-complex dtype (4 for int4, 16 for bfloat16)."""
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.iinfo(dtype).bits
    return jnp.finfo(dtype).bits


def _np_words(x: np.ndarray) -> np.ndarray:
    """The array's values as a flat uint32 array of words."""
    if np.iscomplexobj(x):
        return _np_words(np.stack([np.real(x), np.imag(x)], axis=-1))
    if x.dtype == np.bool_:
        return x.astype(np.uint32).ravel()
    bits = _bits(x.dtype)
    if bits < 8:
        return x.astype(np.int8).view(np.uint8).astype(np.uint32).ravel()
    if bits == 8:
        return x.view(np.uint8).astype(np.uint32).ravel()
    if bits == 16:
        return x.view(np.uint16).astype(np.uint32).ravel()
    return np.ascontiguousarray(x).view(np.uint32).ravel()


def _jnp_words(x: jax.Array) -> jax.Array:
    """As :func:`_np_words`, traced, but not flattened.

    A sharded array cannot be reshaped freely: the words come in an array whose
    C-order flattening is what :func:`_np_words` gives.
    """
    if jnp.iscomplexobj(x):
        return _jnp_words(jnp.stack([x.real, x.imag], axis=-1))
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = _bits(x.dtype)
    if bits < 8:
        return lax.bitcast_convert_type(x.astype(jnp.int8), jnp.uint8).astype(jnp.uint32)
    if bits == 8:
        return lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    if bits == 16:
        return lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    return lax.bitcast_convert_type(x, jnp.uint32)


def _np_sums(x: np.ndarray) -> tuple[int, int]:
    words = _np_words(np.asarray(x)).astype(np.uint64)
    odd = (2 * np.arange(words.size, dtype=np.uint64) + 1) & _MASK
    return int(words.sum() & _MASK), int(((words * odd) & _MASK).sum() & _MASK)


def _jnp_sums(x: jax.Array) -> jax.Array:
    words = _jnp_words(x)
    position = jnp.zeros((), jnp.uint32)  # the C-order flat index of each word
    stride = 1
    for axis in reversed(range(words.ndim)):
        index = lax.broadcasted_iota(jnp.uint32, words.shape, axis)
        position = position + index * jnp.uint32(stride & _MASK)
        stride *= words.shape[axis]
    odd = 2 * position + 1
    return jnp.stack([words.sum(dtype=jnp.uint32), (words * odd).sum(dtype=jnp.uint32)])


@functools.cache
def _jitted(sharding: Any) -> Any:
    """The reduction, with its result replicated where the input is a NamedSharding."""
    if isinstance(sharding, NamedSharding):
        return jax.jit(_jnp_sums, out_shardings=NamedSharding(sharding.mesh, PartitionSpec()))
    return jax.jit(_jnp_sums)


#: What a recorded checksum looks like.
PATTERN = re.compile(r"crc32:[0-9a-f]{8}|sum:[0-9a-f]{16}")


def _sum(value: Any) -> str:
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        if value.size == 0:
            return "sum:" + "0" * 16
        sharding = value.sharding if isinstance(value.sharding, NamedSharding) else None
        data = np.asarray(_jitted(sharding)(value).addressable_data(0))
        a, b = int(data[0]), int(data[1])
    else:
        a, b = _np_sums(np.asarray(value))
    return f"sum:{a:08x}{b:08x}"


def _host(value: Any) -> np.ndarray:
    """The whole array on this host (gathered from every process if it is sharded over them)."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        value = multihost_utils.process_allgather(value, tiled=True)
    return np.ascontiguousarray(np.asarray(value))


def checksum(value: Any, kind: str | None = None) -> str:
    """The content checksum of an array or number.

    Args:
        value: a JAX array (concrete; sharded or not), a NumPy array or a number.
        kind: ``"crc32"`` or ``"sum"``; by default ``"sum"`` for a JAX array
            sharded over several processes, else ``"crc32"``.

    Returns:
        The checksum, e.g. ``"crc32:1c291ca3"``; equal values give equal
        checksums wherever they live.
    """
    if kind is None:
        sharded = isinstance(value, jax.Array) and not value.is_fully_addressable
        kind = "sum" if sharded else "crc32"
    if kind == "sum":
        return _sum(value)
    data = _host(value)
    return f"crc32:{zlib.crc32(data.reshape(-1).view(np.uint8).data):08x}"


def matches(value: Any, recorded: str) -> bool:
    """Whether ``value`` has the ``recorded`` checksum (computed the way it was recorded)."""
    return checksum(value, recorded.partition(":")[0]) == recorded
