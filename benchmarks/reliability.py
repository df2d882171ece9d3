"""Reliability sweep of ff.checkpoint: faults, races and crafted files, counted.

Runs, with real processes on the local disk:

* **racing savers**: two processes save to one path with ``force=True`` at the
  same moment, round after round; after each round the checkpoint must restore
  to one save's flags *and* arrays, with no leftover directories;
* **reader during saves**: one process restores in a loop while another keeps
  replacing the checkpoint; every read must be one save (never a mix);
* **killed saves**: a save with ``force=True`` is SIGKILLed at a random moment;
  the path must then restore to the previous or the new checkpoint, and the
  next save must clean up;
* **flipped bytes**: one random byte of a stored array file is flipped; a
  restore must raise or give the saved values, never other values;
* **crafted files**: FIFOs, device files, links out of the checkpoint, deep
  and huge JSON; ``restore`` and ``inspect`` must give a one-line error within
  a time limit.

Prints a table and writes ``reliability.json``::

    python benchmarks/reliability.py [--rounds N] [--out FOLDER]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

import flax_freeze as ff

CHILD = """
import os, sys, time
import jax.numpy as jnp
import flax_freeze as ff

def node(value):
    me = int(value) // 1000
    b = jnp.full(2, value)
    return {"w": jnp.full(3, value), "b": ff.FrozenParam(b) if me == 1 else b,
            "big": jnp.full((512, 512), value)}
"""


def _spawn(code: str, *args: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD + textwrap.dedent(code), *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _target() -> dict[str, Any]:
    return {"w": jnp.zeros(3), "b": jnp.zeros(2), "big": jnp.zeros((512, 512))}


def _one_save(restored: dict[str, Any]) -> bool:
    """Flags and arrays of one save: saver 1 saves b frozen, saver 2 trainable, same values."""
    w = float(restored["w"][0])
    b = restored["b"]
    frozen = isinstance(b, ff.FrozenParam)
    values = np.asarray(b[...] if frozen else b)
    return bool(
        (np.asarray(restored["w"]) == w).all()
        and (values == w).all()
        and (np.asarray(restored["big"]) == w).all()
        and frozen == (int(w) // 1000 == 1)
    )


def _leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


RACER = """
path, me, rounds, sync = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
for r in range(rounds):
    while not os.path.exists(f"{sync}/go-{r}"):
        time.sleep(0.001)
    try:
        ff.checkpoint.save(path, node(float(me * 1000 + r)), force=True)
        outcome = "won"
    except ValueError as err:
        outcome = "refused" if "is in progress" in str(err) else "error: " + str(err)
    with open(f"{sync}/done-{r}-{me}", "w") as f:
        f.write(outcome)
"""


def racing_savers(root: Path, rounds: int) -> dict[str, int]:
    path, sync = root / "race" / "ckpt", root / "race-sync"
    sync.mkdir()
    ff.checkpoint.save(path, {k: v for k, v in _target().items()})
    savers = [_spawn(RACER, path, me, rounds, sync) for me in (1, 2)]
    counts = {"trials": rounds, "one save restored": 0, "refused with a clear error": 0}
    counts |= {"mixed": 0, "lost": 0, "leftovers": 0, "other errors": 0, "hung": 0}
    for r in range(rounds):
        (sync / f"go-{r}").touch()
        deadline = time.time() + 120
        done = [sync / f"done-{r}-{me}" for me in (1, 2)]
        while not all(d.exists() for d in done) and time.time() < deadline:
            time.sleep(0.01)
        if not all(d.exists() for d in done):
            counts["hung"] += 1
            break
        time.sleep(0.01)
        outcomes = [d.read_text() for d in done]
        counts["refused with a clear error"] += outcomes.count("refused")
        counts["other errors"] += sum(o.startswith("error") for o in outcomes)
        try:
            restored = ff.checkpoint.restore(path, _target())
        except (ValueError, FileNotFoundError):
            counts["lost"] += 1
            continue
        counts["one save restored" if _one_save(restored) else "mixed"] += 1
        counts["leftovers"] += bool(_leftovers(path))
    for saver in savers:
        try:
            saver.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            saver.kill()
            saver.communicate()
            counts["hung"] += 1
    return counts


READER = """
path, stop = sys.argv[1], sys.argv[2]
good = mixed = errors = 0
target = {"w": jnp.zeros(3), "b": jnp.zeros(2), "big": jnp.zeros((512, 512))}
while not os.path.exists(stop):
    try:
        out = ff.checkpoint.restore(path, target)
    except ValueError as err:
        errors += 1
        continue
    w = float(out["w"][0])
    b = out["b"]
    frozen = isinstance(b, ff.FrozenParam)
    ok = (out["w"] == w).all() and ((b[...] if frozen else b) == w).all()
    ok = ok and (out["big"] == w).all() and frozen == (int(w) // 1000 == 1)
    good += bool(ok)
    mixed += not ok
print(good, mixed, errors)
"""

WRITER = """
path, rounds = sys.argv[1], int(sys.argv[2])
for r in range(rounds):
    ff.checkpoint.save(path, node(float((1 + r % 2) * 1000 + r)), force=True)
"""


def reader_during_saves(root: Path, rounds: int) -> dict[str, int]:
    path, stop = root / "read" / "ckpt", root / "read-stop"
    ff.checkpoint.save(
        path,
        {
            "w": jnp.full(3, 1000.0),
            "b": ff.FrozenParam(jnp.full(2, 1000.0)),
            "big": jnp.full((512, 512), 1000.0),
        },
    )
    reader = _spawn(READER, path, stop)
    writer = _spawn(WRITER, path, rounds)
    writer.communicate(timeout=600)
    stop.touch()
    out, err = reader.communicate(timeout=300)
    good, mixed, errors = (int(x) for x in out.split()) if out.strip() else (0, 0, -1)
    return {
        "saves": rounds,
        "reads": good + mixed + max(errors, 0),
        "one save": good,
        "mixed": mixed,
        "clear errors": max(errors, 0),
        "writer failed": int(writer.returncode != 0),
    }


KILLED = """
path, value = sys.argv[1], float(sys.argv[2])
print("saving", flush=True)
ff.checkpoint.save(path, node(value), force=True)
print("saved", flush=True)
"""


def killed_saves(root: Path, trials: int, rng: random.Random) -> dict[str, int]:
    path = root / "kill" / "ckpt"
    ff.checkpoint.save(
        path,
        {"w": jnp.full(3, 2000.0), "b": jnp.full(2, 2000.0), "big": jnp.full((512, 512), 2000.0)},
    )
    counts = {"trials": trials, "previous or new restored": 0, "data lost": 0, "mixed": 0}
    counts["cleaned up by the next save"] = 0
    for t in range(trials):
        child = _spawn(KILLED, path, 2000.0 + t + 1)
        assert child.stdout is not None
        child.stdout.readline()  # JAX is imported; the save starts now
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        child.communicate()
        try:
            restored = ff.checkpoint.restore(path, _target())
        except (ValueError, FileNotFoundError):
            counts["data lost"] += 1
            ff.checkpoint.save(
                path,
                {
                    "w": jnp.full(3, 2000.0),
                    "b": jnp.full(2, 2000.0),
                    "big": jnp.full((512, 512), 2000.0),
                },
                force=True,
            )
            continue
        counts["previous or new restored" if _one_save(restored) else "mixed"] += 1
        w = float(restored["w"][0])
        ff.checkpoint.save(
            path,
            {"w": jnp.full(3, w), "b": jnp.full(2, w), "big": jnp.full((512, 512), w)},
            force=True,
        )
        counts["cleaned up by the next save"] += not _leftovers(path)
    return counts


def flipped_bytes(root: Path, trials: int, rng: random.Random) -> dict[str, int]:
    counts = {"trials": trials, "clear error": 0, "saved values": 0, "wrong values": 0}
    saved = {
        "w": jnp.arange(3.0),
        "b": ff.FrozenParam(jnp.ones(2)),
        "big": jnp.arange(512 * 512, dtype=jnp.float32).reshape(512, 512),
    }
    for t in range(trials):
        path = root / "flip" / f"ckpt{t}"
        ff.checkpoint.save(path, saved)
        files = sorted(p for p in (path / "state").rglob("*") if p.is_file())
        file = rng.choice(files)
        raw = bytearray(file.read_bytes())
        if not raw:
            continue
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        file.write_bytes(bytes(raw))
        try:
            out = ff.checkpoint.restore(path, _target())
        except (ValueError, FileNotFoundError) as err:
            counts["clear error"] += "\n" not in str(err)
            continue
        same = all(
            np.array_equal(
                np.asarray(out[k][...] if k == "b" else out[k]),
                np.asarray(saved[k][...] if k == "b" else saved[k]),
            )
            for k in saved
        )
        counts["saved values" if same else "wrong values"] += 1
    return counts


def _crafts() -> dict[str, Any]:
    def link(to: str) -> Any:
        return lambda f: os.symlink(to, f)

    return {
        "FIFO as flags": ("flags/metadata", os.mkfifo),
        "FIFO as array metadata": ("state/_METADATA", os.mkfifo),
        "FIFO as array data": ("state/manifest.ocdbt", os.mkfifo),
        "link to /dev/zero": ("flags/metadata", link("/dev/zero")),
        "link to /dev/urandom as data": ("state/manifest.ocdbt", link("/dev/urandom")),
        "link out of the checkpoint": ("flags/metadata", link("/etc/hostname")),
        "link into a loop": ("flags/metadata", link("metadata")),
        "deep JSON flags": (
            "flags/metadata",
            lambda f: f.write_text("[" * 100_000 + "]" * 100_000),
        ),
        "deep JSON metadata": ("state/_METADATA", lambda f: f.write_text('{"a":' * 100_000)),
        "huge JSON flags": ("flags/metadata", lambda f: f.write_text(" " * (300 * 2**20) + "{}")),
        "binary flags": ("flags/metadata", lambda f: f.write_bytes(bytes(range(256)) * 10)),
        "null flags": ("flags/metadata", lambda f: f.write_text("null")),
        "empty metadata": ("state/_METADATA", lambda f: f.write_text("")),
        "directory as flags": ("flags/metadata", lambda f: f.mkdir()),
    }


INSPECT_TIMEOUT = 60


def crafted_files(root: Path) -> dict[str, Any]:
    counts: dict[str, Any] = {"tried": 0, "handled safely": 0, "failed": []}
    for name, (file, craft) in _crafts().items():
        path = root / "craft" / name.replace(" ", "-").replace("/", "-")
        ff.checkpoint.save(path, {"w": jnp.ones(3), "b": ff.FrozenParam(jnp.zeros(2))})
        (path / file).unlink()
        craft(path / file)
        counts["tried"] += 1
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
        start = time.time()
        try:
            done = subprocess.run(
                [sys.executable, "-m", "flax_freeze", "inspect", str(path)],
                capture_output=True,
                text=True,
                timeout=INSPECT_TIMEOUT,
                env=env,
                check=False,
            )
        except subprocess.TimeoutExpired:
            counts["failed"].append(f"{name}: inspect hung")
            continue
        one_line = done.returncode == 2 and done.stderr.count("\n") == 1
        try:
            ff.checkpoint.restore(path, {"w": jnp.zeros(3), "b": jnp.zeros(2)})
            restored = "restored"
        except (ValueError, FileNotFoundError) as err:
            restored = "error" if "\n" not in str(err) else "multi-line error"
        if one_line and restored == "error" and time.time() - start < INSPECT_TIMEOUT:
            counts["handled safely"] += 1
        else:
            counts["failed"].append(
                f"{name}: inspect {done.returncode} {done.stderr[-200:]!r}, restore {restored}"
            )
    return counts


def main(rounds: int = 20, out: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Runs every part of the sweep; prints the figures; writes ``reliability.json`` to ``out``."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        results = {
            "racing savers": racing_savers(root, rounds),
            "reader during saves": reader_during_saves(root, 2 * rounds),
            "killed saves": killed_saves(root, rounds, rng),
            "flipped bytes": flipped_bytes(root, 2 * rounds, rng),
            "crafted files": crafted_files(root),
        }
    for part, counts in results.items():
        print(f"{part}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "reliability.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwritten to {Path(out) / 'reliability.json'}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="trials per part")
    parser.add_argument("--out", default="benchmarks/results", help="folder for reliability.json")
    args = parser.parse_args()
    main(args.rounds, args.out)
