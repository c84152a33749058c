"""Data sets by name, deterministic splits, batched augmentation and reproducible loaders.

    bundle = build_data(recipe.data)                   # DataBundle
    loader = bundle.loader("train", 128, shuffle=True, seed=0)
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)                # epoch k's order depends only on (seed, k)
        for x, y in loader:
            x = bundle.prepare(x.to(device), train=True)   # augmentation + normalization on the device

Modules: `registry` (names -> loaders), `sources` (in-memory data sets), `imagefolder` (files + PIL),
`arrays` (uint8 tensors, the .npz reader), `splits` (stratified splits), `augment` (batched crop, flip,
Cutout; per-image AutoAugment), `loader` (epoch-seeded samplers), `bundle` (DataBundle, build_data).
"""

from sdtool.data.arrays import load_images_npz
from sdtool.data.bundle import DataBundle, build_data
from sdtool.data.registry import dataset_names

__all__ = ["DataBundle", "build_data", "dataset_names", "load_images_npz"]
