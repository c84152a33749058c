"""Training augmentation: batched tensor ops for in-memory data, per-image pipelines for the rest.

The official recipe is RandomCrop(32, padding 4, fill 128) -> horizontal flip -> AutoAugment (CIFAR10
policy) -> ToTensor -> Cutout(1 hole, 16 px) -> Normalize. Without AutoAugment, crop, flip and Cutout
are done here on a whole batch on the training device (one gather, one mask), which gives the same
distribution as the per-image PIL ops without any per-image Python work. AutoAugment has no batched
form, so when it is on, crop + flip + AutoAugment run per image on uint8 tensors
(`per_image_transform`) and only /255, Cutout and Normalize stay batched.

AutoAugment policies (`autoaugment`): `cifar10`, `imagenet` and `svhn` are torchvision's
`v2.AutoAugment`; `official_cifar10` is the CIFAR-10 policy exactly as the self-distillation authors'
code applies it (`official_autoaugment.py`: grey fill, bicubic shears, counter-clockwise rotations
only, PIL's enhance ops). Both draw from torch's global CPU generator.

Randomness: the batched ops draw from the default generator of the batch's device (so an engine that
saves and restores torch RNG states resumes exactly) unless a `generator` on that device is passed.
Draw order per call: crop rows, crop columns, flip coin (random_crop_flip); hole row, hole column (cutout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from sdtool.data.official_autoaugment import OfficialCIFAR10AutoAugment

POLICIES = {  # torchvision's policies
    "cifar10": v2.AutoAugmentPolicy.CIFAR10,
    "imagenet": v2.AutoAugmentPolicy.IMAGENET,
    "svhn": v2.AutoAugmentPolicy.SVHN,
}
OFFICIAL_CIFAR10 = "official_cifar10"


def autoaugment(policy: str) -> torch.nn.Module:
    """The per-image AutoAugment op for a recipe's `autoaugment_policy` value (PIL image or uint8 tensor)."""
    if policy == OFFICIAL_CIFAR10:
        return OfficialCIFAR10AutoAugment()
    return v2.AutoAugment(POLICIES[policy])


def random_crop_flip(
    x: torch.Tensor,
    padding: int,
    fill: int,
    crop: bool = True,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample random crop (pad by `padding` with `fill`, take an H x W window) and horizontal flip.

    x: (N, C, H, W), any dtype (uint8 here, so `fill` is exact). Returns a new (N, C, H, W) tensor.
    Offsets are uniform in [0, 2 * padding] like torchvision's RandomCrop; each sample is flipped with
    probability 1/2. Flipping the window is folded into the column index, so both are one `gather`
    over the flattened padded image (several times faster than 4-D advanced indexing on the CPU).
    """
    n, c, h, w = x.shape
    dev = x.device
    if crop and padding > 0:
        src = F.pad(x, (padding, padding, padding, padding), value=fill)
        oy = torch.randint(0, 2 * padding + 1, (n, 1), device=dev, generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (n, 1), device=dev, generator=generator)
    else:
        src = x
        oy = ox = torch.zeros(n, 1, dtype=torch.long, device=dev)
    rows = oy + torch.arange(h, device=dev)  # (N, H) rows of the padded image
    cols = torch.arange(w, device=dev).expand(n, w)  # (N, W)
    if flip:
        flipped = torch.rand(n, 1, device=dev, generator=generator) < 0.5
        cols = torch.where(flipped, w - 1 - cols, cols)
    cols = cols + ox
    flat = (rows[:, :, None] * src.shape[-1] + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return src.reshape(n, c, -1).gather(2, flat).view(n, c, h, w)


def cutout(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero one square hole per sample, as the official Cutout (DeVries & Taylor).

    x: float (N, C, H, W) on the [0, 1] scale. The hole's centre (cy, cx) is uniform over the whole
    image and the hole covers rows [cy - size//2, cy + size//2) and the same columns, clipped at the
    borders, so it is size x size when inside the image and smaller at the edges. Returns a new tensor.
    """
    n, _, h, w = x.shape
    dev = x.device
    cy = torch.randint(0, h, (n, 1), device=dev, generator=generator)
    cx = torch.randint(0, w, (n, 1), device=dev, generator=generator)
    half = size // 2
    ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
    in_y = (ys >= cy - half) & (ys < cy + half)  # (N, H)
    in_x = (xs >= cx - half) & (xs < cx + half)  # (N, W)
    keep = ~(in_y[:, :, None] & in_x[:, None, :])  # (N, H, W)
    return x * keep[:, None].to(x.dtype)  # a multiply is cheaper than a broadcast masked_fill


def normalize_(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """In place (x - mean) / std with mean, std of shape (1, C, 1, 1); the same float ops as
    torchvision's Normalize, so the results are bit-identical."""
    return x.sub_(mean).div_(std)


def per_image_transform(size: int, crop: bool, padding: int, fill: int, flip: bool, policy: str) -> v2.Compose:
    """Crop -> flip -> AutoAugment for one uint8 (C, H, W) tensor (the official order); uint8 out."""
    ops: list = []
    if crop and padding > 0:
        ops.append(v2.RandomCrop(size, padding=padding, fill=fill))
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    ops.append(autoaugment(policy))
    return v2.Compose(ops)


class Cutout(torch.nn.Module):
    """`cutout` for one float (C, H, W) image, for per-image pipelines (uses the global CPU RNG)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return cutout(img[None], self.size)[0]
