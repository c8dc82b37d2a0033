"""InfoNCE over dot products of sparse vocabulary-weight vectors (registered as `sparse_contrastive`).

SPLADE (Formal et al. 2021; SPLADE v2, arXiv 2109.10086) trains with in-batch and hard negatives on the dot
product of the two texts' weight vectors, without normalisation (a document's weights may grow with its
evidence) and without a temperature (temperature 1 here). The FLOPS regulariser that makes the vectors
sparse is a separate term (`flops`). Candidates, masks, gathering and per-process weights are those of
`scored.candidate_scores`.
"""
from __future__ import annotations

from dataclasses import dataclass

from llm2emb.losses.registry import register_loss
from llm2emb.losses.scored import DotScorer, ScoredInfoNCE


@register_loss("sparse_contrastive")
class SparseInfoNCE(ScoredInfoNCE):
    """InfoNCE over dot products of sparse vocabulary weights (SPLADE), in-batch and hard negatives."""

    head = "sparse"
    scorer = DotScorer()

    @dataclass
    class Options(ScoredInfoNCE.Options):
        temperature: float = 1.0
