"""Bidirectional attention and padding invariance for every registered architecture."""
from __future__ import annotations

import pytest
import torch

from llm2emb import Embedder
from llm2emb.errors import UserError
from llm2emb.model.bidirectional import BIDIRECTIONAL_ARCHITECTURES

ARCHS = sorted(BIDIRECTIONAL_ARCHITECTURES)


def _token0_and_padding(folder, bidirectional, attn, side):
    emb = Embedder.from_pretrained(str(folder), pooling="mean", bidirectional=bidirectional,
                                   attn_implementation=attn, padding_side=side)
    short = emb.tokenize(["the cat sat on the mat"]).input_ids[0]
    edited = list(short)
    edited[3] += 5  # change a later token
    longer = emb.tokenize(["a much longer text that forces the short one to be padded quite a bit"]).input_ids[0]
    with torch.no_grad():
        batch = emb.collate([short, edited, longer])
        hidden = emb.hidden_states(batch["input_ids"], batch["attention_mask"])
        alone = emb.hidden_states(**emb.collate([short]))
    n, width = len(short), batch["input_ids"].shape[1]
    first = 0 if side == "right" else width - n
    token0_change = (hidden[0, first] - hidden[1, first]).abs().max().item()
    padding_change = (hidden[0, first:first + n] - alone[0]).abs().max().item()
    return token0_change, padding_change


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_bidirectional_sees_later_tokens_and_ignores_padding(tiny_model_factory, arch, attn, side):
    folder = tiny_model_factory(arch)
    causal_change, causal_pad = _token0_and_padding(folder, False, attn, side)
    bi_change, bi_pad = _token0_and_padding(folder, True, attn, side)
    assert causal_change == 0.0, "causal: token 0 must not see later tokens"
    assert bi_change > 1e-3, "bidirectional: token 0 must change when a later token changes"
    assert causal_pad < 1e-5 and bi_pad < 1e-5, "padding must never change a text's hidden states"


def test_required_architectures_registered():
    assert {"qwen3", "deepseek_v3", "llama", "mistral", "qwen2", "gemma3_text"} <= set(ARCHS)


def test_unverified_architecture_is_a_clear_error(tmp_path, smollm2_dir):
    import transformers as tf
    from transformers import AutoTokenizer

    config = tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=49152)
    tf.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="not verified for model type 'gpt2'.*qwen3"):
        Embedder.from_pretrained(str(tmp_path), bidirectional=True)
    assert Embedder.from_pretrained(str(tmp_path), pooling="mean").encode(["ok"]).shape == (1, 32)


def test_saved_model_remembers_bidirectional(tiny_model_factory, tmp_path):
    emb = Embedder.from_pretrained(str(tiny_model_factory("qwen3")), pooling="mean", bidirectional=True)
    texts = ["bidirectional models remember it", "second"]
    before = emb.encode(texts)
    emb.save(tmp_path / "saved")
    again = Embedder.from_pretrained(str(tmp_path / "saved"))
    assert again.config.bidirectional
    assert abs(again.encode(texts) - before).max() < 1e-6
