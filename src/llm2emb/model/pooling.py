"""Pooling: hidden states of a batch -> one vector per text (the seed's "表征提取").

Every pooler takes `hidden` (B, T, H), `attention_mask` (B, T; 1 = real token, right or left padded) and
`prefix_lengths` (B,), the number of instruction tokens at the start of each text to exclude
(skip-instruction; zeros when off). Positions are derived from the mask, never from pad/eos ids, so
left and right padding give the same vectors and eos == pad tokenizers (SmolLM2, Qwen3-Embedding) work.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from llm2emb.errors import UserError, did_you_mean

POOLING_REGISTRY: dict[str, type["Pooling"]] = {}


def register_pooling(name: str) -> Callable[[type["Pooling"]], type["Pooling"]]:
    def wrap(cls: type["Pooling"]) -> type["Pooling"]:
        POOLING_REGISTRY[name] = cls
        cls.name = name
        return cls
    return wrap


def token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """0-based index of each real token within its text (padding gets -1), for either padding side."""
    mask = attention_mask.long()
    return (mask.cumsum(dim=1) - 1).masked_fill(mask == 0, -1)


def content_mask(attention_mask: torch.Tensor, prefix_lengths: torch.Tensor | None) -> torch.Tensor:
    """Real tokens after the instruction prefix. A text that is all prefix keeps all its tokens."""
    mask = attention_mask.bool()
    if prefix_lengths is None:
        return mask
    idx = token_index(attention_mask)
    keep = mask & (idx >= prefix_lengths.to(idx.device).unsqueeze(1))
    empty = ~keep.any(dim=1, keepdim=True)
    return torch.where(empty, mask, keep)


class Pooling(nn.Module):
    name: str = ""
    #: True when pooling has trainable parameters that must be saved with the model
    trainable: bool = False

    def __init__(self, hidden_size: int, **_: object) -> None:
        super().__init__()
        self.hidden_size = hidden_size

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                prefix_lengths: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


@register_pooling("eos")
class EOSPooling(Pooling):
    """Hidden state of the last real token (the appended EOS): F2LLM, Qwen3-Embedding."""

    def forward(self, hidden, attention_mask, prefix_lengths=None):
        idx = token_index(attention_mask)
        last = idx == (attention_mask.long().sum(dim=1, keepdim=True) - 1)
        position = last.float().argmax(dim=1)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), position]


@register_pooling("mean")
class MeanPooling(Pooling):
    """Average of the real (non-instruction) tokens."""

    def forward(self, hidden, attention_mask, prefix_lengths=None):
        weights = content_mask(attention_mask, prefix_lengths).to(hidden.dtype)
        return (hidden * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)


@register_pooling("weighted_mean")
class WeightedMeanPooling(Pooling):
    """Position-weighted mean (SGPT, Muennighoff 2022): token i weighs i+1, since in a causal model later
    tokens have seen more of the text."""

    def forward(self, hidden, attention_mask, prefix_lengths=None):
        keep = content_mask(attention_mask, prefix_lengths)
        weights = (token_index(attention_mask) + 1).clamp(min=0).to(hidden.dtype) * keep.to(hidden.dtype)
        return (hidden * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1e-9)


@register_pooling("attention")
class AttentionPooling(Pooling):
    """One learned query attends over the token states (multi-head), as in Set Transformer's PMA."""

    trainable = True

    def __init__(self, hidden_size: int, num_heads: int = 8, **_: object) -> None:
        super().__init__(hidden_size)
        while hidden_size % num_heads:
            num_heads //= 2
        self.query = nn.Parameter(torch.randn(1, 1, hidden_size) * hidden_size ** -0.5)
        self.attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)

    def forward(self, hidden, attention_mask, prefix_lengths=None):
        keep = content_mask(attention_mask, prefix_lengths)
        query = self.query.to(hidden.dtype).expand(hidden.size(0), -1, -1)
        out, _ = self.attn(query, hidden, hidden, key_padding_mask=~keep, need_weights=False)
        return out.squeeze(1)


@register_pooling("latent_attention")
class LatentAttentionPooling(Pooling):
    """NV-Embed's latent attention layer (Lee et al., 2024): token states are queries over a trainable
    latent array (keys = values), followed by an MLP and a mean over the real tokens."""

    trainable = True

    def __init__(self, hidden_size: int, num_latents: int = 512, num_heads: int = 8, **_: object) -> None:
        super().__init__(hidden_size)
        while hidden_size % num_heads:
            num_heads //= 2
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_size) * hidden_size ** -0.5)
        self.attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, hidden, attention_mask, prefix_lengths=None):
        latents = self.latents.to(hidden.dtype).unsqueeze(0).expand(hidden.size(0), -1, -1)
        attended, _ = self.attn(hidden, latents, latents, need_weights=False)
        out = attended + self.mlp(attended)
        weights = content_mask(attention_mask, prefix_lengths).to(hidden.dtype)
        return (out * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)


def build_pooling(name: str, hidden_size: int, **kwargs: object) -> Pooling:
    if name not in POOLING_REGISTRY:
        raise UserError(f"Unknown pooling mode {name!r}; choose one of: {', '.join(POOLING_REGISTRY)}."
                        + did_you_mean(name, POOLING_REGISTRY))
    return POOLING_REGISTRY[name](hidden_size, **kwargs)
