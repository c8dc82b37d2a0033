"""FLOPS regulariser for sparse vectors (registered as `flops`).

Paria et al. 2020, "Minimizing FLOPs to Learn Efficient Sparse Representations", as used by SPLADE (Formal
et al. 2021): for a batch of N non-negative weight vectors w_1..w_N over the vocabulary,

    FLOPS = sum_j ( (1/N) sum_i w_ij )^2

a smooth proxy of the expected number of multiplications of a sparse dot product. SPLADE regularises
queries and documents with separate weights: loss = query_weight * FLOPS(queries) + doc_weight *
FLOPS(positives and hard negatives). The term's own `weight` (in `losses`) multiplies that again; SPLADE v2
uses query_weight 3e-4 and doc_weight 1e-4 (they ramp the weights up quadratically over the first 50k steps;
llm2emb uses them as given).

Distributed: the means are over every process's rows (gathered with their gradient), so every process
computes the same value, which needs no per-process weighting (see `distributed`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from llm2emb.losses.distributed import gather_sizes, gather_with_grad, is_distributed
from llm2emb.losses.registry import EmbeddingBatch, LossTerm, register_loss
from llm2emb.losses.scored import at_least_fp32


def flops(weights: Tensor) -> Tensor:
    """sum over columns of the squared mean absolute weight over rows (R, V) -> scalar."""
    return (at_least_fp32(weights).abs().mean(dim=0) ** 2).sum()


def _all_rows(x: Tensor, gather: bool) -> Tensor:
    if not (gather and is_distributed()):
        return x
    return gather_with_grad(x, gather_sizes(x.size(0), x.device))


@register_loss("flops")
class Flops(LossTerm):
    """FLOPS regulariser (Paria et al. 2020) with separate query / document weights, as SPLADE."""

    head = "sparse"

    @dataclass
    class Options:
        query_weight: float = 3e-4
        doc_weight: float = 1e-4

        def validate(self) -> None:
            for name in ("query_weight", "doc_weight"):
                value = getattr(self, name)
                if not (math.isfinite(value) and value >= 0):
                    raise ValueError(f"{name} must be a finite number >= 0, got {value}")

    def forward(self, batch: EmbeddingBatch) -> tuple[Tensor, dict[str, float]]:
        queries = _all_rows(batch.q, self.gather)
        docs = [batch.p] if batch.n is None else [batch.p, batch.n.reshape(-1, batch.n.size(-1))]
        docs = torch.cat([_all_rows(d, self.gather) for d in docs])
        q_flops, d_flops = flops(queries), flops(docs)
        total = self.options.query_weight * q_flops + self.options.doc_weight * d_flops
        return total, {"flops/query": float(q_flops.detach()), "flops/doc": float(d_flops.detach())}
