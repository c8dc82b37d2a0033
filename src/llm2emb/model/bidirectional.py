"""Bidirectional attention for decoder-only LLMs (the seed's "深度改动", as in NV-Embed, LLM2Vec, Jina v4).

transformers 5 builds a bidirectional mask when `config.is_causal` is False (masking_utils). That alone is
not enough: with no padding the mask is skipped and sdpa falls back on each attention module's own
`is_causal` flag, so both must be switched off. Setting only the modules' flag is wrong too (eager keeps
the causal mask, and sdpa does as soon as a batch has padding). Each architecture below was checked by a
test: token 0's hidden state changes when a later token changes, and padding never leaks in.
"""
from __future__ import annotations

from typing import Callable

import torch

from llm2emb.errors import UserError

# model_type -> a function that adjusts the config before the model is built (architecture quirks).
BIDIRECTIONAL_ARCHITECTURES: dict[str, Callable[[object], None]] = {}


def register_bidirectional(*model_types: str):
    def wrap(fn: Callable[[object], None]) -> Callable[[object], None]:
        for model_type in model_types:
            BIDIRECTIONAL_ARCHITECTURES[model_type] = fn
        return fn
    return wrap


@register_bidirectional("qwen3", "deepseek_v3", "llama", "mistral", "qwen2")
def _plain_decoder(config: object) -> None:
    """These build their masks through `create_causal_mask`, which honours `config.is_causal`."""


@register_bidirectional("gemma3_text")
def _gemma3(config: object) -> None:
    """Gemma 3 has a native switch; it also widens sliding-window layers to a symmetric window."""
    config.use_bidirectional_attention = True


def check_supported(model_type: str) -> None:
    if model_type not in BIDIRECTIONAL_ARCHITECTURES:
        raise UserError(
            f"Bidirectional attention is not verified for model type {model_type!r}; supported: "
            f"{', '.join(sorted(BIDIRECTIONAL_ARCHITECTURES))}. Use bidirectional=False (bi_attn_enabled: false).")


def make_config_bidirectional(config) -> None:
    """Mutate a transformers config (before the model is built) so the model attends both ways."""
    check_supported(config.model_type)
    BIDIRECTIONAL_ARCHITECTURES[config.model_type](config)
    config.is_causal = False


def make_modules_bidirectional(model: torch.nn.Module) -> None:
    """Switch off every attention module's own causal flag (used by sdpa/flash when no mask is passed)."""
    for module in model.modules():
        if hasattr(module, "is_causal") and isinstance(getattr(module, "is_causal"), bool):
            module.is_causal = False
