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


def n_workers(requested: int = 0) -> int:
    """0 means one worker per CPU this process may use."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


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
        window = max(2, workers * chunksize * 2)
        with ctx.Pool(workers, initializer=initializer, initargs=initargs) as pool:
            pending: deque = deque()
            for item in items:
                pending.append(pool.apply_async(fn, (item,)))
                if len(pending) >= window:
                    yield pending.popleft().get()
                    bar.update()
            while pending:
                yield pending.popleft().get()
                bar.update()
    finally:
        bar.close()
