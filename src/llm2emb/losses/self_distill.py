"""Self-knowledge distillation of a hybrid model's heads from their combined score (registered as
`self_distill`).

BGE-M3 (Chen et al. 2024, section 3.3): with s_inter = sum_h w_h s_h over the heads (dense, sparse,
multi-vector) and p(s) = softmax(s / temperature) over a query's candidates,

    L_inter = InfoNCE(s_inter)                          the combined score trained as one more head
    L'_h    = - sum_c p(s_inter)_c * log p(s_h)_c       each head learns the combined ranking (teacher
                                                         p(s_inter) is detached)
    loss    = L_inter + sum_h w_h L'_h

over the same in-batch and hard-negative candidates as the heads' own InfoNCE (`scored.candidate_scores`).
Each head's distribution uses that head's loss temperature; s_inter uses this term's `temperature`.
BGE-M3 averages its terms with factors 1/4, 1/3 and 1/2; llm2emb sums them (the head losses weighted by
`hybrid_weights`, this term by its `weight`). The heads, weights and head temperatures are set by
`RepresentationObjective` (losses/representation.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from llm2emb.losses.registry import EmbeddingBatch, LossTerm, register_loss
from llm2emb.losses.scored import CosineScorer, DotScorer, Logits, Scorer, candidate_scores


def head_scorer(head: str) -> Scorer:
    from llm2emb.losses.late_interaction import MaxSimScorer

    return {"dense": CosineScorer(), "sparse": DotScorer(), "multi_vector": MaxSimScorer()}[head]


@register_loss("self_distill")
class SelfDistill(LossTerm):
    """BGE-M3 self-distillation: InfoNCE on the weighted head score, and each head distilled from it."""

    head = "hybrid"

    @dataclass
    class Options:
        temperature: float = 0.05
        inbatch_hard_negatives: bool = False

        def validate(self) -> None:
            if not (math.isfinite(self.temperature) and self.temperature > 0):
                raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")

    def __init__(self, options: "SelfDistill.Options", gather: bool = True) -> None:
        super().__init__(options, gather)
        self.weights: dict[str, float] = {}
        self.temperatures: dict[str, float] = {}

    def configure(self, weights: dict[str, float], temperatures: dict[str, float]) -> None:
        """The hybrid's heads with their weights, and the temperature each head's own loss uses."""
        self.weights = dict(weights)
        self.temperatures = {head: float(temperatures.get(head, self.options.temperature)) for head in weights}

    def forward(self, batch: EmbeddingBatch) -> tuple[Tensor, dict[str, float]]:
        if not self.weights:
            raise ValueError("self_distill needs the hybrid heads: build it through RepresentationObjective")
        per_head: dict[str, dict[str, Logits]] = {}
        for head in self.weights:
            n = None if batch.n is None else batch.n[head]
            per_head[head] = candidate_scores(head_scorer(head), batch.q[head], batch.p[head], n, batch.use_inbatch,
                                              gather=self.gather,
                                              inbatch_hard_negatives=self.options.inbatch_hard_negatives,
                                              passage_keys=batch.passage_keys, negative_keys=batch.negative_keys)
        total: Tensor | None = None
        parts: dict[str, float] = {}
        for term in next(iter(per_head.values())):
            first = per_head[next(iter(per_head))][term]
            combined = sum(self.weights[h] * per_head[h][term].scores for h in per_head)
            inter = Logits(combined, first.drop, first.target, first.weight)  # type: ignore[arg-type]
            loss = inter.loss(self.options.temperature)
            teacher = F.softmax(inter.logits(self.options.temperature), dim=-1).detach()
            for head, weight in self.weights.items():
                log_p = F.log_softmax(per_head[head][term].logits(self.temperatures[head]), dim=-1)
                if first.drop is not None:  # 0 * -inf: masked columns take no part
                    log_p = log_p.masked_fill(first.drop, 0.0)
                distill = -(teacher * log_p).sum(-1).mean() * first.weight
                parts[f"self_distill/{head}"] = parts.get(f"self_distill/{head}", 0.0) + float(distill.detach())
                loss = loss + weight * distill
            total = loss if total is None else total + loss
        return total, parts  # type: ignore[return-value]
