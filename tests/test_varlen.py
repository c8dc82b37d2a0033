"""Padding-free batches (`attn_implementation: varlen`): packed forward passes give the padded model's
vectors (causal and bidirectional, left and right padding, three architectures) and its gradients; attention
never crosses texts; the CUDA kernel's argument layout matches the per-text path; sliding-window models are
refused; export writes a plain sdpa folder."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from llm2emb.config import load_train_config
from llm2emb.errors import UserError
from llm2emb.model import varlen

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["hello world", "a much longer text about embeddings and the packing of several sequences", "x",
         "def f(x): return x + 1", "Instruct: find code\nQuery: sort a list in place"]


def _pair(model, **kwargs):
    from llm2emb.model.embedder import Embedder

    return (Embedder.from_pretrained(str(model), attn_implementation="sdpa", **kwargs),
            Embedder.from_pretrained(str(model), attn_implementation="varlen", **kwargs))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "deepseek_v3"])
@pytest.mark.parametrize("bidirectional, side, pooling", [(False, "right", "mean"), (False, "left", "eos"),
                                                          (True, "right", "eos"), (True, "left", "mean")])
def test_packed_vectors_equal_padded_vectors(tiny_model_factory, arch, bidirectional, side, pooling):
    padded, packed = _pair(tiny_model_factory(arch), pooling=pooling, bidirectional=bidirectional,
                           padding_side=side)
    a, b = padded.encode(TEXTS, batch_size=5), packed.encode(TEXTS, batch_size=5)
    np.testing.assert_allclose(b, a, atol=2e-6)


def test_attention_that_crossed_texts_would_be_caught(tiny_model, monkeypatch):
    padded, packed = _pair(tiny_model, pooling="mean")
    reference = padded.encode(TEXTS, batch_size=5)

    def one_segment(query, key, value, cu, causal, scaling, dropout):  # the whole row as one text
        whole = torch.tensor([0, int(cu[-1])])
        return _per_text(query, key, value, whole, causal, scaling, dropout)
    _per_text = varlen._per_text
    monkeypatch.setattr(varlen, "_per_text", one_segment)
    assert np.abs(packed.encode(TEXTS, batch_size=5) - reference).max() > 1e-3


def test_flash_kernel_layout_matches_the_per_text_path():
    """`_flash_varlen` feeds torch's varlen kernel (N, H, D) tensors and cumulative lengths; a stand-in kernel
    with that contract (per-text sdpa, GQA expanded) must give the per-text path's output."""
    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        assert q.dim() == 3 and cu_q.dtype == torch.int32 and max_q == int((cu_q[1:] - cu_q[:-1]).max())
        out = varlen._per_text(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                               cu_q, window_size == (-1, 0), scale, 0.0)
        return out[0].transpose(0, 1)
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 4, 11, 8), torch.randn(1, 2, 11, 8), torch.randn(1, 2, 11, 8)
    cu = torch.tensor([0, 3, 4, 11], dtype=torch.int32)
    for causal in (True, False):
        expected = varlen._per_text(query, key, value, cu, causal, 0.3, 0.0)
        got = varlen._flash_varlen(kernel, frozenset(inspect.signature(kernel).parameters), query, key, value, cu,
                                   7, causal, 0.3)
        torch.testing.assert_close(got, expected)


def test_packed_training_gradients_equal_padded(tiny_model):
    from llm2emb.losses.representation import objective_for_config
    from llm2emb.train.encode import EncodedBatch
    from llm2emb.train.trainer import build_embedder, build_encoder

    grads = {}
    for impl in ("sdpa", "varlen"):
        cfg = load_train_config(None, model_path=str(tiny_model), experiment_id="e", train_data_path="d",
                                pooling_mode="mean", lora_enabled=True, lora_dropout=0.0, bi_attn_enabled=True,
                                attn_implementation=impl, gradient_checkpointing=True)
        torch.manual_seed(0)
        embedder = build_embedder(cfg)
        encoder, objective = build_encoder(embedder), objective_for_config(cfg)
        ids = [embedder.tokenizer(t)["input_ids"] + [2] for t in TEXTS]
        batch = EncodedBatch(embedder.collate(ids[:3]), embedder.collate(ids[2:]), None, 0, True, "d", 3)
        q, p, _ = encoder(batch)
        objective(q, p, None, True).total.backward()
        grads[impl] = {n: t.grad for n, t in encoder.named_parameters() if t.requires_grad}
    assert grads["sdpa"].keys() == grads["varlen"].keys()
    for name, grad in grads["sdpa"].items():
        torch.testing.assert_close(grads["varlen"][name], grad, rtol=1e-4, atol=1e-6 * max(1.0, float(grad.abs().max())))


def test_sliding_window_models_are_refused(tiny_model_factory):
    from llm2emb.model.embedder import Embedder

    with pytest.raises(UserError, match="full-attention models only, and gemma3_text has sliding-window"):
        Embedder.from_pretrained(str(tiny_model_factory("gemma3_text")), attn_implementation="varlen")


def test_config_accepts_varlen_and_its_aliases():
    for name in ("varlen", "packed", "padding_free"):
        cfg = load_train_config(None, model_path="m", experiment_id="e", train_data_path="d", attn_implementation=name)
        assert cfg.attn_implementation == "varlen"


def test_export_writes_an_sdpa_folder(tiny_model, tmp_path):
    from llm2emb.export import export_model
    from llm2emb.model.embedder import Embedder

    embedder = Embedder.from_pretrained(str(tiny_model), pooling="mean", attn_implementation="varlen")
    embedder.save(tmp_path / "model")
    export_model(str(tmp_path / "model"), str(tmp_path / "st"))
    loaded = Embedder.from_pretrained(str(tmp_path / "st"))
    assert loaded.config.attn_implementation == "sdpa"
    np.testing.assert_allclose(loaded.encode(TEXTS[:2]), embedder.encode(TEXTS[:2]), atol=2e-6)
