"""Sparse (lexical) representation: a weight per vocabulary entry from the LLM's own LM head.

SPLADE (Formal et al. 2021, "SPLADE: Sparse Lexical and Expansion Model for First Stage Ranking"; SPLADE v2,
arXiv 2109.10086): w_j = max over the text's tokens t of log(1 + relu(logit_{t,j})), the logits being the
token states times the LM head (the tied input embeddings, or the checkpoint's `lm_head.weight`). Decoder
LLMs as sparse retrievers, as in Tevatron's examples (e.g. Zeng et al. 2025, "Scaling Sparse and Dense
Retrieval in Decoder-Only LLMs"; Doshi et al. 2024, "Mistral-SPLADE"): the same pooling over a causal (or
bidirectional) decoder's states. Scores are dot products of the weight vectors; the FLOPS regulariser
(`llm2emb.losses.flops`) makes them sparse, and `sparse_query_top_k` / `sparse_doc_top_k` prune them at
inference (`encoding.encode_heads`).

Attention sink: the first position of a decoder (BOS, or the first token when the tokenizer adds none) gets
a huge state norm that carries no content (Xiao et al. 2024, "Efficient Streaming Language Models with
Attention Sinks"; Sun et al. 2024, "Massive Activations in Large Language Models"), so its logits would
dominate a max-pool. As the decoder sparse retrievers do, the first position (`sparse_skip_first`) and the
special tokens (`skip_special_tokens`) are left out of the max-pool; a one-token text keeps its token.

Exactness notes: log1p and relu are monotone, so the max of log1p(relu(l)) over tokens is log1p(relu(max l))
(one log over (B, V), not (B, T, V)); and an excluded token's state is zeroed, so its logits are 0, which
relu maps to the minimum anyway. Only the `vocab_size` rows the tokenizer knows are used (LM heads are
often padded to a multiple of 64 or 128).

Output of `forward`: {"sparse": (B, V)} float (V = tokenizer size), non-negative.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llm2emb.errors import UserError
from llm2emb.layout import EMBEDDER_MODULES
from llm2emb.model.lm_head import checkpoint_tensor, is_tied
from llm2emb.model.representations import (Representation, register_representation, special_token_ids,
                                           token_set_mask)

#: tokens per chunk of the no-grad max-pool (bounds the (B, chunk, V) logits at inference)
INFERENCE_TOKEN_CHUNK = 64


@register_representation("sparse")
class Sparse(Representation):
    """Vocabulary weights log(1 + relu(LM-head logits)) max-pooled over tokens (SPLADE on a decoder LLM)."""

    heads = ("sparse",)

    def __init__(self, embedder, options) -> None:
        super().__init__(embedder, options)
        backbone = embedder.backbone
        self.tied = is_tied(backbone)
        rows = int(backbone.get_input_embeddings().weight.shape[0])
        self.vocab_size = min(rows, len(embedder.tokenizer))
        self.special_ids = special_token_ids(embedder) if options.skip_special_tokens else []
        self.skip_first = options.sparse_skip_first
        self.lm_head: nn.Linear | None = None
        if not self.tied:
            # the checkpoint's own LM head, frozen: filled in `attach` (or from modules.safetensors)
            self.lm_head = nn.Linear(embedder.hidden_size, self.vocab_size, bias=False,
                                     dtype=next(backbone.parameters()).dtype)
            self.lm_head.weight.requires_grad_(False)

    def attach(self, embedder, source: str) -> None:
        if self.tied:
            return
        weight = checkpoint_tensor(source, "lm_head.weight")
        if weight is not None:
            with torch.no_grad():
                self.lm_head.weight.copy_(weight[: self.vocab_size].to(self.lm_head.weight.dtype))
            return
        modules = Path(source) / EMBEDDER_MODULES
        if modules.is_file():  # a saved sparse Embedder: its LM head is in modules.safetensors
            from safetensors import safe_open

            with safe_open(str(modules), framework="pt") as handle:
                if any(k.startswith("representation.") and k.endswith("lm_head.weight") for k in handle.keys()):
                    return
        raise UserError(f"{source!r} has no LM head (its embeddings are not tied and its checkpoint has no "
                        "lm_head.weight), so the sparse representation cannot be built; use the causal-LM "
                        "checkpoint of this model, or the dense / multi_vector representation.")

    def lm_weight(self, embedder) -> torch.Tensor:
        """(V, H) LM head weight: the input embeddings when tied, else the loaded `lm_head`."""
        if self.tied:
            return embedder.backbone.get_input_embeddings().weight[: self.vocab_size]
        return self.lm_head.weight

    def forward(self, embedder, hidden, input_ids, attention_mask, prefix_lengths):
        keep = token_set_mask(input_ids, attention_mask, prefix_lengths, self.special_ids, self.skip_first)
        weight = self.lm_weight(embedder).to(hidden.dtype)
        states = torch.where(keep.unsqueeze(-1), hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
        if torch.is_grad_enabled():
            best = (states @ weight.T).amax(dim=1)                                   # (B, V)
        else:  # inference: bound the (B, chunk, V) logits
            best = None
            for start in range(0, states.size(1), INFERENCE_TOKEN_CHUNK):
                part = (states[:, start:start + INFERENCE_TOKEN_CHUNK] @ weight.T).amax(dim=1)
                best = part if best is None else torch.maximum(best, part)
        return {"sparse": torch.log1p(torch.relu(best))}
