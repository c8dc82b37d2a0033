"""Hybrid representation: several heads over one backbone pass, trained jointly, scored as a weighted sum.

BGE-M3 (Chen et al. 2024, "BGE M3-Embedding: Multi-Lingual, Multi-Functionality, Multi-Granularity Text
Embeddings Through Self-Knowledge Distillation"): dense, lexical (here the LM-head sparse head) and
multi-vector heads share the encoder; the relevance score is s = w1 s_dense + w2 s_sparse + w3 s_multi_vector
with BGE-M3's default weights (1, 0.3, 1) (`hybrid_heads`, `hybrid_weights`). Training: each head's loss
weighted by its weight, optionally plus self-distillation from the combined score
(`llm2emb.losses.self_distill`). Evaluation scores documents with the same weighted sum
(`llm2emb.eval.representations`).

Output of `forward`: the union of the heads' outputs, e.g. {"dense", "sparse", "multi_vector",
"multi_vector_mask"}.
"""
from __future__ import annotations

from torch import nn

from llm2emb.model.representations import REPRESENTATION_REGISTRY, Representation, register_representation


@register_representation("hybrid")
class Hybrid(Representation):
    """Several heads (dense / sparse / multi_vector) trained jointly; score = weighted sum (BGE-M3)."""

    def __init__(self, embedder, options) -> None:
        super().__init__(embedder, options)
        self.parts = nn.ModuleDict({head: REPRESENTATION_REGISTRY[head](embedder, options)
                                    for head in options.hybrid_heads})

    @property
    def head_names(self) -> tuple[str, ...]:
        return tuple(self.options.hybrid_heads)

    @property
    def weights(self) -> dict[str, float]:
        return dict(zip(self.options.hybrid_heads, self.options.hybrid_weights))

    def attach(self, embedder, source: str) -> None:
        for part in self.parts.values():
            part.attach(embedder, source)

    def forward(self, embedder, hidden, input_ids, attention_mask, prefix_lengths):
        out = {}
        for part in self.parts.values():
            out.update(part(embedder, hidden, input_ids, attention_mask, prefix_lengths))
        return out
