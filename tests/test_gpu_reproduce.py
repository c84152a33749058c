"""benchmarks/gpu_reproduce.sh --smoke: the five-minute GPU comparison, run on the CPU so that it cannot rot.

It must run from the source tree on a machine that has torch but maybe not sdtool's other dependencies:
the subprocess test makes Torch-Pruning, fvcore and PyYAML unimportable and runs the shell script as a
user would.
"""

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_reproduce.sh"
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"


def _check_report(report: dict, n_train: int, n_test: int) -> None:
    assert report["augmentation"].endswith("NOT the paper's AutoAugment")
    assert report["data"]["train"] == n_train and report["data"]["test"] == n_test
    plain, sd = report["results"]["plain"], report["results"]["self_distill"]
    assert plain["epochs"] == sd["epochs"] == 1  # equal epochs; --smoke trains one
    assert len(plain["test"]["exits"]) == 1 and plain["test"]["ensemble"] is None
    assert len(sd["test"]["exits"]) == 4 and sd["test"]["ensemble"] is not None
    for acc in plain["test"]["exits"] + sd["test"]["exits"] + [sd["test"]["ensemble"]]:
        assert 0 <= acc <= 100
    assert plain["seconds_per_epoch"] > 0 and sd["seconds_per_epoch"] > 0


@pytest.mark.slow  # a subprocess that imports torch: about 5-15 s on 2 cores
def test_smoke_runs_the_shell_script_without_pruning_fvcore_or_yaml(tmp_path):
    blocked = tmp_path / "blocked"
    (blocked / "fvcore").mkdir(parents=True)
    for path in (blocked / "torch_pruning.py", blocked / "fvcore" / "__init__.py", blocked / "yaml.py"):
        path.write_text("raise ImportError('not installed on this machine')\n")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(blocked), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    r = subprocess.run(
        ["bash", str(SCRIPT), "--smoke", "--data", "fake", "--out", str(out)],
        cwd=tmp_path,  # not the repository: the script finds sdtool through the PYTHONPATH it sets
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "NOT the paper's AutoAugment" in r.stdout
    assert "plain" in r.stdout and "self_distill" in r.stdout and "ensemble" in r.stdout
    _check_report(json.loads((out / "gpu_reproduce.json").read_text()), 128, 100)


@pytest.fixture(scope="module")
def gpu_reproduce():
    spec = importlib.util.spec_from_file_location("gpu_reproduce", ROOT / "benchmarks" / "gpu_reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (CIFAR / "test.npz").is_file(), reason="needs ../shared/data/cifar10 beside the repository")
def test_smoke_on_the_shared_cifar10(tmp_path, gpu_reproduce):
    """The real files as the data README describes them: JPEG training bytes, decoded test arrays."""
    report = gpu_reproduce.main(["--smoke", "--data", str(CIFAR), "--out", str(tmp_path)])
    assert report["data"]["name"].startswith("cifar10") and report["data"]["classes"] == 10
    _check_report(report, 128, 100)
    assert json.loads((tmp_path / "gpu_reproduce.json").read_text())["results"] == report["results"]


def test_cifar100_when_its_files_are_given(tmp_path, gpu_reproduce):
    """A cifar-100-python/ folder (the python-version archive, extracted) makes it a 100-class run."""
    folder = tmp_path / "data" / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", 64), ("test", 20)):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": list(range(99, 99 - n, -1))}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"fine_label_names": [f"c{i}".encode() for i in range(100)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    report = gpu_reproduce.main(["--smoke", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    assert report["data"] == {"name": "cifar100", "classes": 100, "train": 64, "test": 20}
    _check_report(report, 64, 20)
