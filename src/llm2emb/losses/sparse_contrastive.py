"""InfoNCE over dot products of sparse vocabulary-weight vectors (registered as `sparse_contrastive`).

SPLADE (Formal et al. 2021; SPLADE v2, arXiv 2109.10086) trains with in-batch and hard negatives on the dot
product of the two texts' weight vectors, without normalisation (a document's weights may grow with its
evidence) and without a temperature (temperature 1 here). The FLOPS regulariser that makes the vectors
sparse is a separate term (`flops`). Candidates, masks, gathering and per-process weights are those of
`scored.candidate_scores`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from llm2emb.losses.registry import EmbeddingBatch, LossTerm, register_loss
from llm2emb.losses.scored import DotScorer, candidate_scores


@register_loss("sparse_contrastive")
class SparseInfoNCE(LossTerm):
    """InfoNCE over dot products of sparse vocabulary weights (SPLADE), in-batch and hard negatives."""

    head = "sparse"
    scorer = DotScorer()

    @dataclass
    class Options:
        temperature: float = 1.0
        inbatch_hard_negatives: bool = False

        def validate(self) -> None:
            if not (math.isfinite(self.temperature) and self.temperature > 0):
                raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")

    def forward(self, batch: EmbeddingBatch) -> tuple[Tensor, dict[str, float]]:
        terms = candidate_scores(self.scorer, batch.q, batch.p, batch.n, batch.use_inbatch, gather=self.gather,
                                 inbatch_hard_negatives=self.options.inbatch_hard_negatives,
                                 passage_keys=batch.passage_keys, negative_keys=batch.negative_keys)
        return sum(t.loss(self.options.temperature) for t in terms.values()), {}  # type: ignore[return-value]
