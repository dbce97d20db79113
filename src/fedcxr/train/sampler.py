"""A batch sampler that makes W-process DDP training take the same steps as one process."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def global_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Epoch `epoch`'s shuffled global batches: randperm(n) from a generator seeded seed+epoch.

    The last batch holds the n % batch_size leftover examples (no example is dropped).
    """
    if n < 0:
        raise ValueError(f"expected a dataset size >= 0, found {n}")
    if batch_size < 1:
        raise ValueError(f"expected batch_size >= 1, found {batch_size}")
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    return [order[start : start + batch_size] for start in range(0, n, batch_size)]


def rank_slice(batch: list[int], rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s contiguous share of a global batch (len(batch) // world_size examples).

    A batch whose length is not a multiple of world_size (only ever the epoch's last one) is
    cut to the largest multiple first, so every rank averages over the same number of
    examples and DDP's mean of per-rank means equals the global mean.
    """
    share = len(batch) // world_size
    return batch[rank * share : (rank + 1) * share]


class GlobalBatchSampler(Sampler[list[int]]):
    """Rank r of W's slice of each global batch; use as DataLoader(batch_sampler=...).

    Every rank draws the same global permutation per epoch (seeded with seed + epoch, see
    `global_batches`) and takes its contiguous batch_size / W examples of each global batch,
    so the W slices of step k concatenate, in rank order, to the batch one process would
    train on. With world_size=1 it yields exactly the single-process batches. The last
    global batch is cut to a multiple of W (at most W - 1 examples skipped per epoch, none
    when W=1) and dropped when that leaves nothing, so all ranks take the same number of
    steps. Call set_epoch(e) before each epoch.
    """

    def __init__(
        self, n: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0
    ) -> None:
        if world_size < 1:
            raise ValueError(f"expected world_size >= 1, found {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"expected 0 <= rank < world_size={world_size}, found rank={rank}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(
                f"expected a global batch_size divisible by the world size {world_size} "
                f"(each rank takes batch_size / world_size examples), found batch_size="
                f"{batch_size}"
            )
        if n < 0:
            raise ValueError(f"expected a dataset size >= 0, found {n}")
        self.n = n
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    @property
    def per_rank_batch(self) -> int:
        return self.batch_size // self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        for batch in global_batches(self.n, self.batch_size, self.seed, self.epoch):
            mine = rank_slice(batch, self.rank, self.world_size)
            if mine:
                yield mine

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest >= self.world_size else 0)
