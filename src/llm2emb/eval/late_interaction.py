"""Exact MaxSim scoring of a query set against a corpus of token sets, in bounded memory.

MaxSim(q, d) = (1/|q|) sum_i max_j <q_i, d_j> (`llm2emb.losses.late_interaction.maxsim`; the mean over query
tokens ranks one query's documents exactly as ColBERT's sum). The corpus is held as `TokenSets` (float32
token vectors of every document back to back, plus offsets): 4 * token_dim bytes per token, e.g. about
100 KB for a 200-token document at 128 dimensions, 0.5 GB for 5k such documents. Scoring pads a group of
documents of similar length (documents are visited in length order) and computes

    (query tokens, dim) @ (documents x longest, dim)^T -> max over each document's tokens -> mean per query

with the group sized so that this product stays under `budget_bytes` (default 256 MB), whatever the corpus
size; `search.exact_top_k`-style merging keeps only the top k per query across groups.
"""
from __future__ import annotations

import numpy as np
import torch

from llm2emb.model.representations.encoding import TokenSets

BUDGET_BYTES = 256 * 2**20


def _padded(sets: TokenSets, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(len(rows), longest, dim) vectors and (len(rows), longest) mask of the chosen token sets."""
    lengths = sets.lengths[rows]
    longest = max(int(lengths.max()) if len(rows) else 0, 1)
    dim = sets.vectors.shape[1]
    out = np.zeros((len(rows), longest, dim), dtype=np.float32)
    mask = np.zeros((len(rows), longest), dtype=bool)
    for i, r in enumerate(rows):
        n = int(lengths[i])
        out[i, :n] = sets.vectors[sets.offsets[r]:sets.offsets[r] + n]
        mask[i, :n] = True
    return torch.from_numpy(out), torch.from_numpy(mask)


def maxsim_matrix(queries: TokenSets, docs: TokenSets, budget_bytes: int = BUDGET_BYTES) -> np.ndarray:
    """(len(queries), len(docs)) float32 MaxSim scores, exact; memory per step <= about `budget_bytes`."""
    n_q, n_d = len(queries), len(docs)
    out = np.zeros((n_q, n_d), dtype=np.float32)
    if n_q == 0 or n_d == 0:
        return out
    q_all = torch.from_numpy(np.ascontiguousarray(queries.vectors, dtype=np.float32))
    q_len = torch.from_numpy(queries.lengths)
    owner = torch.repeat_interleave(torch.arange(n_q), q_len)                # query of each query token
    counts = q_len.clamp(min=1).to(torch.float32)
    by_length = np.argsort(docs.lengths, kind="stable")
    q_tokens = max(len(q_all), 1)
    # documents per group: q_tokens * group * longest * 4 bytes <= budget (longest = the group's last length)
    start = 0
    while start < n_d:
        end = start + 1
        while end < n_d and q_tokens * (end + 1 - start) * max(int(docs.lengths[by_length[end]]), 1) * 4 \
                <= budget_bytes:
            end += 1
        rows = by_length[start:end]
        vectors, mask = _padded(docs, rows)                                     # (G, L, dim), (G, L)
        sims = (q_all @ vectors.reshape(-1, vectors.size(-1)).T).view(len(q_all), len(rows), -1)
        sims = sims.masked_fill(~mask.unsqueeze(0), float("-inf")).amax(dim=-1)  # (query tokens, G)
        sims = torch.where(torch.isfinite(sims), sims, torch.zeros_like(sims))
        per_query = torch.zeros((n_q, len(rows)), dtype=torch.float32).index_add_(0, owner, sims)
        out[:, rows] = (per_query / counts.unsqueeze(1)).numpy()
        start = end
    return out
