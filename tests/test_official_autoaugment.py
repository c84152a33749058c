"""`autoaugment_policy: official_cifar10`: every operation against independent numpy references, the
policy table, the random draws, and the data pipelines that use it."""

import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from sdtool.data import official_autoaugment as oa
from sdtool.data.augment import autoaugment, per_image_transform
from sdtool.data.imagefolder import train_transform
from sdtool.engine import fit
from sdtool.recipe import AugmentConfig, from_dict

LEVELS = range(10)
SIGNED = {"shearX", "shearY", "translateX", "translateY", "color", "contrast", "sharpness", "brightness"}


def _gradient() -> np.ndarray:
    y, x = np.mgrid[0:32, 0:32]
    return np.stack([40 + 4 * x, 50 + 3 * y, 100 + x + 2 * y], axis=-1).astype(np.uint8)  # low contrast


IMAGES = {
    "noise": np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8),
    "gradient": _gradient(),
}


def run_op(a: np.ndarray, op: str, level: int, sign: int = 1) -> np.ndarray:
    return np.asarray(oa.apply_op(Image.fromarray(a), op, level, sign)).astype(np.int64)


def mag(lo: float, hi: float, level: int) -> float:
    return float(np.linspace(lo, hi, 10)[level])


def close(out: np.ndarray, ref: np.ndarray, tol: int = 1) -> None:
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= tol


# ------------------------------------------------------------------------------------ the table


EXPECTED = [  # (op1, p1, m1, op2, p2, m2), the authors' code's order
    ("invert", 0.1, 7, "contrast", 0.2, 6),
    ("rotate", 0.7, 2, "translateX", 0.3, 9),
    ("sharpness", 0.8, 1, "sharpness", 0.9, 3),
    ("shearY", 0.5, 8, "translateY", 0.7, 9),
    ("autocontrast", 0.5, 8, "equalize", 0.9, 2),
    ("shearY", 0.2, 7, "posterize", 0.3, 7),
    ("color", 0.4, 3, "brightness", 0.6, 7),
    ("sharpness", 0.3, 9, "brightness", 0.7, 9),
    ("equalize", 0.6, 5, "equalize", 0.5, 1),
    ("contrast", 0.6, 7, "sharpness", 0.6, 5),
    ("color", 0.7, 7, "translateX", 0.5, 8),
    ("equalize", 0.3, 7, "autocontrast", 0.4, 8),
    ("translateY", 0.4, 3, "sharpness", 0.2, 6),
    ("brightness", 0.9, 6, "color", 0.2, 8),
    ("solarize", 0.5, 2, "invert", 0.0, 3),
    ("equalize", 0.2, 0, "autocontrast", 0.6, 0),
    ("equalize", 0.2, 8, "equalize", 0.6, 4),
    ("color", 0.9, 9, "equalize", 0.6, 6),
    ("autocontrast", 0.8, 4, "solarize", 0.2, 8),
    ("brightness", 0.1, 3, "color", 0.7, 0),
    ("solarize", 0.4, 5, "autocontrast", 0.9, 3),
    ("translateY", 0.9, 9, "translateY", 0.7, 9),
    ("autocontrast", 0.9, 2, "solarize", 0.8, 3),
    ("equalize", 0.8, 8, "invert", 0.1, 3),
    ("translateY", 0.7, 9, "autocontrast", 0.9, 1),
]


def test_policy_table_entry_by_entry():
    assert len(oa.POLICY) == 25
    for i, (got, want) in enumerate(zip(oa.POLICY, EXPECTED, strict=True)):
        assert got == want, f"sub-policy {i}"
    assert oa.SIGNED == SIGNED


def test_policy_table_matches_the_papers_listing_in_torchvision():
    """torchvision transcribes the paper's CIFAR-10 policy in the same order (magnitude None where unused)."""
    tv = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)._policies
    for ours, theirs in zip(oa.POLICY, tv, strict=True):
        for (op, p, level), (name, tp, tlevel) in zip((ours[:3], ours[3:]), theirs, strict=True):
            assert (op.lower(), p) == (name.lower(), tp)
            assert tlevel is None or tlevel == level


def test_magnitudes():
    assert oa.MAGNITUDES["posterize"].tolist() == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
    assert oa.MAGNITUDES["solarize"][0] == 256 and oa.MAGNITUDES["solarize"][9] == 0
    assert oa.MAGNITUDES["translateX"][9] == 150 / 331 and oa.MAGNITUDES["rotate"][9] == 30


# ------------------------------------------------------------------------- pixel-wise operations


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("level", LEVELS)
def test_lut_ops_exact(name, level):
    a = IMAGES[name]
    v = a.astype(np.int64)
    assert np.array_equal(run_op(a, "invert", level), 255 - v)
    thr = mag(256, 0, level)
    assert np.array_equal(run_op(a, "solarize", level), np.where(v < thr, v, 255 - v))
    bits = int(round(mag(8, 4, level)))
    assert np.array_equal(run_op(a, "posterize", level), v & (0xFF & ~(2 ** (8 - bits) - 1)))


def autocontrast_ref(v: np.ndarray) -> np.ndarray:
    """Per band: stretch [min, max] to [0, 255], lut = int(i * scale + offset), clipped."""
    out = v.copy()
    for c in range(v.shape[-1]):
        lo, hi = v[..., c].min(), v[..., c].max()
        if hi > lo:
            scale = 255.0 / (hi - lo)
            out[..., c] = np.clip(np.trunc(v[..., c] * scale - lo * scale), 0, 255)
    return out


def equalize_ref(v: np.ndarray) -> np.ndarray:
    """Per band: step = (pixels - count of the top used value) // 255; value i maps to
    (step // 2 + pixels below i) // step, at most 255 (applying a lut clips it: with step rounded down,
    the top values can overshoot); identity when step is 0 or one value is used."""
    out = v.copy()
    for c in range(v.shape[-1]):
        hist = np.bincount(v[..., c].ravel(), minlength=256)
        used = hist[hist > 0]
        step = (used.sum() - used[-1]) // 255
        if len(used) > 1 and step:
            below = np.concatenate([[0], np.cumsum(hist)[:-1]])
            out[..., c] = np.minimum((step // 2 + below) // step, 255)[v[..., c]]
    return out


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("level", LEVELS)
def test_autocontrast_and_equalize_exact(name, level):
    a = IMAGES[name]
    v = a.astype(np.int64)
    assert np.array_equal(run_op(a, "autocontrast", level), autocontrast_ref(v))
    assert np.array_equal(run_op(a, "equalize", level), equalize_ref(v))
    if name == "gradient":  # really changes something
        assert not np.array_equal(autocontrast_ref(v), v) and not np.array_equal(equalize_ref(v), v)


def blend(degenerate: np.ndarray, v: np.ndarray, factor: float) -> np.ndarray:
    return np.clip(np.trunc(degenerate + factor * (v - degenerate)), 0, 255)


def luma(v: np.ndarray) -> np.ndarray:  # ITU-R 601-2, as PIL's RGB -> L
    return np.round(v[..., 0] * 0.299 + v[..., 1] * 0.587 + v[..., 2] * 0.114)


def smooth(v: np.ndarray) -> np.ndarray:
    """PIL's SMOOTH: 3x3 kernel (1 1 1 / 1 5 1 / 1 1 1) / 13 inside, border pixels unchanged."""
    out = v.astype(np.float64).copy()
    k = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
    acc = sum(k[dy, dx] * v[dy : dy + 30, dx : dx + 30] for dy in range(3) for dx in range(3))
    out[1:-1, 1:-1] = np.round(acc)
    return out


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("sign", [1, -1])
def test_enhance_ops_within_one(name, level, sign):
    """PIL's enhance = blend(degenerate, image, 1 + m * sign), truncated; +-1 for PIL's integer rounding
    of the grey conversion and the smoothing filter."""
    a = IMAGES[name]
    v = a.astype(np.float64)
    f = 1 + mag(0, 0.9, level) * sign
    grey = np.repeat(luma(v)[..., None], 3, axis=-1)
    close(run_op(a, "brightness", level, sign), blend(np.zeros_like(v), v, f))
    close(run_op(a, "color", level, sign), blend(grey, v, f))
    close(run_op(a, "contrast", level, sign), blend(np.full_like(v, int(luma(v).mean() + 0.5)), v, f))
    close(run_op(a, "sharpness", level, sign), blend(smooth(v), v, f))


# ----------------------------------------------------------------------------- geometric operations


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("sign", [1, -1])
def test_translate_exact(name, level, sign):
    """Output pixel x shows the input pixel whose cell holds its centre moved by the shift:
    floor(x + 0.5 + m * W * sign); grey 128 where that falls outside the image."""
    a = IMAGES[name]
    shift = mag(0, 150 / 331, level) * 32 * sign
    src = np.floor(np.arange(32) + 0.5 + shift).astype(np.int64)
    inside = (src >= 0) & (src < 32)
    ref_x = np.where(inside[None, :, None], a[:, np.clip(src, 0, 31)], 128)
    ref_y = np.where(inside[:, None, None], a[np.clip(src, 0, 31)], 128)
    assert np.array_equal(run_op(a, "translateX", level, sign), ref_x)
    assert np.array_equal(run_op(a, "translateY", level, sign), ref_y)


def cubic_weight(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -1 (PIL's transform bicubic)."""
    t = np.abs(t)
    return np.where(t <= 1, t**3 - 2 * t**2 + 1, np.where(t < 2, -(t**3) + 5 * t**2 - 8 * t + 4, 0.0))


def bicubic_sample(a: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Sample `a` (H, W, C) at continuous points (pixel centres at i + 0.5), edges clamped, grey 128
    outside [0, W) x [0, H), the result clipped and truncated to uint8."""
    h, w, _ = a.shape
    out = np.full(xs.shape + (a.shape[-1],), 128.0)
    inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    px, py = xs[inside] - 0.5, ys[inside] - 0.5
    x0, y0 = np.floor(px).astype(np.int64), np.floor(py).astype(np.int64)
    acc = np.zeros((len(px), a.shape[-1]))
    for j in range(-1, 3):
        wy = cubic_weight(py - (y0 + j))
        for i in range(-1, 3):
            wx = cubic_weight(px - (x0 + i))
            pix = a[np.clip(y0 + j, 0, h - 1), np.clip(x0 + i, 0, w - 1)]
            acc += (wx * wy)[:, None] * pix
    # The weights sum to 1 only up to round-off: a hair is added so that whole values (flat regions) stay whole.
    out[inside] = np.clip(np.trunc(acc + 1e-9), 0, 255)
    return out


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("sign", [1, -1])
def test_shear_against_bicubic_sampler(name, level, sign):
    """Output pixel centre (x + .5, y + .5) samples the input at (x + .5 + m (y + .5), y + .5) (shearX).
    Within +-1 and >= 99% exact: PIL evaluates the cubic in Horner form, this sampler as a weighted sum,
    so a value within round-off of a whole number can truncate to either side."""
    a = IMAGES[name]
    m = mag(0, 0.3, level) * sign
    y, x = np.mgrid[0:32, 0:32] + 0.5
    for op, (xs, ys) in (("shearX", (x + m * y, y)), ("shearY", (x, y + m * x))):
        out, ref = run_op(a, op, level, sign), bicubic_sample(a.astype(np.float64), xs, ys)
        close(out, ref)
        assert np.mean(out == ref) >= 0.99, op
        if level == 0:
            assert np.array_equal(out, a)


def rotate_ref(a: np.ndarray, degrees: float) -> np.ndarray:
    """Counter-clockwise on screen (y down) about the image centre: output point p (from the centre)
    shows input point (px cos - py sin, px sin + py cos), nearest pixel; grey 128 outside."""
    h, w, _ = a.shape
    t = math.radians(degrees)
    y, x = np.mgrid[0:h, 0:w] + 0.5
    px, py = x - w / 2, y - h / 2
    sx = np.floor(w / 2 + px * math.cos(t) - py * math.sin(t)).astype(np.int64)
    sy = np.floor(h / 2 + px * math.sin(t) + py * math.cos(t)).astype(np.int64)
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    return np.where(inside[..., None], a[np.clip(sy, 0, h - 1), np.clip(sx, 0, w - 1)], 128)


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("level", LEVELS)
def test_rotate_against_nearest_sampler(name, level):
    """<= 0.5% of pixels may differ: PIL steps through the image in 16.16 fixed point, so a sampling point
    within ~1e-4 pixel of a cell border can land in the neighbouring cell."""
    a = IMAGES[name]
    out, ref = run_op(a, "rotate", level), rotate_ref(a.astype(np.int64), mag(0, 30, level))
    assert np.mean(np.any(out != ref, axis=-1)) <= 0.005
    assert run_op(a, "rotate", level, sign=-1).tolist() == out.tolist()  # rotate takes no sign


def lone_pixel() -> np.ndarray:
    a = np.zeros((32, 32, 3), np.uint8)
    a[16, 28] = 255  # right of the centre
    return a


def bright_spot(a: np.ndarray) -> tuple[int, int]:
    ys, xs = np.nonzero(a[..., 0] == 255)
    return int(ys[0]), int(xs[0])


def test_rotate_turns_counter_clockwise():
    y, x = bright_spot(run_op(lone_pixel(), "rotate", 9).astype(np.uint8))
    assert y < 16 - 4 and x < 28  # moved up (and a little left): counter-clockwise on screen


# -------------------------------------------------------------------------------- random draws


def replay(img: Image.Image, seed: int) -> tuple[Image.Image, list]:
    """The documented draw order, re-enacted: sub-policy, then per op a float64 coin and, when the op
    runs and is signed, a sign (0 -> -1)."""
    torch.manual_seed(seed)
    row = EXPECTED[int(torch.randint(25, ()))]
    draws: list = []
    for op, p, level in (row[:3], row[3:]):
        if float(torch.rand((), dtype=torch.float64)) < p:
            sign = 2 * int(torch.randint(2, ())) - 1 if op in SIGNED else 1
            draws.append((op, sign))
            img = oa.apply_op(img, op, level, sign)
    return img, draws


def test_draw_order_and_generator_state():
    aug = oa.OfficialCIFAR10AutoAugment()
    img = Image.fromarray(IMAGES["noise"])
    applied = []
    for seed in range(200):
        ref, draws = replay(img, seed)
        state = torch.get_rng_state()
        torch.manual_seed(seed)
        out = aug(img)
        assert torch.equal(torch.get_rng_state(), state), seed  # same draws, no more, no fewer
        assert np.array_equal(np.asarray(out), np.asarray(ref)), seed
        applied += draws
    signs = {(op, s) for op, s in applied if op in SIGNED}
    assert {s for _, s in signs} == {-1, 1}
    assert {op for op, _ in signs} >= {"shearY", "translateX", "translateY", "color", "brightness", "sharpness"}


def test_same_seed_same_output_on_tensors():
    aug = oa.OfficialCIFAR10AutoAugment()
    x = torch.from_numpy(IMAGES["noise"]).permute(2, 0, 1).contiguous()
    torch.manual_seed(5)
    first = [aug(x) for _ in range(20)]
    torch.manual_seed(5)
    assert all(torch.equal(a, aug(x)) for a in first)
    assert all(a.dtype == torch.uint8 and a.shape == (3, 32, 32) for a in first)
    assert sum(not torch.equal(a, x) for a in first) >= 10


def test_sub_policies_are_uniform(monkeypatch):
    seen: Counter = Counter()
    monkeypatch.setattr(oa, "apply_subpolicy", lambda img, k: seen.update([k]) or img)
    aug, img = oa.OfficialCIFAR10AutoAugment(), Image.fromarray(IMAGES["noise"])
    torch.manual_seed(0)
    n = 10000
    for _ in range(n):
        aug(img)
    sd = math.sqrt(n / 25 * 24 / 25)
    assert set(seen) == set(range(25)) and all(abs(c - n / 25) < 4.5 * sd for c in seen.values())


def test_signs_change_enhance_direction():
    img = Image.fromarray(IMAGES["gradient"])
    means = set()
    for seed in range(40):  # sub-policy 13: brightness p=.9 level 6, then colour p=.2
        torch.manual_seed(seed)
        means.add(np.sign(np.asarray(oa.apply_subpolicy(img, 13)).astype(float).mean() - IMAGES["gradient"].mean()))
    assert {-1.0, 1.0} <= means


def test_rotate_never_turns_clockwise_in_the_policy():
    img = Image.fromarray(lone_pixel())
    moved = 0
    for seed in range(60):  # sub-policy 1: rotate p=.7 level 2 (6.7 degrees), translateX p=.3
        torch.manual_seed(seed)
        out = np.asarray(oa.apply_subpolicy(img, 1))
        if (out[..., 0] == 255).sum() == 1:
            y, _ = bright_spot(out)
            assert y <= 16
            moved += y < 16
    assert moved >= 20


# ------------------------------------------------------------------------------------- pipelines


def test_per_image_transform_and_imagefolder_use_it():
    tf = per_image_transform(32, True, 4, 128, True, "official_cifar10")
    assert isinstance(tf.transforms[-1], oa.OfficialCIFAR10AutoAugment)
    assert isinstance(autoaugment("cifar10"), v2.AutoAugment)
    x = torch.from_numpy(IMAGES["noise"]).permute(2, 0, 1).contiguous()
    torch.manual_seed(0)
    out = tf(x)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    a = AugmentConfig(autoaugment=True, autoaugment_policy="official_cifar10")
    ftf = train_transform(a, 24, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert any(isinstance(t, oa.OfficialCIFAR10AutoAugment) for t in ftf.transforms)
    y = ftf(Image.fromarray(IMAGES["gradient"]))
    assert y.dtype == torch.float32 and y.shape == (3, 24, 24)


def test_recipe_trains_a_step_with_the_official_policy(tmp_path):
    r = from_dict(
        {
            "model": {"name": "resnet18", "width": 4},
            "data": {
                "name": "fake",
                "fake_size": 32,
                "batch_size": 16,
                "eval_batch_size": 64,
                "limit_test": 16,
                "augment": {"autoaugment": True, "autoaugment_policy": "official_cifar10", "cutout": 16},
            },
            "train": {"epochs": 1, "lr": 0.05, "seed": 0, "threads": 1},
        }
    )
    res = fit(r, tmp_path / "run", quiet=True)
    assert res.last.exists()
