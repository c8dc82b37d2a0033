"""Evaluating multi-vector, sparse and hybrid models: chunked MaxSim, the sparse product and the combined top-k
against direct computations; retrieval / STS metrics against metrics computed by hand from the model's own
outputs; result records; dense-only options refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from llm2emb.errors import UserError
from llm2emb.eval.late_interaction import maxsim_matrix
from llm2emb.eval.metrics import retrieval_scores
from llm2emb.eval.representations import RepresentationEncoder, search_top_k
from llm2emb.eval.retrieval import build_run, run_retrieval
from llm2emb.eval.sparse import sparse_matrix
from llm2emb.model.embedder import Embedder
from llm2emb.model.representations.encoding import EncodedHeads, TokenSets, encode_heads
from test_eval_retrieval import CORPUS, QRELS, QUERIES, write_beir

rng = np.random.default_rng(0)


def random_sets(n: int, dim: int = 8, longest: int = 9) -> TokenSets:
    lengths = rng.integers(1, longest + 1, size=n)
    vectors = rng.standard_normal((int(lengths.sum()), dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return TokenSets(vectors, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def loop_maxsim(q: np.ndarray, d: np.ndarray) -> float:
    return float(np.mean([max(float(qi @ dj) for dj in d) for qi in q]))


@pytest.mark.parametrize("budget", [1, 4096, 2**28])  # 1 byte: one document per group
def test_chunked_maxsim_equals_loops(budget):
    queries, docs = random_sets(5), random_sets(23)
    got = maxsim_matrix(queries, docs, budget_bytes=budget)
    expected = np.array([[loop_maxsim(queries[i], docs[j]) for j in range(len(docs))] for i in range(len(queries))])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_sparse_product_equals_dense_dot_products():
    q = sp.random(4, 50, density=0.2, format="csr", random_state=1, dtype=np.float32)
    d = sp.random(9, 50, density=0.3, format="csr", random_state=2, dtype=np.float32)
    np.testing.assert_allclose(sparse_matrix(q, d), q.toarray() @ d.toarray().T, atol=1e-6)


def test_combined_top_k_equals_a_full_sort_with_small_blocks():
    n_q, n_d = 7, 31
    heads = EncodedHeads(dense=rng.standard_normal((n_q, 4)).astype(np.float32),
                         multi_vector=random_sets(n_q),
                         sparse=sp.random(n_q, 40, density=0.3, format="csr", random_state=3, dtype=np.float32))
    docs = EncodedHeads(dense=rng.standard_normal((n_d, 4)).astype(np.float32), multi_vector=random_sets(n_d),
                        sparse=sp.random(n_d, 40, density=0.3, format="csr", random_state=4, dtype=np.float32))
    weights = {"dense": 1.0, "sparse": 0.3, "multi_vector": 0.7}
    full = np.zeros((n_q, n_d))
    for i in range(n_q):
        for j in range(n_d):
            dot = float(heads.sparse[i].toarray()[0] @ docs.sparse[j].toarray()[0])
            full[i, j] = (float(heads.dense[i] @ docs.dense[j]) + 0.3 * dot
                          + 0.7 * loop_maxsim(heads.multi_vector[i], docs.multi_vector[j]))
    scores, indices = search_top_k(heads, docs, weights, k=5, query_chunk=3, doc_chunk=4)
    expected = np.argsort(-full, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(full, expected, 1), atol=1e-5)


def _direct_metrics(embedder, data_dir, weights):
    """Scores from the model's own outputs by explicit loops -> run -> the same metric function."""
    from llm2emb.eval.data import load_beir

    data = load_beir(data_dir)
    qids = data.evaluable_query_ids()
    texts = [data.query_texts[data.query_ids.index(q)] for q in qids]
    queries = encode_heads(embedder, texts, role="query")
    docs = encode_heads(embedder, data.corpus_texts, role="document")
    full = np.zeros((len(qids), len(docs)))
    for i in range(len(qids)):
        for j in range(len(docs)):
            s = 0.0
            if "dense" in weights:
                s += weights["dense"] * float(queries.dense[i] @ docs.dense[j])
            if "sparse" in weights:
                s += weights["sparse"] * float((queries.sparse[i].multiply(docs.sparse[j])).sum())
            if "multi_vector" in weights:
                s += weights["multi_vector"] * loop_maxsim(queries.multi_vector[i], docs.multi_vector[j])
            full[i, j] = s
    order = np.argsort(-full, axis=1, kind="stable")
    run = build_run(qids, data.corpus_ids, np.take_along_axis(full, order, 1), order)
    return retrieval_scores({q: data.qrels[q] for q in qids}, run)[0], docs


@pytest.mark.parametrize("representation", ["multi_vector", "sparse", "hybrid"])
def test_retrieval_metrics_equal_a_direct_computation(tiny_model, tmp_path, representation):
    folder = write_beir(tmp_path / "tiny", CORPUS, QUERIES, QRELS)
    emb = Embedder.from_pretrained(tiny_model, representation=representation, max_length=32,
                                   representation_options={"sparse_query_top_k": 7, "sparse_doc_top_k": 11})
    run = run_retrieval(emb, folder, show_progress=False)
    weights = emb.representation.weights
    expected, docs = _direct_metrics(emb, folder, weights)
    for key in ("ndcg_at_10", "mrr_at_10", "recall_at_3", "map_at_10"):
        assert run.metrics[key] == pytest.approx(expected[key], abs=1e-6), key
    assert run.index_info["representation"] == representation
    assert run.index_info["index_bytes_per_doc"] == pytest.approx(docs.nbytes / len(CORPUS), abs=0.1)
    if representation == "sparse":  # 11 float32 weights + 11 int32 ids per document, + one int64 row pointer
        assert run.index_info["index_bytes_per_doc"] <= 11 * 8 + 8 + 8 / len(CORPUS) + 0.1


def test_sts_and_pairs_use_the_model_own_similarity(tiny_model, tmp_path):
    from scipy.stats import spearmanr

    from llm2emb.eval.tasks import run_task

    pairs = [("cats purr", "cats sleep", 4.0), ("dogs bark", "fish swim", 0.5), ("birds fly", "birds migrate", 3.5),
             ("a red car", "the sea is deep", 0.0), ("hot tea", "warm tea", 4.5)]
    path = tmp_path / "sts.tsv"
    path.write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in pairs))
    emb = Embedder.from_pretrained(tiny_model, representation="sparse", max_length=32)
    outcome = run_task(emb, f"sts:{path}")
    enc = encode_heads(emb, [t for a, b, _ in pairs for t in (a, b)], role="document").sparse
    dots = [float(enc[2 * i].multiply(enc[2 * i + 1]).sum()) for i in range(len(pairs))]
    assert outcome.main_score == "similarity_spearman"
    assert outcome.metrics["similarity_spearman"] == pytest.approx(spearmanr([s for *_, s in pairs], dots)[0])
    np.testing.assert_allclose(outcome.per_item["cosine"], dots, rtol=1e-5)
    labels = tmp_path / "pairs.tsv"
    labels.write_text("sentence1\tsentence2\tlabel\n" + "".join(f"{a}\t{b}\t{int(s > 2)}\n" for a, b, s in pairs))
    outcome = run_task(emb, f"pairs:{labels}")
    assert outcome.main_score == "max_ap" and 0 <= outcome.metrics["max_ap"] <= 1


def test_dense_only_options_are_refused_for_non_dense_models(tiny_model, tmp_path):
    emb = Embedder.from_pretrained(tiny_model, representation="sparse", max_length=32)
    with pytest.raises(UserError, match="--dim 8 truncates dense vectors"):
        RepresentationEncoder(emb, dim=8)
    with pytest.raises(UserError, match="no dense vector"):
        RepresentationEncoder(emb).encode(["x"])


def test_eval_cli_writes_representation_and_index_size(tiny_model, tmp_path, capsys):
    from llm2emb.cli import main

    folder = write_beir(tmp_path / "tiny", CORPUS, QUERIES, QRELS)
    Embedder.from_pretrained(tiny_model, representation="multi_vector", max_length=32,
                             representation_options={"token_dim": 8}).save(tmp_path / "mv")
    out = tmp_path / "results"
    assert main(["eval", "--model", str(tmp_path / "mv"), "--tasks", str(folder), "--output", str(out),
                 "--no-progress"]) == 0
    record = json.loads(next(out.glob("*.json")).read_text())
    assert record["model"]["representation"] == "multi_vector"
    assert record["info"]["representation"] == "multi_vector"
    tokens = sum(len(Embedder.from_pretrained(tmp_path / "mv").tokenize([t]).input_ids[0]) - 1
                 for t in [(r["title"] + " " + r["text"]).strip() for r in CORPUS])  # minus the EOS of each
    expected = (tokens * 8 * 4 + (len(CORPUS) + 1) * 8) / len(CORPUS)
    assert record["info"]["index_bytes_per_doc"] == pytest.approx(expected, abs=0.1)
    assert main(["eval", "--model", str(tmp_path / "mv"), "--tasks", str(folder), "--dim", "4", "--output",
                 str(out), "--no-progress"]) == 2
    assert "--dim 4 truncates dense vectors" in capsys.readouterr().err


def test_eval_loading_takes_the_representation_from_a_training_config_and_labels_it(tiny_model, tmp_path):
    from llm2emb.eval.loading import load_eval_model

    config = tmp_path / "train.json"
    config.write_text(json.dumps({"model_path": str(tiny_model), "representation": "sparse", "sparse_doc_top_k": 5,
                                  "pooling_mode": "mean"}))
    loaded = load_eval_model(config=str(config))
    assert loaded.model.config.representation == "sparse"
    assert loaded.model.representation.options.sparse_doc_top_k == 5
    assert "[sparse" in loaded.label and "mean" not in loaded.label
    loaded.model.save(tmp_path / "saved")
    assert "[sparse" in load_eval_model(str(tmp_path / "saved")).label
