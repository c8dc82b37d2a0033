"""Embedder API: encode contract, order, dims, errors, save/load round trip, LoRA adapter folders."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llm2emb import Embedder
from llm2emb.errors import UserError
from llm2emb.model.loading import resolve_model_path


def test_encode_order_norm_dim_and_empty(tiny_model):
    emb = Embedder.from_pretrained(str(tiny_model), pooling="mean")
    texts = ["b" * 50, "a", "medium length text", ""]
    vecs = emb.encode(texts, batch_size=2)
    assert vecs.shape == (4, 64) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    single = emb.encode(["a"])[0]
    assert np.abs(vecs[1] - single).max() < 1e-5  # returned in input order
    small = emb.encode(texts, dim=16)
    assert small.shape == (4, 16) and np.allclose(np.linalg.norm(small, axis=1), 1, atol=1e-5)
    raw = emb.encode(texts, normalize=False, dim=16)
    assert np.allclose(small, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)
    assert emb.encode([]).shape == (0, 64)
    with pytest.raises(UserError, match="dim=65 is out of range"):
        emb.encode(["x"], dim=65)
    with pytest.raises(UserError, match="list of texts"):
        emb.encode("not a list")


def test_eos_appended_and_kept_on_truncation(tiny_model):
    emb = Embedder.from_pretrained(str(tiny_model), max_length=8)
    enc = emb.tokenize(["word " * 40, "hi"])
    eos = emb.tokenizer.eos_token_id
    assert all(ids[-1] == eos for ids in enc.input_ids)
    assert len(enc.input_ids[0]) == 8 and enc.truncated == 1


def test_instruction_is_prepended(tiny_model):
    emb = Embedder.from_pretrained(str(tiny_model), pooling="mean")
    a = emb.encode(["cat"], instruction="Instruct: x\nQuery: ")
    b = emb.encode(["Instruct: x\nQuery: cat"])
    assert np.abs(a - b).max() < 1e-6


@pytest.mark.parametrize("pooling,head", [("mean", None), ("attention", "linear"), ("latent_attention", "mlp")])
def test_save_load_round_trip(tiny_model, tmp_path, pooling, head):
    emb = Embedder.from_pretrained(str(tiny_model), pooling=pooling, head=head, head_dim=32 if head else None,
                                   skip_instruction=True, max_length=64)
    texts = ["round trip", "保存再加载", "Instruct: t\nQuery: with instruction"]
    before = emb.encode(texts)
    emb.save(tmp_path / "m")
    again = Embedder.from_pretrained(str(tmp_path / "m"))
    assert (again.config.pooling, again.config.head, again.config.max_length) == (pooling, head, 64)
    assert np.abs(again.encode(texts) - before).max() < 1e-6


def test_lora_adapter_save_load_and_merge(tiny_model, tmp_path):
    emb = Embedder.from_pretrained(str(tiny_model), pooling="mean")
    base = emb.encode(["lora text"])
    emb.add_lora(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, param in emb.backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    tuned = emb.encode(["lora text"])
    assert np.abs(tuned - base).max() > 1e-3
    emb.save(tmp_path / "adapter")
    emb.save(tmp_path / "merged", merge_lora=True)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    for folder in ("adapter", "merged"):
        again = Embedder.from_pretrained(str(tmp_path / folder))
        assert np.abs(again.encode(["lora text"]) - tuned).max() < 1e-5, folder


def test_lora_wrapping_prints_no_transformers_deprecation_noise(tiny_model, tmp_path):
    """peft reads transformers' deprecated `is_gradient_checkpointing` when wrapping; users must not see it."""
    import warnings

    emb = Embedder.from_pretrained(str(tiny_model), pooling="mean")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emb.add_lora(r=4, alpha=8, dropout=0.0, target_modules=["q_proj"])
        emb.save(tmp_path / "adapter")
        Embedder.from_pretrained(str(tmp_path / "adapter"))
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_bad_model_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_path("./no/such/dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    bad = tmp_path / "fake.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(UserError, match="not a GGUF decoder LLM"):
        Embedder.from_pretrained(str(bad))


def test_unknown_alias_or_offline_hub_id_is_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"^No local folder nobody/no-such-model-xyz, and Hub access is off"):
        Embedder.from_pretrained("nobody/no-such-model-xyz")
