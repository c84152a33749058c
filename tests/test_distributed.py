"""Multi-process training with torchrun on the CPU (gloo): the quickstart recipe, 2 processes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


@pytest.mark.slow
def test_two_process_quickstart_checkpoint_matches_eval(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this Python")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        torchrun,
        "--nproc_per_node",
        "2",
        "-m",
        "sdtool",
        "train",
        str(RECIPE),
        "--out",
        str(out),
        "--json",
        "--set",
        "train.epochs=1",
        "--set",
        "model.width=4",
        "--set",
        "data.limit_train=256",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)  # only rank 0 prints
    row = res["epochs"][0]
    assert row["world_size"] == 2 and row["eval_split"] == "val"
    recorded = row["eval"]["exits"][-1]["top1"]
    ev = subprocess.run(
        [sys.executable, "-m", "sdtool", "eval", str(out / "best.safetensors"), "--split", "val", "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert ev.returncode == 0, ev.stderr
    rep = json.loads(ev.stdout)
    assert rep["n"] == row["eval"]["n"]
    assert rep["exits"][-1]["top1"] == pytest.approx(recorded)
    assert rep["ensemble"]["top1"] == pytest.approx(row["eval"]["ensemble"]["top1"])

    # Resuming needs the same number of processes (each one's RNG state is stored).
    r = subprocess.run(
        [sys.executable, "-m", "sdtool", "train", "--resume", str(out)], capture_output=True, text=True, env=env
    )
    assert r.returncode == 1 and "trained with 2 processes" in r.stderr
