"""What a restore reads into each target entry: one record per entry, from planning to applying."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from .._walk import Entry, Key, join


@dataclass(frozen=True)
class _Read:
    """How one target entry (or one optax state leaf filled in) is read from the checkpoint."""

    stored: Key  # the stored array that fills it
    sharding: jax.sharding.Sharding | None  # where it is read to; None: a NumPy array
    dtype: np.dtype[Any]  # its dtype once read (it is read as stored, then cast)
    impl: str | None = None  # the PRNG key implementation of stored key data
    ties: tuple[Key, ...] = ()  # the other stored paths of a tied variable, read and compared


@dataclass(frozen=True)
class Mismatch:
    """A target entry whose stored array does not fit it (shape, dtype or key type)."""

    entry: Entry
    stored: Key
    problem: str

    def __str__(self) -> str:
        return f"{join(self.stored)} ({self.problem})"
