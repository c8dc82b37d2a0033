"""Sparse and multi-vector models export through llm2emb's module to the sentence-transformers classes that
hold them (SparseEncoder, MultiVectorEncoder): the folder reloads there with `trust_remote_code=True` and
gives llm2emb's own outputs and scores (query top-k by `encode_query`, token sets without the instruction
prefix and special tokens); the export's self-check catches a folder that does not."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llm2emb import Embedder
from llm2emb.export import export_model
from llm2emb.export.exporter import ExportCheckError
from llm2emb.model.representations.encoding import encode_heads

st = pytest.importorskip("sentence_transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

INSTRUCTION = "Instruct: find the code.\nQuery:"
DOCS = ["def add(a, b): return a + b", "Sorting lists in place with list.sort().", "向量检索", "x"]
QUERIES = ["how to add two numbers", "sort a list"]


def _source(tmp_path, tiny_model, representation: str, **options):
    torch.manual_seed(0)
    emb = Embedder.from_pretrained(str(tiny_model), representation=representation, max_length=32,
                                   query_instruction=INSTRUCTION, skip_instruction=True,
                                   representation_options=options)
    if representation == "multi_vector":  # a trained-looking projection, not the identity-ish init
        with torch.no_grad():
            for param in emb.representation.parameters():
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    emb.save(tmp_path / "src")
    return tmp_path / "src", emb


def _maxsim(q: np.ndarray, d: np.ndarray) -> float:
    return float((q @ d.T).max(axis=1).sum())


def test_sparse_model_loads_in_sparse_encoder_with_the_same_weights(tiny_model, tmp_path):
    src, emb = _source(tmp_path, tiny_model, "sparse", sparse_query_top_k=8, sparse_doc_top_k=0)
    result = export_model(str(src), tmp_path / "out")
    assert result.route == "module" and any("sparse representation" in r for r in result.route_reasons)
    assert min(result.checks.values()) > 0.9999
    config = json.loads((tmp_path / "out" / "config_sentence_transformers.json").read_text())
    assert config["model_type"] == "SparseEncoder" and config["similarity_fn_name"] == "dot"
    model = st.SparseEncoder(str(tmp_path / "out"), device="cpu", trust_remote_code=True)
    q = model.encode_query(QUERIES, convert_to_sparse_tensor=False).numpy()
    d = model.encode_document(DOCS, convert_to_sparse_tensor=False).numpy()
    ref_q = encode_heads(emb, QUERIES, instruction=INSTRUCTION, role="query").sparse.toarray()
    ref_d = encode_heads(emb, DOCS).sparse.toarray()
    assert (q > 0).sum(axis=1).max() <= 8 and (d > 0).sum(axis=1).min() > 8   # query top-k only
    np.testing.assert_allclose(q, ref_q, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d, ref_d, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.similarity(torch.from_numpy(q), torch.from_numpy(d)).numpy(), ref_q @ ref_d.T,
                               rtol=1e-4, atol=1e-4)
    assert "SparseEncoder(" in (tmp_path / "out" / "README.md").read_text()


def test_multi_vector_model_loads_in_multi_vector_encoder_with_the_same_token_sets(tiny_model, tmp_path):
    src, emb = _source(tmp_path, tiny_model, "multi_vector", token_dim=16)
    result = export_model(str(src), tmp_path / "out")
    assert result.route == "module" and min(result.checks.values()) > 0.9999
    model = st.MultiVectorEncoder(str(tmp_path / "out"), device="cpu", trust_remote_code=True)
    q = [np.asarray(t, dtype=np.float32) for t in model.encode_query(QUERIES)]
    d = [np.asarray(t, dtype=np.float32) for t in model.encode_document(DOCS)]
    ref_q = encode_heads(emb, QUERIES, instruction=INSTRUCTION, role="query").multi_vector
    ref_d = encode_heads(emb, DOCS).multi_vector
    for got, ref in [(q[i], ref_q[i]) for i in range(len(QUERIES))] + [(d[i], ref_d[i]) for i in range(len(DOCS))]:
        assert got.shape == ref.shape       # the instruction prefix and special tokens are not in the set
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    scores = np.asarray(model.similarity(q, d), dtype=np.float64)
    expected = np.array([[_maxsim(ref_q[i], ref_d[j]) for j in range(len(DOCS))] for i in range(len(QUERIES))])
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)


def test_the_self_check_catches_a_folder_with_other_outputs(tiny_model, tmp_path, monkeypatch):
    from llm2emb.export import st_module

    forward = st_module.LLM2EmbModule.forward

    def wrong(self, features, task=None, **kwargs):  # forgets the query top-k: reference and export disagree
        return forward(self, features, task=None, **kwargs)

    monkeypatch.setattr(st_module.LLM2EmbModule, "forward", wrong)
    src, _ = _source(tmp_path, tiny_model, "sparse", sparse_query_top_k=4)
    with pytest.raises(ExportCheckError, match="sentence-transformers"):
        export_model(str(src), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
