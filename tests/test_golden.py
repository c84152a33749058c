"""The golden chain (tests/golden.py) stays bit-identical: refactors must not change a single number."""

import math

import pytest

from tests import golden


def _close(a, b, path: str) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{path}: keys differ"
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-3), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.mark.slow
def test_golden_chain_is_unchanged(tmp_path):
    ref = __import__("json").loads(golden.REFERENCE.read_text())
    got = golden.run_chain(tmp_path)
    assert sorted(got) == sorted(ref["digests"])
    exact = ref["platform"] == golden.platform()
    for name, want in ref["digests"].items():
        have = got[name]
        if exact:
            # Where the reference was written, every tensor and the metadata are bit-identical.
            assert have["tensors_sha256"] == want["tensors_sha256"], f"{name}: tensors changed"
            if "meta" in want:
                _close(have["meta"], want["meta"], name)  # names the first differing field, if any
                assert have["meta_sha256"] == want["meta_sha256"], f"{name}: metadata changed"
            else:
                assert have["ops"] == want["ops"] and have["outputs"] == want["outputs"]
        else:
            # Another CPU or torch may round differently: tensors within a tolerance, metadata too.
            _close(have["sums"], want["sums"], f"{name}.sums")
            _close(
                {k: v for k, v in have.items() if k not in ("sums", "tensors_sha256", "meta_sha256")},
                {k: v for k, v in want.items() if k not in ("sums", "tensors_sha256", "meta_sha256")},
                name,
            )
