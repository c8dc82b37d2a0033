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

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
