"""Evaluating multi-vector, sparse and hybrid models: their own index and exact scoring, for every task kind
that compares texts (retrieval, STS, pair classification).

| representation | retrieval score (query q, document d)                     | pair score (STS, pairs)                    |
|----------------|-----------------------------------------------------------|--------------------------------------------|
| multi_vector   | MaxSim(q, d), chunked (`late_interaction`)                | (MaxSim(a, b) + MaxSim(b, a)) / 2          |
| sparse         | dot product, sparse matrix product (`sparse`)             | dot product                                |
| hybrid         | sum_h w_h s_h over its heads (BGE-M3; dense head: cosine) | the same sum of the heads' pair scores     |

Queries are encoded with the query role (sparse: `sparse_query_top_k`), documents and both sides of a pair
with the document role. Retrieval records carry `representation` and `index_bytes_per_doc` (the corpus
index: float32 dense rows, float32 token vectors + offsets, CSR values + ids + row pointers). There is no
corpus embedding cache for these models (the corpus is encoded on every evaluation).

Dense-only options are refused with a UserError: `--dim` (Matryoshka truncation) and, for models without a
dense head, anything that needs one vector per text (MTEB tasks).
"""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Sequence

import numpy as np

from llm2emb.errors import UserError
from llm2emb.eval.late_interaction import maxsim_matrix
from llm2emb.eval.sparse import sparse_matrix
from llm2emb.model.representations.encoding import EncodedHeads, encode_heads

QUERY_CHUNK = 256      # queries scored together
DOC_CHUNK = 16384      # documents per block of the running top-k


class RepresentationEncoder:
    """An `Embedder` whose representation is multi_vector, sparse or hybrid, for the evaluators."""

    def __init__(self, embedder, dim: int | None = None, name: str | None = None) -> None:
        representation = embedder.representation
        if representation is None:
            raise ValueError("RepresentationEncoder needs a non-dense Embedder; use EmbedderEncoder")
        self.representation = embedder.config.representation
        if dim is not None:
            raise UserError(f"--dim {dim} truncates dense vectors (Matryoshka), but this model's representation is "
                            f"{self.representation}; evaluate it without --dim.")
        self.embedder = embedder
        self.dim = None
        self.heads = tuple(representation.head_names)
        self.weights = dict(representation.weights)
        self.name = name or str(embedder.config.base_model or "embedder")
        self.default_max_length = int(embedder.config.max_length)
        self.default_query_instruction = embedder.config.query_instruction

    # ------------------------------------------------------------------ the TextEncoder part
    def encode(self, texts: Sequence[str], *, instruction: str | None = None, batch_size: int = 32,
               max_length: int | None = None, show_progress: bool = False) -> np.ndarray:
        """Dense unit vectors: the dense head of a hybrid; refused for models without one."""
        if "dense" not in self.heads:
            raise UserError(f"This model's representation is {self.representation}, which has no dense vector; "
                            "evaluate it on local retrieval / STS / pair tasks (scored with its own similarity), "
                            "not on tasks that need one vector per text such as MTEB tasks.")
        return self.embedder.encode(list(texts), instruction=instruction, batch_size=batch_size, normalize=True,
                                    show_progress=show_progress, max_length=max_length)

    def encode_heads(self, texts: Sequence[str], *, instruction: str | None = None, role: str = "document",
                     batch_size: int = 32, max_length: int | None = None, show_progress: bool = False) -> EncodedHeads:
        return encode_heads(self.embedder, list(texts), instruction=instruction, role=role, batch_size=batch_size,
                            max_length=max_length, show_progress=show_progress)

    def settings(self) -> dict[str, Any]:
        config = asdict(self.embedder.config)
        config.pop("query_instruction", None)
        return config

    def fingerprint(self) -> str:
        from llm2emb.eval.encoders import module_fingerprint

        tok = self.embedder.tokenizer
        extra = {"kind": "llm2emb", "config": self.settings(), "dim": None,
                 "tokenizer": [type(tok).__name__, len(tok), tok.eos_token_id, tok.pad_token_id,
                               getattr(tok, "padding_side", None)]}
        return module_fingerprint(self.embedder, extra)

    def describe(self) -> dict[str, Any]:
        config = self.embedder.config
        out = {"kind": "llm2emb", "base_model": config.base_model, "representation": self.representation,
               "heads": list(self.heads), "weights": self.weights, "pooling": config.pooling,
               "bidirectional": config.bidirectional, "skip_instruction": config.skip_instruction,
               "instruction_separator": config.instruction_separator, "head": config.head,
               "max_length": config.max_length, "dtype": config.dtype, "lora": self.embedder.is_lora,
               "representation_options": dict(config.representation_options)}
        if "dense" in self.heads:
            out["embedding_dim"] = self.embedder.embedding_dim
        return out


def is_representation_encoder(encoder) -> bool:
    return isinstance(encoder, RepresentationEncoder)


# ---------------------------------------------------------------------- scoring
def score_matrix(queries: EncodedHeads, docs: EncodedHeads, weights: dict[str, float]) -> np.ndarray:
    """(n_queries, n_docs) combined score sum_h w_h s_h over the heads both sides have."""
    total = np.zeros((len(queries), len(docs)), dtype=np.float32)
    for head, weight in weights.items():
        if head == "dense":
            part = queries.dense @ docs.dense.T
        elif head == "sparse":
            part = sparse_matrix(queries.sparse, docs.sparse)
        elif head == "multi_vector":
            part = maxsim_matrix(queries.multi_vector, docs.multi_vector)
        else:  # pragma: no cover - parse_options only lets registered heads through
            raise ValueError(head)
        total += np.float32(weight) * part
    return total


def search_top_k(queries: EncodedHeads, docs: EncodedHeads, weights: dict[str, float], k: int,
                 query_chunk: int = QUERY_CHUNK, doc_chunk: int = DOC_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k documents per query by the combined score: (scores, indices), best first, each
    (n_queries, min(k, n_docs)); blocks of queries x documents keep memory bounded, as `search.exact_top_k`."""
    n_q, n_d = len(queries), len(docs)
    k = min(k, n_d)
    out_s = np.empty((n_q, k), dtype=np.float32)
    out_i = np.empty((n_q, k), dtype=np.int64)
    if n_q == 0 or k == 0:
        return out_s, out_i
    for q0 in range(0, n_q, query_chunk):
        q_block = queries if n_q <= query_chunk else queries.take(range(q0, min(q0 + query_chunk, n_q)))
        best_s = np.empty((len(q_block), 0), dtype=np.float32)
        best_i = np.empty((len(q_block), 0), dtype=np.int64)
        for d0 in range(0, n_d, doc_chunk):
            rows = range(d0, min(d0 + doc_chunk, n_d))
            scores = score_matrix(q_block, docs if n_d <= doc_chunk else docs.take(rows), weights)
            merged_s = np.concatenate([best_s, scores], axis=1)
            merged_i = np.concatenate([best_i, np.broadcast_to(np.arange(rows.start, rows.stop),
                                                               scores.shape)], axis=1)
            # stable order: equal scores keep the lower document index first, as torch.topk on a CPU
            order = np.argsort(-merged_s, axis=1, kind="stable")[:, :k]
            best_s = np.take_along_axis(merged_s, order, axis=1)
            best_i = np.take_along_axis(merged_i, order, axis=1)
        out_s[q0:q0 + len(q_block)] = best_s
        out_i[q0:q0 + len(q_block)] = best_i
    return out_s, out_i


def search_corpus(encoder: RepresentationEncoder, query_texts: Sequence[str], corpus_texts: Sequence[str], k: int, *,
                  instruction: str | None, batch_size: int, max_length: int | None, show_progress: bool,
                  seconds: dict[str, float]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Encode the corpus and the queries, search exactly; fills `seconds` like `run_retrieval` and returns
    (scores, indices, info) with info = {representation, index_bytes_per_doc}."""
    start = time.perf_counter()
    docs = encoder.encode_heads(corpus_texts, role="document", batch_size=batch_size, max_length=max_length,
                                show_progress=show_progress)
    seconds["encode_corpus"] = time.perf_counter() - start
    start = time.perf_counter()
    queries = encoder.encode_heads(query_texts, instruction=instruction, role="query", batch_size=batch_size,
                                   max_length=max_length, show_progress=False)
    seconds["encode_queries"] = time.perf_counter() - start
    start = time.perf_counter()
    scores, indices = search_top_k(queries, docs, encoder.weights, k)
    seconds["search"] = time.perf_counter() - start
    info = {"representation": encoder.representation,
            "index_bytes_per_doc": round(docs.nbytes / max(len(corpus_texts), 1), 1)}
    return scores, indices, info


def pair_similarity(encoder: RepresentationEncoder, texts1: Sequence[str], texts2: Sequence[str], *,
                    instruction: str | None = None, batch_size: int = 32, max_length: int | None = None,
                    show_progress: bool = False) -> np.ndarray:
    """The model's own similarity of each pair (module docstring), each distinct text encoded once."""
    unique = list(dict.fromkeys([*texts1, *texts2]))
    row = {text: i for i, text in enumerate(unique)}
    encoded = encoder.encode_heads(unique, instruction=instruction, role="document", batch_size=batch_size,
                                   max_length=max_length, show_progress=show_progress)
    a = np.asarray([row[t] for t in texts1], dtype=np.int64)
    b = np.asarray([row[t] for t in texts2], dtype=np.int64)
    total = np.zeros(len(a), dtype=np.float64)
    for head, weight in encoder.weights.items():
        if head == "dense":
            part = np.einsum("ij,ij->i", encoded.dense[a], encoded.dense[b])
        elif head == "sparse":
            part = np.asarray(encoded.sparse[a].multiply(encoded.sparse[b]).sum(axis=1)).ravel()
        else:
            sets = encoded.multi_vector
            part = np.asarray([(_maxsim(sets[i], sets[j]) + _maxsim(sets[j], sets[i])) / 2 for i, j in zip(a, b)])
        total += weight * part
    return total


def _maxsim(q: np.ndarray, d: np.ndarray) -> float:
    if len(q) == 0 or len(d) == 0:
        return 0.0
    return float((q @ d.T).max(axis=1).mean())


def sts_similarity_metrics(similarity: np.ndarray, gold: Sequence[float]) -> dict[str, float]:
    """Pearson / Spearman of the gold scores with the model's own similarity (main score `spearman`)."""
    from llm2emb.eval.metrics import _pearson_spearman

    pearson, spearman = _pearson_spearman(np.asarray(gold, dtype=np.float64), np.asarray(similarity, np.float64))
    return {"pearson": pearson, "spearman": spearman, "similarity_pearson": pearson, "similarity_spearman": spearman}


def pair_similarity_metrics(similarity: np.ndarray, labels: Sequence[int]) -> dict[str, float]:
    """MTEB's pair-classification search (best-threshold accuracy / F1, average precision) on the model's own
    similarity; with one scoring function `max_ap` is its AP."""
    from sklearn.metrics import average_precision_score

    from llm2emb.eval.metrics import _pearson_spearman, best_accuracy, best_f1

    label_arr = np.asarray(labels, dtype=np.int64)
    values = np.asarray(similarity, dtype=np.float64)
    acc, _ = best_accuracy(values.tolist(), label_arr, True)
    f1, precision, recall, _ = best_f1(values.tolist(), label_arr, True)
    ap = float(average_precision_score(label_arr, values))
    out = {"similarity_accuracy": float(acc), "similarity_f1": float(f1), "similarity_precision": float(precision),
           "similarity_recall": float(recall), "similarity_ap": ap, "max_accuracy": float(acc), "max_f1": float(f1),
           "max_precision": float(precision), "max_recall": float(recall), "max_ap": ap}
    out["similarity_pearson"], out["similarity_spearman"] = _pearson_spearman(label_arr.astype(np.float64), values)
    return out
