"""Checkpoints written by earlier sdtool versions (tests/data/ckpt/, made by make_fixtures.py) load unchanged."""

import json
import math
from pathlib import Path

import pytest

from sdtool import checkpoint

HERE = Path(__file__).resolve().parent / "data"
EXPECTED = json.loads((HERE / "ckpt" / "expected.json").read_text())["files"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_loads_and_computes_what_it_did(name):
    from tests.data.make_fixtures import logits_sum

    path = HERE / "ckpt" / f"{name}.safetensors"
    got = logits_sum(path)
    assert math.isclose(got, EXPECTED[name]["deepest_logits_sum"], rel_tol=1e-4, abs_tol=1e-4)
    info = checkpoint.inspect_checkpoint(path)
    assert info["parameters"] > 0 and info["meta"]["lineage"]
