"""AutoAugment's CIFAR-10 policy as the self-distillation authors' training code applies it.

Their code uses the widely copied PIL implementation of the AutoAugment paper's (Cubuk et al., CVPR
2019) CIFAR-10 policy. It differs from torchvision's `AutoAugment(CIFAR10)` in ways that change the
training distribution: rotations turn counter-clockwise only (no random sign); shear, translate and
rotate fill uncovered pixels with grey 128 instead of black; shears resample bicubically; solarize
thresholds on a 256 scale (level 0 leaves the image unchanged; torchvision's 255 turns white pixels
black); the enhance ops are PIL's ImageEnhance blends.

Policy: 25 sub-policies (`POLICY`), each two (operation, probability, level 0-9) entries. Per image a
sub-policy is chosen uniformly and its two operations are applied in order, each with its probability.
A level indexes 10 evenly spaced magnitudes (`MAGNITUDES`, numpy linspace, float64). Shear, translate
and the four enhance ops take a random sign (+1 or -1) drawn only when the operation is applied.

Randomness comes from torch's global generator (never Python's `random`), so the training engine's
saved RNG states make a resumed run identical and DataLoader workers' per-worker seeds apply. Draw order
per image: `torch.randint(25, ())` for the sub-policy; then for each of its two operations, in order,
one `torch.rand((), dtype=float64)` coin (applied when below the probability) and, only when applied
and signed, one `torch.randint(2, ())` for the sign (0 -> -1, 1 -> +1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

FILL = 128  # grey for pixels that shear, translate and rotate uncover
LEVELS = 10

# (op1, p1, level1, op2, p2, level2), in the authors' code's order (the paper's CIFAR-10 policy).
POLICY: tuple[tuple[str, float, int, str, float, int], ...] = (
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
)

_UNUSED = np.zeros(LEVELS)
MAGNITUDES: dict[str, np.ndarray] = {
    "shearX": np.linspace(0, 0.3, LEVELS),
    "shearY": np.linspace(0, 0.3, LEVELS),
    "translateX": np.linspace(0, 150 / 331, LEVELS),  # a fraction of the image width
    "translateY": np.linspace(0, 150 / 331, LEVELS),  # a fraction of the image height
    "rotate": np.linspace(0, 30, LEVELS),  # degrees, counter-clockwise
    "color": np.linspace(0.0, 0.9, LEVELS),
    "contrast": np.linspace(0.0, 0.9, LEVELS),
    "sharpness": np.linspace(0.0, 0.9, LEVELS),
    "brightness": np.linspace(0.0, 0.9, LEVELS),
    "posterize": np.round(np.linspace(8, 4, LEVELS)).astype(np.int64),  # bits kept
    "solarize": np.linspace(256, 0, LEVELS),  # pixels at or above the threshold are inverted
    "autocontrast": _UNUSED,
    "equalize": _UNUSED,
    "invert": _UNUSED,
}

SIGNED = frozenset({"shearX", "shearY", "translateX", "translateY", "color", "contrast", "sharpness", "brightness"})
_ENHANCERS = {
    "color": ImageEnhance.Color,
    "contrast": ImageEnhance.Contrast,
    "sharpness": ImageEnhance.Sharpness,
    "brightness": ImageEnhance.Brightness,
}
_PLAIN: dict[str, Callable[[Image.Image], Image.Image]] = {
    "autocontrast": ImageOps.autocontrast,
    "equalize": ImageOps.equalize,
    "invert": ImageOps.invert,
}


def _affine(op: str, m: float, size: tuple[int, int]) -> tuple[float, ...]:
    """PIL AFFINE data (a, b, c, d, e, f): output pixel (x, y) samples input (ax + by + c, dx + ey + f)."""
    w, h = size
    return {
        "shearX": (1, m, 0, 0, 1, 0),
        "shearY": (1, 0, 0, m, 1, 0),
        "translateX": (1, 0, m * w, 0, 1, 0),
        "translateY": (1, 0, 0, 0, 1, m * h),
    }[op]


def _rotate(img: Image.Image, degrees: float) -> Image.Image:
    # Rotating RGBA marks the uncovered corners with alpha 0; compositing over grey fills them with 128.
    rot = img.convert("RGBA").rotate(degrees)  # nearest, counter-clockwise, about the centre
    grey = Image.new("RGBA", rot.size, (FILL,) * 4)
    return Image.composite(rot, grey, rot).convert(img.mode)


def apply_op(img: Image.Image, op: str, level: int, sign: int = 1) -> Image.Image:
    """One operation of the policy at `level` (0-9) with `sign` (+1/-1; ignored by unsigned ops)."""
    m = float(MAGNITUDES[op][level])
    if op in ("shearX", "shearY", "translateX", "translateY"):
        # Shears resample bicubically; translations keep PIL's default, nearest.
        resample = Image.Resampling.BICUBIC if op.startswith("shear") else Image.Resampling.NEAREST
        fill = (FILL,) * len(img.getbands())
        return img.transform(
            img.size, Image.Transform.AFFINE, _affine(op, m * sign, img.size), resample, fillcolor=fill
        )
    if op == "rotate":
        return _rotate(img, m)
    if op in _ENHANCERS:
        return _ENHANCERS[op](img).enhance(1 + m * sign)
    if op == "posterize":
        return ImageOps.posterize(img, int(MAGNITUDES[op][level]))
    if op == "solarize":
        # Pixels are integers, so `v < t` equals `v < ceil(t)`: the fractional thresholds stay exact.
        return ImageOps.solarize(img, math.ceil(m))
    return _PLAIN[op](img)


def apply_subpolicy(img: Image.Image, index: int) -> Image.Image:
    """Sub-policy `index` of `POLICY`: two coin flips (and signs) from torch's global generator."""
    op1, p1, level1, op2, p2, level2 = POLICY[index]
    for op, p, level in ((op1, p1, level1), (op2, p2, level2)):
        if float(torch.rand((), dtype=torch.float64)) < p:
            sign = 2 * int(torch.randint(2, ())) - 1 if op in SIGNED else 1
            img = apply_op(img, op, level, sign)
    return img


def _to_pil(x: torch.Tensor) -> Image.Image:
    if x.dtype != torch.uint8 or x.ndim != 3 or x.shape[0] not in (1, 3):
        raise TypeError(
            f"official AutoAugment takes a uint8 (C, H, W) tensor with 1 or 3 channels, got {x.dtype} {tuple(x.shape)}"
        )
    a = x.detach().cpu().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(a[..., 0] if a.shape[-1] == 1 else a))


def _to_tensor(img: Image.Image) -> torch.Tensor:
    a = np.array(img)  # a copy, so the tensor owns writable memory
    return torch.from_numpy(a[:, :, None] if a.ndim == 2 else a).permute(2, 0, 1).contiguous()


class OfficialCIFAR10AutoAugment(torch.nn.Module):
    """The authors' CIFAR-10 AutoAugment for one image: a PIL image (returned as PIL) or a uint8
    (C, H, W) tensor (converted to PIL and back, as torchvision's v2.AutoAugment takes either)."""

    def forward(self, img: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        index = int(torch.randint(len(POLICY), ()))
        if isinstance(img, torch.Tensor):
            return _to_tensor(apply_subpolicy(_to_pil(img), index))
        return apply_subpolicy(img, index)
