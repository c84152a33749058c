"""`sdtool report`: the compression report of a checkpoint's chain (train -> prune -> fine-tune -> thresholds)."""

import json
import shutil
from html import escape
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdtool import chain_render, checkpoint, plotting
from sdtool.cli import app
from sdtool.cli_report import resolve_target
from tests.ckpt_factory import make_ckpt

runner = CliRunner()
FIXTURES = Path(__file__).resolve().parent / "data" / "ckpt"
TRAIN_VAL = [10.0, 20.0, 30.0, 40.0]  # the per-exit validation top-1 the tests record for training
FT_VAL = [15.0, 25.0, 35.0, 50.0]
HAS_MPL = plotting.pyplot() is not None


def _metrics(top1: list[float], ensemble: float) -> dict:
    exits = [{"exit": k + 1, "top1": t, "top5": 100.0, "loss": 1.0} for k, t in enumerate(top1)]
    return {"epoch": 1, "val": {"n": 100, "exits": exits, "ensemble": {"top1": ensemble, "top5": 100.0, "loss": 1.0}}}


def _chain(d: Path, thresholds: bool) -> dict[str, Path]:
    """train (recorded val accuracy) -> prune (l2, ratio 0.5) -> fine-tune (a `train` step derived from the
    pruned file, as `train --init` records it) [-> thresholds fitted on the validation split]."""
    from sdtool.prune import PruneOptions, prune_checkpoint

    train = make_ckpt(d / "sd" / "best.safetensors", sharpen=8.0)
    ckpt = checkpoint.load_checkpoint(train)
    entry = ckpt.meta.lineage[0]
    recorded = type(entry)(**{**entry.__dict__, "metrics": _metrics(TRAIN_VAL, 45.0)})
    checkpoint.Checkpoint(ckpt.model, ckpt.meta.replace(lineage=[recorded])).save(train)
    pruned = d / "pruned.safetensors"
    prune_checkpoint(str(train), str(pruned), PruneOptions(criterion="l2", ratio=0.5), evaluate=False)
    parent = checkpoint.load_checkpoint(pruned)
    ft = d / "ft" / "best.safetensors"
    ft.parent.mkdir()
    m = _metrics(FT_VAL, 55.0)
    parent.derive("train", recipe=entry.recipe, step_metrics=m, metrics=m).save(ft)
    files = {"train": train, "pruned": pruned, "ft": ft}
    if thresholds:
        from sdtool.exit_eval import FitOptions, RunOptions, eval_early_exit

        final = d / "final.safetensors"
        run = RunOptions(device="cpu", latency_images=0)
        eval_early_exit(str(ft), run, FitOptions(fit=True, max_drop=1.0), out=str(final), quiet=True)
        files["final"] = final
    return files


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, Path]:
    return _chain(tmp_path_factory.mktemp("chain"), thresholds=True)


def _report(*args: str) -> tuple[dict, object]:
    r = runner.invoke(app, ["report", *args, "--json"])
    assert r.exit_code == 0, (r.output, r.exception)
    return json.loads(r.stdout), r


def test_full_chain_tables_numbers_and_files(chain, tmp_path):
    out = tmp_path / "rep"
    rep, r = _report(str(chain["final"]), "--out", str(out), "--repeats", "2")
    steps = rep["steps"]
    assert [s["label"] for s in steps] == ["train", "prune", "fine-tune", "thresholds"]
    assert [s["status"] for s in steps] == ["ok", "ok", "ok", "target"]
    assert steps[1]["checkpoint"] == str(chain["pruned"]) and steps[2]["checkpoint"] == str(chain["ft"])
    assert all(s["costs_source"] == "measured" for s in steps)
    # Pruning halves the channels: fewer parameters and MACs; fine-tune and thresholds keep the structure.
    assert steps[1]["params"] < steps[0]["params"] and steps[1]["macs"] < steps[0]["macs"]
    assert steps[1]["macs"] == steps[2]["macs"] == steps[3]["macs"]
    assert [e["top1"] for e in steps[0]["exits"]] == TRAIN_VAL and steps[0]["accuracy"]["split"] == "val"
    assert steps[0]["accuracy"]["ensemble_top1"] == 45.0
    assert [e["top1"] for e in steps[2]["exits"]] == FT_VAL
    assert [e["top1"] for e in steps[3]["exits"]] == FT_VAL
    assert steps[3]["accuracy"]["source"] == "as step 3 (same weights)"
    assert steps[1]["accuracy"] is None  # pruned without evaluation: nothing recorded
    assert steps[1]["pruning"]["criterion"] == "l2" and steps[1]["pruning"]["ratio"] == 0.5
    assert steps[1]["parameters"] == {"criterion": "l2", "ratio": 0.5, "ratio_used": 0.5}
    assert steps[0]["parameters"]["mode"] == "self_distill" and "init" not in steps[0]["parameters"]
    assert steps[2]["parameters"]["init"] == str(chain["pruned"])
    ee = steps[3]["early_exit"]
    fit = checkpoint.load_meta(chain["final"]).thresholds
    assert ee["policy"] == "max_softmax" and ee["values"] == fit.values
    assert ee["fitted_on"]["objective"] == "max_drop" and ee["fitted_on"]["max_drop"] == 1.0
    assert set(ee["results"]) == {"fit (val)", "test"}
    for s in steps:  # batch-1 latency of each exit and of the full net
        lat = [s["latency_ms"], *(e["latency_ms"] for e in s["exits"])]
        assert all(x["min"] <= x["median"] <= x["max"] for x in lat)
    assert rep["latency"]["repeats"] == 2 and rep["latency"]["batch_size"] == 1
    assert rep["warnings"] == [] and rep["checkpoint"] == str(chain["final"])

    pngs = ["accuracy_vs_macs.png", "early_exit_step4.png"] if HAS_MPL else []
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.md", "report.html", "report.json", *pngs])
    assert json.loads((out / "report.json").read_text())["steps"] == steps
    md = (out / "report.md").read_text()
    assert "| 2 | prune | " + str(chain["pruned"]) + " | ok |" in md
    assert "| 4 | max_softmax | deepest | max drop 1 points |" in md
    assert "| 1. train | 4 |" in md and "| 40.00 |" in md
    html = (out / "report.html").read_text()
    assert "<script" not in html and "<link" not in html and "http" not in html
    assert html.count("data:image/png;base64,") == len(pngs)
    for name in pngs:
        assert f"]({name})" in md and (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "step 4/4 (thresholds" in r.stderr  # progress


def test_missing_and_changed_parents(tmp_path):
    files = _chain(tmp_path / "c", thresholds=False)
    changed = files["pruned"].read_bytes()
    files["pruned"].write_bytes(files["train"].read_bytes())  # another model under the recorded name
    files["train"].unlink()
    rep, r = _report(str(files["ft"]), "--out", str(tmp_path / "rep"), "--no-latency")
    s = rep["steps"]
    assert [x["status"] for x in s] == ["missing", "changed since", "target"]
    # What the chain recorded stands in: the prune step's costs before and after, training's accuracy.
    assert s[0]["costs_source"] == "recorded by step 2 (prune)" and s[1]["costs_source"] == "recorded"
    assert [e["top1"] for e in s[0]["exits"]] == TRAIN_VAL
    assert s[1]["macs"] == s[2]["macs"] and s[0]["macs"] > s[1]["macs"]
    assert s[0]["latency_ms"] is None and rep["latency"] is None
    assert len(rep["warnings"]) == 2
    assert "is missing" in rep["warnings"][0] and "changed since" in rep["warnings"][1]
    assert "warning:" in r.stderr and "is missing" in r.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| missing |" in md and "| changed since |" in md and "Latency: not measured" in md
    assert changed != files["pruned"].read_bytes()


def test_without_matplotlib_writes_tables_and_says_so(chain, tmp_path, monkeypatch):
    monkeypatch.setattr(plotting, "pyplot", lambda: None)
    out = tmp_path / "rep"
    rep, r = _report(str(chain["final"]), "--out", str(out), "--no-latency")
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md"]
    assert rep["plots"] == {"files": [], "note": plotting.PLOT_HINT}
    assert r.stderr.count(plotting.PLOT_HINT) == 1
    assert plotting.PLOT_HINT in (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert escape(plotting.PLOT_HINT) in html and "data:image/png" not in html


def test_evaluate_remeasures_each_step_on_test(chain, tmp_path):
    rep, _ = _report(str(chain["final"]), "--out", str(tmp_path / "rep"), "--no-latency", "--evaluate")
    s = rep["steps"]
    assert all(x["accuracy"]["source"] == "evaluated" and x["accuracy"]["split"] == "test" for x in s)
    assert all(x["accuracy"]["n"] == 100 for x in s)
    # Thresholds keep the weights: the same accuracy as the fine-tuned file.
    assert [e["top1"] for e in s[3]["exits"]] == [e["top1"] for e in s[2]["exits"]]
    assert [e["top1"] for e in s[2]["exits"]] != FT_VAL  # measured, not the recorded numbers


def test_out_folder_rules(chain, tmp_path, monkeypatch):
    monkeypatch.setattr(plotting, "pyplot", lambda: None)  # the folder rules, not the plots
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    r = runner.invoke(app, ["report", str(chain["train"]), "--out", str(foreign), "--no-latency"])
    assert r.exit_code == 1 and "not empty" in r.stderr and sorted(foreign.iterdir()) == [foreign / "notes.txt"]

    out = tmp_path / "rep"
    _report(str(chain["train"]), "--out", str(out), "--no-latency")
    (out / "early_exit_step9.png").write_bytes(b"stale")  # an earlier report's plot
    _report(str(chain["train"]), "--out", str(out), "--no-latency")  # an earlier report is replaced
    assert not (out / "early_exit_step9.png").exists() and (out / "report.md").is_file()

    def broken(rep, images):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(chain_render, "html", broken)
    before = (out / "report.json").read_text()
    r = runner.invoke(app, ["report", str(chain["train"]), "--out", str(out), "--no-latency"])
    assert r.exit_code == 1 and "no space left" in r.stderr
    assert (out / "report.json").read_text() == before  # the earlier report is untouched
    new = tmp_path / "new"
    r = runner.invoke(app, ["report", str(chain["train"]), "--out", str(new), "--no-latency"])
    assert r.exit_code == 1 and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "rep"]  # no temporary folder left


def test_run_folders_resolve_to_their_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.safetensors").write_bytes(b"x")
    assert resolve_target(run) == run / "last.safetensors"
    (run / "best.safetensors").write_bytes(b"x")
    assert resolve_target(run) == run / "best.safetensors"
    pipe = tmp_path / "moved_pipe"
    pipe.mkdir()
    (pipe / "final.safetensors").write_bytes(b"x")
    (pipe / "pipeline.json").write_text(json.dumps({"out": "runs/pipe", "final": "runs/pipe/final.safetensors"}))
    assert resolve_target(pipe) == pipe / "final.safetensors"
    r = runner.invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 1 and "holds no pipeline.json" in r.stderr
    r = runner.invoke(app, ["report", str(pipe), "--out", str(tmp_path / "rep"), "--device", "cpu"])
    assert r.exit_code == 1 and "belong to --evaluate" in r.stderr and not (tmp_path / "rep").exists()


def test_recorded_fixtures_with_missing_parents(tmp_path):
    """Files written by an earlier version, whose parents are gone: export --exit 2 and distill."""
    exit2 = shutil.copy(FIXTURES / "exit2.safetensors", tmp_path / "exit2.safetensors")
    rep, _ = _report(str(exit2), "--out", str(tmp_path / "rep"), "--repeats", "1")
    s = rep["steps"]
    assert [x["label"] for x in s] == ["train", "prune", "thresholds", "export exit 2"]
    assert [x["status"] for x in s] == ["missing", "missing", "missing", "target"]
    assert [e["exit"] for e in s[3]["exits"]] == [2] and s[3]["costs_source"] == "measured"
    assert s[3]["macs"] == s[1]["exits"][1]["macs"] == 105536  # exit 2 of the pruned net, as recorded
    assert s[0]["macs"] == 648704 and s[1]["pruning"]["ratio"] == 0.5
    assert s[2]["early_exit"]["results"]["test"]["top1"] == 12.5 and s[2]["early_exit"]["values"] is None
    assert len(rep["warnings"]) == 3

    distilled = shutil.copy(FIXTURES / "distilled.safetensors", tmp_path / "distilled.safetensors")
    rep, _ = _report(str(distilled), "--out", str(tmp_path / "rep2"), "--no-latency")
    d = rep["steps"][0]["distillation"]
    assert d["alpha"] == 0.9 and d["temperature"] == 4.0 and d["teacher_status"] == "missing"
    assert "teacher" in rep["warnings"][0]
    assert "| 0.9 | 4 |" in (tmp_path / "rep2" / "report.md").read_text()
