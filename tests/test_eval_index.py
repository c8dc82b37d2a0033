"""Dense retrieval through an index library (`llm2emb eval --index`): faiss' exact index returns what exact
search returns, HNSW keeps most of it, metrics through run_retrieval are exact search's for faiss-flat, and bad
input (an unknown index, faiss missing, an index for a sparse model) is one sentence."""
from __future__ import annotations

import builtins

import numpy as np
import pytest

from llm2emb.cli import main
from llm2emb.errors import UserError
from llm2emb.eval.retrieval import run_retrieval
from llm2emb.eval.search import SEARCHERS, exact_top_k, top_k
from test_eval_retrieval import HashEncoder, tiny_beir  # noqa: F401  (fixture)

faiss = pytest.importorskip("faiss")


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_faiss_flat_equals_exact_and_hnsw_keeps_most_neighbours():
    rng = np.random.default_rng(0)
    corpus, queries = _unit(rng, 3000, 48), _unit(rng, 64, 48)
    exact_scores, exact_idx = exact_top_k(queries, corpus, 20)
    flat_scores, flat_idx = top_k(queries, corpus, 20, "faiss-flat")
    np.testing.assert_array_equal(flat_idx, exact_idx)
    np.testing.assert_allclose(flat_scores, exact_scores, rtol=1e-5, atol=1e-6)
    _, hnsw_idx = top_k(queries, corpus, 20, "faiss-hnsw")
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(hnsw_idx, exact_idx)])
    assert recall >= 0.9
    assert set(SEARCHERS) >= {"exact", "faiss-flat", "faiss-hnsw"}
    assert top_k(queries, corpus[:5], 20, "faiss-flat")[1].shape == (64, 5)   # k capped by the corpus


def test_run_retrieval_with_an_index_gives_exact_metrics(tiny_beir):  # noqa: F811
    exact = run_retrieval(HashEncoder(), tiny_beir, cache=False)
    flat = run_retrieval(HashEncoder(), tiny_beir, cache=False, index="faiss-flat")
    assert flat.metrics == exact.metrics and flat.index_info["index"] == "faiss-flat"


def test_bad_index_input(tiny_beir, tiny_model, monkeypatch, capsys):  # noqa: F811
    assert main(["eval", "--model", str(tiny_model), "--tasks", str(tiny_beir), "--index", "annoy"]) == 2
    assert "--index 'annoy' is not a search index; choose one of: exact, faiss-flat, faiss-hnsw" in \
        capsys.readouterr().err
    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("no faiss")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(UserError, match=r"pip install 'llm2emb\[index\]'"):
        top_k(np.ones((1, 4), np.float32), np.ones((3, 4), np.float32), 2, "faiss-hnsw")
    monkeypatch.setattr(builtins, "__import__", real_import)

    from llm2emb.model.embedder import Embedder

    sparse = Embedder.from_pretrained(str(tiny_model), representation="sparse", max_length=32)
    with pytest.raises(UserError, match="--index faiss-flat searches dense vectors; this is a sparse model"):
        run_retrieval(sparse, tiny_beir, cache=False, index="faiss-flat", show_progress=False)
