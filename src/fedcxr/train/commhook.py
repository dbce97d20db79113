"""A DDP communication hook: torch's default all-reduce, counting the bytes each rank sends in."""

# No `from __future__ import annotations`: DDP compares the hook's annotations with
# dist.GradBucket and torch.futures.Future[torch.Tensor] at registration, so they must be real.

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks


@dataclass
class AllReduceCounter:
    """Hook state: the process group (None = WORLD) and what this rank has all-reduced so far.

    `bytes` counts the gradient bucket payload handed to all_reduce (numel x element size),
    per rank and per call; what the backend puts on the wire (ring or tree traffic, headers)
    is a backend-dependent multiple of it.
    """

    process_group: dist.ProcessGroup | None = None
    bytes: int = 0
    calls: int = 0

    def add(self, tensor: torch.Tensor) -> None:
        self.bytes += tensor.numel() * tensor.element_size()
        self.calls += 1

    def reset(self) -> None:
        self.bytes = 0
        self.calls = 0


def counting_allreduce_hook(
    state: AllReduceCounter, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """default_hooks.allreduce_hook (average over ranks) after adding the bucket to `state`."""
    state.add(bucket.buffer())
    return default_hooks.allreduce_hook(state.process_group, bucket)  # type: ignore[arg-type]


def register_counter(
    model: torch.nn.Module, process_group: dist.ProcessGroup | None = None
) -> AllReduceCounter:
    """Register counting_allreduce_hook on a DistributedDataParallel model; return its counter."""
    register = getattr(model, "register_comm_hook", None)
    if not callable(register):
        raise TypeError(
            f"expected a DistributedDataParallel model to register the all-reduce counter on, "
            f"found {type(model).__name__}"
        )
    counter = AllReduceCounter(process_group)
    register(counter, counting_allreduce_hook)
    return counter
