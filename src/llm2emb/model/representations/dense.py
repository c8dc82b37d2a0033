"""The dense head: the Embedder's own pooling + optional head, as one head of a hybrid representation.

A model whose representation is `dense` does not use this module (its `Embedder.representation` is None
and `forward` returns the pooled tensor); a hybrid with a "dense" head returns it under the key "dense"."""
from __future__ import annotations

from llm2emb.model.representations import Representation, register_representation


@register_representation("dense")
class Dense(Representation):
    """One pooled vector per text (cosine similarity): pooling + head, as every dense llm2emb model."""

    heads = ("dense",)

    def forward(self, embedder, hidden, input_ids, attention_mask, prefix_lengths):
        pooled = embedder.pooling(hidden, attention_mask, prefix_lengths)
        return {"dense": embedder.head(pooled) if embedder.head is not None else pooled}
