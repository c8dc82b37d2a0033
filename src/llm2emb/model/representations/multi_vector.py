"""Multi-vector (late-interaction) representation: one unit vector per token, scored with MaxSim.

ColBERT (Khattab & Zaharia 2020, "ColBERT: Efficient and Effective Passage Search via Contextualized Late
Interaction over BERT"), as in PyLate: a bias-free linear projection of every token state from the hidden
size to `token_dim` (default 128), L2-normalised per token. Here the encoder is the decoder LLM (causal or
bidirectional). The token set of a text (`token_set_mask`) leaves out padding always, the instruction
prefix with the Embedder's `skip_instruction`, and special tokens (BOS, EOS / end token) with
`skip_special_tokens`. Vectors outside the token set are zero and the mask says which rows count, so pad
tokens never score (`llm2emb.losses.late_interaction.maxsim`).

Output of `forward`: {"multi_vector": (B, T, token_dim), "multi_vector_mask": (B, T) bool}.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm2emb.model.representations import (Representation, register_representation, special_token_ids,
                                           token_set_mask)


@register_representation("multi_vector")
class MultiVector(Representation):
    """Token vectors (hidden -> token_dim, unit length) scored with MaxSim (ColBERT late interaction)."""

    heads = ("multi_vector",)

    def __init__(self, embedder, options) -> None:
        super().__init__(embedder, options)
        self.projection = nn.Linear(embedder.hidden_size, options.token_dim, bias=False)
        self.special_ids = special_token_ids(embedder) if options.skip_special_tokens else []
        self.projection.to(next(embedder.backbone.parameters()).dtype)

    def forward(self, embedder, hidden, input_ids, attention_mask, prefix_lengths):
        mask = token_set_mask(input_ids, attention_mask, prefix_lengths, self.special_ids)
        vectors = F.normalize(self.projection(hidden), dim=-1)
        # where(), not a multiply: a non-finite state at an excluded position must not leak
        vectors = torch.where(mask.unsqueeze(-1), vectors, torch.zeros((), dtype=vectors.dtype, device=vectors.device))
        return {"multi_vector": vectors, "multi_vector_mask": mask}
