"""Retrieval evaluation: local evaluator on hand-made BEIR folders, the mteb adapter's equality with it,
the corpus-embedding cache, and one clear error per kind of bad input."""
from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest

from llm2emb.errors import UserError
from llm2emb.eval.cache import EmbeddingCache
from llm2emb.eval.data import load_beir, load_pairs, sample_queries
from llm2emb.eval.retrieval import evaluate_retrieval, run_retrieval
from llm2emb.eval.search import exact_top_k


class HashEncoder:
    """Bag of hashed words: a deterministic, instant `TextEncoder` for tests."""

    name = "hash"
    default_max_length = None
    default_query_instruction = None

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim
        self.calls: list[tuple[int, str | None]] = []

    def encode(self, texts, *, instruction=None, batch_size=32, max_length=None, show_progress=False):
        self.calls.append((len(texts), instruction))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", f"{instruction or ''}{text}".lower()):
                out[i, zlib.crc32(word.encode()) % self.dim] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def fingerprint(self) -> str:
        return f"hash-{self.dim}"

    def describe(self):
        return {"kind": "test", "embedding_dim": self.dim}


def write_beir(root: Path, corpus, queries, qrels, split="test", header=True) -> Path:
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    with open(root / "corpus.jsonl", "w") as fh:
        for row in corpus:
            fh.write(json.dumps(row) + "\n")
    with open(root / "queries.jsonl", "w") as fh:
        for row in queries:
            fh.write(json.dumps(row) + "\n")
    lines = (["query-id\tcorpus-id\tscore"] if header else []) + [f"{q}\t{d}\t{s}" for q, d, s in qrels]
    (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


CORPUS = [
    {"_id": "d1", "title": "Cats", "text": "cats purr and sleep all day"},
    {"_id": "d2", "title": "", "text": "dogs bark at the mail carrier"},
    {"_id": "d3", "title": "Fish", "text": "fish swim in the sea"},
    {"_id": "d4", "title": "", "text": "birds fly south in winter"},
]
QUERIES = [
    {"_id": "q1", "text": "why do cats purr", "metadata": {}},
    {"_id": "q2", "text": "dogs bark", "metadata": {}},
    {"_id": "q3", "text": "where do birds fly in winter"},
    {"_id": "q4", "text": "a query without judgements"},
]
QRELS = [("q1", "d1", 1), ("q2", "d2", 1), ("q3", "d4", 1), ("q3", "d3", 0)]


@pytest.fixture
def tiny_beir(tmp_path) -> Path:
    return write_beir(tmp_path / "tiny", CORPUS, QUERIES, QRELS)


# ----------------------------------------------------------------------------- data and search

def test_load_beir_builds_mteb_document_texts(tiny_beir):
    data = load_beir(tiny_beir)
    assert data.split == "test"
    assert data.corpus_texts[0] == "Cats cats purr and sleep all day"   # title + " " + text
    assert data.corpus_texts[1] == "dogs bark at the mail carrier"      # empty title: text only
    assert data.evaluable_query_ids() == ["q1", "q2", "q3"]             # q4 has no qrels row


def test_sample_queries_is_seeded_and_keeps_order():
    ids = [f"q{i}" for i in range(100)]
    a = sample_queries(ids, 10, seed=42)
    assert a == sample_queries(ids, 10, seed=42)
    assert a != sample_queries(ids, 10, seed=7)
    assert a == sorted(a, key=ids.index) and len(set(a)) == 10
    assert sample_queries(ids, 500) == ids


def test_exact_top_k_matches_full_sort_with_small_chunks():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(7, 8)).astype(np.float32)
    c = rng.normal(size=(50, 8)).astype(np.float32)
    scores, idx = exact_top_k(q, c, 5, query_chunk=3, corpus_chunk=4)
    full = q @ c.T
    np.testing.assert_array_equal(idx, np.argsort(-full, axis=1)[:, :5])
    np.testing.assert_allclose(scores, np.sort(full, axis=1)[:, ::-1][:, :5], rtol=1e-6)
    assert exact_top_k(q, c[:3], 10)[1].shape == (7, 3)


# ----------------------------------------------------------------------------- evaluator

def test_retrieval_on_tiny_set_by_hand(tiny_beir):
    enc = HashEncoder()
    run = run_retrieval(enc, tiny_beir, cache=False, query_instruction="search: ")
    # every query shares words only with its relevant document -> perfect ranking
    assert run.metrics["ndcg_at_10"] == 1.0 and run.metrics["mrr_at_10"] == 1.0
    assert run.metrics["recall_at_1"] == 1.0
    assert run.metrics["precision_at_1"] == 1.0
    assert run.metrics["precision_at_10"] == 0.1  # trec_eval divides by k even when fewer docs exist
    assert (run.n_queries, run.n_docs) == (3, 4)
    # documents are encoded without the instruction, queries with it
    assert enc.calls == [(4, None), (3, "search: ")]


def test_self_doc_id_is_dropped_from_its_query(tmp_path):
    corpus = [{"_id": "d1", "text": "how do I reset my password"},
              {"_id": "d2", "text": "reset password steps for my account"},
              {"_id": "d3", "text": "opening hours of the bank"}]
    queries = [{"_id": "q1", "text": "how do I reset my password", "metadata": {"self_doc_id": "d1"}}]
    folder = write_beir(tmp_path / "dup", corpus, queries, [("q1", "d2", 1)])
    ignored = run_retrieval(HashEncoder(), folder, cache=False)
    assert ignored.metrics["ndcg_at_1"] == 1.0  # d1 (identical) would be first otherwise
    plain = write_beir(tmp_path / "plain", corpus, [{"_id": "q1", "text": queries[0]["text"]}], [("q1", "d2", 1)])
    assert run_retrieval(HashEncoder(), plain, cache=False).metrics["ndcg_at_1"] == 0.0


def test_evaluate_retrieval_api_and_limits(tiny_beir):
    metrics = evaluate_retrieval(HashEncoder(), tiny_beir, limits=2, cache=False)
    assert {"ndcg_at_10", "mrr_at_10", "map_at_10", "recall_at_10", "recall_at_100", "precision_at_10"} <= set(metrics)
    assert run_retrieval(HashEncoder(), tiny_beir, limits=2, cache=False).n_queries == 2


def test_limits_zero_is_a_user_error(tiny_beir):
    with pytest.raises(UserError, match="limits must be a positive number"):
        evaluate_retrieval(HashEncoder(), tiny_beir, limits=0, cache=False)


# ----------------------------------------------------------------------------- the mteb adapter

def test_mteb_adapter_equals_local_evaluator_on_scifact_mini(shared_data):
    from llm2emb.eval.mteb_adapter import LocalRetrievalTask, run_mteb_task

    folder = shared_data / "eval" / "scifact_mini"
    local = run_retrieval(HashEncoder(), folder, limits=50, cache=False, show_progress=False)
    via_mteb = run_mteb_task(HashEncoder(), LocalRetrievalTask(folder, limits=50), cache=False, show_progress=False)
    assert local.n_queries == via_mteb["n_queries"] == 50
    assert local.metrics["ndcg_at_10"] > 0.3  # bag of words is a real (lexical) retriever here
    for key in ("ndcg_at_10", "mrr_at_10", "map_at_10", "recall_at_100", "precision_at_10", "ndcg_at_1000"):
        assert abs(local.metrics[key] - via_mteb["metrics"][key]) <= 1e-6, key


def test_mteb_adapter_ignores_self_docs_and_applies_query_instruction(tmp_path):
    from llm2emb.eval.mteb_adapter import LocalRetrievalTask, run_mteb_task

    corpus = [{"_id": f"d{i}", "text": f"question number {i} about topic {i % 3}"} for i in range(12)]
    queries = [{"_id": f"q{i}", "text": f"question number {i} about topic {i % 3}",
                "metadata": {"self_doc_id": f"d{i}"}} for i in range(6)]
    qrels = [(f"q{i}", f"d{i + 3}", 1) for i in range(6)]
    folder = write_beir(tmp_path / "dups", corpus, queries, qrels)
    enc = HashEncoder()
    local = run_retrieval(enc, folder, cache=False, query_instruction="find: ")
    via_mteb = run_mteb_task(enc, LocalRetrievalTask(folder), cache=False, show_progress=False,
                             query_instruction="find: ")
    for key, value in local.metrics.items():
        assert abs(value - via_mteb["metrics"][key]) <= 1e-6, key
    assert ("find: " in {instr for _, instr in enc.calls}) and (None in {instr for _, instr in enc.calls})


def test_unknown_mteb_task_name_suggests_close_names():
    from llm2emb.eval.tasks import run_task

    with pytest.raises(UserError, match="Did you mean 'T2Retrieval'"):
        run_task(HashEncoder(), "T2Retreival")


def test_task_registry_detects_kinds(tmp_path, tiny_beir):
    from llm2emb.eval.tasks import resolve_task

    sts = tmp_path / "sts.tsv"
    sts.write_text("a\tb\t4.5\nc\td\t1.0\n")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("sentence1,sentence2,label\na,b,1\nc,d,0\n")
    assert resolve_task(str(tiny_beir)).kind.name == "retrieval"
    assert resolve_task(str(sts)).kind.name == "sts"
    assert resolve_task(str(pairs)).kind.name == "pairs"
    assert resolve_task("T2Retrieval").kind.name == "mteb"
    assert resolve_task(f"mteb-local:{tiny_beir}").kind.name == "mteb-local"
    with pytest.raises(UserError, match="does not exist"):
        resolve_task(str(tmp_path / "nope" / "x.tsv"))


# ----------------------------------------------------------------------------- cache

def test_cache_hits_and_is_invalidated_when_weights_change(tiny_model, tiny_beir, tmp_path):
    import torch

    from llm2emb import Embedder
    from llm2emb.eval.encoders import as_encoder

    cache = EmbeddingCache(tmp_path / "cache")
    emb = Embedder.from_pretrained(tiny_model, pooling="mean")
    first = run_retrieval(emb, tiny_beir, cache=cache, show_progress=False)
    second = run_retrieval(emb, tiny_beir, cache=cache, show_progress=False)
    assert (first.corpus_from_cache, second.corpus_from_cache) == (False, True)
    assert second.metrics == first.metrics
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1

    # the same weights loaded again hit the cache; one changed weight misses it
    reloaded = Embedder.from_pretrained(tiny_model, pooling="mean")
    assert as_encoder(reloaded).fingerprint() == as_encoder(emb).fingerprint()
    with torch.no_grad():
        emb.backbone.layers[0].mlp.down_proj.weight[0, 0] += 0.5
    third = run_retrieval(emb, tiny_beir, cache=cache, show_progress=False)
    assert third.corpus_from_cache is False
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
    # a different max length is a different entry too
    assert run_retrieval(emb, tiny_beir, cache=cache, max_length=8, show_progress=False).corpus_from_cache is False


def test_cached_vectors_equal_fresh_ones(tiny_beir, tmp_path):
    from llm2emb.eval.cache import encode_cached

    cache = EmbeddingCache(tmp_path / "c")
    texts = load_beir(tiny_beir).corpus_texts
    fresh, hit1 = encode_cached(HashEncoder(), texts, cache=cache)
    again, hit2 = encode_cached(HashEncoder(), texts, cache=cache)
    assert (hit1, hit2) == (False, True)
    np.testing.assert_array_equal(fresh, again)
    assert not list((tmp_path / "c").glob("*.tmp"))


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("missing", ["corpus.jsonl", "queries.jsonl", "qrels"])
def test_missing_beir_file(tiny_beir, missing):
    import shutil

    target = tiny_beir / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(UserError, match=f"missing {missing}"):
        load_beir(tiny_beir)


def test_qrels_matching_nothing_says_how_many(tmp_path):
    folder = write_beir(tmp_path / "bad", CORPUS, QUERIES, [("x1", "d1", 1), ("q1", "zz", 1), ("x2", "zz", 1)])
    with pytest.raises(UserError, match=r"None of the 3 qrels rows .* 2 name a query id .* and 2 a corpus id"):
        load_beir(folder)


def test_empty_corpus(tmp_path):
    folder = write_beir(tmp_path / "empty", [], QUERIES, QRELS)
    with pytest.raises(UserError, match="corpus.jsonl is empty"):
        load_beir(folder)


def test_bad_json_line_is_named(tiny_beir):
    with open(tiny_beir / "corpus.jsonl", "a") as fh:
        fh.write("{not json\n")
    with pytest.raises(UserError, match="corpus.jsonl line 5 is not valid JSON"):
        load_beir(tiny_beir)


def test_pair_file_formats_and_errors(tmp_path):
    tsv = tmp_path / "a.tsv"
    tsv.write_text("s1\ts2\tscore\nhello\tworld\t3.5\nfoo\tbar\t1\n")
    data = load_pairs(tsv)
    assert data.texts1 == ["hello", "foo"] and list(data.scores) == [3.5, 1.0] and not data.is_binary
    csv_bom = tmp_path / "b.csv"
    csv_bom.write_text("\ufeffsentence1,sentence2,label\n\"a, b\",c,1\nd,e,0\n", encoding="utf-8")
    data = load_pairs(csv_bom)
    assert data.texts1 == ["a, b", "d"] and data.is_binary
    bad = tmp_path / "c.tsv"
    bad.write_text("x\ty\t1\nx\ty\tfive\n")
    with pytest.raises(UserError, match="line 2: score 'five' is not a number"):
        load_pairs(bad)
