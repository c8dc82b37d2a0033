"""Masked next-token prediction (MNTP), LLM2Vec's first step (BehnamGhader et al. 2024, "LLM2Vec: Large
Language Models Are Secretly Powerful Text Encoders", arXiv 2404.05961; reference code McGill-NLP/llm2vec,
experiments/run_mntp.py).

A decoder LLM switched to bidirectional attention has never seen its future tokens; MNTP adapts it before any
contrastive training. A share of each text's tokens (20% in LLM2Vec for Llama models) is replaced by a mask token
(the tokenizer's own, else "_" as LLM2Vec's `mask_token_type: blank`), and the token at position i is predicted
from the LM-head logits at position i - 1, as in next-token prediction, so the LM head is used unchanged:

    loss = - sum over masked (b, i) of log softmax(W h[b, i-1])[x[b, i]] / (number of masked tokens)

with h the last hidden states of the masked input, W the LM head (the tied input embeddings, or the checkpoint's
`lm_head.weight`, frozen) and x the original ids. Only content tokens are masked: never padding, special tokens
(BOS / EOS / the end token), the instruction prefix of a query, or a text's first token (it has no position
before it). Every text of a batch (queries, positives, hard negatives) is an MNTP input.

Across processes the denominator is the masked-token count of all processes together (an all-reduce of a count,
no gradient), scaled by the process count that DDP divides by: the averaged gradient then equals the gradient of
the one-process loss over the concatenated batch, whatever each process drew.

Masks are drawn from a generator seeded by (seed, step, process), so a resumed run draws the same masks.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llm2emb.errors import UserError
from llm2emb.losses import LossOutput
from llm2emb.losses.distributed import is_distributed, world_size
from llm2emb.model.lm_head import checkpoint_tensor, is_tied
from llm2emb.model.pooling import content_mask
from llm2emb.model.representations import special_token_ids

#: LLM2Vec's mask for tokenizers without one (`mask_token_type: blank`)
BLANK_MASK_TOKEN = "_"
IGNORE = -100


def mask_token_id(tokenizer, setting: str) -> int:
    """Id of the mask token: `auto` = the tokenizer's mask token, else "_"; any other value must be one token."""
    if setting == "auto":
        if getattr(tokenizer, "mask_token_id", None) is not None:
            return int(tokenizer.mask_token_id)
        setting = BLANK_MASK_TOKEN
    vocab = tokenizer.get_vocab()
    if setting in vocab:  # a token as the vocabulary spells it (LLM2Vec sets tokenizer.mask_token = "_")
        return int(vocab[setting])
    encoded = tokenizer(setting, add_special_tokens=False)["input_ids"]
    if len(encoded) != 1:
        raise UserError(f"mntp_mask_token {setting!r} is {len(encoded)} tokens for this tokenizer; give a single "
                        "token (auto: the tokenizer's mask token, else \"_\").")
    return int(encoded[0])


def mask_seed(seed: int, step: int, process: int) -> int:
    """The mask generator's seed for one step of one process (validation batches use negative steps)."""
    return int(np.random.SeedSequence([seed, step + 2 ** 31, process]).generate_state(1)[0])


def draw_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_lengths: torch.Tensor | None,
              special_ids: list[int], probability: float, generator: torch.Generator) -> torch.Tensor:
    """(B, T) bool: the positions to mask (module docstring), drawn independently with `probability`."""
    candidates = content_mask(attention_mask, prefix_lengths).bool()  # real tokens after the instruction prefix
    if special_ids:
        candidates &= ~torch.isin(input_ids, torch.as_tensor(special_ids, device=input_ids.device))
    # predicted from the position before it: that position must hold a token of the same text
    before = torch.zeros_like(candidates)
    before[:, 1:] = attention_mask[:, :-1].bool()
    candidates &= before
    draws = torch.rand(input_ids.shape, generator=generator).to(input_ids.device)
    return candidates & (draws < probability)


class MaskedNextTokenPrediction(nn.Module):
    """The module the trainer prepares for an MNTP run: forward(batch, seed) -> LossOutput.

    Holds the Embedder (its backbone is what trains; LoRA or full weights) and reads the LM head weight:
    the tied embeddings, or the checkpoint's `lm_head.weight` kept as a frozen plain tensor (not a parameter
    or buffer, so neither checkpoints nor DDP's buffer broadcast carry it)."""

    def __init__(self, embedder, source: str, probability: float, mask_token: str = "auto") -> None:
        super().__init__()
        if not 0 < probability < 1:
            raise UserError(f"mntp_mask_probability must be in (0, 1) for an MNTP run, got {probability}")
        own = [name for name, module in (("pooling", embedder.pooling), ("head", embedder.head),
                                         ("representation", embedder.representation))
               if module is not None and any(True for _ in module.parameters())]
        if own:
            # they would get no gradient (and DDP refuses parameters without one)
            raise UserError(f"mntp_mask_probability is set for a model with its own trainable {own[0]}, which masked "
                            "next-token prediction does not train; run MNTP with a dense representation, "
                            "parameter-free pooling (eos / mean / weighted_mean) and no head, and add those in the "
                            "next stage.")
        self.embedder = embedder
        self.probability = probability
        self.mask_id = mask_token_id(embedder.tokenizer, mask_token)
        self.special_ids = special_token_ids(embedder)
        self.tied = is_tied(embedder.backbone)
        self._lm_weight: torch.Tensor | None = None
        if not self.tied:
            weight = checkpoint_tensor(source, "lm_head.weight")
            if weight is None:
                raise UserError(f"{source!r} has no LM head (its embeddings are not tied and its checkpoint has no "
                                "lm_head.weight), so masked next-token prediction cannot run; use the causal-LM "
                                "checkpoint of this model.")
            self._lm_weight = weight.detach()

    def lm_weight(self, device: torch.device) -> torch.Tensor:
        if self.tied:
            return self.embedder.backbone.get_input_embeddings().weight
        if self._lm_weight.device != device:
            self._lm_weight = self._lm_weight.to(device)
        return self._lm_weight

    def forward(self, batch, seed: int) -> LossOutput:
        generator = torch.Generator().manual_seed(seed)
        inputs = [batch.queries, batch.passages] + ([batch.negatives] if batch.negatives is not None else [])
        sources, targets = [], []
        for part in inputs:
            ids, mask = part["input_ids"], part["attention_mask"]
            chosen = draw_mask(ids, mask, part.get("prefix_lengths"), self.special_ids, self.probability, generator)
            hidden = self.embedder.hidden_states(torch.where(chosen, self.mask_id, ids), mask)
            sources.append(hidden[:, :-1][chosen[:, 1:]])           # h[b, i-1] for every masked (b, i)
            targets.append(ids[:, 1:][chosen[:, 1:]])
        source, target = torch.cat(sources), torch.cat(targets)
        count = torch.tensor(float(target.numel()), device=source.device)
        if is_distributed():
            torch.distributed.all_reduce(count)
        weight = self.lm_weight(source.device)
        logits = (source @ weight.to(source.dtype).T).float()
        total = F.cross_entropy(logits, target, reduction="sum") * world_size() / count.clamp(min=1.0)
        with torch.no_grad():
            accuracy = float((logits.argmax(dim=-1) == target).float().mean()) if target.numel() else 0.0
        return LossOutput(total, {"mntp_accuracy": accuracy, "masked_tokens": float(target.numel())})
