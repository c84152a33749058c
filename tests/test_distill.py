"""External-teacher distillation: KD wiring, frozen teachers, torchvision weights files, mismatches, a run."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from sdtool import SdtoolError, checkpoint
from sdtool.distill import DistillExtra, Teacher, distill
from sdtool.models import create_model
from sdtool.recipe import DistillConfig, from_dict

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def bundle(classes=10, size=32, mean=MEAN, std=STD):
    return SimpleNamespace(num_classes=classes, input_size=size, mean=tuple(mean), std=tuple(std))


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    torch.manual_seed(1)
    m = create_model("resnet20", num_classes=10, width=4)
    with torch.no_grad():  # non-trivial BN statistics, so eval and train mode differ
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
        m.classifiers[-1].weight.mul_(300)  # confident teacher: a KD term far from zero
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    checkpoint.save(path, m, {"num_classes": 10, "input": {"size": 32, "mean": MEAN, "std": STD}, "ensemble": "logits"})
    return path


def ref_kd(s, t, T):
    """T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean, from explicit sums in float64."""
    total = 0.0
    for sn, tn in zip(s.double().tolist(), t.double().tolist()):
        ls = [v / T - math.log(sum(math.exp(u / T) for u in sn)) for v in sn]
        lt = [v / T - math.log(sum(math.exp(u / T) for u in tn)) for v in tn]
        total += sum(math.exp(b) * (b - a) for a, b in zip(ls, lt))
    return T * T * total / len(s)


@pytest.mark.parametrize("targets", ["deepest", "all"])
def test_kd_term_is_wired_and_the_teacher_stays_frozen(teacher_ckpt, targets):
    torch.manual_seed(0)
    cfg = DistillConfig(temperature=4.0, alpha=0.9, targets=targets)
    extra = DistillExtra(cfg, str(teacher_ckpt))
    student = create_model("resnet20", num_classes=10, width=4)
    extra.bind(student, bundle())
    extra.train()
    ref_teacher, _ = checkpoint.load(teacher_ckpt)
    before = {k: v.clone() for k, v in extra.teacher.net.state_dict().items()}

    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits, feats = student(x)
    loss, parts = extra(x, logits, feats, y)
    with torch.no_grad():
        t = ref_teacher.forward_until(x, 3)  # deepest exit of the teacher, eval mode
    zs = logits if targets == "all" else logits[-1:]
    assert float(loss.detach()) == pytest.approx(0.9 * sum(ref_kd(z.detach(), t, 4.0) for z in zs), rel=1e-4)
    assert float(parts["teacher_kd"]) == pytest.approx(float(loss.detach()))

    opt = torch.optim.SGD([p for p in list(student.parameters()) + list(extra.parameters()) if p.requires_grad], lr=1.0)
    loss.backward()
    assert all(p.grad is None for p in extra.teacher.parameters())
    assert not any(p.requires_grad for p in extra.teacher.parameters())
    assert student.classifiers[-1].weight.grad.abs().sum() > 0
    if targets == "deepest":
        assert student.classifiers[0].weight.grad is None  # only the deepest exit is taught
    opt.step()
    assert not extra.teacher.net.training
    for k, v in extra.teacher.net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)  # BN statistics included
    assert extra.epoch_metrics()["teacher_seconds"] > 0


def test_teacher_ensemble_output_and_renormalisation(teacher_ckpt):
    ref, _ = checkpoint.load(teacher_ckpt)
    teacher = Teacher(str(teacher_ckpt), output="ensemble")
    mean_s, std_s = [0.4, 0.4, 0.4], [0.5, 0.5, 0.5]
    teacher.check(10, 32, mean_s, std_s)  # the student normalises differently: the teacher re-normalises
    x = torch.randn(2, 3, 32, 32)
    img = x * torch.tensor(std_s).view(1, 3, 1, 1) + torch.tensor(mean_s).view(1, 3, 1, 1)
    x_t = (img - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = torch.stack(ref(x_t)[0]).mean(0)
    z, feats = teacher(x)
    torch.testing.assert_close(z, want, rtol=1e-4, atol=1e-5)
    assert len(feats) == 4 and teacher.info["renormalized"]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_teacher_from_a_local_weights_file(tmp_path, suffix):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / f"r18{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)
    else:
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    teacher = Teacher("torchvision:resnet18", str(path))
    teacher.check(10, 32, MEAN, STD)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref(x)
    z, feats = teacher(x)
    torch.testing.assert_close(z, want)
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512]  # layer1..layer4 for feature distillation
    assert teacher.info["weights_sha256"] == checkpoint.sha256(path)

    extra = DistillExtra(DistillConfig(feature="fitnet"), "torchvision:resnet18", str(path))
    student = create_model("resnet8x4", num_classes=10, width=8)
    extra.bind(student, bundle())
    assert [(fl.adapter.in_channels, fl.adapter.out_channels) for fl in extra.feature_losses] == [
        (4, 64),
        (8, 128),
        (16, 256),
        (32, 512),
    ]
    logits, feats = student(x)
    loss, parts = extra(x, logits, feats, torch.tensor([1, 2]))
    loss.backward()
    assert all(fl.adapter.weight.grad is not None for fl in extra.feature_losses)  # adapters are trained
    assert float(parts["teacher_feature"]) > 0


def test_teacher_errors_are_one_line(tmp_path, teacher_ckpt):
    cases = [
        (lambda: Teacher("torchvision:resnet18", str(tmp_path / "missing.pth")), "not found"),
        (lambda: Teacher("torchvision:resnet18"), "needs --teacher-weights"),
        (lambda: Teacher("torchvision:resnet81", "x.pth"), "did you mean resnet18"),
        (lambda: Teacher(str(tmp_path / "nope.safetensors")), "not found"),
        (lambda: Teacher(str(teacher_ckpt)).check(100, 32, MEAN, STD), "predicts 10 classes .* has 100"),
        (lambda: Teacher(str(teacher_ckpt)).check(10, 64, MEAN, STD), "32x32 inputs .* 64x64"),
    ]
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(5, 3)}, bad)
    cases.append((lambda: Teacher("torchvision:resnet18", str(bad)), "does not fit torchvision:resnet18"))
    for fn, pattern in cases:
        with pytest.raises(SdtoolError, match=pattern) as e:
            fn()
        assert "\n" not in str(e.value)


def test_distill_run_records_the_teacher_in_the_lineage(tmp_path, teacher_ckpt):
    r = from_dict(
        {
            "model": {"name": "resnet8x4", "width": 8},
            "data": {"name": "fake", "fake_size": 32, "batch_size": 16, "eval_batch_size": 64},
            "train": {"epochs": 1, "limit_batches": 2, "threads": 1},
            "distill": {"targets": "all", "feature": "at"},
        }
    )
    res = distill(r, tmp_path / "run", teacher=str(teacher_ckpt), quiet=True)
    meta = checkpoint.read_meta(res.last)
    entry = meta["lineage"][-1]
    assert entry["command"] == "distill"
    assert entry["teacher"]["source"] == str(teacher_ckpt)
    assert entry["teacher"]["sha256"] == checkpoint.sha256(teacher_ckpt)
    assert entry["recipe"]["distill"]["teacher"] == str(teacher_ckpt)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["teacher_seconds"] > 0 and row["teacher_ms_per_step"] > 0
    assert meta["model"]["name"] == "resnet8x4" and len(res.test["exits"]) == 4


def test_cli_distill_mismatch_is_one_line(tmp_path, teacher_ckpt):
    from typer.testing import CliRunner

    from sdtool.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {name: resnet20, width: 4}\ndata: {name: fake, fake_size: 16, input_size: 40, batch_size: 8}\n"
        "train: {epochs: 1, limit_batches: 1}\n"
    )
    res = CliRunner().invoke(
        app, ["distill", str(recipe), "--teacher", str(teacher_ckpt), "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 1
    assert res.output.strip().count("\n") == 0 and "32x32 inputs" in res.output


ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = [
    "data.name=fake",
    "data.fake_size=32",
    "data.val_size=0",
    "data.batch_size=16",
    "train.epochs=1",
    "train.limit_batches=1",
    "train.threads=1",
]


@pytest.mark.parametrize(
    "name,tiny,teacher",
    [
        ("cifar100_resnet50_to_resnet18_sd_kd", ["model.width=4"], True),
        ("cifar100_mobilenet_v2_sd", ["model.width_mult=0.25"], False),
        ("cifar100_shufflenet_v2_sd", ["model.width_mult=0.25"], False),
        ("cifar100_resnet32x4_plain", ["model.width=8"], False),
        ("cifar100_resnet32x4_to_resnet8x4_kd", ["model.width=8"], True),
        ("cifar100_resnet32x4_to_resnet8x4_sd_kd", ["model.width=8"], True),
    ],
)
def test_recipes_run_tiny_on_fake_data(tmp_path, teacher_ckpt, name, tiny, teacher):
    from sdtool.engine import fit
    from sdtool.recipe import load_recipe

    path = ROOT / "recipes" / f"{name}.yaml"
    command = path.read_text().splitlines()[0]
    assert command.startswith(f"# sdtool {'distill' if teacher else 'train'} recipes/{name}.yaml")
    r = load_recipe(path, TINY_RUN + tiny)
    res = (
        distill(r, tmp_path / "run", teacher=str(teacher_ckpt), quiet=True)
        if teacher
        else fit(r, tmp_path / "run", quiet=True)
    )
    meta = checkpoint.read_meta(res.last)
    assert meta["model"]["name"] == r.model.name
    assert len(res.test["exits"]) == (1 if r.sd.mode == "plain" else 4)


def test_distill_resume_restores_feature_adapters_exactly(tmp_path, teacher_ckpt):
    """Two epochs in one go, or one epoch and `--resume` for the second: the same weights and adapters."""
    base = {
        "model": {"name": "resnet8x4", "width": 8},
        "data": {"name": "fake", "fake_size": 32, "batch_size": 16, "eval_batch_size": 64},
        "train": {"epochs": 2, "limit_batches": 2, "threads": 1, "lr": 0.05},
        "distill": {"feature": "fitnet"},
    }
    full = distill(from_dict(base), tmp_path / "full", teacher=str(teacher_ckpt), quiet=True)
    cut = json.loads(json.dumps(base))
    cut["train"]["epochs"] = 1
    distill(from_dict(cut), tmp_path / "cut", teacher=str(teacher_ckpt), quiet=True)
    # Extend the interrupted run to two epochs, as if it had been stopped after its first.
    rfile = tmp_path / "cut" / "recipe.yaml"
    rfile.write_text(rfile.read_text().replace("epochs: 1", "epochs: 2"))
    resumed = distill(None, None, resume=tmp_path / "cut", quiet=True)
    a = checkpoint.load_tensors(full.last)
    b = checkpoint.load_tensors(resumed.last)
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = checkpoint.load_tensors(tmp_path / "full" / "train_state.safetensors")
    sb = checkpoint.load_tensors(tmp_path / "cut" / "train_state.safetensors")
    adapters = [k for k in sa if k.startswith("extra.")]
    assert adapters and all(torch.equal(sa[k], sb[k]) for k in adapters)
    assert not any("teacher" in k for k in adapters)  # the frozen teacher is not copied into the state
