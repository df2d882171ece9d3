"""Command line: ``python -m flax_freeze inspect CKPT_DIR`` (also ``flax-freeze inspect``).

``inspect`` prints a checkpoint's table of paths, types, shapes, dtypes and
trainable or frozen, with totals, from its metadata alone: no array is read.
``--json`` prints the same as JSON. A CheckpointManager directory shows its
latest step (or ``--step N``). A bad directory gets a one-line error and exit
status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import checkpoint


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flax-freeze", description="flax_freeze command line tools."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect",
        help="show a checkpoint's variables and flags (reads metadata only)",
        description="Show a checkpoint's variables, shapes, dtypes and trainable or frozen "
        "flags, with totals, reading its metadata only.",
    )
    inspect.add_argument("directory", help="checkpoint directory, or a CheckpointManager one")
    inspect.add_argument("--step", type=int, default=None, help="step of a manager directory")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0, or 2 for a bad checkpoint).

    Args:
        argv: the arguments after the program name; defaults to ``sys.argv[1:]``.

    Returns:
        The exit status.

    Example:
        >>> import os, tempfile
        >>> import jax.numpy as jnp
        >>> import flax_freeze as ff
        >>> from flax_freeze.__main__ import main
        >>> directory = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> ff.checkpoint.save(directory, {"w": jnp.ones(3), "b": ff.FrozenParam(jnp.zeros(2))})
        >>> main(["inspect", directory])  # doctest: +ELLIPSIS
        /...ckpt: flax_freeze flags
        path  type         shape  dtype    status     count  bytes
        ----------------------------------------------------------
        b     FrozenParam  (2,)   float32  frozen         2      8
        w     Array        (3,)   float32  trainable      3     12
        ----------------------------------------------------------
        trainable 3 (12 B), frozen 2 (8 B), total 5 (20 B)
        0
    """
    args = _parser().parse_args(argv)
    try:
        description = checkpoint.describe(args.directory, step=args.step)
    except (OSError, ValueError) as err:
        message = " ".join(str(err).split())
        print(f"flax-freeze {args.command}: error: {message}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(description.to_json(), indent=2))
    else:
        if description.step is not None:
            print(f"step {description.step}")
        print(description)
    return 0


if __name__ == "__main__":
    sys.exit(main())
