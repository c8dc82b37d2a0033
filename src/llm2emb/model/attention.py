"""Attention implementation names, shared by training, evaluation and export.

The seed's configs say `flash`, `sdpa` or `eager`; transformers calls flash attention `flash_attention_2`.
Flash attention needs CUDA and the flash-attn package; without them the same model runs with sdpa (the same
vectors up to kernel rounding), with a warning saying so.
"""
from __future__ import annotations

import importlib.util
import logging

logger = logging.getLogger(__name__)

# varlen: llm2emb's padding-free packed forward (model/varlen.py), not a transformers name
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention", "varlen")
ATTN_ALIASES = {"flash": "flash_attention_2", "flash_attn": "flash_attention_2", "flash2": "flash_attention_2",
                "flash_attn_2": "flash_attention_2", "flash_attention": "flash_attention_2",
                "flash3": "flash_attention_3", "packed": "varlen", "padding_free": "varlen"}
_FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def portable_attn_implementation(name: str) -> str:
    """What an exported folder should load with: sdpa in place of implementations that need more than torch
    and transformers (the flash kernels and their packages, llm2emb's own `varlen`); others unchanged."""
    name = canonical_attn_implementation(name)
    return "sdpa" if name in _FLASH_PACKAGES or name == "varlen" else name


def canonical_attn_implementation(name: str) -> str:
    """The transformers name for a seed spelling (`flash` -> `flash_attention_2`); others unchanged."""
    return ATTN_ALIASES.get(name, name)


def runnable_attn_implementation(requested: str) -> str:
    """`requested` (any spelling) if it can run here, else sdpa: flash kernels need CUDA and their package."""
    import torch

    name = canonical_attn_implementation(requested)
    package = _FLASH_PACKAGES.get(name)
    if package is None:
        return name
    if not torch.cuda.is_available():
        logger.warning("attn_implementation=%s needs CUDA; using sdpa on this machine", name)
        return "sdpa"
    if importlib.util.find_spec(package) is None:
        logger.warning("attn_implementation=%s needs the %s package, which is not installed; using sdpa "
                       "(pip install flash-attn for the faster kernel)", name, package)
        return "sdpa"
    return name
