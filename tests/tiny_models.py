"""Tiny random decoder LLMs (hidden 64, 2 layers) of every registered architecture, saved with a real
tokenizer (SmolLM2's byte-level BPE, which also covers Chinese) so tests exercise real tokenisation."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 49152  # SmolLM2 tokenizer size

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, tie_word_embeddings=True,
              bos_token_id=1, eos_token_id=2, pad_token_id=None)  # no padding_idx: EOS row stays random


def tiny_config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**COMMON)
    if arch == "mistral":
        return tf.MistralConfig(**COMMON, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**COMMON)
    if arch == "qwen3":
        return tf.Qwen3Config(**COMMON, head_dim=16)
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=4,
                                   layer_types=["sliding_attention", "full_attention"])
    if arch == "deepseek_v3":
        return tf.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, moe_intermediate_size=32,
                                   n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                   n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                                   q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
    raise KeyError(arch)


def build_tiny_model(arch: str, tokenizer_dir: Path, out_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir
