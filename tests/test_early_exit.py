"""Real early exit (equal to the all-exits forward, really skipping work), threshold fitting, the CLI."""

import json

import numpy as np
import pytest
import torch
from ckpt_factory import make_ckpt
from typer.testing import CliRunner

from sdtool import checkpoint
from sdtool import thresholds as th
from sdtool.cli import app
from sdtool.early_exit import ExitPolicy, confidence, early_exit_forward
from sdtool.losses import ensemble_logits
from sdtool.models import create_model
from sdtool.profile import exit_costs

runner = CliRunner()


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, width=4).eval()
    with torch.no_grad():
        for fc in model.classifiers:  # spread the confidences out
            fc.weight.mul_(20)
    x = torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = model(x)
    return model, x, logits, exit_costs(model, (16, 16))


def _midpoint_thresholds(logits, policy, q=(0.6, 0.5, 0.5)):
    """Per shallow exit a threshold halfway between two observed scores, so no sample sits on it."""
    out = []
    for z, qq in zip(logits[:-1], q):
        s = np.sort(confidence(z, policy).numpy())
        i = int(qq * (len(s) - 1))
        mid = float((s[i] + s[i + 1]) / 2)
        out.append(mid if policy == "max_softmax" else -mid)
    return out


@pytest.mark.parametrize("policy", ["max_softmax", "entropy"])
@pytest.mark.parametrize("fallback", ["deepest", "ensemble"])
def test_early_exit_equals_all_exits_forward(net, policy, fallback):
    model, x, logits, costs = net
    pol = ExitPolicy(policy, _midpoint_thresholds(logits, policy), fallback)
    out, exit_at = early_exit_forward(model, x, pol)
    assert set(exit_at.tolist()) == {0, 1, 2, 3}  # every exit answers someone
    final = ensemble_logits(logits, "logits") if fallback == "ensemble" else logits[-1]
    expected = torch.stack([final[i] if k == 3 else logits[k][i] for i, k in enumerate(exit_at.tolist())])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # The exit each sample takes is the first whose score passes: the same as simulating on all logits.
    table = th.make_table(logits, torch.zeros(len(x), dtype=torch.long), costs, policy, fallback, "logits")
    _, _, sim_exit = th.simulate(table, np.array([pol.score_thresholds()]))
    assert sim_exit[0].tolist() == exit_at.tolist()
    # Batch 1 takes the same path and gives the same numbers.
    for i in (0, 5, 17):
        o1, e1 = early_exit_forward(model, x[i : i + 1], pol)
        assert int(e1) == int(exit_at[i])
        torch.testing.assert_close(o1[0], out[i], rtol=1e-4, atol=1e-5)


def test_rows_that_leave_skip_the_later_stages(net):
    """The deeper stages see only the samples still undecided; a never-answering exit's head is skipped."""
    model, x, logits, costs = net
    seen = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: seen.setdefault(name, []).append(inp[0].shape[0]))
        for name, m in [("stage4", model.stages[3]), ("head2", model.heads[1]), ("head3", model.heads[2])]
    ]
    try:
        thr = _midpoint_thresholds(logits, "max_softmax")
        pol = ExitPolicy("max_softmax", [thr[0], None, thr[2]], "deepest")
        _, exit_at = early_exit_forward(model, x, pol)
        assert "head2" not in seen  # exit 2 never answers, so its head never runs
        assert seen["head3"] == [int((exit_at > 0).sum())]
        assert seen["stage4"] == [int((exit_at == 3).sum())] and seen["stage4"][0] < len(x)
        seen.clear()
        early_exit_forward(model, x[:1], ExitPolicy("max_softmax", [0.0, 0.0, 0.0]))  # exit 1 takes everything
        assert "stage4" not in seen  # batch 1: the network simply stopped
    finally:
        for h in hooks:
            h.remove()


COSTS = {
    "reference": {"macs": 400.0},  # made-up costs: 4 stages of 100 MACs, heads of 10 each
    "exits": [{"stages_macs": 100.0 * (k + 1), "head_macs": 10.0 if k < 3 else 0.0} for k in range(4)],
}


def _synthetic_table(fallback="deepest", n=3000, seed=0):
    """Logits whose exits get more accurate with depth (like a trained self-distilled net)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    logits = []
    for k in range(4):
        z = torch.randn(n, 10, generator=g) * 1.5
        z[torch.arange(n), y] += 1.2 + 0.9 * k
        logits.append(z)
    return th.make_table(logits, y, COSTS, "max_softmax", fallback, "logits")


@pytest.mark.parametrize("max_drop", [0.0, 0.5, 2.0])
def test_fit_respects_max_drop_and_saves_macs(max_drop):
    t = _synthetic_table()
    r = th.fit(t, "max_softmax", max_drop=max_drop)
    acc, macs, _ = th.simulate(t, np.array([[np.inf if v is None else v for v in r["values"]]]))
    assert r["feasible"] and float(acc[0]) == pytest.approx(r["top1"])
    assert r["top1"] >= r["deepest_top1"] - max_drop - 1e-9
    assert float(macs[0]) == pytest.approx(r["expected_macs"]) and r["expected_macs"] < t.reference_macs
    # At least as good as the best single shared threshold that meets the same constraint.
    levels, acc_s, macs_s = th.shared_sweep(t)
    ok = acc_s >= r["deepest_top1"] - max_drop - 1e-9
    assert r["expected_macs"] <= macs_s[ok].min() + 1e-6


@pytest.mark.parametrize("fallback", ["deepest", "ensemble"])
def test_fit_respects_budget(fallback):
    t = _synthetic_table(fallback)
    for budget in (0.5, 0.7):
        r = th.fit(t, "max_softmax", budget=budget)
        assert r["feasible"] and r["macs_fraction"] <= budget + 1e-9
        levels, acc_s, macs_s = th.shared_sweep(t)
        assert r["top1"] >= acc_s[macs_s <= budget * t.reference_macs].max() - 1e-9
    r = th.fit(t, "max_softmax", budget=0.01)  # below the cheapest exit: reported, not hidden
    assert not r["feasible"]


def test_sweep_curve_is_consistent():
    t = _synthetic_table()
    s = th.sweep(t, "max_softmax", n_budgets=5)
    assert len(s["fitted"]) == 5 and [e["exit"] for e in s["exits_alone"]] == [1, 2, 3, 4]
    assert all(p["macs_fraction"] <= p["budget"] + 1e-9 for p in s["fitted"])
    assert s["shared"][-1]["threshold"] is None  # the last point: no shallow exit answers
    assert s["shared"][-1]["top1"] == pytest.approx(s["deepest_top1"])


def test_sweep_without_matplotlib(tmp_path, monkeypatch, capsys):
    """matplotlib is the `plot` extra: without it the JSON and CSV are written, the PNG is not, and a
    warning says once how to get it."""
    import sdtool.plotting
    from sdtool import report_exit

    monkeypatch.setattr(sdtool.plotting, "pyplot", lambda: None)
    monkeypatch.setattr(report_exit, "_hinted", False)
    sw = th.sweep(_synthetic_table(n=300), "max_softmax", n_budgets=3)
    assert report_exit.write_sweep(sw, tmp_path / "a") == ["sweep.json", "sweep.csv"]
    assert report_exit.write_sweep(sw, tmp_path / "b") == ["sweep.json", "sweep.csv"]
    assert {p.name for p in (tmp_path / "a").iterdir()} == {"sweep.json", "sweep.csv"}
    assert report_exit.sweep_report(tmp_path / "a") == {
        "dir": str(tmp_path / "a"),
        "files": ["sweep.json", "sweep.csv"],
        "png": None,
    }
    assert capsys.readouterr().err.count(sdtool.plotting.PLOT_HINT) == 1


# --- the CLI on a checkpoint of the built-in `fake` data --------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_ckpt(tmp_path_factory.mktemp("ee") / "m.safetensors", sharpen=30.0)


def _eval(*args):
    r = runner.invoke(app, ["eval", *map(str, args), "--latency-images", "4", "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_fit_warns_when_the_split_was_cut_from_other_data(ckpt, tmp_path):
    """Same size and seed, but the recorded split came from another training set: the fingerprint
    tells them apart, and the fit is flagged as overlapping the training images."""
    rec = checkpoint.read_meta(ckpt)["val_split"]
    assert rec["size"] == 100 and rec["of"] == 400 and len(rec["fingerprint"]) == 16
    other = make_ckpt(tmp_path / "other.safetensors", sharpen=30.0, val_split={**rec, "fingerprint": "0" * 16})
    rep = _eval(other, "--early-exit", "--fit-thresholds", "--max-drop", "1", "--split", "val")
    assert rep["fit"]["overlaps_training"] and any("same size and seed, other data" in w for w in rep["warnings"])


def test_cli_fit_writes_nothing_without_out(ckpt, tmp_path):
    before = sorted(p.name for p in ckpt.parent.iterdir())
    rep = _eval(ckpt, "--early-exit", "--fit-thresholds", "--max-drop", "1", "--split", "val")
    assert sorted(p.name for p in ckpt.parent.iterdir()) == before and rep["written"] is None
    f = rep["fit"]
    assert f["split"] == "val" and f["n"] == 100 and not f["overlaps_training"] and f["feasible"]
    assert f["top1"] >= f["deepest_top1"] - 1 - 1e-9
    # Real early exit on the fitting split reproduces the simulated fit.
    assert rep["n"] == 100 and rep["top1"] == pytest.approx(f["top1"])
    assert rep["expected_macs"] == pytest.approx(f["expected_macs"])
    assert sum(e["count"] for e in rep["exits"]) == 100
    assert rep["macs_speedup"] == pytest.approx(rep["reference_macs"] / rep["expected_macs"])
    t = rep["timing"]
    assert t["batch_n"]["batch_size"] == 64 and t["batch_1"]["images"] == 4 and t["threads"] >= 1
    assert rep["wall_clock_speedup"]["batch_1"] > 0 and rep["wall_clock_speedup"]["batch_n"] > 0
    b1, s = t["batch_1"], rep["wall_clock_speedup"]
    for key in ("early_exit_ms_per_image", "deepest_ms_per_image", "speedup"):  # median with its spread
        assert 0 < b1[f"{key}_min"] <= b1[key] <= b1[f"{key}_max"]
    assert (s["batch_1_min"], s["batch_1"], s["batch_1_max"]) == (b1["speedup_min"], b1["speedup"], b1["speedup_max"])
    assert any("fitted on" in w for w in rep["warnings"])  # reported on the fitting split


def test_cli_fit_out_then_reuse_stored_thresholds(ckpt, tmp_path):
    out, sweep = tmp_path / "ee.safetensors", tmp_path / "sweep"
    rep = _eval(
        ckpt,
        "--early-exit",
        "--fit-thresholds",
        "--budget",
        "0.6",
        "--policy",
        "entropy",
        "--out",
        out,
        "--sweep-out",
        sweep,
    )
    assert rep["written"] == str(out) and rep["split"] == "test"
    meta = checkpoint.read_meta(out)
    thr = meta["thresholds"]
    assert thr["policy"] == "entropy" and thr["fallback"] == "deepest" and len(thr["values"]) == 3
    assert thr["fitted_on"]["split"] == "val" and thr["fitted_on"]["budget"] == 0.6
    assert meta["lineage"][-1]["command"].startswith("eval --early-exit")
    assert meta["lineage"][-1]["parent_sha256"] == checkpoint.sha256(ckpt)
    assert {p.name for p in sweep.iterdir()} == {"sweep.json", "sweep.csv", "sweep.png"}
    assert (sweep / "sweep.png").read_bytes()[:4] == b"\x89PNG" and rep["sweep"]["png"] == "sweep.png"
    again = _eval(out, "--early-exit")  # stored thresholds, no fitting
    assert again["thresholds"] == thr["values"] and again["fit"] is None
    assert again["top1"] == pytest.approx(rep["top1"]) and again["expected_macs"] == pytest.approx(rep["expected_macs"])
    r = runner.invoke(app, ["eval", str(out), "--early-exit", "--policy", "max_softmax"])
    assert r.exit_code == 1 and "refit" in r.output


def test_cli_errors_are_one_line(ckpt, tmp_path):
    no_val = make_ckpt(tmp_path / "noval.safetensors", val_size=0)
    for args in (
        ["eval", str(no_val), "--early-exit", "--fit-thresholds"],  # no validation split
        ["eval", str(ckpt), "--early-exit"],  # no stored thresholds
        ["eval", str(ckpt), "--fit-thresholds"],  # fitting without --early-exit
        ["eval", str(ckpt), "--early-exit", "--fit-thresholds", "--max-drop", "1", "--budget", "0.5"],
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 1 and r.output.count("\n") == 1 and r.output.startswith("error:"), r.output
    r = runner.invoke(app, ["eval", str(no_val), "--early-exit", "--fit-thresholds"])
    assert "--set data.val_size=0.1" in r.output and "overlap" in r.output
    rep = _eval(no_val, "--early-exit", "--fit-thresholds", "--set", "data.val_size=0.1")
    assert rep["fit"]["overlaps_training"] and any("overlap" in w for w in rep["warnings"])
