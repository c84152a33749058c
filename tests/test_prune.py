"""Structured pruning: real shrinkage, consistent exits, exact reload, MACs targets, lineage, CLI errors.

Models are width-8 ResNet18s on 16x16 `fake` images, so every pruning run takes well under a second.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from sdtool import checkpoint
from sdtool.cli import app
from sdtool.engine import fit
from sdtool.errors import SdtoolError
from sdtool.models import create_model
from sdtool.prune import CRITERIA, PruneOptions, full_macs, prune_checkpoint, prune_model
from sdtool.recipe import from_dict, load_recipe

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16
TINY = {
    "model": {"name": "resnet18", "width": 8},
    "data": {
        "name": "fake",
        "fake_size": 64,
        "batch_size": 16,
        "eval_batch_size": 64,
        "input_size": SIZE,
        "val_size": 16,
    },
    "train": {"epochs": 1, "limit_batches": 2, "lr": 0.05, "seed": 0, "threads": 1},
}
runner = CliRunner()


def params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A (barely) trained self-distilled checkpoint with its recipe in the lineage."""
    res = fit(from_dict(json.loads(json.dumps(TINY))), tmp_path_factory.mktemp("sd") / "run", quiet=True)
    return res.best or res.last


@pytest.fixture(scope="module")
def model(trained):
    return checkpoint.load(trained)[0]


def x_batch(n=3):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_ratio_really_shrinks_and_every_exit_runs(model):
    pruned, info = prune_model(model, PruneOptions(ratio=0.5), SIZE)
    assert params(pruned) < 0.6 * params(model)
    assert info["macs_fraction"] < 0.6 and info["macs_after"] == full_macs(pruned, SIZE)
    assert params(model) == 196_592  # the original is left untouched
    x = x_batch()
    logits, feats = pruned(x)
    assert len(logits) == model.num_exits == 4
    for k, (z, f) in enumerate(zip(logits, feats)):
        assert pruned.classifiers[k].out_features == 10 and z.shape == (3, 10)
        assert f.shape == (3, pruned.feature_dims[k])
        torch.testing.assert_close(pruned.forward_until(x, k), z)
    # The deepest exit's features follow the backbone (8*8 = 64 -> 32 channels at ratio 0.5).
    assert pruned.feature_dims[-1] == 32 < model.feature_dims[-1]


def test_attention_and_residuals_stay_consistent(model):
    from torchvision.models.resnet import BasicBlock

    def blocks(m):
        return [b for b in m.modules() if isinstance(b, BasicBlock)]

    pruned, _ = prune_model(model, PruneOptions(ratio=0.5, protect_exits=False), SIZE)
    for k, s in enumerate(pruned.exit_stages[:-1]):
        c = blocks(pruned.stages[s])[-1].bn2.num_features  # stage output width
        assert c < blocks(model.stages[s])[-1].bn2.num_features
        att = pruned.attention[k]
        # x * sigmoid(up(relu(bn(SepConv(x))))): the mask has the stage's channels
        assert att.conv[0].in_channels == att.conv[0].groups == c
        assert att.conv[5].out_channels == att.bn.num_features == c
        assert pruned.heads[k][0][0].in_channels == c  # the head's first depthwise conv reads the stage output
    for b in blocks(pruned):
        if b.downsample is None:  # identity shortcut: the block adds its input, so widths must match
            assert b.conv2.out_channels == b.conv1.in_channels
        else:
            assert b.conv2.out_channels == b.downsample[0].out_channels


@pytest.mark.parametrize("protect", [True, False])
def test_pruning_equals_silencing_the_removed_channels(model, protect):
    """The strongest consistency check: removing channels gives exactly the network in which those
    channels are silenced (their batch-norm scale and shift set to 0, so they carry zeros through
    every residual sum, attention product and head). A wrong index mapping anywhere breaks it."""
    import copy

    import torch_pruning as tp
    from torch import nn

    from sdtool.prune import make_importance
    from sdtool.pruner import _logits, _plan

    a, b = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
    x = x_batch(4)
    ignored, _ = _plan(a, x[:1], PruneOptions(ratio=0.4, protect_exits=protect))
    names, mods_a, mods_b = {m: n for n, m in a.named_modules()}, dict(a.named_modules()), dict(b.named_modules())
    pruner = tp.pruner.BasePruner(
        a,
        x[:1],
        importance=make_importance("l2"),
        pruning_ratio=0.4,
        ignored_layers=[mods_a[n] for n in ignored],
        output_transform=_logits,
    )
    silenced = 0
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            if isinstance(dep.target.module, nn.BatchNorm2d) and dep.handler == tp.prune_batchnorm_out_channels:
                bn = mods_b[names[dep.target.module]]
                with torch.no_grad():
                    bn.weight[idxs] = 0
                    bn.bias[idxs] = 0
                silenced += len(idxs)
        group.prune()
    assert silenced > 100 and params(a) < 0.7 * params(b)
    with torch.no_grad():
        for za, zb in zip(a(x)[0], b(x)[0]):
            torch.testing.assert_close(za, zb, rtol=1e-4, atol=1e-5)


def test_protect_exits_keeps_the_exit_branches_own_widths(model):
    kept, _ = prune_model(model, PruneOptions(ratio=0.5), SIZE)
    free, _ = prune_model(model, PruneOptions(ratio=0.5, protect_exits=False), SIZE)
    assert kept.feature_dims[:-1] == model.feature_dims[:-1] == [64, 64, 64]
    assert free.feature_dims[:-1] == [32, 32, 32]
    assert params(free) < params(kept)
    for m in (kept, free):
        assert [fc.out_features for fc in m.classifiers] == [10] * 4  # classes are never pruned


@pytest.mark.parametrize("target,glob", [(0.5, False), (0.35, False), (0.5, True)])
def test_target_macs_within_two_percent(model, target, glob):
    from fvcore.nn import FlopCountAnalysis

    pruned, info = prune_model(model, PruneOptions(target_macs=target, global_pruning=glob), SIZE)
    # An independent fvcore count of the whole multi-exit forward.
    x = torch.zeros(1, 3, SIZE, SIZE)
    counts = [
        FlopCountAnalysis(m, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False).total()
        for m in (model, pruned)
    ]
    frac = counts[1] / counts[0]
    assert abs(frac - target) <= 0.02 * target
    assert frac == pytest.approx(info["macs_fraction"], rel=1e-9)
    assert info["search"][-1]["ratio"] == pytest.approx(info["ratio"], abs=1e-6)


def test_unreachable_target_is_one_clear_error(model):
    with pytest.raises(SdtoolError, match="unreachable.*ask for at least"):
        prune_model(model, PruneOptions(target_macs=0.02), SIZE)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_prunes(model, trained, criterion):
    batches = loss_fn = None
    if criterion == "taylor":
        from sdtool.data import build_data
        from sdtool.evaluate import data_for_checkpoint
        from sdtool.prune import _first_batches, taylor_loss

        meta = checkpoint.read_meta(trained)
        bundle = build_data(data_for_checkpoint(meta))
        batches = _first_batches(bundle.loader("train", 16, shuffle=True, seed=0), bundle.prepare, 2)
        loss_fn = taylor_loss(meta, model.num_exits)
    pruned, info = prune_model(model, PruneOptions(criterion=criterion, ratio=0.4), SIZE, batches, loss_fn)
    assert params(pruned) < 0.8 * params(model) and info["macs_fraction"] < 0.8
    assert [z.shape for z in pruned(x_batch())[0]] == [torch.Size([3, 10])] * 4
    assert all(p.grad is None for p in pruned.parameters())  # taylor's gradients are not left behind


def test_criteria_choose_different_channels(model):
    """Same ratio, same shapes, different surviving channels: the criterion really decides."""
    a, _ = prune_model(model, PruneOptions(criterion="l1", ratio=0.5), SIZE)
    b, _ = prune_model(model, PruneOptions(criterion="random", ratio=0.5), SIZE)
    c, _ = prune_model(model, PruneOptions(criterion="l1", ratio=0.5), SIZE)
    wa, wb, wc = (m.stages[3][1].conv1.weight for m in (a, b, c))
    assert wa.shape == wb.shape and not torch.equal(wa, wb)
    assert torch.equal(wa, wc)  # deterministic


def test_taylor_needs_data(model):
    with pytest.raises(SdtoolError, match="taylor needs data"):
        prune_model(model, PruneOptions(criterion="taylor", ratio=0.3), SIZE)


@pytest.mark.slow
def test_checkpoint_reloads_in_a_fresh_process(trained, model, tmp_path):
    out = tmp_path / "pruned.safetensors"
    opts = PruneOptions(criterion="l2", target_macs=0.5)
    rep = prune_checkpoint(trained, out, opts)
    # The same pruning in memory (it is deterministic), against the file loaded by a new interpreter.
    pruned, _ = prune_model(model, opts, SIZE)
    x = x_batch(4)
    save_file({"x": x}, tmp_path / "x.safetensors")
    code = (
        "import sys; from safetensors.torch import load_file, save_file; from sdtool import checkpoint\n"
        "m, _ = checkpoint.load(sys.argv[1]); x = load_file(sys.argv[2])['x']\n"
        "z, f = m(x); save_file({f'z{k}': t.contiguous() for k, t in enumerate(z)}, sys.argv[3])"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(out), str(tmp_path / "x.safetensors"), str(tmp_path / "z.safetensors")],
        check=True,
        cwd=ROOT,
    )
    from safetensors.torch import load_file

    fresh = load_file(tmp_path / "z.safetensors")
    with torch.no_grad():
        mine = pruned(x)[0]
    for k, z in enumerate(mine):
        torch.testing.assert_close(fresh[f"z{k}"], z, rtol=1e-5, atol=1e-6)
    meta = checkpoint.read_meta(out)
    # Depthwise convolutions changed their groups along with their channels, and that is recorded.
    dw = meta["shapes"]["heads.0.0.0"]
    assert dw["groups"] == dw["in_channels"] == dw["out_channels"] < 8
    assert rep["pruned_modules"] == len(meta["shapes"]) > 20
    assert rep["sha256"] == checkpoint.sha256(out)


def test_lineage_and_metadata(trained, tmp_path):
    out = tmp_path / "p.safetensors"
    rep = prune_checkpoint(trained, out, PruneOptions(ratio=0.3, criterion="fpgm", round_to=2))
    meta, parent = checkpoint.read_meta(out), checkpoint.read_meta(trained)
    entry = meta["lineage"][-1]
    assert [e["command"] for e in meta["lineage"]] == ["train", "prune"]
    assert entry["parent_sha256"] == checkpoint.sha256(trained) and entry["recipe"] is None
    assert entry["options"]["criterion"] == "fpgm" and entry["options"]["round_to"] == 2
    m = entry["metrics"]
    assert m["after"]["params"] < m["before"]["params"] and m["after"]["macs"] < m["before"]["macs"]
    assert len(m["before"]["exits"]) == 4 and m["macs_fraction"] == round(rep["macs_fraction"], 4)
    assert meta["thresholds"] is None and meta["num_classes"] == parent["num_classes"]
    assert meta["val_split"] == parent["val_split"] and meta["input"] == parent["input"]
    # round_to=2: every pruned convolution keeps an even number of channels
    assert all(s["out_channels"] % 2 == 0 for s in meta["shapes"].values() if s["type"] == "conv2d")


def test_finetune_from_pruned_init_keeps_structure_and_lineage(trained, tmp_path):
    pruned = tmp_path / "pruned.safetensors"
    prune_checkpoint(trained, pruned, PruneOptions(ratio=0.5, protect_exits=False))
    res = fit(from_dict(json.loads(json.dumps(TINY))), tmp_path / "ft", init=str(pruned), quiet=True)
    ft = res.best or res.last
    meta, pmeta = checkpoint.read_meta(ft), checkpoint.read_meta(pruned)
    assert meta["shapes"] == pmeta["shapes"]
    assert [e["command"] for e in meta["lineage"]] == ["train", "prune", "train"]
    assert meta["lineage"][1]["parent_sha256"] == checkpoint.sha256(trained)
    assert meta["lineage"][2]["parent_sha256"] == checkpoint.sha256(pruned)
    model, _ = checkpoint.load(ft)
    assert model.feature_dims == [32, 32, 32, 32]
    # The self-distillation adaptation layers were sized from the pruned widths.
    state = checkpoint.load_tensors(tmp_path / "ft" / "train_state.safetensors")
    adapters = {k: tuple(v.shape) for k, v in state.items() if "adapters" in k and k.endswith("weight")}
    assert adapters and all(shape == (32, 32) for shape in adapters.values())


@pytest.mark.slow
def test_pipeline_tiny(tmp_path):
    from sdtool.pipeline import run_pipeline

    sets = [
        f"{k}={v}"
        for k, v in {
            "data.name": "fake",
            "data.fake_size": 96,
            "data.input_size": SIZE,
            "data.val_size": 32,
            "data.batch_size": 16,
            "model.width": 8,
            "train.epochs": 1,
            "train.limit_batches": 2,
            "train.threads": 1,
            "prune.finetune_epochs": 1,
            "prune.criterion": "taylor",
        }.items()
    ]
    r = load_recipe(ROOT / "recipes" / "pipeline_quickstart.yaml", sets)
    rep = run_pipeline(r, tmp_path / "pl", quiet=True)
    assert [s["step"] for s in rep["steps"]] == ["train", "prune", "fine-tune", "early exit"]
    assert rep["steps"][1]["macs"] < rep["steps"][0]["macs"]
    final = Path(rep["final"])
    meta = checkpoint.read_meta(final)
    assert [e["command"] for e in meta["lineage"]][:3] == ["train", "prune", "train"]
    assert meta["lineage"][-1]["command"].startswith("eval --early-exit")
    assert meta["thresholds"] and meta["shapes"]
    assert json.loads((tmp_path / "pl" / "pipeline.json").read_text()) == json.loads(json.dumps(rep))
    with pytest.raises(SdtoolError, match="already holds a pipeline"):
        run_pipeline(r, tmp_path / "pl", quiet=True)


def test_pipeline_checks_options_before_training(tmp_path):
    from sdtool.pipeline import run_pipeline

    r = load_recipe(ROOT / "recipes" / "pipeline_quickstart.yaml", ["prune.criterion=nope"])
    with pytest.raises(SdtoolError, match="valid criteria"):
        run_pipeline(r, tmp_path / "pl", quiet=True)
    assert not (tmp_path / "pl").exists()


def test_cli_prune_json_and_table(trained, tmp_path):
    out = tmp_path / "c.safetensors"
    r = runner.invoke(app, ["prune", str(trained), "--out", str(out), "--ratio", "0.5", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["out"] == str(out) and out.is_file() and rep["accuracy"] is None
    assert rep["after"]["full"]["params"] < rep["before"]["full"]["params"]
    out2 = tmp_path / "d.safetensors"
    r = runner.invoke(
        app,
        [
            "prune",
            str(trained),
            "--out",
            str(out2),
            "--target-macs",
            "0.5",
            "--eval",
            "--criterion",
            "taylor",
            "--iterative-steps",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "full" in r.stdout and "top-1" in r.stdout and "accuracy on the test split" in r.stdout
    assert out2.is_file() and checkpoint.read_meta(out2)["lineage"][-1]["options"]["iterative_steps"] == 2


def _foreign(tmp_path):
    p = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, p)
    return p


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ratio", "1.5"], "--ratio must be in (0, 1)"),
        (["--ratio", "0"], "--ratio must be in (0, 1)"),
        (["--target-macs", "0.01"], "unreachable"),
        (["--target-macs", "1.2"], "--target-macs must be in (0, 1)"),
        ([], "exactly one of --ratio"),
        (["--ratio", "0.5", "--target-macs", "0.5"], "exactly one of --ratio"),
        (["--ratio", "0.5", "--iterative-steps", "0"], "--iterative-steps"),
        ("foreign", "not an sdtool checkpoint"),
    ],
)
def test_cli_bad_input_is_one_line_exit_1_nothing_written(trained, tmp_path, args, message):
    out = tmp_path / "never.safetensors"
    src = trained
    if args == "foreign":
        src, args = _foreign(tmp_path), ["--ratio", "0.5"]
    r = runner.invoke(app, ["prune", str(src), "--out", str(out), *args])
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert not out.exists() and not list(tmp_path.glob(".never*"))  # no temporary file left either


def test_prune_a_pruned_checkpoint_again(trained, tmp_path):
    once, twice = tmp_path / "once.safetensors", tmp_path / "twice.safetensors"
    prune_checkpoint(trained, once, PruneOptions(ratio=0.3))
    prune_checkpoint(once, twice, PruneOptions(ratio=0.3, criterion="l1", protect_exits=False))
    m1, _ = checkpoint.load(once)
    m2, meta = checkpoint.load(twice)
    assert params(m2) < params(m1)
    assert [e["command"] for e in meta["lineage"]] == ["train", "prune", "prune"]
    assert meta["lineage"][-1]["parent_sha256"] == checkpoint.sha256(once)


def test_taylor_gradients_computed_once_match_a_fresh_computation(model, trained):
    """The target search reuses the unpruned model's gradients; they equal recomputing them per copy."""
    import copy

    from sdtool.data import build_data
    from sdtool.evaluate import data_for_checkpoint
    from sdtool.prune import _first_batches, prune_once, taylor_loss
    from sdtool.pruner import _taylor_grads

    meta = checkpoint.read_meta(trained)
    bundle = build_data(data_for_checkpoint(meta))
    batches = _first_batches(bundle.loader("train", 16, shuffle=True, seed=0), bundle.prepare, 2)
    loss_fn = taylor_loss(meta, model.num_exits)
    opts = PruneOptions(criterion="taylor", ratio=0.4)
    x = torch.zeros(1, 3, SIZE, SIZE)
    scratch = copy.deepcopy(model)
    _taylor_grads(scratch, batches, loss_fn, 1)
    grads = {n: p.grad for n, p in scratch.named_parameters()}
    a = prune_once(copy.deepcopy(model), x, opts, 0.4, batches, loss_fn, grads=grads)
    b = prune_once(copy.deepcopy(model), x, opts, 0.4, batches, loss_fn)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    c = prune_once(copy.deepcopy(model), x, PruneOptions(criterion="l2", ratio=0.4), 0.4)
    assert any(
        not torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()) if p.shape == q.shape
    )  # the gradients changed the choice


@pytest.mark.parametrize("cmd", ["prune", "pipeline"])
def test_help_has_an_example(cmd):
    r = runner.invoke(app, [cmd, "--help"])
    assert r.exit_code == 0 and f"Example: sdtool {cmd}" in r.output


def test_pipeline_recipe_is_valid():
    r = load_recipe(ROOT / "recipes" / "pipeline_quickstart.yaml")
    assert r.prune.enabled and r.prune.criterion == "taylor" and r.eval.early_exit and r.data.val_size > 0
    assert (
        (ROOT / "recipes" / "pipeline_quickstart.yaml")
        .read_text()
        .startswith("# sdtool pipeline recipes/pipeline_quickstart.yaml")
    )


def test_split_layer1_resnet18_prunes_to_a_target_and_reloads(tmp_path):
    """The five-stage resnet18 (an exit inside layer1, whose head starts with a stride-1 SepConv) prunes
    to a MACs target like the paper's layout; every exit still runs and the file rebuilds it."""
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, width=8, split_layer1=True)
    pruned, info = prune_model(model, PruneOptions(target_macs=0.5), SIZE)
    assert abs(info["macs_fraction"] - 0.5) <= 0.01 and params(pruned) < 0.6 * params(model)
    assert pruned.feature_dims[:-1] == model.feature_dims[:-1] == [64] * 4  # protect_exits kept the heads
    assert pruned.stages[0][1][0].conv2.out_channels == pruned.stages[1][0].conv1.in_channels < 8
    path = tmp_path / "split.safetensors"
    checkpoint.save(path, pruned, {"num_classes": 10})
    reloaded, meta = checkpoint.load(path)
    assert meta["model"]["args"]["split_layer1"] and meta["model"]["stages"][1] == "layer1[1:]"
    pruned.eval()
    x = x_batch()
    with torch.no_grad():
        logits = pruned(x)[0]
        assert len(logits) == 5
        for k, (a, b) in enumerate(zip(reloaded(x)[0], logits)):
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(reloaded.forward_until(x, k), b)
