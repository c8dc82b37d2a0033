"""Spread-out (uniformity) regulariser: keeps embeddings from collapsing into a narrow cone.

Wang & Isola 2020, "Understanding Contrastive Representation Learning through Alignment and Uniformity
on the Hypersphere" (ICML), the uniformity loss; the idea of spreading descriptors over the sphere is
from Zhang et al. 2017, "Learning Spread-out Local Feature Descriptors" (ICCV). For L2-normalised x_1..x_M:

    L = log( mean_{i != j} exp(-t * ||x_i - x_j||^2) )

It lies in [-4t, 0]: 0 when all points coincide, lower the more uniformly they cover the sphere (the
anisotropy LLM hidden states are known for is what it fights). `t` is the seed's `spread_t`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm2emb.losses.distributed import gather_sizes, gather_with_grad, is_distributed
from llm2emb.losses.registry import EmbeddingBatch, LossTerm, register_loss


class SpreadOutLoss(nn.Module):
    """Uniformity log E_{i != j} exp(-t ||x_i - x_j||^2) over the rows of x, L2-normalised inside."""

    def __init__(self, t: float = 2.0) -> None:
        super().__init__()
        if not t > 0:
            raise ValueError(f"spread_t must be > 0, got {t}")
        self.t = float(t)

    def forward(self, x: Tensor) -> Tensor:
        """x: (M, D) with M >= 2; returns a scalar."""
        if x.dim() != 2 or x.size(0) < 2:
            raise ValueError(f"spread-out needs a (M, D) tensor with M >= 2 rows, got {tuple(x.shape)}")
        x = F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)
        m = x.size(0)
        # ||a - b||^2 = 2 - 2 a.b on the unit sphere: smooth everywhere, unlike pdist, whose sqrt has an
        # infinite derivative when two rows coincide (duplicate texts in a batch).
        sq_dist = (2 - 2 * (x @ x.T)).clamp(min=0)
        off_diagonal = ~torch.eye(m, dtype=torch.bool, device=x.device)
        # log-mean-exp for stability when t * ||.||^2 is large
        return torch.logsumexp(-self.t * sq_dist[off_diagonal], dim=0) - math.log(m * (m - 1))


@register_loss("spread_out")
class SpreadOut(LossTerm):
    """Spread-out / uniformity over all queries and positives of the global batch (Wang & Isola 2020)."""

    @dataclass
    class Options:
        t: float = 2.0

        def validate(self) -> None:
            if not (math.isfinite(self.t) and self.t > 0):
                raise ValueError(f"t must be a finite number > 0, got {self.t}")

    def __init__(self, options: "SpreadOut.Options", gather: bool = True) -> None:
        super().__init__(options, gather)
        self.spread = SpreadOutLoss(options.t)

    def forward(self, batch: EmbeddingBatch) -> tuple[Tensor, dict[str, float]]:
        x = torch.cat([batch.q, batch.p])
        if self.gather and is_distributed():
            # The same value on every process, so DDP's averaging needs no correction.
            x = gather_with_grad(x, gather_sizes(x.size(0), x.device))
        return self.spread(x), {}
