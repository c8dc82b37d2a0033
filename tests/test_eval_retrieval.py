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


# ----------------------------------------------------------------------------- per-item scores

GRADED_CORPUS = [
    {"_id": "d1", "text": "cats purr softly"},
    {"_id": "d2", "text": "cats sleep all day long"},
    {"_id": "d3", "text": "dogs bark at cats"},
    {"_id": "d4", "text": "birds fly south"},
    {"_id": "d5", "text": "fish swim"},
]
GRADED_QUERIES = [{"_id": "q1", "text": "cats purr"}, {"_id": "q2", "text": "why do dogs bark at night"},
                  {"_id": "q3", "text": "cats"}, {"_id": "q4", "text": "where do birds fly"}]
GRADED_QRELS = [("q1", "d1", 1), ("q2", "d2", 1), ("q3", "d2", 2), ("q3", "d3", 1), ("q4", "d4", 1),
                ("q4", "d5", 1)]


@pytest.fixture
def graded_beir(tmp_path) -> Path:
    """Imperfect rankings, so per-query values differ and the averages are not trivially 1."""
    return write_beir(tmp_path / "graded", GRADED_CORPUS, GRADED_QUERIES, GRADED_QRELS)


def test_per_query_scores_average_to_the_aggregates(graded_beir):
    import math

    from llm2emb.eval.metrics import PER_QUERY_METRICS

    run = run_retrieval(HashEncoder(), graded_beir, cache=False, show_progress=False)
    assert list(run.per_query) == list(PER_QUERY_METRICS)
    ndcg = run.per_query["ndcg_at_10"]
    assert sorted(ndcg) == ["q1", "q2", "q3", "q4"]
    # by hand: q2's relevant d2 shares no word, ties at 0 after d3 with d4, d5 (larger ids first) -> rank 4;
    # q3 ranks d1, d3 (grade 1), d2 (grade 2) by length-normalised overlap
    assert ndcg["q1"] == 1.0 and run.per_query["mrr_at_10"]["q2"] == 0.25
    assert ndcg["q2"] == pytest.approx(1 / math.log2(5), abs=1e-12)
    assert ndcg["q3"] == pytest.approx((1 / math.log2(3) + 2 / math.log2(4)) / (2 + 1 / math.log2(3)), abs=1e-12)
    assert 0 < run.metrics["ndcg_at_10"] < 1
    for name, values in run.per_query.items():
        mean = sum(values.values()) / len(values)
        if name.startswith("mrr"):  # MTEB does not round MRR
            assert abs(mean - run.metrics[name]) <= 1e-12, name
        else:  # MTEB rounds the other averages to 5 decimals
            assert round(mean, 5) == run.metrics[name] and abs(mean - run.metrics[name]) <= 5e-6, name
    # with limits only the sampled queries are scored
    limited = run_retrieval(HashEncoder(), graded_beir, limits=2, cache=False, show_progress=False)
    assert len(limited.per_query["ndcg_at_10"]) == 2 and set(limited.per_query["ndcg_at_10"]) < set(ndcg)


def _record(task_spec: str, outcome) -> dict:
    from llm2emb.eval.results import make_record
    from llm2emb.eval.tasks import resolve_task

    return make_record(label="hash", model={"source": "hash"}, config=None, task=resolve_task(task_spec),
                       outcome=outcome, limits=None, seed=42, query_instruction=None, batch_size=32,
                       max_length=None, dim=None, started="2025-01-01T00:00:00+00:00", seconds=0.1,
                       versions={})


def test_retrieval_record_carries_rounded_per_query_scores(graded_beir, tmp_path):
    from llm2emb.eval.report import render_report
    from llm2emb.eval.results import load_records, write_record
    from llm2emb.eval.tasks import TaskOptions, run_task

    outcome = run_task(HashEncoder(), str(graded_beir), TaskOptions(cache=False, show_progress=False))
    assert outcome.per_item["ndcg_at_10"]["q2"] == pytest.approx(0.43067655807339306, abs=1e-15)
    path = write_record(_record(str(graded_beir), outcome), tmp_path / "results")
    saved = json.loads(path.read_text())
    assert saved["per_item"]["ndcg_at_10"] == {"q1": 1.0, "q2": 0.430677, "q3": 0.619906, "q4": 0.919721}
    assert set(saved["per_item"]) == set(outcome.per_item)
    assert saved["metrics"] == outcome.metrics  # the aggregates are not rounded further
    # records written before per_item existed still load and compare
    old = dict(saved)
    del old["per_item"]
    (tmp_path / "results" / "old.json").write_text(json.dumps({**old, "label": "old"}))
    records = load_records([tmp_path / "results"])
    assert sorted(r["label"] for r in records) == ["hash", "old"]
    assert "old" in render_report(records)


def test_sts_and_pairs_outcomes_carry_per_pair_values(tmp_path):
    from scipy.stats import spearmanr
    from sklearn.metrics import average_precision_score

    from llm2emb.eval.pairs import evaluate_pairs
    from llm2emb.eval.sts import evaluate_sts
    from llm2emb.eval.tasks import TaskOptions, run_task

    sts = tmp_path / "sts.tsv"
    sts.write_text("sentence1\tsentence2\tscore\ncats purr\tcats purr softly\t4.5\ndogs bark\tfish swim\t0.5\n"
                   "birds fly south\tbirds fly\t4.0\ncats sleep\tdogs sleep all day\t2.0\ncats purr\tfish\t1.0\n")
    opts = TaskOptions(show_progress=False)
    outcome = run_task(HashEncoder(), str(sts), opts)
    cosine, gold = outcome.per_item["cosine"], outcome.per_item["gold"]
    assert gold == [4.5, 0.5, 4.0, 2.0, 1.0]  # file order
    assert len(cosine) == 5 and cosine[1] == pytest.approx(0.0, abs=1e-6)  # no shared word
    assert spearmanr(gold, cosine)[0] == outcome.metrics["cosine_spearman"]
    assert outcome.metrics == evaluate_sts(HashEncoder(), sts, show_progress=False)  # public API unchanged
    saved = _record(str(sts), outcome)["per_item"]
    assert saved["gold"] == gold and saved["cosine"] == [float(f"{c:.6g}") for c in cosine]

    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("cats purr\tcats purr softly\t1\ndogs bark\tfish swim\t0\nbirds fly\tbirds fly south\t1\n"
                     "cats sleep\tdogs bark\t0\n")
    outcome = run_task(HashEncoder(), str(pairs), opts)
    assert outcome.per_item["label"] == [1, 0, 1, 0]
    assert average_precision_score(outcome.per_item["label"], outcome.per_item["cosine"]) == \
        outcome.metrics["cosine_ap"]
    assert outcome.metrics == evaluate_pairs(HashEncoder(), pairs, show_progress=False)
    assert _record(str(pairs), outcome)["per_item"]["label"] == [1, 0, 1, 0]


# per-query values of the hand-made run in test_eval_metrics.py (ranks spelled out there)
HAND_QRELS = {"q1": {"d2": 1, "d3": 1}, "q2": {"d4": 1}, "q3": {"d1": 2, "d2": 1}}
HAND_RUN = {
    "q1": {"d1": 0.9, "d2": 0.8, "d3": 0.7, "d4": 0.1},   # relevant at ranks 2 and 3
    "q2": {"d4": 0.9, "d1": 0.5, "d2": 0.4, "d3": 0.3},   # relevant at rank 1
    "q3": {"d2": 0.9, "d1": 0.8, "d3": 0.2, "d4": 0.1},   # grade 1 before grade 2
}


def _unit_2d(angles_deg):
    a = np.radians(np.asarray(angles_deg, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def test_retrieval_per_query_values_by_hand():
    import math

    from llm2emb.eval.metrics import PER_QUERY_METRICS, retrieval_metrics, retrieval_scores

    metrics, per_query = retrieval_scores(HAND_QRELS, HAND_RUN, k_values=(1, 3, 10),
                                          per_query=("ndcg_at_3", "mrr_at_10", "recall_at_1", "ndcg_at_99"))
    assert metrics == retrieval_metrics(HAND_QRELS, HAND_RUN, k_values=(1, 3, 10))  # same aggregates as before
    assert list(per_query) == ["ndcg_at_3", "mrr_at_10", "recall_at_1"]  # caller's order; no k=99 evaluated
    ndcg3_q1 = (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    ndcg3_q3 = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))
    assert per_query["ndcg_at_3"] == pytest.approx({"q1": ndcg3_q1, "q2": 1.0, "q3": ndcg3_q3}, abs=1e-12)
    assert per_query["mrr_at_10"] == {"q1": 0.5, "q2": 1.0, "q3": 1.0}
    assert per_query["recall_at_1"] == {"q1": 0.0, "q2": 1.0, "q3": 0.5}
    # the aggregate is the per-query mean (rounded to 5 decimals as MTEB does; MRR is not rounded)
    for name, values in per_query.items():
        mean = sum(values.values()) / len(values)
        assert (mean if name.startswith("mrr") else round(mean, 5)) == metrics[name], name
    assert set(retrieval_scores(HAND_QRELS, HAND_RUN)[1]) == set(PER_QUERY_METRICS)


def test_sts_and_pair_scores_return_the_cosines_behind_the_metrics():
    from scipy.stats import spearmanr
    from sklearn.metrics import average_precision_score

    from llm2emb.eval.metrics import pair_metrics, pair_scores, sts_metrics, sts_scores

    emb1 = _unit_2d([0, 0, 0, 0])
    emb2 = _unit_2d([0, 60, 90, 120])
    gold = [4.0, 3.0, 1.0, 2.0]
    metrics, cosine = sts_scores(emb1, emb2, gold)
    assert metrics == sts_metrics(emb1, emb2, gold)
    np.testing.assert_allclose(cosine, [1, 0.5, 0, -0.5], atol=1e-6)
    assert spearmanr(gold, cosine)[0] == metrics["cosine_spearman"]
    labels = [1, 0, 1, 0]
    metrics, cosine = pair_scores(emb1, emb2, labels)
    assert metrics == pair_metrics(emb1, emb2, labels)
    assert average_precision_score(labels, cosine) == metrics["cosine_ap"]


def test_build_run_drops_missing_neighbours():
    """faiss HNSW returns -1 where it found fewer than k neighbours: no document is made up for it."""
    import numpy as np

    from llm2emb.eval.retrieval import build_run

    scores = np.array([[0.9, 0.5, -3.4e38]], dtype=np.float32)
    indices = np.array([[1, 0, -1]])
    run = build_run(["q1"], ["d0", "d1", "d2"], scores, indices)
    assert run == {"q1": {"d1": pytest.approx(0.9), "d0": pytest.approx(0.5)}}
