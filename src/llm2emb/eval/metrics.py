"""Metrics computed exactly as MTEB 2.x computes them, without importing mteb.

* Retrieval (`retrieval_metrics`): nDCG@k, MAP@k, Recall@k, P@k and hit rate from pytrec_eval (trec_eval's
  `ndcg_cut`, `map_cut`, `recall`, `P`, `success`), averaged over the evaluated queries and rounded to 5
  decimals; MRR@k computed in Python with pytrec_eval's tie-break (score, then doc id, descending) and not
  rounded. Same keys as MTEB's score dict: `ndcg_at_10`, `mrr_at_10`, `map_at_10`, `recall_at_100`,
  `precision_at_10`, `hit_rate_at_10`, ... (mteb `_evaluators/retrieval_metrics.py`).
  `retrieval_scores` also returns the per-query values behind the averages (`PER_QUERY_METRICS`), for
  paired statistics over queries.
* STS (`sts_metrics`): Pearson and Spearman correlation of the gold score with cosine similarity and with
  negative Manhattan / Euclidean distance (mteb `abstasks/sts.py`); main score `cosine_spearman`.
* Pair classification (`pair_metrics`): per scoring function (cosine, Manhattan, Euclidean, dot) the best
  accuracy and F1 over all thresholds and the average precision, and `max_*` over the functions; main score
  `max_ap` (mteb `abstasks/pair_classification.py`). C-MTEB's Spearman of cosine vs label is added as
  `cosine_spearman`.
* `sts_scores` / `pair_scores` return the same metrics plus the per-pair cosine similarity they came from.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Sequence

import numpy as np

#: MTEB's default cut-offs for retrieval tasks (`AbsTaskRetrieval.k_values`).
K_VALUES: tuple[int, ...] = (1, 3, 5, 10, 20, 100, 1000)

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]

# (our key prefix, trec_eval measure) in MTEB's output order
_TREC_MEASURES: tuple[tuple[str, str], ...] = (
    ("ndcg", "ndcg_cut"), ("map", "map_cut"), ("recall", "recall"), ("precision", "P"), ("hit_rate", "success"),
)


def mrr_at_k(qrels: Qrels, run: Run, k_values: Sequence[int]) -> dict[int, list[float]]:
    """Reciprocal rank of the first relevant (score > 0) document within the top k, per query of `run`.

    Ranking ties are broken by document id, descending, as pytrec_eval does (mteb issue #5092)."""
    k_max = max(k_values)
    out: dict[int, list[float]] = defaultdict(list)
    for query_id, doc_scores in run.items():
        top = sorted(doc_scores.items(), key=lambda item: (item[1], item[0]), reverse=True)[:k_max]
        relevant = {doc for doc, rel in qrels[query_id].items() if rel > 0}
        for k in k_values:
            rr = 0.0
            for rank, (doc, _) in enumerate(top[:k]):
                if doc in relevant:
                    rr = 1.0 / (rank + 1)
                    break
            out[k].append(rr)
    return out


#: per-query values kept by `retrieval_scores` (the report's default retrieval columns)
PER_QUERY_METRICS: tuple[str, ...] = ("ndcg_at_10", "mrr_at_10", "map_at_10", "recall_at_10", "recall_at_100",
                                      "precision_at_10")


def retrieval_scores(qrels: Qrels, run: Run, k_values: Sequence[int] = K_VALUES,
                     per_query: Sequence[str] = PER_QUERY_METRICS
                     ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """`retrieval_metrics` plus the per-query values behind them: ({metric: mean}, {metric: {query id: value}}).

    The per-query values are the very numbers that are averaged (one pytrec_eval evaluation, one MRR pass),
    unrounded, for the metrics in `per_query` that the `k_values` produce. The mean of a rounded metric's
    per-query values, rounded to 5 decimals, is its aggregate; MRR's mean is its aggregate."""
    import pytrec_eval

    cut = ",".join(str(k) for k in k_values)
    measures = {f"{measure}.{cut}" for _, measure in _TREC_MEASURES}
    qrels_int = {q: {d: int(r) for d, r in docs.items()} for q, docs in qrels.items()}
    evaluated: dict[str, dict[str, float]] = pytrec_eval.RelevanceEvaluator(qrels_int, measures).evaluate(
        {q: {d: float(s) for d, s in docs.items()} for q, docs in run.items()})
    n = len(evaluated)
    if n == 0:
        raise ValueError("no query of the run has relevance judgements")
    wanted = set(per_query)
    metrics: dict[str, float] = {}
    by_query: dict[str, dict[str, float]] = {}
    for name, measure in _TREC_MEASURES:
        for k in k_values:
            # same summation order and rounding as mteb's parse_metrics_from_scores
            values = [evaluated[q][f"{measure}_{k}"] for q in evaluated]
            metrics[f"{name}_at_{k}"] = round(sum(values) / n, 5)
            if f"{name}_at_{k}" in wanted:
                by_query[f"{name}_at_{k}"] = dict(zip(evaluated, values))
    for k, values in mrr_at_k(qrels_int, run, k_values).items():
        metrics[f"mrr_at_{k}"] = sum(values) / len(values)
        if f"mrr_at_{k}" in wanted:
            by_query[f"mrr_at_{k}"] = dict(zip(run, values))  # mrr_at_k walks `run` in order
    # the caller's order, so files list the main metric first
    return metrics, {name: by_query[name] for name in per_query if name in by_query}


def retrieval_metrics(qrels: Qrels, run: Run, k_values: Sequence[int] = K_VALUES) -> dict[str, float]:
    """MTEB's retrieval scores for `run` ({query id: {doc id: score}}) against `qrels` ({query id: {doc id: grade}}).

    Every query of `run` must have an entry in `qrels`. Averages are over the queries pytrec_eval evaluates
    (those in both), exactly as `mteb._evaluators.retrieval_metrics.calculate_retrieval_scores`."""
    return retrieval_scores(qrels, run, k_values, per_query=())[0]


def _pearson_spearman(gold: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    from scipy.stats import pearsonr, spearmanr

    return float(pearsonr(gold, predicted)[0]), float(spearmanr(gold, predicted)[0])


def _paired_scores(emb1: np.ndarray, emb2: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pair cosine similarity, Manhattan and Euclidean distance (sklearn, as MTEB) and dot product."""
    from sklearn.metrics.pairwise import (paired_cosine_distances, paired_euclidean_distances,
                                          paired_manhattan_distances)

    a, b = np.asarray(emb1), np.asarray(emb2)
    return {
        "cosine": 1 - paired_cosine_distances(a, b),
        "manhattan": paired_manhattan_distances(a, b),
        "euclidean": paired_euclidean_distances(a, b),
        "dot": np.asarray([np.dot(a[i], b[i]) for i in range(len(a))]),
    }


def sts_scores(emb1: np.ndarray, emb2: np.ndarray, gold: Sequence[float]) -> tuple[dict[str, float], np.ndarray]:
    """`sts_metrics` and the per-pair cosine similarity its `cosine_*` correlations are computed from."""
    gold_arr = np.asarray(gold, dtype=np.float64)
    scores = _paired_scores(emb1, emb2)
    out: dict[str, float] = {}
    for name, values in (("cosine", scores["cosine"]), ("manhattan", -scores["manhattan"]),
                         ("euclidean", -scores["euclidean"])):
        out[f"{name}_pearson"], out[f"{name}_spearman"] = _pearson_spearman(gold_arr, values)
    # the model's own similarity is cosine for every llm2emb encoder
    out["pearson"], out["spearman"] = out["cosine_pearson"], out["cosine_spearman"]
    return out, np.asarray(scores["cosine"], dtype=np.float64)


def sts_metrics(emb1: np.ndarray, emb2: np.ndarray, gold: Sequence[float]) -> dict[str, float]:
    """MTEB's STS scores: correlations of `gold` with cosine similarity and negative distances."""
    return sts_scores(emb1, emb2, gold)[0]


def best_accuracy(scores: Sequence[float], labels: np.ndarray, high_score_more_similar: bool) -> tuple[float, float]:
    """Best accuracy over thresholds between distinct scores, and that threshold (MTEB's search)."""
    rows = sorted(zip(scores, labels), key=lambda x: x[0], reverse=high_score_more_similar)
    max_acc, best_threshold = 0.0, -1.0
    positive_so_far, remaining_negatives = 0, int(np.sum(labels == 0))
    for i in range(len(rows) - 1):
        score, label = rows[i]
        if label == 1:
            positive_so_far += 1
        else:
            remaining_negatives -= 1
        if score == rows[i + 1][0]:  # a threshold cannot split tied scores
            continue
        acc = (positive_so_far + remaining_negatives) / len(labels)
        if acc > max_acc:
            max_acc, best_threshold = acc, (rows[i][0] + rows[i + 1][0]) / 2
    return max_acc, best_threshold


def best_f1(scores: Sequence[float], labels: np.ndarray, high_score_more_similar: bool
            ) -> tuple[float, float, float, float]:
    """Best F1 over thresholds, with its precision, recall and threshold (MTEB's search)."""
    rows = sorted(zip(scores, labels), key=lambda x: x[0], reverse=high_score_more_similar)
    best = (0.0, 0.0, 0.0, 0.0)
    correct, total_positive = 0, int(np.sum(labels))
    for i, (score, label) in enumerate(rows[:-1]):
        if label == 1:
            correct += 1
        if score == rows[i + 1][0]:
            continue
        if correct > 0:
            precision, recall = correct / (i + 1), correct / total_positive
            f1 = 2 * precision * recall / (precision + recall)
            if f1 > best[0]:
                best = (f1, precision, recall, (rows[i][0] + rows[i + 1][0]) / 2)
    return best


def pair_scores(emb1: np.ndarray, emb2: np.ndarray, labels: Sequence[int]) -> tuple[dict[str, float], np.ndarray]:
    """`pair_metrics` and the per-pair cosine similarity its `cosine_*` scores are computed from."""
    from sklearn.metrics import average_precision_score

    label_arr = np.asarray(labels, dtype=np.int64)
    scores = _paired_scores(emb1, emb2)
    out: dict[str, float] = {}
    best: dict[str, list[float]] = defaultdict(list)
    for name, higher_is_similar in (("cosine", True), ("manhattan", False), ("euclidean", False), ("dot", True)):
        values = scores[name].tolist()
        acc, _ = best_accuracy(values, label_arr, higher_is_similar)
        f1, precision, recall, _ = best_f1(values, label_arr, higher_is_similar)
        ap = average_precision_score(label_arr, np.asarray(values) * (1 if higher_is_similar else -1))
        for metric, value in (("accuracy", acc), ("f1", f1), ("precision", precision), ("recall", recall),
                              ("ap", ap)):
            out[f"{name}_{metric}"] = float(value)
            best[metric].append(float(value))
    for metric, values in best.items():
        out[f"max_{metric}"] = max(values)
    out["cosine_pearson"], out["cosine_spearman"] = _pearson_spearman(label_arr.astype(np.float64), scores["cosine"])
    return out, np.asarray(scores["cosine"], dtype=np.float64)


def pair_metrics(emb1: np.ndarray, emb2: np.ndarray, labels: Sequence[int]) -> dict[str, float]:
    """MTEB's pair-classification scores (labels 1 = similar, 0 = not); main score `max_ap`."""
    return pair_scores(emb1, emb2, labels)[0]
