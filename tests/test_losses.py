"""Golden-value tests of the losses.

Every expected value is recomputed here from elementary operations (explicit exp / log sums, an
explicit square root of a sum of squares, explicit loops in float64 Python), never by calling
`sdtool.losses` helpers, so a mistake in the module cannot hide in the reference.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from sdtool.errors import SdtoolError
from sdtool.losses import (
    ATLoss,
    FitNetLoss,
    KDLoss,
    SelfDistillLoss,
    default_hint_exits,
    ensemble_logits,
    soft_cross_entropy,
)

N, C = 3, 5
DIMS = [8, 12, 16, 16]


# ----------------------------------------------------------------------------------------------------
# The independent reference, on nested Python lists of floats.


def rows(t):
    return t.detach().double().tolist()


def log_softmax_row(z, T=1.0):
    z = [v / T for v in z]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def softmax_row(z, T=1.0):
    return [math.exp(v) for v in log_softmax_row(z, T)]


def ref_ce(z, y, ls=0.0):
    total = 0.0
    for zn, yn in zip(z, y):
        lp = log_softmax_row(zn)
        total += -(1 - ls) * lp[yn] - ls / len(zn) * sum(lp)
    return total / len(z)


def ref_soft_ce(s, t, T):
    total = 0.0
    for sn, tn in zip(s, t):
        q, lp = softmax_row(tn, T), log_softmax_row(sn, T)
        total += -sum(qc * lpc for qc, lpc in zip(q, lp))
    return total / len(s)


def ref_ensemble(zs, kind):
    out = []
    for n in range(len(zs[0])):
        if kind == "logits":
            out.append([sum(z[n][c] for z in zs) / len(zs) for c in range(len(zs[0][n]))])
        else:
            ps = [softmax_row(z[n]) for z in zs]
            out.append([math.log(sum(p[c] for p in ps) / len(ps)) for c in range(len(ps[0]))])
    return out


def ref_linear(f, weight, bias):
    W, b = rows(weight), rows(bias)
    return [[sum(W[j][k] * fn[k] for k in range(len(fn))) + b[j] for j in range(len(W))] for fn in f]


def ref_dist(a, b):
    return math.sqrt(sum((a[n][j] - b[n][j]) ** 2 for n in range(len(a)) for j in range(len(a[n]))))


def ref_loss(
    module, logits, feats, y, mode, alpha=0.3, beta=0.03, T=3.0, teacher="deepest", H=(1, 2), ls=0.0, ens="logits"
):
    z = [rows(t) for t in logits]
    f = [rows(t) for t in feats]
    y = y.tolist()
    K = len(z)
    if mode == "plain":
        return ref_ce(z[-1], y, ls)
    if mode == "deep_supervision":
        return sum(ref_ce(z[i], y, ls) for i in range(K))
    zt = z[-1] if teacher == "deepest" else ref_ensemble(z, ens)
    loss = ref_ce(z[-1], y, ls)
    for i in range(K - 1):
        loss += alpha * ref_soft_ce(z[i], zt, T) + (1 - alpha) * ref_ce(z[i], y, ls)
    for i in H:
        lin = module.adapters[str(i)]
        loss += beta * ref_dist(ref_linear(f[i - 1], lin.weight, lin.bias), f[-1])
    return loss


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = [3 * torch.randn(N, C, generator=g) for _ in DIMS]
    feats = [torch.randn(N, d, generator=g) for d in DIMS]
    y = torch.tensor([0, 3, 4])
    return logits, feats, y


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Golden values for every mode and option.

CASES = {
    "defaults": dict(kw={}, ref={}),
    "teacher_ensemble": dict(kw=dict(teacher="ensemble"), ref=dict(teacher="ensemble")),
    "teacher_ensemble_softmax": dict(
        kw=dict(teacher="ensemble", ensemble="softmax"), ref=dict(teacher="ensemble", ens="softmax")
    ),
    "hint_custom": dict(kw=dict(hint_exits=[3, 1]), ref=dict(H=(1, 3))),
    "hint_only_k_minus_1": dict(kw=dict(hint_exits=[3]), ref=dict(H=(3,))),
    "hint_empty": dict(kw=dict(hint_exits=[]), ref=dict(H=())),
    "label_smoothing": dict(kw=dict(label_smoothing=0.1), ref=dict(ls=0.1)),
    "alpha_0": dict(kw=dict(alpha=0.0), ref=dict(alpha=0.0)),
    "alpha_1": dict(kw=dict(alpha=1.0), ref=dict(alpha=1.0)),
    "beta_0": dict(kw=dict(beta=0.0), ref=dict(beta=0.0, H=())),
    "other_weights": dict(kw=dict(alpha=0.5, beta=0.5, temperature=1.5), ref=dict(alpha=0.5, beta=0.5, T=1.5)),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_self_distill_golden(batch, case):
    logits, feats, y = batch
    torch.manual_seed(1)
    loss_fn = SelfDistillLoss("self_distill", DIMS, **CASES[case]["kw"])
    total, parts = loss_fn(logits, feats, y)
    close(total, ref_loss(loss_fn, logits, feats, y, "self_distill", **CASES[case]["ref"]))
    assert set(parts) == {"ce_deepest", "ce_shallow", "kd", "hint"}
    assert all(v.ndim == 0 and not v.requires_grad for v in parts.values())
    assert float(sum(parts.values())) == pytest.approx(total.item(), rel=1e-5)


def test_parts_are_the_weighted_terms(batch):
    logits, feats, y = batch
    loss_fn = SelfDistillLoss("self_distill", DIMS, alpha=0.3, beta=0.03, temperature=3.0)
    _, parts = loss_fn(logits, feats, y)
    z, yl = [rows(t) for t in logits], y.tolist()
    parts = {k: float(v) for k, v in parts.items()}
    assert parts["ce_deepest"] == pytest.approx(ref_ce(z[-1], yl), rel=1e-5)
    assert parts["ce_shallow"] == pytest.approx(0.7 * sum(ref_ce(z[i], yl) for i in range(3)), rel=1e-5)
    assert parts["kd"] == pytest.approx(0.3 * sum(ref_soft_ce(z[i], z[-1], 3.0) for i in range(3)), rel=1e-5)
    assert parts["hint"] > 0


@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_deep_supervision_golden(batch, ls):
    logits, feats, y = batch
    loss_fn = SelfDistillLoss("deep_supervision", DIMS, label_smoothing=ls)
    total, parts = loss_fn(logits, feats, y)
    close(total, ref_loss(loss_fn, logits, feats, y, "deep_supervision", ls=ls))
    assert set(parts) == {"ce_deepest", "ce_shallow"}


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_plain_golden(batch, ls):
    logits, feats, y = batch
    loss_fn = SelfDistillLoss("plain", [16], label_smoothing=ls)
    total, parts = loss_fn(logits[-1:], feats[-1:], y)
    close(total, ref_ce(rows(logits[-1]), y.tolist(), ls))
    assert parts == {"ce_deepest": pytest.approx(total.item())}


def test_single_exit_self_distill_is_plain_ce(batch):
    logits, feats, y = batch
    total, parts = SelfDistillLoss("self_distill", [16])(logits[-1:], feats[-1:], y)
    close(total, ref_ce(rows(logits[-1]), y.tolist()))
    assert parts["kd"] == parts["hint"] == parts["ce_shallow"] == 0.0


def test_three_exits_golden(batch):
    logits, feats, y = batch
    loss_fn = SelfDistillLoss("self_distill", DIMS[1:], teacher="ensemble")
    total, _ = loss_fn(logits[1:], feats[1:], y)
    assert list(loss_fn.adapters) == ["1"]
    close(total, ref_loss(loss_fn, logits[1:], feats[1:], y, "self_distill", teacher="ensemble", H=(1,)))


# ----------------------------------------------------------------------------------------------------
# Hand-computed anchors.


def test_soft_cross_entropy_two_class_anchor():
    # T=1: teacher [ln 3, 0] -> q = (3/4, 1/4); student uniform -> softCE = ln 2 exactly.
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3), 0.0]])
    close(soft_cross_entropy(s, t, 1.0), math.log(2))
    # T=2 (no T^2 factor): q = (3/4, 1/4), p = (1/3, 2/3) -> 3/4 ln 3 + 1/4 ln 3/2.
    s, t = torch.tensor([[0.0, 2 * math.log(2)]]), torch.tensor([[2 * math.log(3), 0.0]])
    close(soft_cross_entropy(s, t, 2.0), 0.75 * math.log(3) + 0.25 * math.log(1.5))


def test_kd_two_class_anchor():
    # Same distributions: KL(q || p) = 3/4 ln(9/4) + 1/4 ln(3/8), times T^2 = 4.
    s, t = torch.tensor([[0.0, 2 * math.log(2)]]), torch.tensor([[2 * math.log(3), 0.0]])
    close(KDLoss(temperature=2.0)(s, t), 4 * (0.75 * math.log(9 / 4) + 0.25 * math.log(3 / 8)))


def test_kd_golden_batch(batch):
    logits, _, _ = batch
    T = 4.0
    s, t = rows(logits[0]), rows(logits[-1])
    expected = 0.0
    for sn, tn in zip(s, t):
        q, lq, lp = softmax_row(tn, T), log_softmax_row(tn, T), log_softmax_row(sn, T)
        expected += sum(qc * (lqc - lpc) for qc, lqc, lpc in zip(q, lq, lp))
    expected = T * T * expected / len(s)
    close(KDLoss(T)(logits[0], logits[-1]), expected)
    assert KDLoss(T)(logits[-1], logits[-1]).abs().item() < 1e-6


def test_ensemble_logits(batch):
    logits, _, _ = batch
    close(ensemble_logits(logits), ref_ensemble([rows(z) for z in logits], "logits"))
    log_mean = ensemble_logits(logits, "softmax")
    close(log_mean, ref_ensemble([rows(z) for z in logits], "softmax"))
    # softmax of the returned log-probabilities gives back the mean probabilities exactly.
    mean_p = [[sum(softmax_row(rows(z)[n])[c] for z in logits) / len(logits) for c in range(C)] for n in range(N)]
    close(log_mean.softmax(dim=1), mean_p)
    with pytest.raises(SdtoolError):
        ensemble_logits(logits, "median")


# ----------------------------------------------------------------------------------------------------
# Stop-gradient, checked with autograd against explicit gradients.


def leaves(batch):
    logits, feats, y = batch
    return [z.clone().requires_grad_() for z in logits], [f.clone().requires_grad_() for f in feats], y


@pytest.mark.parametrize("teacher", ["deepest", "ensemble"])
def test_teacher_is_stop_gradient(batch, teacher):
    logits, feats, y = leaves(batch)
    alpha, T = 0.3, 3.0
    loss_fn = SelfDistillLoss("self_distill", DIMS, alpha=alpha, temperature=T, teacher=teacher)
    total, _ = loss_fn(logits, feats, y)
    total.backward()
    onehot = F.one_hot(y, C).double()
    # z_K: only its own CE term -> (softmax(z_K) - onehot) / N.
    pK = torch.tensor([softmax_row(r) for r in rows(logits[-1])])
    torch.testing.assert_close(logits[-1].grad.double(), (pK - onehot) / N, rtol=1e-5, atol=1e-7)
    # z_i shallow: only its own two terms; the (ensemble) teacher contributes nothing.
    zt = rows(logits[-1]) if teacher == "deepest" else ref_ensemble([rows(z) for z in logits], "logits")
    q = torch.tensor([softmax_row(r, T) for r in zt])
    for z in logits[:-1]:
        pT = torch.tensor([softmax_row(r, T) for r in rows(z)])
        p = torch.tensor([softmax_row(r) for r in rows(z)])
        expected = alpha * (pT - q) / (T * N) + (1 - alpha) * (p - onehot) / N
        torch.testing.assert_close(z.grad.double(), expected, rtol=1e-5, atol=1e-7)


def test_deepest_features_get_no_gradient_from_hint(batch):
    logits, feats, y = leaves(batch)
    loss_fn = SelfDistillLoss("self_distill", DIMS, beta=1.0)
    total, _ = loss_fn(logits, feats, y)
    total.backward()
    assert feats[-1].grad is None  # sg(f_K)
    assert feats[2].grad is None  # exit K-1 = 3 is not in the default H
    assert feats[0].grad.abs().sum() > 0 and feats[1].grad.abs().sum() > 0
    assert all(p.grad is not None for p in loss_fn.parameters())


# ----------------------------------------------------------------------------------------------------
# Hint exits and adapters.


def test_default_hint_exits():
    assert default_hint_exits(4) == [1, 2]
    assert default_hint_exits(3) == [1]
    assert default_hint_exits(2) == []
    assert default_hint_exits(1) == []
    assert SelfDistillLoss("self_distill", [4, 8]).hint_exits == []


def test_adapters_follow_feature_dims():
    pruned = [5, 9, 14, 11]
    loss_fn = SelfDistillLoss("self_distill", pruned)
    assert {k: tuple(m.weight.shape) for k, m in loss_fn.adapters.items()} == {"1": (11, 5), "2": (11, 9)}
    custom = SelfDistillLoss("self_distill", pruned, hint_exits=[3])
    assert {k: tuple(m.weight.shape) for k, m in custom.adapters.items()} == {"3": (11, 14)}
    # Adapters are the loss side's parameters: state_dict keys are stable for checkpoints.
    assert set(loss_fn.state_dict()) == {"adapters.1.weight", "adapters.1.bias", "adapters.2.weight", "adapters.2.bias"}


@pytest.mark.parametrize("mode,dims", [("deep_supervision", DIMS), ("plain", [16])])
def test_no_adapters_without_distillation(mode, dims):
    loss_fn = SelfDistillLoss(mode, dims, hint_exits=[1, 2])
    assert len(loss_fn.adapters) == 0 and list(loss_fn.parameters()) == []


def test_no_adapters_when_beta_is_zero():
    assert list(SelfDistillLoss("self_distill", DIMS, beta=0.0).parameters()) == []


@pytest.mark.parametrize("bad", [[0], [4], [-1], [1, 1], [True], ["1"], [1.0]])
def test_invalid_hint_exit(bad):
    with pytest.raises(SdtoolError, match="sd.hint_exits") as e:
        SelfDistillLoss("self_distill", DIMS, hint_exits=bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kw", [dict(mode="distill"), dict(teacher="best"), dict(ensemble="max"), dict(temperature=0.0)]
)
def test_invalid_options(kw):
    args = dict(mode="self_distill") | kw
    with pytest.raises(SdtoolError) as e:
        SelfDistillLoss(args.pop("mode"), DIMS, **args)
    assert "\n" not in str(e.value)


def test_from_recipe():
    from sdtool.recipe import SdConfig

    sd = SdConfig(teacher="ensemble", hint_exits=[2], alpha=0.4)
    loss_fn = SelfDistillLoss.from_recipe(sd, DIMS, label_smoothing=0.1)
    assert (loss_fn.teacher, loss_fn.hint_exits, loss_fn.alpha, loss_fn.label_smoothing) == ("ensemble", [2], 0.4, 0.1)


def test_wrong_exit_count_is_a_bug(batch):
    logits, feats, y = batch
    with pytest.raises(ValueError):
        SelfDistillLoss("self_distill", DIMS)(logits[1:], feats[1:], y)


# ----------------------------------------------------------------------------------------------------
# Feature distillation.


def test_fitnet_golden_and_shapes():
    g = torch.Generator().manual_seed(2)
    fs, ft = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 6, 3, 3, generator=g)
    loss_fn = FitNetLoss(4, 6)
    assert tuple(loss_fn.adapter.weight.shape) == (6, 4, 1, 1)
    W, s, t = rows(loss_fn.adapter.weight[:, :, 0, 0]), rows(fs), rows(ft)
    sq, count = 0.0, 0
    for n in range(2):
        for o in range(6):
            for h in range(3):
                for w in range(3):
                    v = sum(W[o][c] * s[n][c][h][w] for c in range(4))
                    sq += (v - t[n][o][h][w]) ** 2
                    count += 1
    close(loss_fn(fs, ft), sq / count)
    # Different spatial sizes: the adapted student map is resized to the teacher's.
    out = loss_fn(torch.randn(2, 4, 8, 8, generator=g), ft)
    assert out.ndim == 0 and torch.isfinite(out)


def test_fitnet_zero_when_identical():
    loss_fn = FitNetLoss(4, 4)
    with torch.no_grad():
        loss_fn.adapter.weight.copy_(torch.eye(4)[:, :, None, None])
    f = torch.randn(2, 4, 5, 5)
    assert loss_fn(f, f).item() == 0.0
    # Constant maps stay constant under bilinear resize: 8x8 student vs 4x4 teacher.
    const = torch.arange(4.0)[None, :, None, None]
    assert loss_fn(const.expand(2, 4, 8, 8), const.expand(2, 4, 4, 4)).abs().item() < 1e-12


def test_at_golden():
    g = torch.Generator().manual_seed(3)
    fs, ft = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 4, 4, generator=g)

    def att(f):
        out = []
        for fn in rows(f):
            a = [sum(fn[c][h][w] ** 2 for c in range(len(fn))) / len(fn) for h in range(4) for w in range(4)]
            norm = math.sqrt(sum(v * v for v in a))
            out.append([v / norm for v in a])
        return out

    a_s, a_t = att(fs), att(ft)
    expected = sum((a_s[n][j] - a_t[n][j]) ** 2 for n in range(2) for j in range(16)) / 32
    close(ATLoss()(fs, ft), expected)


def test_at_zero_when_identical_and_resizes():
    f = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.cat([f, f], dim=1).detach().requires_grad_()  # more channels, same attention map
    loss = ATLoss()(f, t)
    assert loss.abs().item() < 1e-12
    out = ATLoss()(torch.randn(2, 3, 8, 8, requires_grad=True), t)
    out.backward()
    assert out.ndim == 0 and torch.isfinite(out) and t.grad is None  # teacher gets no gradient
