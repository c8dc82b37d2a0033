"""Running a test worker in 2 CPU processes (gloo) and collecting what each saved: shared by the 2-process
gradient tests of the losses."""
from __future__ import annotations

import contextlib
import datetime
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@contextlib.contextmanager
def process_group(rank: int, world: int, init_method: str) -> Iterator[None]:
    """A gloo group for the worker's body. The rendezvous is a file in the test's folder, not a TCP port picked in
    advance (another process may take that port before rank 0 binds it). The closing barrier keeps either process
    from tearing its connections down while the other still uses them: gloo's I/O thread aborts the process
    (SIGABRT) on "connection reset by peer", which CI saw once in these tests."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_two_processes(worker: Callable, out_dir: Path) -> list:
    """`worker(rank, world, init_method, out_dir)` in 2 processes (`init_method` for `process_group`); each saves
    `out_dir/rank<r>.pt`, returned in rank order."""
    init_method = f"file://{Path(out_dir).resolve() / 'rendezvous'}"
    mp.spawn(worker, args=(2, init_method, str(out_dir)), nprocs=2, join=True)
    return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(2)]
