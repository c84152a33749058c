"""`sdtool export`: one exit as a compact standalone model, in safetensors, pt2 and onnx."""

import json
import sys

import numpy as np
import pytest
import torch
from ckpt_factory import make_ckpt
from typer.testing import CliRunner

from sdtool import SdtoolError, checkpoint
from sdtool.cli import app
from sdtool.evaluate import eval_checkpoint
from sdtool.export import export
from sdtool.profile import exit_costs

runner = CliRunner()

X = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_ckpt(tmp_path_factory.mktemp("export") / "m.safetensors")


@pytest.fixture(scope="module")
def full(ckpt):
    model, _ = checkpoint.load(ckpt)
    with torch.no_grad():
        return model, model(X)[0]


def test_exit_as_compact_checkpoint(ckpt, full, tmp_path):
    model, logits = full
    out = tmp_path / "exit2.safetensors"
    r = runner.invoke(app, ["export", str(ckpt), "--exit", "2", "--format", "safetensors", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["check"]["max_abs_diff"] == 0.0 and rep["exits"] == 1 and rep["source_exits"] == 4
    small, meta = checkpoint.load(out)  # a fresh build from the spec, like any checkpoint
    assert meta["model"]["name"] == "truncated" and meta["model"]["args"]["exit"] == 2
    assert small.num_exits == 1 and len(small.stages) == 2
    with torch.no_grad():
        z, _ = small(X)
    assert len(z) == 1
    torch.testing.assert_close(z[0], logits[1])
    costs, alone = exit_costs(small, (16, 16)), exit_costs(model, (16, 16))["exits"][1]
    assert costs["parameters"] == alone["params"] < sum(p.numel() for p in model.parameters())
    assert costs["full"]["macs"] == alone["macs"]
    assert meta["lineage"][-1]["command"] == "export --exit 2" and meta.get("thresholds") is None
    rep = eval_checkpoint(str(out), device="cpu")  # evaluates on the recorded (fake) data
    assert [e["exit"] for e in rep["exits"]] == [1] and rep["ensemble"] is None and rep["n"] == 100


def test_pruned_exit_keeps_its_shapes(tmp_path):
    """A pruned net's exit exports with the pruned widths and reloads without re-pruning."""
    from sdtool.models.shapes import apply_shapes

    src = make_ckpt(tmp_path / "src.safetensors")
    model, meta = checkpoint.load(src)
    apply_shapes(
        model,
        {
            "stages.0.1.0.conv1": {"type": "conv2d", "in_channels": 4, "out_channels": 2, "groups": 1},
            "stages.0.1.0.bn1": {"type": "batchnorm2d", "num_features": 2},
            "stages.0.1.0.conv2": {"type": "conv2d", "in_channels": 2, "out_channels": 4, "groups": 1},
        },
    )
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    model.eval()
    pruned = tmp_path / "pruned.safetensors"
    checkpoint.save(pruned, model, {k: v for k, v in meta.items() if k not in ("model", "shapes")})
    rep = export(str(pruned), str(tmp_path / "e1.safetensors"), "safetensors", exit=1)
    assert rep["check"]["max_abs_diff"] == 0.0
    small, meta1 = checkpoint.load(tmp_path / "e1.safetensors")
    assert set(meta1["shapes"]) == {"stages.0.1.0.conv1", "stages.0.1.0.bn1", "stages.0.1.0.conv2"}
    with torch.no_grad():
        torch.testing.assert_close(small(X)[0][0], model(X)[0][0])


def test_pt2_exit_with_dynamic_batch(ckpt, full, tmp_path):
    out = tmp_path / "exit1.pt2"
    rep = export(str(ckpt), str(out), "pt2", exit=1)
    assert rep["check"]["same_argmax"] and rep["check"]["max_abs_diff"] < 1e-5
    loaded = torch.export.load(str(out)).module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), full[1][0], rtol=1e-4, atol=1e-5)  # batch 5
        torch.testing.assert_close(loaded(X[:1]), full[1][0][:1], rtol=1e-4, atol=1e-5)  # batch 1


def test_onnx_exit_runs_in_onnxruntime(ckpt, full, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx
    import onnxruntime as ort

    out = tmp_path / "exit1.onnx"
    r = runner.invoke(app, ["export", str(ckpt), "--exit", "1", "--format", "onnx", "--out", str(out)])
    assert r.exit_code == 0, r.output
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"input": X.numpy()})  # batch 5; the graph was traced at batch 2
    np.testing.assert_allclose(got, full[1][0].numpy(), rtol=1e-4, atol=1e-5)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    emb = json.loads(props["sdtool"])
    assert emb["exit"] == 1 and emb["outputs"] == ["logits"] and emb["input"]["size"] == 16


def test_missing_onnx_extra_is_one_line(ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript -> ImportError
    with pytest.raises(SdtoolError, match=r"pip install sdtool\[onnx\]"):
        export(str(ckpt), str(tmp_path / "m.onnx"), "onnx")
    r = runner.invoke(app, ["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "pip install sdtool[onnx]" in r.output
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("bad", ["0", "5"])
def test_exit_out_of_range_is_one_line(ckpt, tmp_path, bad):
    out = tmp_path / "x.safetensors"
    r = runner.invoke(app, ["export", str(ckpt), "--exit", bad, "--out", str(out)])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("error:") and "exits 1..4" in r.output and not out.exists()


def test_unknown_format_is_a_usage_error(ckpt, tmp_path):
    # --format is a choice: Typer refuses other values (usage error, exit status 2) before the command runs.
    r = runner.invoke(app, ["export", str(ckpt), "--format", "tflite", "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "Invalid value for '--format'" in r.output
    assert all(f"'{f}'" in r.output for f in ("safetensors", "pt2", "onnx")) and not (tmp_path / "m").exists()
