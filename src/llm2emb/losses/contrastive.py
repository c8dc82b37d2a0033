"""InfoNCE with in-batch and hard negatives (the F2LLM recipe, with gradients across processes).

InfoNCE: van den Oord et al. 2018, "Representation Learning with Contrastive Predictive Coding"; with
in-batch negatives as in DPR (Karpukhin et al. 2020) and hard negatives as in F2LLM (Zhang et al. 2025,
"F2LLM Technical Report: Matching SOTA Embedding Performance with 6 Million Open-Source Data").

For query i with positive p_i and hard negatives n_i1..n_ik, with s(a, b) = cos(a, b) / temperature:

    hard term      L_hard_i = -log  exp s(q_i, p_i) / (exp s(q_i, p_i) + sum_j exp s(q_i, n_ij))
    in-batch term  L_ib_i   = -log  exp s(q_i, p_i) / sum_{m in all processes' rows} exp s(q_i, p_m)
                              [+ exp s(q_i, n_mj) for all rows' negatives, with inbatch_hard_negatives]

    loss = mean_i L_ib_i (when use_inbatch) + mean_i L_hard_i (when k > 0)

If a batch has neither (no negatives and use_inbatch=False), the in-batch term is used so that there is
something to learn from. The caller passes use_inbatch=False for classification / clustering / sts data,
whose in-batch "negatives" are often the same class (false negatives), as F2LLM does.

Distributed: positives (and negatives, with inbatch_hard_negatives) are gathered from every process with
`gather_with_grad`, and the per-process loss is weighted so that the mean over processes equals the loss
of one process on the concatenated batch. DDP / DeepSpeed / FSDP average the gradients over processes, so
the trainer gets exactly the one-process gradient and needs no scaling of its own (see
`llm2emb.losses.distributed`). All processes must make the same call (same use_inbatch, same k).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm2emb.losses.distributed import gather_sizes, gather_with_grad, is_distributed, rank, row_weight


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class ContrastiveLoss(nn.Module):
    """InfoNCE over cosine similarities / temperature; see the module docstring for the exact terms."""

    def __init__(self, temperature: float = 0.05, inbatch_hard_negatives: bool = False,
                 gather: bool = True) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.inbatch_hard_negatives = inbatch_hard_negatives
        self.gather = gather

    def terms(self, q: Tensor, p: Tensor, n: Tensor | None, use_inbatch: bool) -> dict[str, Tensor]:
        """The loss terms that apply to this batch: {"inbatch": ..., "hard": ...} (one or both)."""
        if q.dim() != 2 or p.shape != q.shape:
            raise ValueError(f"q and p must both be (B, D); got {tuple(q.shape)} and {tuple(p.shape)}")
        if n is not None and (n.dim() != 3 or n.size(0) != q.size(0) or n.size(2) != q.size(1)):
            raise ValueError(f"n must be (B, k, D) = ({q.size(0)}, k, {q.size(1)}); got {tuple(n.shape)}")
        k = 0 if n is None else n.size(1)
        # Similarities in at least fp32: bf16 cosines / 0.05 lose the small differences the loss is about.
        q, p = F.normalize(_at_least_fp32(q), dim=-1), F.normalize(_at_least_fp32(p), dim=-1)
        n = F.normalize(_at_least_fp32(n), dim=-1) if k else None

        distributed = self.gather and is_distributed()
        sizes = gather_sizes(q.size(0), q.device) if distributed else [q.size(0)]
        # Per-process weight so that the mean over processes is the one-process loss (1.0 for even batches).
        weight = row_weight(sizes) if distributed else 1.0

        out: dict[str, Tensor] = {}
        if k:
            candidates = torch.cat([p.unsqueeze(1), n], dim=1)                 # (B, 1 + k, D)
            logits = torch.einsum("bd,bcd->bc", q, candidates) / self.temperature
            target = torch.zeros(q.size(0), dtype=torch.long, device=q.device)  # own positive is column 0
            out["hard"] = F.cross_entropy(logits, target) * weight
        if use_inbatch or not k:
            all_p = gather_with_grad(p, sizes) if distributed else p            # (sum B, D)
            columns = [all_p]
            if self.inbatch_hard_negatives and k:
                flat = n.reshape(-1, n.size(-1))                                # (B * k, D), row-major
                columns.append(gather_with_grad(flat, [s * k for s in sizes]) if distributed else flat)
            logits = q @ torch.cat(columns).T / self.temperature
            offset = sum(sizes[: rank()]) if distributed else 0
            target = torch.arange(q.size(0), device=q.device) + offset          # own positive's global row
            out["inbatch"] = F.cross_entropy(logits, target) * weight
        return out

    def forward(self, q: Tensor, p: Tensor, n: Tensor | None, use_inbatch: bool) -> Tensor:
        """q, p: (B, D) un-normalised; n: (B, k, D) or None. Returns the scalar loss."""
        return sum(self.terms(q, p, n, use_inbatch).values())  # type: ignore[return-value]
