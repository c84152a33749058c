"""Reproducible DataLoaders: the order of epoch k depends only on (seed, k).

Every loader's `sampler` is an `EpochBatchSampler` with `set_epoch(epoch)`, distributed or not, so the
engine calls `loader.sampler.set_epoch(epoch)` before each epoch. Epoch k is shuffled by a generator
seeded from (seed, k) alone, never from a generator that advances across epochs, so a run resumed
at epoch k sees exactly the batches an uninterrupted run sees. The loader never draws from the global
torch RNG (it gets its own generator), so iterating it does not shift the RNG states the engine
saves; worker processes, when used, are seeded from (seed, epoch, rank, worker id) for the same
reason (per-image AutoAugment and the imagefolder pipeline draw from them).

The loader fetches whole batches (`sampler` yields index lists, `batch_size=None`): for in-memory
tensors a batch is one indexing op instead of B item calls and a stack.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torch.utils.data._utils.collate import default_collate

# Per-epoch generator seed = seed * SEED_STRIDE + epoch: with a plain `seed + epoch` (DistributedSampler's
# formula) runs with seeds 0 and 1 would replay each other's epochs shifted by one.
SEED_STRIDE = 1_000_003


class EpochSampler(Sampler[int]):
    """Indices 0..n-1, shuffled per epoch by torch.randperm with a generator seeded seed*SEED_STRIDE + epoch."""

    def __init__(self, n: int, shuffle: bool, seed: int) -> None:
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * SEED_STRIDE + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class EpochBatchSampler(Sampler[list[int]]):
    """Groups an index sampler (EpochSampler or DistributedSampler, in `.sampler`) into batches."""

    def __init__(
        self, sampler: EpochSampler | DistributedSampler, batch_size: int, drop_last: bool, seed: int = 0, rank: int = 0
    ) -> None:
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.seed, self.rank, self.epoch = seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for i in self.sampler:
            batch.append(i)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


class BatchFetcher(Dataset):
    """`fetcher[list of indices]` -> the collated batch; `.dataset` is the dataset it reads."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(cast(Sized, self.dataset))  # torch's Dataset does not declare __len__

    def __getitem__(self, indices: list[int]) -> Any:
        get_batch = getattr(self.dataset, "get_batch", None)
        batch = get_batch(indices) if get_batch is not None else None
        return batch if batch is not None else default_collate([self.dataset[i] for i in indices])


class WorkerSeeder:
    """worker_init_fn: seeds torch, numpy and random in a worker from (seed, epoch, rank, worker id).

    It holds the batch sampler and reads its epoch when the workers start (at `iter(loader)`, after
    the engine's set_epoch), so the seeds do not depend on how many epochs this process has run.
    """

    def __init__(self, batch_sampler: EpochBatchSampler) -> None:
        self.batch_sampler = batch_sampler

    def __call__(self, worker_id: int) -> None:
        b = self.batch_sampler
        key = f"{b.seed}/{b.epoch}/{b.rank}/{worker_id}".encode()
        s = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1
        torch.manual_seed(s)
        np.random.seed(s % 2**32)
        random.seed(s)


@dataclass(frozen=True)
class Shard:
    """Read one shard of the data per process (torch's DistributedSampler): this process is `rank` of
    `num_replicas`, both taken from the process group when None."""

    num_replicas: int | None = None
    rank: int | None = None


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    shard: Shard | None = None,
) -> DataLoader:
    """DataLoader over `dataset` whose `.sampler` (an EpochBatchSampler) has `set_epoch`.

    shard: read only this process's shard (DistributedSampler, seeded the same way); None = all of
    it. `workers` is ignored (0) for datasets that fetch a batch as one tensor op (`get_batch`):
    worker processes would only add copies there.
    """
    index_sampler: EpochSampler | DistributedSampler
    if shard is not None:
        index_sampler = DistributedSampler(
            dataset,
            num_replicas=shard.num_replicas,
            rank=shard.rank,
            shuffle=shuffle,
            seed=seed * SEED_STRIDE,
            drop_last=drop_last,
        )
        rank = index_sampler.rank
    else:
        index_sampler = EpochSampler(len(cast(Sized, dataset)), shuffle, seed)  # Dataset does not declare __len__
        rank = 0
    batches = EpochBatchSampler(index_sampler, batch_size, drop_last, seed=seed, rank=rank)
    if getattr(dataset, "get_batch", None) is not None and getattr(dataset, "transform", None) is None:
        workers = 0
    return DataLoader(
        BatchFetcher(dataset),
        batch_size=None,
        sampler=batches,
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=WorkerSeeder(batches) if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )
