"""Gathering embeddings across processes without losing their gradients.

Contrastive losses get their in-batch negatives from every process's batch, so each process needs the
other processes' embeddings. `accelerator.gather` / `dist.all_gather` return tensors cut off from the
graph: the loss then never pushes a process's *own* passages away from the *other* processes' queries
(a known bug in F2LLM's trainer). `gather_with_grad` is an autograd function whose backward sums, over
all processes, the gradient each process computed for every slice, and hands each process the part that
belongs to its own rows.

Why that sum is the right thing under DDP (and DeepSpeed / FSDP, which also *average* gradients): let
process r compute a loss L_r from its own rows and the gathered tensor. After the backward each process
holds sum_r' dL_r'/d(own rows), the parameter gradients are averaged over the N processes, and the result
is the gradient of (1/N) * sum_r L_r. So a per-process loss is exact as long as **the mean over processes
of the per-process losses equals the loss of one process on the concatenated batch**. Two kinds of terms
have that property and need no scaling at all:
  * a term computed identically on every process from gathered tensors (e.g. spread-out over all rows);
  * a mean over this process's rows, when every process has the same number of rows. With uneven row
    counts B_r the mean must be weighted by N * B_r / sum(B); `row_weight` gives that factor.

Every collective here must be called by all processes in the same order, like any torch.distributed call.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a torch.distributed process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """Number of rows on every process (all processes must call this), e.g. [8, 8] or [8, 5]."""
    if not is_distributed():
        return [n]
    local = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return [int(t.item()) for t in out]


def row_weight(sizes: Sequence[int]) -> float:
    """Factor for a mean over this process's rows so that its average over processes is the global mean.

    N * B_r / sum(B): exactly 1.0 when every process has the same number of rows (the usual case).
    """
    total = sum(sizes)
    return len(sizes) * sizes[rank()] / total if total else 0.0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 (row counts may differ), backward = all_reduce(SUM) then own slice."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: tuple[int, ...]) -> Tensor:  # type: ignore[override]
        ctx.sizes = sizes
        ctx.rank = dist.get_rank()
        longest = max(sizes)
        # all_gather needs equal shapes: pad every slice to the longest, cut the padding off afterwards.
        padded = x.contiguous()
        if x.size(0) < longest:
            padded = torch.cat([padded, padded.new_zeros((longest - x.size(0),) + tuple(x.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        parts[ctx.rank] = x  # the exact local values (not a round-trip copy)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        # Every process holds the gradient of its own loss w.r.t. *all* gathered rows; the rows of
        # process r receive the sum of those gradients. all_reduce works on every backend (gloo has
        # no reduce_scatter), and the gathered batch of embeddings is small.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None


def gather_with_grad(x: Tensor, sizes: Sequence[int] | None = None) -> Tensor:
    """Concatenate every process's `x` along dim 0, in rank order, keeping gradients.

    The local slice stays connected to the local graph and, in the backward, also receives the gradient
    that the other processes' losses put on it (see the module docstring for why that gives the same
    parameter gradients as one process on the concatenated batch). `sizes` (rows per process, from
    `gather_sizes`) may be passed to skip one collective; by default it is gathered. Returns `x` itself
    when torch.distributed is not initialised or has a single process.
    """
    if not is_distributed():
        return x
    if sizes is None:
        sizes = gather_sizes(x.size(0), x.device)
    if len(sizes) != dist.get_world_size() or sizes[dist.get_rank()] != x.size(0):
        raise ValueError(f"gather_with_grad: sizes {list(sizes)} do not match this process's {x.size(0)} rows "
                         f"and world size {dist.get_world_size()}")
    return _GatherWithGrad.apply(x, tuple(int(s) for s in sizes))
