"""Exact top-k dense retrieval by chunked matrix products (no approximate index).

Memory is bounded by `query_chunk x (corpus_chunk + k)` scores however large the corpus: each corpus chunk's
top k is merged into a running top k per query.
"""
from __future__ import annotations

import numpy as np


def exact_top_k(queries: np.ndarray, corpus: np.ndarray, k: int, query_chunk: int = 1024,
                corpus_chunk: int = 65536, device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-`k` corpus rows by dot product (cosine for unit vectors) for every query row.

    Returns (scores, indices), each (n_queries, min(k, n_corpus)), best first."""
    import torch

    n_q, n_c = len(queries), len(corpus)
    k = min(k, n_c)
    out_scores = np.empty((n_q, k), dtype=np.float32)
    out_idx = np.empty((n_q, k), dtype=np.int64)
    if n_q == 0 or k == 0:
        return out_scores, out_idx
    dev = torch.device(device or "cpu")
    corpus_t = torch.from_numpy(np.ascontiguousarray(corpus, dtype=np.float32))
    for q0 in range(0, n_q, query_chunk):
        q = torch.from_numpy(np.ascontiguousarray(queries[q0:q0 + query_chunk], dtype=np.float32)).to(dev)
        best_s = torch.empty((len(q), 0), device=dev)
        best_i = torch.empty((len(q), 0), dtype=torch.long, device=dev)
        for c0 in range(0, n_c, corpus_chunk):
            block = corpus_t[c0:c0 + corpus_chunk].to(dev)
            top_s, top_i = torch.topk(q @ block.T, min(k, len(block)), dim=1)
            merged_s = torch.cat([best_s, top_s], dim=1)
            merged_i = torch.cat([best_i, top_i + c0], dim=1)
            best_s, keep = torch.topk(merged_s, min(k, merged_s.shape[1]), dim=1)
            best_i = torch.gather(merged_i, 1, keep)
        out_scores[q0:q0 + len(q)] = best_s.cpu().numpy()
        out_idx[q0:q0 + len(q)] = best_i.cpu().numpy()
    return out_scores, out_idx
