"""Dense retrieval evaluation on a local BEIR folder, with MTEB's metrics (see `metrics.retrieval_metrics`).

Queries get the query instruction, documents none (as in the seed's T2Retrieval runs); the corpus is
encoded once, longest texts first, through the embedding cache; search is exact (chunked matmul); a
query's `metadata.self_doc_id` is never retrieved for it (BEIR's `ignore_identical_ids`).

    from llm2emb.eval.retrieval import evaluate_retrieval
    metrics = evaluate_retrieval(embedder, "data/scifact_mini", limits=100)   # {"ndcg_at_10": 0.22, ...}
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from llm2emb.errors import UserError
from llm2emb.eval.cache import EmbeddingCache, encode_cached, resolve_cache
from llm2emb.eval.data import RetrievalData, check_limits, load_beir, sample_queries
from llm2emb.eval.encoders import as_encoder
from llm2emb.eval.metrics import K_VALUES, retrieval_scores
from llm2emb.eval.search import top_k

logger = logging.getLogger(__name__)

MAIN_SCORE = "ndcg_at_10"


@dataclass
class RetrievalRun:
    """Metrics of one retrieval evaluation plus what was evaluated and how long each phase took.

    `per_query` holds, for `metrics.PER_QUERY_METRICS`, each evaluated query's value ({metric: {query id:
    value}}): the numbers the aggregates average, for paired statistics over queries."""

    metrics: dict[str, float]
    split: str
    n_queries: int
    n_queries_total: int
    n_docs: int
    corpus_from_cache: bool
    seconds: dict[str, float] = field(default_factory=dict)
    main_score: str = MAIN_SCORE
    per_query: dict[str, dict[str, float]] = field(default_factory=dict)
    #: {"representation": ..., "index_bytes_per_doc": ...} of the corpus index
    index_info: dict[str, Any] = field(default_factory=dict)


def build_run(query_ids: Sequence[str], corpus_ids: Sequence[str], scores, indices,
              ignore: dict[str, str] | None = None) -> dict[str, dict[str, float]]:
    """{query id: {doc id: score}} from top-k arrays. `ignore` maps a query to a doc removed from its
    ranking after the top-k cut, as MTEB's `ignore_identical_ids` removes it (so k=1000 keeps 999).

    Negative indices are dropped: an approximate index (faiss HNSW) returns -1 where it found fewer than k
    neighbours, which Python indexing would turn into the last document."""
    ignore = ignore or {}
    run: dict[str, dict[str, float]] = {}
    for row, qid in enumerate(query_ids):
        docs = {corpus_ids[idx]: score for score, idx in zip(scores[row].tolist(), indices[row].tolist())
                if idx >= 0}
        if qid in ignore:
            docs.pop(ignore[qid], None)
        run[qid] = docs
    return run


def run_retrieval(model, data: RetrievalData | str | os.PathLike[str], limits: int | None = None,
                  query_instruction: str | None = None, batch_size: int = 32, max_length: int | None = None,
                  seed: int = 42, *, split: str | None = None, dim: int | None = None,
                  k_values: Sequence[int] = K_VALUES, cache: EmbeddingCache | bool | str | None = True,
                  show_progress: bool = True, index: str = "exact") -> RetrievalRun:
    """Evaluate `model` (Embedder, SentenceTransformer or `TextEncoder`) on a BEIR folder; see module doc.

    `query_instruction` None falls back to the model's configured default query instruction (if any)."""
    encoder = as_encoder(model, dim=dim)
    check_limits(limits)
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}.")
    if not isinstance(data, RetrievalData):
        data = load_beir(data, split=split)
    if query_instruction is None:
        query_instruction = getattr(encoder, "default_query_instruction", None)
    evaluable = data.evaluable_query_ids()
    if not evaluable:
        raise UserError(f"No query in {data.path / 'queries.jsonl'} has a qrels row in split {data.split!r}; "
                        "nothing to evaluate.")
    chosen = sample_queries(evaluable, limits, seed)
    position = {qid: i for i, qid in enumerate(data.query_ids)}
    query_texts = [data.query_texts[position[q]] for q in chosen]
    seconds: dict[str, float] = {}

    if getattr(encoder, "representation", "dense") != "dense":
        # multi_vector / sparse / hybrid: their own index and exact scoring (eval.representations), no cache
        if index != "exact":
            raise UserError(f"--index {index} searches dense vectors; this is a {encoder.representation} model, "
                            "which is scored exactly: drop --index.")
        from llm2emb.eval.representations import search_corpus

        scores, indices, index_info = search_corpus(
            encoder, query_texts, data.corpus_texts, max(k_values), instruction=query_instruction,
            batch_size=batch_size, max_length=max_length, show_progress=show_progress, seconds=seconds)
        cached = False
    else:
        start = time.perf_counter()
        corpus_vectors, cached = encode_cached(encoder, data.corpus_texts, cache=resolve_cache(cache),
                                               batch_size=batch_size, max_length=max_length,
                                               show_progress=show_progress, label=f"{data.name} corpus")
        seconds["encode_corpus"] = time.perf_counter() - start
        start = time.perf_counter()
        query_vectors = encoder.encode(query_texts, instruction=query_instruction, batch_size=batch_size,
                                       max_length=max_length, show_progress=False)
        seconds["encode_queries"] = time.perf_counter() - start
        start = time.perf_counter()
        scores, indices = top_k(query_vectors, corpus_vectors, max(k_values), index)
        seconds["search"] = time.perf_counter() - start
        index_info = {"representation": "dense", "index": index,
                      "index_bytes_per_doc": round(corpus_vectors.nbytes / max(len(corpus_vectors), 1), 1)}

    start = time.perf_counter()
    run = build_run(chosen, data.corpus_ids, scores, indices, ignore=data.self_doc_ids)
    seconds["search"] += time.perf_counter() - start

    start = time.perf_counter()
    qrels = {q: data.qrels[q] for q in chosen}
    metrics, per_query = retrieval_scores(qrels, run, k_values)
    seconds["score"] = time.perf_counter() - start
    logger.info("%s (%s, %d queries, %d docs): nDCG@10 %.5f", data.name, data.split, len(chosen),
                len(data.corpus_ids), metrics.get("ndcg_at_10", float("nan")))
    return RetrievalRun(metrics=metrics, split=data.split, n_queries=len(chosen), n_queries_total=len(evaluable),
                        n_docs=len(data.corpus_ids), corpus_from_cache=cached, seconds=seconds, per_query=per_query,
                        index_info=index_info)


def evaluate_retrieval(embedder, task_dir: str | os.PathLike[str] | Path, limits: int | None = None,
                       query_instruction: str | None = None, batch_size: int = 32, max_length: int | None = None,
                       seed: int = 42, **kwargs: Any) -> dict[str, float]:
    """MTEB-equal retrieval metrics of `embedder` on the BEIR folder `task_dir`.

    Keys: `ndcg_at_k`, `mrr_at_k`, `map_at_k`, `recall_at_k`, `precision_at_k`, `hit_rate_at_k` for k in
    1, 3, 5, 10, 20, 100, 1000. `limits` keeps that many queries (seeded draw) and the whole corpus.
    Extra keyword arguments (`split`, `dim`, `k_values`, `cache`, `show_progress`) go to `run_retrieval`."""
    return run_retrieval(embedder, task_dir, limits=limits, query_instruction=query_instruction,
                         batch_size=batch_size, max_length=max_length, seed=seed, **kwargs).metrics
