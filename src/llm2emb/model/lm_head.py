"""The LLM's own LM head (vocabulary logits from token states), for what reads it: the sparse representation
(SPLADE weights) and LLM2Vec's masked next-token prediction. The head is the tied input embeddings when the
model ties them, else the checkpoint's `lm_head.weight` (the backbone is loaded without its LM head)."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def _text_config(config):
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


def is_tied(backbone) -> bool:
    """True when the model's LM head is its input embedding matrix."""
    config = backbone.config
    return bool(getattr(config, "tie_word_embeddings", False) or getattr(_text_config(config), "tie_word_embeddings",
                                                                      False))


def checkpoint_tensor(source: str, name: str) -> torch.Tensor | None:
    """Tensor `name` from the safetensors checkpoint of `source` (folder or hub id), None when absent."""
    from safetensors import safe_open

    try:
        from transformers.utils import cached_file
    except ImportError:  # pragma: no cover
        cached_file = None

    def locate(filename: str) -> str | None:
        local = Path(source) / filename
        if local.is_file():
            return str(local)
        if Path(source).is_dir() or cached_file is None:
            return None
        try:
            return cached_file(source, filename, _raise_exceptions_for_missing_entries=False)
        except (OSError, ValueError):
            return None

    files = []
    index = locate("model.safetensors.index.json")
    if index is not None:
        weight_map = json.loads(Path(index).read_text(encoding="utf-8")).get("weight_map", {})
        if name in weight_map:
            files.append(locate(weight_map[name]))
    else:
        files.append(locate("model.safetensors"))
    for file in files:
        if file is None:
            continue
        with safe_open(file, framework="pt") as handle:
            if name in handle.keys():
                return handle.get_tensor(name)
    return None
