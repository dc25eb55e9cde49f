"""Run one function over modules on a few threads, each with single-threaded math libraries.

Why: per-module work is many medium-sized ops plus serial steps (numpy partition, LAPACK on small
matrices); on a small CPU, modules side by side on 1-thread workers keep every core busy, and
avoid the busy-waiting collapse of multi-threaded OpenMP / OpenBLAS calls when threads outnumber
free cores (measured here: 10-50x slower when another process competes). torch ops and numpy's
sorts release the GIL. Results come back in input order.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def map_modules(
    fn: Callable[[int, T], R],
    items: Sequence[T],
    *,
    workers: int | None = None,
    desc: str = "",
    progress: bool = False,
) -> list[R]:
    """[fn(i, item) for i, item in enumerate(items)], on `workers` threads (1: in this thread)."""
    workers = default_workers() if workers is None else max(1, int(workers))
    bar = tqdm(total=len(items), desc=desc, disable=not progress)
    try:
        if workers == 1 or len(items) <= 1:
            out = []
            for i, it in enumerate(items):
                out.append(fn(i, it))
                bar.update(1)
            return out
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            # numpy's and scipy's OpenBLAS (and OpenMP) to one thread too, for the run only.
            with threadpool_limits(limits=1), ThreadPoolExecutor(workers) as ex:
                futures = [ex.submit(fn, i, it) for i, it in enumerate(items)]
                for f in futures:
                    f.add_done_callback(lambda _f: bar.update(1))
                return [f.result() for f in futures]
        finally:
            torch.set_num_threads(prev)
    finally:
        bar.close()
