"""Evaluation metrics: hand-computed values on tiny sets, and equality with mteb's own implementation."""
from __future__ import annotations

import math

import numpy as np
import pytest

from llm2emb.eval.metrics import K_VALUES, pair_metrics, retrieval_metrics, sts_metrics


def _unit(angles_deg):
    a = np.radians(np.asarray(angles_deg, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- retrieval, by hand

QRELS = {"q1": {"d2": 1, "d3": 1}, "q2": {"d4": 1}, "q3": {"d1": 2, "d2": 1}}
RUN = {
    "q1": {"d1": 0.9, "d2": 0.8, "d3": 0.7, "d4": 0.1},   # relevant at ranks 2 and 3
    "q2": {"d4": 0.9, "d1": 0.5, "d2": 0.4, "d3": 0.3},   # relevant at rank 1
    "q3": {"d2": 0.9, "d1": 0.8, "d3": 0.2, "d4": 0.1},   # grade 1 before grade 2
}


def test_retrieval_metrics_by_hand():
    m = retrieval_metrics(QRELS, RUN, k_values=(1, 3, 10))
    # nDCG with trec_eval's linear gain: DCG = sum rel / log2(rank + 1)
    ndcg3_q1 = (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    ndcg3_q3 = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))
    assert m["ndcg_at_3"] == round((ndcg3_q1 + 1.0 + ndcg3_q3) / 3, 5)
    assert m["ndcg_at_1"] == round((0 + 1 + 1 / 2) / 3, 5)  # q3: grade 1 at rank 1, ideal grade 2
    assert m["mrr_at_10"] == pytest.approx((1 / 2 + 1 + 1) / 3)
    assert m["mrr_at_1"] == pytest.approx((0 + 1 + 1) / 3)
    assert m["recall_at_1"] == round((0 + 1 + 1 / 2) / 3, 5)
    assert m["recall_at_3"] == 1.0
    assert m["precision_at_1"] == round(2 / 3, 5)
    assert m["precision_at_10"] == round((2 / 10 + 1 / 10 + 2 / 10) / 3, 5)  # trec_eval divides by k
    ap_q1 = (1 / 2 + 2 / 3) / 2
    assert m["map_at_10"] == round((ap_q1 + 1 + 1) / 3, 5)
    assert m["hit_rate_at_1"] == round(2 / 3, 5)


def test_mrr_ties_break_by_doc_id_descending():
    # d1 and d9 tie; pytrec_eval (and mteb) rank the larger id first
    m = retrieval_metrics({"q": {"d1": 1}}, {"q": {"d1": 0.5, "d9": 0.5}}, k_values=(1, 10))
    assert m["mrr_at_10"] == 0.5
    assert m["ndcg_at_1"] == 0.0


def test_retrieval_metrics_equal_mteb_on_random_runs():
    from mteb._evaluators.retrieval_metrics import calculate_retrieval_scores, make_score_dict

    rng = np.random.default_rng(0)
    docs = [f"d{i}" for i in range(300)]
    qrels, run = {}, {}
    for q in range(40):
        qid = f"q{q}"
        rel = rng.choice(len(docs), size=int(rng.integers(1, 5)), replace=False)
        qrels[qid] = {docs[i]: int(rng.integers(1, 3)) for i in rel}
        # rounded scores create ties on purpose
        run[qid] = {d: float(np.round(rng.random(), 2)) for d in docs}
    ours = retrieval_metrics(qrels, run)
    res = calculate_retrieval_scores(run, qrels, list(K_VALUES))
    theirs = make_score_dict(ndcg=res.ndcg, _map=res.map, recall=res.recall, precision=res.precision,
                             mrr=res.mrr, naucs={}, naucs_mrr={}, hit_rate=res.hit_rate, task_scores={})
    assert set(ours) <= set(theirs)
    for key, value in ours.items():
        assert value == theirs[key], key


# ----------------------------------------------------------------------------- STS and pairs, by hand

def test_sts_metrics_by_hand():
    emb1 = _unit([0, 0, 0, 0])
    emb2 = _unit([0, 60, 90, 120])  # cosines 1, 0.5, 0, -0.5
    gold = [4.0, 3.0, 1.0, 2.0]
    m = sts_metrics(emb1, emb2, gold)
    assert m["cosine_spearman"] == pytest.approx(1 - 6 * 2 / (4 * (16 - 1)))  # rank differences 0, 0, 1, 1
    cos = np.array([1, 0.5, 0, -0.5])
    assert m["cosine_pearson"] == pytest.approx(np.corrcoef(cos, gold)[0, 1], abs=1e-6)
    assert m["spearman"] == m["cosine_spearman"]


def test_pair_metrics_by_hand():
    emb1 = _unit([0, 0, 0, 0])
    emb2 = _unit(np.degrees(np.arccos([0.9, 0.8, 0.3, 0.1])))
    m = pair_metrics(emb1, emb2, [1, 0, 1, 0])
    assert m["cosine_ap"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["cosine_accuracy"] == pytest.approx(0.75)
    assert m["cosine_f1"] == pytest.approx(0.8)  # threshold between 0.3 and 0.1: P 2/3, R 1
    assert m["cosine_precision"] == pytest.approx(2 / 3)
    assert m["max_ap"] >= m["cosine_ap"]
    assert m["euclidean_ap"] == pytest.approx(m["cosine_ap"])  # unit vectors: same order


def test_sts_and_pair_metrics_equal_mteb():
    import mteb
    from mteb._evaluators.pair_classification_evaluator import PairClassificationDistances
    from sklearn.metrics.pairwise import (paired_cosine_distances, paired_euclidean_distances,
                                          paired_manhattan_distances)

    rng = np.random.default_rng(1)
    e1 = rng.normal(size=(200, 16)).astype(np.float32)
    e2 = (e1 + rng.normal(scale=1.5, size=e1.shape)).astype(np.float32)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 /= np.linalg.norm(e2, axis=1, keepdims=True)
    cosine = 1 - paired_cosine_distances(e1, e2)

    labels = (cosine + rng.normal(scale=0.3, size=len(cosine)) > 0.5).astype(int).tolist()
    distances = PairClassificationDistances(
        cosine_scores=cosine.tolist(), euclidean_distances=paired_euclidean_distances(e1, e2).tolist(),
        manhattan_distances=paired_manhattan_distances(e1, e2).tolist(), similarity_scores=cosine.tolist(),
        dot_scores=[float(np.dot(e1[i], e2[i])) for i in range(len(e1))])
    theirs = mteb.get_task("SprintDuplicateQuestions")._compute_metrics(distances, labels)
    ours = pair_metrics(e1, e2, labels)
    for key in ("max_ap", "max_f1", "max_accuracy", "cosine_ap", "manhattan_ap", "cosine_f1", "dot_accuracy"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-12), key

    gold = (cosine * 5 + rng.normal(size=len(cosine))).tolist()
    sts_scores = {"cosine_scores": cosine.tolist(),
                  "manhattan_distances": (-paired_manhattan_distances(e1, e2)).tolist(),
                  "euclidean_distances": (-paired_euclidean_distances(e1, e2)).tolist(),
                  "similarity_scores": cosine.tolist()}
    theirs = mteb.get_task("STSBenchmark")._calculate_scores(sts_scores, gold)
    ours = sts_metrics(e1, e2, gold)
    for key in ("cosine_spearman", "cosine_pearson", "manhattan_spearman", "euclidean_pearson"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-12), key


# ----------------------------------------------------------------------------- pair classification with ties

TIED_SCORES = [1.0, 1.0, 1.0, 1.0, 0.8, 0.8, 0.8, 0.5, 0.5, 0.3, 0.1, 0.1]
TIED_LABELS = [1, 0, 1, 1, 0, 1, 0, 1, 0, 0, 1, 0]


@pytest.mark.parametrize("high_score_more_similar", [True, False])
def test_best_accuracy_and_f1_equal_mteb_on_tied_scores(high_score_more_similar):
    # mteb's own threshold search (>= 2.21.8 places no threshold between tied scores, so row order of ties
    # cannot change the result); called unbound, it does not use `self`
    from mteb.abstasks.pair_classification import AbsTaskPairClassification as Task

    from llm2emb.eval.metrics import best_accuracy, best_f1

    rng = np.random.default_rng(0)
    sign = 1.0 if high_score_more_similar else -1.0  # distances: the same ties, reversed order
    cases = [(TIED_SCORES, TIED_LABELS), ([0.7] * 4, [1, 1, 0, 0]), ([0.7] * 4, [0, 0, 1, 1])]
    for _ in range(20):  # the tied rows in many orders
        order = rng.permutation(len(TIED_SCORES))
        cases.append(([TIED_SCORES[i] for i in order], [TIED_LABELS[i] for i in order]))
    results = set()
    for scores, labels in cases:
        scores = [sign * s for s in scores]
        label_arr = np.asarray(labels, dtype=np.int64)
        ours_acc = best_accuracy(scores, label_arr, high_score_more_similar)
        ours_f1 = best_f1(scores, label_arr, high_score_more_similar)
        assert ours_acc == Task._find_best_acc_and_threshold(None, scores, label_arr, high_score_more_similar)
        assert ours_f1 == Task._find_best_f1_and_threshold(None, scores, label_arr, high_score_more_similar)
        if len(set(scores)) > 1:
            results.add((ours_acc, ours_f1))
    # the order of tied rows does not leak into the numbers
    assert len(results) == 1
    (acc, _), (f1, precision, recall, _) = results.pop()
    # by hand (groups 1.0: 3 pos + 1 neg, 0.8: 1 + 2, 0.5: 1 + 1, 0.3: 0 + 1, 0.1: 1 + 1): accuracy is best
    # cutting below the 1.0 group (3 + 5 right of 12); F1 below the 0.5 group (P 5/9, R 5/6, F1 2/3)
    assert acc == pytest.approx(8 / 12)
    assert (f1, precision, recall) == pytest.approx((2 / 3, 5 / 9, 5 / 6))


def test_pair_metrics_equal_mteb_on_duplicate_and_tied_pairs():
    import mteb
    from mteb._evaluators.pair_classification_evaluator import PairClassificationDistances
    from sklearn.metrics.pairwise import (paired_cosine_distances, paired_euclidean_distances,
                                          paired_manhattan_distances)

    rng = np.random.default_rng(2)
    base1 = rng.normal(size=(5, 8)).astype(np.float32)
    base2 = (base1 + rng.normal(scale=0.8, size=base1.shape)).astype(np.float32)
    base2[0] = base1[0]  # an exact duplicate pair: cosine 1.0, distances 0
    # every pair repeated with mixed labels, so each score value is tied across both classes
    group = np.repeat(np.arange(5), 6)
    labels = [1, 1, 1, 0, 1, 0] + [1, 0, 0, 1, 1, 0] + [0, 1, 0, 1, 0, 0] + [1, 0, 1, 0, 0, 0] + [0, 0, 1, 0, 0, 1]
    for _ in range(5):
        order = rng.permutation(len(group))
        e1, e2, y = base1[group[order]], base2[group[order]], [labels[i] for i in order]
        cosine = 1 - paired_cosine_distances(e1, e2)
        assert len(set(cosine.tolist())) == 5
        distances = PairClassificationDistances(
            cosine_scores=cosine.tolist(), euclidean_distances=paired_euclidean_distances(e1, e2).tolist(),
            manhattan_distances=paired_manhattan_distances(e1, e2).tolist(), similarity_scores=cosine.tolist(),
            dot_scores=[float(np.dot(e1[i], e2[i])) for i in range(len(e1))])
        theirs = mteb.get_task("SprintDuplicateQuestions")._compute_metrics(distances, y)
        ours = pair_metrics(e1, e2, y)
        keys = {f"{fn}_{m}" for fn in ("cosine", "manhattan", "euclidean", "dot")
                for m in ("accuracy", "f1", "precision", "recall", "ap")}
        keys |= {f"max_{m}" for m in ("accuracy", "f1", "precision", "recall", "ap")}
        for key in sorted(keys):
            assert ours[key] == theirs[key], key
