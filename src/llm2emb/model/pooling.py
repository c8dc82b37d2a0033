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


class _PreNorm(nn.Module):
    """LayerNorm the input (and the attention context, when given) before `fn`, as NV-Embed's PreNorm."""

    def __init__(self, dim: int, fn: nn.Module, context_dim: int | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim) if context_dim is not None else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm_context is None:
            return self.fn(self.norm(x))
        return self.fn(self.norm(x), self.norm_context(context))


class _CrossAttention(nn.Module):
    """Multi-head attention of `x` (queries) over `context` (keys = values), bias-free as in NV-Embed."""

    def __init__(self, dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        inner = num_heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.to_q(x).view(b, t, self.num_heads, -1).transpose(1, 2)                  # (B, heads, T, d)
        # the latents are the same for every text: project them once and broadcast over the batch
        k, v = (z.view(1, context.size(0), self.num_heads, -1).transpose(1, 2)
                for z in self.to_kv(context).chunk(2, dim=-1))                            # (1, heads, L, d)
        out = nn.functional.scaled_dot_product_attention(q, k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1))
        return self.to_out(out.transpose(1, 2).reshape(b, t, -1))


class _GEGLU(nn.Module):
    """x * GELU(gate) on the two halves of the last dimension (Shazeer 2020)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return x * nn.functional.gelu(gate)


class _FeedForward(nn.Module):
    """NV-Embed's FeedForward: Linear(dim, 8 dim) -> GEGLU -> Linear(4 dim, dim)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult * 2), _GEGLU(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"latent_attention pooling: {name} must be an integer >= 1, got {value!r}.")
    return value


@register_pooling("latent_attention")
class LatentAttentionPooling(Pooling):
    """NV-Embed's latent attention layer (Lee et al., 2024, arXiv 2405.17428, Fig. 1), as in the released
    `modeling_nvembed.py` (`LatentAttentionModel`).

    For the token states h (B, T, H) and a trainable latent array (num_latents, H):

        h = h + CrossAttn(LayerNorm(h), LayerNorm(latents))    # queries = tokens, keys = values = latents
        h = h + FeedForward(LayerNorm(h))                      # Linear(H, 8H) -> GEGLU -> Linear(4H, H)
        out = mean of h over the real, non-instruction tokens

    Each token attends only to the latents, so a pad token never changes a real token's state; pads (and,
    with skip-instruction, instruction tokens, as NV-Embed's pool mask) are left out of the mean only.
    Parameter names follow the released model's (`latents`, `cross_attend_blocks.{0,1}...`).

    Deviations from the release: (1) each head is ceil(H / num_heads) wide (inner width about H), where
    NV-Embed uses 8 heads of 4096 (inner width 8H), to keep the layer at about 16 H^2 parameters;
    (2) the attention output projection and the last feed-forward layer start at zero (the paper does not
    say how it initialises), so at initialisation the layer is exactly mean pooling; (3) no L2
    normalisation here (`Embedder.encode(normalize=...)` does it).
    """

    trainable = True

    def __init__(self, hidden_size: int, num_latents: int = 512, num_heads: int = 8, **_: object) -> None:
        super().__init__(hidden_size)
        num_latents = _positive_int("num_latents", num_latents)
        num_heads = _positive_int("num_heads", num_heads)
        head_dim = -(-hidden_size // num_heads)
        self.cross_attend_blocks = nn.ModuleList([
            _PreNorm(hidden_size, _CrossAttention(hidden_size, num_heads, head_dim), context_dim=hidden_size),
            _PreNorm(hidden_size, _FeedForward(hidden_size)),
        ])
        # unit scale as in NV-Embed; the context LayerNorm makes the scale irrelevant to the forward pass
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_size))
        # Zero-init the last layer of both residual branches (as Fixup, Zhang et al. 2019, and DiT's
        # adaLN-Zero): the new, untrained layer then starts as plain mean pooling of the backbone's states
        # instead of adding random noise to a pretrained representation, and learns a residual correction.
        # Gradients still reach every parameter: these two layers get them at the first step (their inputs
        # are non-zero), the rest as soon as they move.
        attn, ff = self.cross_attend_blocks
        nn.init.zeros_(attn.fn.to_out.weight)
        nn.init.zeros_(ff.fn.net[2].weight)
        nn.init.zeros_(ff.fn.net[2].bias)

    def forward(self, hidden, attention_mask, prefix_lengths=None):
        attn, ff = self.cross_attend_blocks
        hidden = hidden + attn(hidden, self.latents)
        hidden = hidden + ff(hidden)
        keep = content_mask(attention_mask, prefix_lengths).unsqueeze(-1)
        # where(), not a multiply by the mask: a non-finite state at a pad position must not leak (NaN * 0)
        summed = torch.where(keep, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)).sum(1)
        return summed / keep.sum(1).clamp(min=1).to(hidden.dtype)


@register_pooling("cls")
class SummaryTokenPooling(Pooling):
    """Hidden state of the summary token (the seed's `[CLS]` row; `llm2emb.model.summary_token`): the one
    tokenisation rule inserts it at real-token index `index` of every text (its start, after any BOS), or
    last (`index` -1). Found from the mask, so both padding sides pick the same position."""

    #: the Embedder adds the summary token to the tokenizer and the embedding matrix, and passes `index`
    uses_summary_token = True

    def __init__(self, hidden_size: int, index: int = -1, **_: object) -> None:
        super().__init__(hidden_size)
        self.index = int(index)

    def forward(self, hidden, attention_mask, prefix_lengths=None):
        # one token is pooled, so the instruction prefix (skip-instruction) changes nothing here
        lengths = attention_mask.long().sum(dim=1, keepdim=True)
        target = lengths + self.index if self.index < 0 else torch.full_like(lengths, self.index)
        position = (token_index(attention_mask) == target).float().argmax(dim=1)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), position]


def build_pooling(name: str, hidden_size: int, **kwargs: object) -> Pooling:
    if name not in POOLING_REGISTRY:
        raise UserError(f"Unknown pooling mode {name!r}; choose one of: {', '.join(POOLING_REGISTRY)}."
                        + did_you_mean(name, POOLING_REGISTRY))
    return POOLING_REGISTRY[name](hidden_size, **kwargs)
