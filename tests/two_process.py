"""Running a test worker in 2 CPU processes (gloo) and collecting what each saved: shared by the 2-process
gradient tests of the losses."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(worker: Callable, out_dir: Path) -> list:
    """`worker(rank, world, port, out_dir)` in 2 processes; each saves `out_dir/rank<r>.pt`, returned in rank order."""
    mp.spawn(worker, args=(2, free_port(), str(out_dir)), nprocs=2, join=True)
    return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(2)]
