"""Content checksums of stored arrays: recorded at save time, verified on restore.

The checksum of an array is computed over its bytes as 32-bit words (one word
per element for 1- and 2-byte dtypes, several for wider ones): the sum of the
words and the sum of each word times an odd number that depends on its
position, both modulo 2**32. Any change of one element changes the second sum,
so a flipped byte or bit is always caught; it is an integrity check against
damage, not a cryptographic hash.

JAX arrays are summed where they live, in one small jitted reduction per shape
and dtype (no copy to the host, sharded arrays included, the same result on
every process); NumPy arrays and numbers are summed with NumPy. Both give the
same hex string for the same values.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
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


def _hex(a: int, b: int) -> str:
    return f"{a:08x}{b:08x}"


def checksum(value: Any) -> str:
    """The content checksum of an array or number, as 16 hex digits.

    Args:
        value: a JAX array (concrete; sharded or not), a NumPy array or a number.

    Returns:
        The checksum, the same for equal values in either kind of array.
    """
    if isinstance(value, jax.Array):
        if value.size == 0:
            return _hex(0, 0)
        sharding = value.sharding if isinstance(value.sharding, NamedSharding) else None
        sums = _jitted(sharding)(value)
        data = np.asarray(sums.addressable_data(0))
        return _hex(int(data[0]), int(data[1]))
    return _hex(*_np_sums(np.asarray(value)))
