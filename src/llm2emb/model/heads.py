"""Representation heads on top of the pooled vector (the seed's "轻度改动": a Linear or MLP head)."""
from __future__ import annotations

from typing import Callable

from torch import nn

from llm2emb.errors import UserError, did_you_mean

HEAD_REGISTRY: dict[str, Callable[[int, int], nn.Module]] = {}


def register_head(name: str):
    def wrap(factory: Callable[[int, int], nn.Module]):
        HEAD_REGISTRY[name] = factory
        return factory
    return wrap


@register_head("linear")
def _linear(hidden_size: int, out_dim: int) -> nn.Module:
    return nn.Linear(hidden_size, out_dim)


@register_head("mlp")
def _mlp(hidden_size: int, out_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, out_dim))


def build_head(name: str | None, hidden_size: int, out_dim: int | None) -> nn.Module | None:
    """`None`/"none" means no head: the pooled hidden state is the embedding."""
    if name in (None, "", "none"):
        return None
    if name not in HEAD_REGISTRY:
        raise UserError(f"Unknown head {name!r}; choose none or one of: {', '.join(HEAD_REGISTRY)}."
                        + did_you_mean(name, HEAD_REGISTRY))
    if out_dim is not None and out_dim <= 0:
        raise UserError(f"head_dim must be a positive integer, got {out_dim}.")
    return HEAD_REGISTRY[name](hidden_size, out_dim or hidden_size)
