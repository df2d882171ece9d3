"""Two processes under jax.distributed on localhost against one process, same devices in all."""

import subprocess
import sys
from pathlib import Path

import numpy as np

EXAMPLE = Path(__file__).parent.parent / "examples" / "multi_process.py"


def run(tmp_path: Path, processes: int, devices: int) -> dict[str, np.ndarray]:
    out = tmp_path / f"p{processes}"
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--processes", str(processes), "--devices", str(devices),
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{processes} processes x {devices} devices" in result.stdout
    assert (
        "restored with frozen ['layers/0/bias', 'layers/0/kernel', 'layers/1/bias'" in result.stdout
    )
    assert "adapter of 8 arrays restored onto a fresh base: identical True" in result.stdout
    with np.load(out / "weights.npz") as data:
        return dict(data)


def test_two_processes_match_one(tmp_path):
    two = run(tmp_path, processes=2, devices=4)
    one = run(tmp_path, processes=1, devices=8)
    assert two.keys() == one.keys()
    assert {"layers/0/kernel", "layers/1/kernel", "head/kernel"} <= two.keys()
    for path in one:
        if path.startswith("layers/0/"):  # frozen throughout: bit-identical
            np.testing.assert_array_equal(two[path], one[path], err_msg=path)
        else:
            np.testing.assert_allclose(two[path], one[path], rtol=1e-5, atol=1e-6, err_msg=path)
