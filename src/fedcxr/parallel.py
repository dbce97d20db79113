"""Ordered, deterministic parallel map over CPU cores with a progress bar."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import get_context
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _run_batch(fn: Callable[[T], R], batch: list[T]) -> list[R]:
    return [fn(item) for item in batch]


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def n_workers(requested: int = 0) -> int:
    """0 means one worker per CPU this process may use."""
    return requested if requested > 0 else available_cores()


def pmap(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    total: int | None = None,
    workers: int = 0,
    desc: str = "",
    chunksize: int = 4,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
) -> Iterator[R]:
    """Yield fn(item) in input order, computed by `workers` processes (1 = in this process).

    Results come back in order, so output files do not depend on scheduling.
    """
    workers = n_workers(workers)
    bar = tqdm(
        total=total, desc=desc, unit="img", disable=None, mininterval=1.0, dynamic_ncols=True
    )
    try:
        if workers == 1:
            if initializer is not None:
                initializer(*initargs)
            for item in items:
                yield fn(item)
                bar.update()
            return
        # forkserver: no inherited threads or locks from the parent (torch, tqdm) in workers.
        # A bounded window of pending tasks keeps memory flat when items carry image bytes
        # (Pool.imap would read the whole input ahead).
        ctx = get_context("forkserver")
        window = max(2, workers * 3)  # batches in flight
        with ctx.Pool(workers, initializer=initializer, initargs=initargs) as pool:
            pending: deque = deque()
            for batch in _batches(items, chunksize):
                pending.append(pool.apply_async(_run_batch, (fn, batch)))
                if len(pending) >= window:
                    results = pending.popleft().get()
                    yield from results
                    bar.update(len(results))
            while pending:
                results = pending.popleft().get()
                yield from results
                bar.update(len(results))
    finally:
        bar.close()
