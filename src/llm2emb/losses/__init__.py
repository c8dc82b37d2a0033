"""Training objectives (stage 3 of the seed, "训练目标与损失设计").

`EmbeddingObjective` is what the trainer calls: InfoNCE with in-batch and hard negatives
(`ContrastiveLoss`), optionally over Matryoshka prefixes (`MatryoshkaLoss`), plus an optional spread-out
regulariser (`SpreadOutLoss`). Embeddings are gathered across processes with their gradients, and each
process's loss is weighted so that DDP's gradient averaging yields exactly the gradient of one process on
the concatenated batch: the trainer does not scale anything.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from llm2emb.errors import UserError
from llm2emb.losses.contrastive import ContrastiveLoss
from llm2emb.losses.distributed import gather_sizes, gather_with_grad, is_distributed
from llm2emb.losses.matryoshka import MatryoshkaLoss
from llm2emb.losses.spread_out import SpreadOutLoss

__all__ = ["ContrastiveLoss", "EmbeddingObjective", "LossOutput", "MatryoshkaLoss", "SpreadOutLoss",
           "gather_with_grad"]


@dataclass
class LossOutput:
    """`total` is what to backpropagate; `parts` are detached values for logging.

    parts: "contrastive" (the MRL-weighted sum when MRL is on), "contrastive@<d>" (unweighted loss at
    each MRL dimension), "spread" (the unweighted uniformity value; total adds spread_weight times it).
    """
    total: Tensor
    parts: dict[str, float] = field(default_factory=dict)


class EmbeddingObjective(nn.Module):
    """contrastive (MRL-wrapped when `mrl_dims` is given) + spread_weight * spread-out over cat(q, p).

    With MRL the full embedding is always trained too, with weight 1 unless its size is listed in
    `mrl_dims` with its own weight. The spread-out term is computed on the full-size embeddings of all
    queries and positives of all processes (gathered with gradients), identically on every process.
    """

    def __init__(self, temperature: float = 0.05, inbatch_hard_negatives: bool = False,
                 mrl_dims: Sequence[int] | None = None, mrl_dim_weights: Sequence[float] | None = None,
                 spread_weight: float = 0.0, spread_t: float = 2.0, *, gather: bool = True) -> None:
        super().__init__()
        self.contrastive = ContrastiveLoss(temperature, inbatch_hard_negatives, gather)
        self.matryoshka = (MatryoshkaLoss(self.contrastive, mrl_dims, mrl_dim_weights, full_dim_weight=1.0)
                           if mrl_dims else None)
        if mrl_dim_weights and not mrl_dims:
            raise UserError("mrl_dim_weights is set but mrl_dims is empty; set mrl_dims or drop the weights.")
        if spread_weight < 0:
            raise UserError(f"spread_weight must be >= 0, got {spread_weight}.")
        self.spread_weight = float(spread_weight)
        self.spread = SpreadOutLoss(spread_t) if spread_weight > 0 else None
        self.gather = gather

    @classmethod
    def from_config(cls, cfg: Any) -> "EmbeddingObjective":
        """Build from a TrainConfig (or a mapping) with the seed's field names.

        Reads temperature, inbatch_hard_negatives, mrl_enabled / mrl_dims / mrl_dim_weights and
        spread_enabled / spread_weight / spread_t; MRL and spread-out are off unless their `*_enabled` is true.
        """
        get = cfg.get if isinstance(cfg, Mapping) else (lambda key, default=None: getattr(cfg, key, default))
        mrl_dims = mrl_weights = None
        if get("mrl_enabled", False):
            mrl_dims = get("mrl_dims")
            if not mrl_dims:
                raise UserError("mrl_enabled is true but mrl_dims is empty; list the dimensions to train "
                                "(e.g. [128, 256]) or set mrl_enabled to false.")
            mrl_weights = get("mrl_dim_weights") or None
        spread_weight = float(get("spread_weight", 0.0) or 0.0) if get("spread_enabled", False) else 0.0
        spread_t = get("spread_t", 2.0)
        return cls(temperature=get("temperature", 0.05),
                   inbatch_hard_negatives=bool(get("inbatch_hard_negatives", False)),
                   mrl_dims=mrl_dims, mrl_dim_weights=mrl_weights,
                   spread_weight=spread_weight, spread_t=2.0 if spread_t is None else spread_t)

    def forward(self, q: Tensor, p: Tensor, n: Tensor | None, use_inbatch: bool) -> LossOutput:
        """q, p: (B, D) un-normalised embeddings; n: (B, k, D) hard negatives or None."""
        parts: dict[str, float] = {}
        if self.matryoshka is not None:
            weights = self.matryoshka.dim_weights(q.size(-1))
            per_dim = self.matryoshka.per_dim(q, p, n, use_inbatch)
            contrastive = sum(weights[d] * per_dim[d] for d in weights)
            parts.update({f"contrastive@{d}": float(loss.detach()) for d, loss in per_dim.items()})
        else:
            contrastive = self.contrastive(q, p, n, use_inbatch)
        parts["contrastive"] = float(contrastive.detach())
        total: Tensor = contrastive  # type: ignore[assignment]
        if self.spread is not None:
            x = torch.cat([q, p])
            if self.gather and is_distributed():
                # The same value on every process, so DDP's averaging needs no correction.
                x = gather_with_grad(x, gather_sizes(x.size(0), x.device))
            spread = self.spread(x)
            parts["spread"] = float(spread.detach())
            total = total + self.spread_weight * spread
        return LossOutput(total=total, parts=parts)
