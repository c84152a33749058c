"""CPU runtime defaults: the CLI sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP, the user's value wins.

The checks ask the OpenMP runtime itself: with OMP_DISPLAY_ENV=VERBOSE libgomp (torch's OpenMP on Linux)
prints the settings it read when torch loaded it, and GOMP_SPINCOUNT, derived from the wait policy, is 0
for PASSIVE, 300000 when no policy is set and 30000000000 for ACTIVE.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sdtool import cpu

CLEAN = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_"))}
TINY = [
    "--set",
    "model.width=4",
    "--set",
    "data.name=fake",
    "--set",
    "data.fake_size=32",
    "--set",
    "data.batch_size=16",
    "--set",
    "data.eval_batch_size=32",
    "--set",
    "train.epochs=1",
]


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=True,
        env={**CLEAN, "OMP_DISPLAY_ENV": "VERBOSE", "OMP_NUM_THREADS": "1", **env},
    )


def spin_count(stderr: str) -> int:
    found = re.search(r"GOMP_SPINCOUNT = '(\d+)'", stderr)
    if found is None:
        pytest.skip("torch's OpenMP runtime is not libgomp; its settings display differs")
    return int(found.group(1))


def test_train_sets_a_passive_wait_policy_before_torch_loads(tmp_path):
    r = run(
        [
            sys.executable,
            "-m",
            "sdtool",
            "train",
            "recipes/quickstart.yaml",
            "--out",
            str(tmp_path / "run"),
            "--json",
            *TINY,
        ]
    )
    assert spin_count(r.stderr) == 0  # PASSIVE reached the OpenMP runtime: it sleeps instead of spinning
    runtime = json.loads(r.stdout)["runtime"]
    assert runtime == {
        "device": "cpu",
        "memory_format": "channels_last",
        "threads": 1,
        "omp_wait_policy": "PASSIVE",
        "omp_wait_policy_source": "default",
    }
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])  # the epoch line's source
    assert row["omp_wait_policy"] == "PASSIVE" and row["memory_format"] == "channels_last"


def test_the_sdtool_script_goes_through_the_same_setup():
    script = Path(sys.executable).with_name("sdtool")
    if not script.is_file():
        pytest.skip("the sdtool script is not installed beside this python")
    assert spin_count(run([str(script), "models"]).stderr) == 0


def test_the_users_wait_policy_wins():
    r = run([sys.executable, "-m", "sdtool", "models"], OMP_WAIT_POLICY="ACTIVE")
    assert spin_count(r.stderr) == 30_000_000_000  # libgomp's ACTIVE spinning, as the user asked


def test_configure_after_torch_changes_nothing(monkeypatch):
    """In-process (torch is imported here): OpenMP has read its settings, so nothing is set or claimed."""
    environ: dict[str, str] = {}
    assert cpu.configure(environ) is None and environ == {}
    monkeypatch.setattr(cpu, "_source", None)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert cpu.runtime_settings()["omp_wait_policy_source"] == "openmp"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert cpu.runtime_settings() == {
        "threads": 1,
        "omp_wait_policy": "ACTIVE",
        "omp_wait_policy_source": "environment",
    }


def test_configure_before_torch(monkeypatch):
    """The decision itself, as main() takes it before torch is imported: set PASSIVE only where unset."""
    monkeypatch.delitem(sys.modules, "torch")  # as in a fresh CLI process (restored afterwards)
    monkeypatch.setattr(cpu, "_source", None)
    unset: dict[str, str] = {}
    assert cpu.configure(unset) == "default" and unset == {"OMP_WAIT_POLICY": "PASSIVE"}
    users = {"OMP_WAIT_POLICY": "active"}
    assert cpu.configure(users) == "environment" and users == {"OMP_WAIT_POLICY": "active"}
