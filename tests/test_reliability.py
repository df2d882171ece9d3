"""Reliability of checkpoints: what force=True may replace, concurrent savers and readers,
integrity checks, tied targets, validation of the flags item, and crafted files.

Race tests run a fixed number of rounds in child processes, each with a timeout.
"""

import asyncio
import gc
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import flax_freeze as ff
from flax_freeze.checkpoint import _files as _ckpt_files
from flax_freeze.checkpoint._quiet import _quiet_failure
from helpers import (
    ARRAY_DAMAGE,
    CRAFTED_FILES,
    FLAGS_DAMAGE,
    child_env,
    craft,
    damage_arrays,
    data_files,
    flags_json,
    mixed_target,
    mixed_tree,
    write_flags,
)


def listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


CHILD = """
import os, sys, time, signal
import jax, jax.numpy as jnp
import flax_freeze as ff
from flax_freeze.checkpoint._lock import SaveLock
"""


def child(code, *args, wait=True):
    env = child_env()
    argv = [sys.executable, "-c", CHILD + textwrap.dedent(code), *map(str, args)]
    if not wait:
        return subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, check=False)


# --- 1. force=True replaces only a checkpoint ---------------------------------------------


def test_force_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print(1)")
    before = listing(project)
    with pytest.raises(
        ValueError,
        match=r"`directory` '.*project' is not a checkpoint \(.*\)\. save\(\.\.\., force=True\) "
        r"replaces only a checkpoint that flax_freeze or orbax wrote; nothing was changed",
    ):
        ff.checkpoint.save(project, mixed_tree(), force=True)
    assert listing(project) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]


def test_force_refuses_a_checkpoint_manager_root(tmp_path):
    with ocp.CheckpointManager(tmp_path / "runs") as mngr:
        for step in (1, 2):
            mngr.save(step, args=ff.checkpoint.save_args(mixed_tree(step)))
    before = listing(tmp_path / "runs")
    with pytest.raises(
        ValueError,
        match=r"is not a checkpoint \(.*CheckpointManager directory with steps \[1, 2\].*\)",
    ):
        ff.checkpoint.save(tmp_path / "runs", mixed_tree(), force=True)
    assert listing(tmp_path / "runs") == before


def test_force_refuses_a_checkpoint_holding_other_files(tmp_path):
    path = tmp_path / "ckpt"
    ff.checkpoint.save(path, mixed_tree())
    (path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds entries that no checkpoint has: \[notes\.txt\]"):
        ff.checkpoint.save(path, mixed_tree(2.0), force=True)
    assert (path / "notes.txt").read_text() == "mine"
    assert ff.checkpoint.restore(path, mixed_target())["w"].tolist() == [1.0] * 3


@pytest.mark.parametrize(
    ("where", "match"),
    [
        ("", r"`directory` '.*' is the working directory\."),
        (".", r"is the working directory\."),
        ("..", r"holds the working directory"),
        ("/", r"`directory` '/' (is the root directory|holds the working directory)"),
        ("~", r"is the home directory|holds the working directory"),
    ],
    ids=["empty", "dot", "parent", "root", "home"],
)
def test_force_refuses_protected_directories(tmp_path, monkeypatch, where, match):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("keep")
    monkeypatch.chdir(work)
    directory = os.path.expanduser(where) if where == "~" else where
    with pytest.raises(ValueError, match=match):
        ff.checkpoint.save(directory, mixed_tree(), force=True)
    assert (work / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt"]


def test_protected_paths_include_the_home_directory_and_above_it(tmp_path, monkeypatch):
    home = tmp_path / "home" / "user"
    home.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    assert _ckpt_files.protected(home) == "is the home directory"
    assert _ckpt_files.protected(home.parent).startswith("holds the home directory")
    assert _ckpt_files.protected(home / "ckpt") is None


def test_force_refuses_a_symbolic_link(tmp_path):
    real = tmp_path / "real"
    ff.checkpoint.save(real, mixed_tree())
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(ValueError, match=r"`directory` '.*link' is a symbolic link\."):
        ff.checkpoint.save(tmp_path / "link", mixed_tree(2.0), force=True)
    assert ff.checkpoint.restore(real, mixed_target())["w"].tolist() == [1.0] * 3


def test_force_replaces_checkpoints_that_orbax_wrote(tmp_path):
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "plain", {"w": jnp.ones(3)})
    ff.checkpoint.save(tmp_path / "plain", mixed_tree(5.0), force=True)
    assert ff.checkpoint.restore(tmp_path / "plain", mixed_target())["w"].tolist() == [5.0] * 3
    with ocp.CheckpointManager(tmp_path / "m") as mngr:
        mngr.save(3, args=ff.checkpoint.save_args(mixed_tree()))
    ff.checkpoint.save(tmp_path / "m" / "3", mixed_tree(6.0), force=True)  # one step's directory
    assert ff.checkpoint.restore(tmp_path / "m" / "3", mixed_target())["w"].tolist() == [6.0] * 3


# --- 2. one saver per path ---------------------------------------------------------------


def test_a_second_saver_gets_a_clear_error_and_nothing_is_touched(tmp_path):
    path = tmp_path / "ckpt"
    ff.checkpoint.save(path, mixed_tree(1.0))
    holder = child(
        """
        lock = SaveLock(__import__("etils").epath.Path(sys.argv[1]))
        lock.acquire()
        print("locked", flush=True)
        time.sleep(120)
        """,
        path,
        wait=False,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = listing(tmp_path)
        with pytest.raises(
            ValueError,
            match=rf"Another save to `directory` '.*ckpt' is in progress \(process {holder.pid} "
            r"on .*, started .*\)\. Only one save to a path runs at a time.*Nothing was changed",
        ):
            ff.checkpoint.save(path, mixed_tree(2.0), force=True)
        assert listing(tmp_path) == before
    finally:
        holder.kill()  # a killed holder releases the lock
        holder.communicate()
    ff.checkpoint.save(path, mixed_tree(3.0), force=True)  # takes over the stale lock file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert ff.checkpoint.restore(path, mixed_target())["w"].tolist() == [3.0] * 3


def test_save_creates_missing_parents_and_leaves_only_the_checkpoint(tmp_path):
    path = tmp_path / "a" / "b" / "ckpt"
    ff.checkpoint.save(path, mixed_tree(2.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]
    assert ff.checkpoint.restore(path, mixed_target())["w"].tolist() == [2.0] * 3


def test_leftovers_of_killed_saves_are_cleaned_up_or_put_back(tmp_path):
    path = tmp_path / "ckpt"
    ff.checkpoint.save(path, mixed_tree(1.0))
    (tmp_path / "ckpt.flax-freeze-new-0123").mkdir()  # killed while writing
    (tmp_path / "ckpt.flax-freeze-new-0123.orbax-checkpoint-tmp-9").mkdir()
    path.rename(tmp_path / "ckpt.flax-freeze-old-4567")  # killed between the two renames
    with pytest.raises(
        FileNotFoundError, match=r"previous checkpoint is complete at '.*ckpt.flax-freeze-old-4567'"
    ):
        ff.checkpoint.restore(path, mixed_target())
    # The next save puts the previous checkpoint back, then refuses to overwrite it ...
    with pytest.raises(ValueError, match=r"already exists\. Pass force=True"):
        ff.checkpoint.save(path, mixed_tree(2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert ff.checkpoint.restore(path, mixed_target())["w"].tolist() == [1.0] * 3
    # ... or, with force=True, replaces it.
    ff.checkpoint.save(path, mixed_tree(2.0), force=True)
    assert ff.checkpoint.restore(path, mixed_target())["w"].tolist() == [2.0] * 3


SAVER = """
path, me, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
won = refused = 0
for i in range(rounds):
    value = float(me * 1000 + i)
    b = jnp.full(2, value)
    node = {"w": jnp.full(3, value), "b": ff.FrozenParam(b) if me == 1 else b}
    try:
        ff.checkpoint.save(path, node, force=True)
        won += 1
    except ValueError as err:
        assert "is in progress" in str(err), err
        refused += 1
print("done", won, refused, flush=True)
"""


def consistent(restored):
    """Flags and arrays of one save: saver 1 saved b frozen, saver 2 trainable, same values."""
    w, b = float(restored["w"][0]), restored["b"]
    frozen = isinstance(b, ff.FrozenParam)
    values = np.asarray(b[...] if frozen else b)
    return (
        restored["w"].tolist() == [w] * 3
        and values.tolist() == [w] * 2
        and frozen == (w // 1000 == 1)
    )


def test_two_savers_race_one_wins_each_time_never_a_mix(tmp_path):
    path = tmp_path / "ckpt"
    ff.checkpoint.save(path, mixed_tree(0.0))
    savers = [child(SAVER, path, me, 12, wait=False) for me in (1, 2)]
    outs = [s.communicate(timeout=300) for s in savers]
    total_won = 0
    for saver, (out, err) in zip(savers, outs, strict=True):
        assert saver.returncode == 0, err[-2000:]
        _, won, refused = out.split()
        assert int(won) + int(refused) == 12
        total_won += int(won)
    assert total_won >= 12  # at least one save per round finished
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    restored = ff.checkpoint.restore(path, mixed_target())
    assert consistent(restored), restored


READER = """
path, until = sys.argv[1], sys.argv[2]
good = retried_out = 0
while not os.path.exists(until):
    try:
        out = ff.checkpoint.restore(path, {"w": jnp.zeros(3), "b": jnp.zeros(2)})
    except ValueError as err:
        assert "while it was being read" in str(err), err
        retried_out += 1
        continue
    w, b = float(out["w"][0]), out["b"]
    frozen = isinstance(b, ff.FrozenParam)
    values = (b[...] if frozen else b).tolist()
    assert out["w"].tolist() == [w] * 3 and values == [w] * 2, out
    assert frozen == (w // 1000 == 1), ("mixed", out)
    good += 1
print("read", good, retried_out, flush=True)
"""


def test_a_reader_never_mixes_two_saves(tmp_path):
    path, done = tmp_path / "ckpt", tmp_path / "writer-done"
    ff.checkpoint.save(path, mixed_tree(1000.0))
    reader = child(READER, path, done, wait=False)
    writer = child(
        """
        path = sys.argv[1]
        for i in range(40):
            me = 1 + i % 2
            value = float(me * 1000 + i)
            b = jnp.full(2, value)
            node = {"w": jnp.full(3, value), "b": ff.FrozenParam(b) if me == 1 else b}
            ff.checkpoint.save(path, node, force=True)
        open(sys.argv[2], "w").close()
        """,
        path,
        done,
    )
    assert writer.returncode == 0, writer.stderr[-2000:]
    out, err = reader.communicate(timeout=180)
    assert reader.returncode == 0, err[-3000:]
    _, good, retried_out = out.split()
    assert int(good) >= 1
    assert "mixed" not in err


# --- 4. integrity -------------------------------------------------------------------------


def test_every_flipped_byte_is_an_error_never_wrong_weights(tmp_path):
    original = {"w": jnp.arange(4096, dtype=jnp.float32), "b": ff.FrozenParam(jnp.ones(64))}
    tried = caught = 0
    for i, position in enumerate((0.1, 0.3, 0.5, 0.7, 0.9)):
        path = tmp_path / f"ckpt{i}"
        ff.checkpoint.save(path, original)
        for file in data_files(path):
            raw = bytearray(file.read_bytes())
            raw[int(len(raw) * position)] ^= 0x10
            file.write_bytes(bytes(raw))
        tried += 1
        with pytest.raises(ValueError, match=r"is damaged|cannot be read") as info:
            ff.checkpoint.restore(path, {"w": jnp.zeros(4096), "b": jnp.zeros(64)})
        assert "\n" not in str(info.value)
        caught += 1
    assert caught == tried == 5


def test_a_changed_array_names_its_path_and_verify_false_reads_it(tmp_path):
    path = tmp_path / "ckpt"
    ff.checkpoint.save(path, mixed_tree(1.0))
    flags = json.loads((path / "flags" / "metadata").read_text())
    flags["checksums"]["w"] = "crc32:00000000"  # as if the array had changed since it was saved
    (path / "flags" / "metadata").write_text(json.dumps(flags))
    with pytest.raises(
        ValueError,
        match=r"is damaged: the arrays at \[w\] do not match the checksums recorded when they "
        r"were saved.*verify=False reads them anyway",
    ):
        ff.checkpoint.restore(path, mixed_target())
    assert ff.checkpoint.restore(path, mixed_target(), verify=False)["w"].tolist() == [1.0] * 3


def test_checksums_are_the_same_on_device_and_on_host_for_every_dtype():
    from flax_freeze.checkpoint._checksum import checksum

    x = jax.random.normal(jax.random.key(0), (5, 7, 3)) * 10
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16, jnp.int8, jnp.uint8, jnp.bool_, jnp.int4):
        a = x.astype(dtype)
        for kind in ("crc32", "sum"):
            assert checksum(a, kind) == checksum(np.asarray(a), kind), (dtype, kind)
    assert re.fullmatch(r"crc32:[0-9a-f]{8}", checksum(x))
    assert re.fullmatch(r"sum:[0-9a-f]{16}", checksum(x, "sum"))
    for position in (0, 37, x.nbytes - 1):
        for bit in (0, 7):
            changed = np.asarray(x).copy()
            changed.reshape(-1).view(np.uint8)[position] ^= 1 << bit
            for kind in ("crc32", "sum"):
                assert checksum(changed, kind) != checksum(x, kind)


def test_sharded_arrays_are_checksummed_where_they_live(tmp_path):
    mesh = jax.make_mesh((4, 2), ("x", "y"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x", "y"))
    w = jax.device_put(jnp.arange(64.0).reshape(8, 8), sharding)
    ff.checkpoint.save(tmp_path / "ckpt", {"w": w, "b": ff.FrozenParam(jnp.ones(2))})
    out = ff.checkpoint.restore(
        tmp_path / "ckpt", {"w": jax.device_put(jnp.zeros((8, 8)), sharding), "b": jnp.zeros(2)}
    )
    assert out["w"].sharding == sharding
    np.testing.assert_array_equal(out["w"], w)


# --- 6. tied targets ----------------------------------------------------------------------


class AutoEncoder(nnx.Module):
    def __init__(self, seed, tied):
        rngs = nnx.Rngs(seed)
        self.enc = nnx.Linear(4, 4, rngs=rngs)
        self.dec = self.enc if tied else nnx.Linear(4, 4, rngs=rngs)


def test_a_tied_target_refuses_a_checkpoint_whose_paths_differ(tmp_path):
    ff.checkpoint.save(tmp_path / "ckpt", AutoEncoder(0, tied=False))
    model = AutoEncoder(1, tied=True)
    before = np.asarray(model.enc.kernel[...])
    with pytest.raises(
        ValueError,
        match=r"holds different values at 'dec/kernel' and 'enc/kernel', but in `target` they "
        r"are one tied variable \('dec/kernel'\): restoring would keep one and drop the other",
    ):
        ff.checkpoint.restore(tmp_path / "ckpt", model)
    np.testing.assert_array_equal(model.enc.kernel[...], before)  # untouched


def test_a_tied_target_takes_equal_values_and_plain_checkpoints_are_compared(tmp_path):
    same = AutoEncoder(0, tied=False)
    same.dec.kernel[...] = same.enc.kernel[...]
    same.dec.bias[...] = same.enc.bias[...]
    ff.checkpoint.save(tmp_path / "same", same)
    model = ff.checkpoint.restore(tmp_path / "same", AutoEncoder(1, tied=True))
    assert model.dec is model.enc
    np.testing.assert_array_equal(model.enc.kernel[...], same.enc.kernel[...])
    # A plain orbax checkpoint has no checksums: the values are compared once read.
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "plain", nnx.state(AutoEncoder(0, tied=False)))
    with pytest.raises(ValueError, match=r"holds different values at 'dec/kernel/value' and"):
        ff.checkpoint.restore(tmp_path / "plain", AutoEncoder(1, tied=True))


# --- 7. the flags item is validated -------------------------------------------------------


@pytest.mark.parametrize(("damage", "match"), FLAGS_DAMAGE)
def test_the_flags_item_is_validated_against_the_arrays(tmp_path, damage, match):
    path = tmp_path / "ckpt"
    ff.checkpoint.save(path, mixed_tree())
    damage(path)
    with pytest.raises(ValueError, match=match):
        ff.checkpoint.restore(path, mixed_target())
    with pytest.raises(ValueError, match=match):
        ff.checkpoint.describe(path)


def test_version_1_checkpoints_still_restore(tmp_path):
    path = tmp_path / "ckpt"
    ff.checkpoint.save(path, mixed_tree(4.0))
    old = flags_json(path)
    for name in ("save_id", "checksums"):
        del old[name]
    write_flags(path, {**old, "version": 1})
    meta = json.loads((path / "state" / "_METADATA").read_text())
    meta["custom_metadata"] = None
    (path / "state" / "_METADATA").write_text(json.dumps(meta))
    out = ff.checkpoint.restore(path, mixed_target())
    assert isinstance(out["b"], ff.FrozenParam)
    assert out["w"].tolist() == [4.0] * 3


# --- 8. crafted files ---------------------------------------------------------------------


@pytest.mark.parametrize(("name", "make", "match"), CRAFTED_FILES)
def test_crafted_files_are_refused_without_reading_them(tmp_path, name, make, match):
    path = tmp_path / "ckpt"
    ff.checkpoint.save(path, mixed_tree())
    craft(path, name, make)
    with pytest.raises(ValueError, match=match):
        ff.checkpoint.restore(path, mixed_target())


def test_links_inside_the_checkpoint_are_followed(tmp_path):
    path = tmp_path / "ckpt"
    ff.checkpoint.save(path, mixed_tree(7.0))
    (path / "flags" / "metadata").rename(path / "flags" / "real")
    os.symlink("real", path / "flags" / "metadata")
    assert ff.checkpoint.restore(path, mixed_target())["w"].tolist() == [7.0] * 3


def test_json_over_the_size_limit(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    ff.checkpoint.save(path, mixed_tree())
    monkeypatch.setattr(_ckpt_files, "MAX_JSON_BYTES", 100)
    monkeypatch.setattr(_ckpt_files.read_json, "__defaults__", (100,))
    with pytest.raises(ValueError, match=r"is [\d,]+ bytes, over the limit of 100"):
        ff.checkpoint.restore(path, mixed_target())


DAMAGED_READ = """
path = sys.argv[1]
try:
    ff.checkpoint.restore(path, {"w": jnp.zeros(3), "b": jnp.zeros(2)})
except ValueError as err:
    print("error:", err)
"""


@pytest.mark.parametrize("damage", ARRAY_DAMAGE)
def test_array_level_damage_is_one_line_without_stray_tracebacks(tmp_path, damage):
    path = tmp_path / "ckpt"
    ff.checkpoint.save(path, mixed_tree())
    damage_arrays(path, damage)
    done = child(DAMAGED_READ, path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    assert lines[0].startswith("error: Checkpoint"), done.stdout
    assert "damaged" in lines[0]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "Event loop is closed" not in done.stderr, done.stderr[-3000:]


def test_unretrieved_read_errors_of_a_failed_read_are_not_logged(caplog):
    # Reads orbax gave up on after the first failure are reported by asyncio
    # when collected, at a random time; only those reports are dropped.
    with pytest.raises(ValueError, match="first"):
        with _quiet_failure():
            raise ValueError("first")

    async def fail(text):
        raise ValueError(text)

    loop = asyncio.new_event_loop()
    tasks = [
        loop.create_task(fail("OUT_OF_RANGE [tensorstore_spec='{}']")),
        loop.create_task(fail("mine")),
    ]
    loop.run_until_complete(asyncio.sleep(0))
    del tasks
    gc.collect()
    loop.close()
    reports = [r for r in caplog.records if r.name == "asyncio"]
    assert [r.exc_info[1].args[0] for r in reports if r.exc_info] == ["mine"]
