"""Deterministic, class-stratified index splits (validation hold-out, limits, the digits test split).

Written with numpy instead of scikit-learn's `train_test_split` because it must never fail on small
or unbalanced data (a class with one image, fewer picks than classes) and its result must not change
with a library upgrade: it is recorded in checkpoints as (size, seed) plus a fingerprint.
"""

from __future__ import annotations

import hashlib

import numpy as np

from sdtool.errors import SdtoolError

# Seed of the fixed `limit_train` / `limit_test` samples: independent of every recipe seed, so a
# limited test set is the same images in every run.
LIMIT_SEED = 0


def stratified_split(labels: np.ndarray, n_pick: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pick `n_pick` of the indices 0..N-1 keeping class proportions; returns (picked, rest), sorted.

    Each class c gets n_pick * count_c / N picks, rounded by largest remainder (ties to the lower
    label) so the total is exact; within a class the picks are the first ones of one seeded
    permutation of all N indices, so (labels, n_pick, seed) fixes the result.
    """
    labels = np.asarray(labels)
    n = len(labels)
    assert 0 <= n_pick <= n
    perm = np.random.default_rng(seed).permutation(n)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (n_pick / n) if n else counts * 0.0
    quota = np.floor(exact).astype(np.int64)
    short = n_pick - int(quota.sum())
    quota[np.argsort(-(exact - quota), kind="stable")[:short]] += 1
    in_perm = labels[perm]
    picked = np.concatenate(
        [perm[in_perm == c][:q] for c, q in zip(classes, quota, strict=True)] or [np.zeros(0, np.int64)]
    )
    picked = np.sort(picked).astype(np.int64)
    keep = np.ones(n, dtype=bool)
    keep[picked] = False
    return picked, np.flatnonzero(keep).astype(np.int64)


def val_count(val_size: float, n_train: int) -> int:
    """`data.val_size` as a count: a fraction (< 1) of the training split, or a count (>= 1)."""
    n = max(1, round(val_size * n_train)) if val_size < 1 else int(val_size)
    if n >= n_train:
        raise SdtoolError(
            f"data.val_size={val_size:g} holds out {n} of the {n_train} training images and "
            f"leaves none to train on; use a fraction below 1 or a count below {n_train}"
        )
    return n


def limit(labels: np.ndarray, n: int | None, key: str) -> np.ndarray:
    """Positions (sorted) of a fixed stratified sample of `n` labels; all of them when n is None or >= N."""
    if n is None or n >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    if n < 1:
        raise SdtoolError(f"data.{key} must be at least 1 (or null for no limit), got {n}")
    return stratified_split(labels, n, LIMIT_SEED)[0]


def split_fingerprint(labels: np.ndarray, picked: np.ndarray) -> str:
    """Short hash of (the labels of the set split, the picked positions).

    Size and seed alone cannot tell that a validation split was cut from another training set (more
    or fewer images, other labels or label order): the fingerprint can, so early-exit fitting warns
    when its split is not the one held out in training. Images are not hashed (that would mean
    reading every image twice), so two sets with identical labels in identical order look alike.
    """
    h = hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes())
    h.update(np.asarray(picked, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]
