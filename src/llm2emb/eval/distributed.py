"""Data-parallel encoding for evaluation: under N processes (`accelerate launch -m llm2emb eval ...`, `torchrun`,
or the processes of a multi-process study cell) every text list is cut into N contiguous shards, each process
encodes its own shard and the shards are gathered back in order, so every process holds all vectors and
computes the same metrics; only the main process writes results and cache entries.

Equal to one process up to float rounding: each shard is batched on its own (other padding partners, other
batch shapes), so vectors agree to ~1e-6, not bit for bit; metrics computed from them agree unless two scores
tie within that rounding.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence

import numpy as np


def join_process_group() -> tuple[int, int]:
    """(rank, world size) of this launch, joining the process group torchrun / accelerate describe in the
    environment (WORLD_SIZE > 1) when nobody has yet: gloo on CPU, nccl with the process's own GPU."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous share of n rows (the first n % world ranks take one more)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def encode_data_parallel(encode: Callable[[list[str]], np.ndarray], texts: Sequence[str]) -> np.ndarray:
    """`encode(texts)` split across the process group's ranks and gathered in order (one process: a plain call).
    Every rank must call it with the same texts."""
    rank, world = rank_and_world()
    texts = list(texts)
    if world == 1 or len(texts) < world:
        return encode(texts)
    import torch.distributed as dist

    start, end = shard_bounds(len(texts), rank, world)
    mine = np.ascontiguousarray(encode(texts[start:end]))
    parts: list[np.ndarray | None] = [None] * world
    dist.all_gather_object(parts, mine)
    return np.concatenate(parts, axis=0)


def finish() -> None:
    """Leave the process group cleanly: a barrier first, so no process tears down connections another still
    uses (gloo aborts on "connection reset by peer")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
