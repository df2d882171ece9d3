"""The command line: ``python -m flax_freeze inspect CKPT_DIR`` and ``flax-freeze inspect``."""

import json
import os
import re
import subprocess
import sys
import tomllib

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import flax_freeze as ff
from flax_freeze.__main__ import main as cli
from helpers import (
    ARRAY_DAMAGE,
    CNN,
    CRAFTED_FILES,
    FLAGS_DAMAGE,
    ROOT,
    Net,
    child_env,
    cnn_state,
    cnn_train,
    craft,
    damage_arrays,
    mixed_tree,
    net_and_optimizer,
    plain_standard,
    saved,
)

# --- tables and JSON ----------------------------------------------------------------------


def test_describe_and_cli_table_and_json(tmp_path, capsys):
    model, opt = net_and_optimizer()
    ff.checkpoint.save(tmp_path / "ckpt", (model, opt))
    description = ff.checkpoint.describe(tmp_path / "ckpt")
    rows = {r.path: r for r in description.rows}
    assert rows["0/layers/0/kernel"].status == "frozen"
    assert rows["0/layers/0/kernel"].type == "FrozenParam"
    assert rows["0/layers/1/kernel"].status == "trainable"
    assert rows["0/norm/mean"].status == "state"
    assert rows["1/step"].type == "OptState"
    assert rows["0/drop/rngs/key"].dtype == "key<threefry2x32> data (uint32)"
    totals = description.totals
    assert (totals.count["frozen"], totals.bytes["frozen"]) == (16, 64)
    assert cli(["inspect", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\n0/layers/0/kernel +FrozenParam +\(3, 4\) +float32 +frozen +12 +48\n", out)
    assert "frozen 16 (64 B)" in out
    assert out.strip().endswith("B)")
    assert cli(["inspect", str(tmp_path / "ckpt"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"] == totals.to_json()
    assert data["totals"]["frozen"] == {"count": 16, "bytes": 64}
    assert data["has_flags"]
    assert data["step"] is None
    assert {v["path"]: v["status"] for v in data["variables"]}["0/layers/0/bias"] == "frozen"


def test_cli_on_plain_checkpoints_and_manager_directories(tmp_path, capsys):
    plain_standard(tmp_path / "plain", Net(0))
    assert cli(["inspect", str(tmp_path / "plain")]) == 0
    out = capsys.readouterr().out
    assert "no flags (plain orbax checkpoint)" in out
    assert "layers/0/kernel/value" in out
    assert "unknown" in out
    with ocp.CheckpointManager(tmp_path / "m") as mngr:
        for step in (10, 20):
            mngr.save(step, args=ff.checkpoint.save_args({"w": jnp.ones(step)}))
    assert cli(["inspect", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out.startswith("step 20\n")
    assert cli(["inspect", str(tmp_path / "m"), "--step", "10", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["step"] == 10
    assert data["variables"][0]["shape"] == [10]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["nowhere"], r"`directory` '.*nowhere' does not exist\."),
        (["empty"], r"is not an orbax checkpoint"),
        (["m", "--step", "3"], r"`step` 3 is not a finished step"),
    ],
    ids=["missing", "not-a-checkpoint", "no-such-step"],
)
def test_cli_bad_directories_exit_2_with_one_line(tmp_path, capsys, args, match):
    (tmp_path / "empty").mkdir()
    with ocp.CheckpointManager(tmp_path / "m") as mngr:
        mngr.save(1, args=ff.checkpoint.save_args({"w": jnp.ones(2)}))
    assert cli(["inspect", str(tmp_path / args[0]), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flax-freeze inspect: error: ")
    assert err.count("\n") == 1
    assert re.search(match, err)


def test_inspect_of_a_train_state(tmp_path, capsys):
    state = cnn_train(cnn_state(CNN(), 0, frozen="Conv_0/.*"), 1)
    ff.checkpoint.save(tmp_path / "ckpt", state)
    assert cli(["inspect", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"\nparams/Dense_0/kernel +FrozenBox +\(4, 8\) +float32 +frozen +32 +128\n", out
    )
    assert re.search(r"\nparams/Dense_1/kernel +Array +\(8, 2\) +float32 +trainable +16 +64\n", out)
    assert "trainable 34 (136 B), frozen 144 (576 B), state 78 (312 B)" in out


def test_relative_directories(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tree = {"a": jnp.ones(3), "b": ff.FrozenParam(jnp.zeros(2))}
    ff.checkpoint.save("ckpt", tree)
    with ocp.CheckpointManager(tmp_path / "m") as mngr:
        mngr.save(7, args=ff.checkpoint.save_args(tree))
    assert cli(["inspect", "ckpt"]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'ckpt'}: flax_freeze flags\n")
    assert cli(["inspect", "m"]) == 0
    assert capsys.readouterr().out.startswith(f"step 7\n{tmp_path / 'm' / '7'}: ")


# --- python -m flax_freeze, the console script, memory -----------------------------------


def test_python_dash_m_and_console_script(tmp_path):
    saved(tmp_path)
    env = child_env()
    done = subprocess.run(
        [sys.executable, "-m", "flax_freeze", "inspect", str(tmp_path / "ckpt"), "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["totals"]["total"] == {"count": 5, "bytes": 20}
    done = subprocess.run(
        [sys.executable, "-m", "flax_freeze", "inspect", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"flax-freeze": "flax_freeze.__main__:main"}


MEASURE = """
import os, resource, runpy, sys
limit = int(sys.argv[2])
if limit:  # before anything is imported or allocated
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.argv = ["flax-freeze", "inspect", sys.argv[1]]
try:
    runpy.run_module("flax_freeze", run_name="__main__")
except SystemExit as exit:
    code = exit.code
peak = [l for l in open("/proc/self/status") if l.startswith("VmPeak")][0].split()[1]
print("VMPEAK", peak, "EXIT", code, file=sys.stderr)
"""


def test_inspect_reads_metadata_only_under_a_memory_limit(tmp_path):
    big = 512 * 2**20
    ff.checkpoint.save(tmp_path / "small", {"w": np.ones(4, np.float32)})
    ff.checkpoint.save(
        tmp_path / "big",
        {"w": np.zeros(big // 4, np.float32), "b": ff.FrozenParam(np.ones(2, np.float32))},
    )
    env = child_env(MALLOC_ARENA_MAX="2")

    def run(directory, limit=0):
        return subprocess.run(
            [sys.executable, "-c", MEASURE, str(directory), str(limit)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )

    baseline = run(tmp_path / "small")
    assert "EXIT 0" in baseline.stderr, baseline.stderr
    peak = int(re.search(r"VMPEAK (\d+)", baseline.stderr).group(1)) * 1024
    limit = peak + big // 2  # reading the arrays would need at least `big` more
    done = run(tmp_path / "big", limit)
    assert "EXIT 0" in done.stderr, done.stderr[-2000:]
    assert re.search(
        r"\nw +Array +\(134217728,\) +float32 +trainable +134,217,728 +536,870,912\n", done.stdout
    )


# --- damaged and crafted checkpoints: one line, exit status 2 -----------------------------


@pytest.mark.parametrize(("damage", "match"), FLAGS_DAMAGE)
def test_a_damaged_flags_item_is_one_line(tmp_path, capsys, damage, match):
    path = tmp_path / "ckpt"
    ff.checkpoint.save(path, mixed_tree())
    damage(path)
    assert cli(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert re.search(match, err), err


@pytest.mark.parametrize(("name", "make", "match"), CRAFTED_FILES)
def test_crafted_files_are_one_line(tmp_path, capsys, name, make, match):
    path = tmp_path / "ckpt"
    ff.checkpoint.save(path, mixed_tree())
    craft(path, name, make)
    assert cli(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert re.search(match, err), err


@pytest.mark.parametrize("damage", ARRAY_DAMAGE)
def test_array_level_damage_prints_no_traceback(tmp_path, damage):
    path = tmp_path / "ckpt"
    ff.checkpoint.save(path, mixed_tree())
    damage_arrays(path, damage)
    inspect = subprocess.run(
        [sys.executable, "-m", "flax_freeze", "inspect", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=child_env(),
    )
    assert inspect.returncode in (0, 2), inspect.stderr[-3000:]
    assert "Traceback" not in inspect.stderr


def test_cli_on_a_fifo_does_not_hang(tmp_path):
    path = tmp_path / "ckpt"
    ff.checkpoint.save(path, mixed_tree())
    (path / "flags" / "metadata").unlink()
    os.mkfifo(path / "flags" / "metadata")
    done = subprocess.run(
        [sys.executable, "-m", "flax_freeze", "inspect", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=child_env(),
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "which is a FIFO" in done.stderr
