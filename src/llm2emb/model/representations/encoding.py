"""Encoding texts with a multi-vector / sparse / hybrid Embedder: every head's output, on the host.

    from llm2emb.model.representations.encoding import encode_heads
    out = encode_heads(embedder, texts, role="document")
    out.multi_vector.vectors, out.multi_vector.offsets     # token vectors of text i: vectors[offsets[i]:offsets[i+1]]
    out.sparse                                              # scipy.sparse.csr_matrix (len(texts), vocab size)
    out.dense                                               # (len(texts), D) unit vectors, when there is a dense head

Batching follows `Embedder.encode`: texts tokenised as training data is, longest first, padded per batch on
the Embedder's padding side. Token vectors are float32 unit vectors of the token set only (no padding, no
excluded tokens). Sparse rows keep the `sparse_query_top_k` (role "query") or `sparse_doc_top_k` (role
"document") largest weights (0: all non-zero weights), as float32 with int32 vocabulary indices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from llm2emb.errors import UserError

ROLES = ("query", "document")


@dataclass
class TokenSets:
    """Ragged token vectors: text i owns rows offsets[i]:offsets[i + 1] of `vectors` (float32, unit rows)."""

    vectors: np.ndarray   # (total tokens, d)
    offsets: np.ndarray   # (n + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.vectors[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def nbytes(self) -> int:
        return int(self.vectors.nbytes + self.offsets.nbytes)

    def take(self, rows: Sequence[int]) -> "TokenSets":
        rows = list(rows)
        parts = [self[i] for i in rows]
        lengths = np.asarray([len(p) for p in parts], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        dim = self.vectors.shape[1]
        vectors = np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32)
        return TokenSets(vectors.astype(np.float32, copy=False), offsets)


@dataclass
class EncodedHeads:
    """What one list of texts gives for each head of the model (None where the model has no such head)."""

    dense: np.ndarray | None = None
    multi_vector: TokenSets | None = None
    sparse: object | None = None          # scipy.sparse.csr_matrix

    def __len__(self) -> int:
        for value in (self.dense, self.multi_vector, self.sparse):
            if value is not None:
                return value.shape[0] if not isinstance(value, TokenSets) else len(value)
        return 0

    @property
    def nbytes(self) -> int:
        """Bytes of the index these rows make: float32 dense rows, token vectors + offsets, CSR arrays."""
        total = 0
        if self.dense is not None:
            total += int(self.dense.nbytes)
        if self.multi_vector is not None:
            total += self.multi_vector.nbytes
        if self.sparse is not None:
            total += int(self.sparse.data.nbytes + self.sparse.indices.nbytes + self.sparse.indptr.nbytes)
        return total

    def take(self, rows: Sequence[int]) -> "EncodedHeads":
        rows = list(rows)
        return EncodedHeads(None if self.dense is None else self.dense[rows],
                            None if self.multi_vector is None else self.multi_vector.take(rows),
                            None if self.sparse is None else self.sparse[rows])


def prune_top_k(weights: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of each row's `k` largest weights (k = 0: all columns), zeros included; callers drop
    the zeros."""
    if k <= 0 or k >= weights.size(1):
        values, indices = weights, torch.arange(weights.size(1), device=weights.device).expand_as(weights)
        return values, indices
    return torch.topk(weights, k, dim=1)


def encode_heads(embedder, texts: Sequence[str], *, instruction: str | None = None, role: str = "document",
                 batch_size: int = 32, max_length: int | None = None, show_progress: bool = False,
                 precision: str | None = None) -> EncodedHeads:
    """Every head's output for `texts` (module docstring); `role` picks the sparse top-k; `precision` (auto |
    fp32 | bf16 | fp16, default the model's `config.precision`) as in `Embedder.encode`: the forward pass under
    autocast, the outputs converted to float32 before normalising, pruning and copying."""
    import scipy.sparse as sp

    from llm2emb.model.precision import autocast, log_choice

    representation = getattr(embedder, "representation", None)
    if representation is None:
        raise UserError("encode_heads() needs a multi_vector, sparse or hybrid model; this one is dense, use "
                        "Embedder.encode().")
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}, got {role!r}.")
    if isinstance(texts, str):
        raise UserError("encode_heads() takes a list of texts, not a single string; wrap it in a list.")
    texts = list(texts)
    compute = embedder.compute_precision(precision)  # before any state changes: fp16 on a CPU is refused
    heads = representation.head_names
    options = representation.options
    top_k = options.sparse_query_top_k if role == "query" else options.sparse_doc_top_k
    n = len(texts)
    dense = np.zeros((n, embedder.embedding_dim), dtype=np.float32) if "dense" in heads else None
    token_parts: list[np.ndarray | None] = [None] * n
    sparse_rows: list[tuple[np.ndarray, np.ndarray] | None] = [None] * n
    vocab = 0
    was_training = embedder.training
    embedder.eval()
    if n:
        log_choice(compute, "encode")
    try:
        with torch.inference_mode():
            encoded = embedder.tokenize(texts, instruction=instruction, max_length=max_length)
            order = sorted(range(n), key=lambda i: -len(encoded.input_ids[i]))
            progress = None
            if show_progress:
                from tqdm.auto import tqdm
                progress = tqdm(total=n, desc="encode", unit="text")
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                ids = [encoded.input_ids[i] for i in idx]
                batch = embedder.collate(ids, [encoded.prefix_lengths[i] for i in idx], device=embedder.device)
                with autocast(compute, embedder.device):
                    out = embedder(**batch)
                if dense is not None:
                    dense[idx] = torch.nn.functional.normalize(out["dense"].float(), dim=-1).cpu().numpy()
                if "multi_vector" in out:
                    vectors = out["multi_vector"].float().cpu().numpy()
                    mask = out["multi_vector_mask"].cpu().numpy()
                    for row, i in enumerate(idx):
                        token_parts[i] = vectors[row][mask[row]]
                if "sparse" in out:
                    weights = out["sparse"].float()
                    vocab = weights.size(1)
                    values, indices = prune_top_k(weights, top_k)
                    values, indices = values.cpu().numpy(), indices.cpu().numpy()
                    for row, i in enumerate(idx):
                        nonzero = values[row] > 0
                        order_cols = np.argsort(indices[row][nonzero], kind="stable")
                        sparse_rows[i] = (indices[row][nonzero][order_cols].astype(np.int32),
                                          values[row][nonzero][order_cols].astype(np.float32))
                if progress is not None:
                    progress.update(len(idx))
            if progress is not None:
                progress.close()
    finally:
        embedder.train(was_training)
    result = EncodedHeads(dense=dense)
    if "multi_vector" in heads:
        dim = representation.options.token_dim
        parts = [p if p is not None else np.zeros((0, dim), dtype=np.float32) for p in token_parts]
        lengths = np.asarray([len(p) for p in parts], dtype=np.int64)
        vectors = np.concatenate(parts) if n else np.zeros((0, dim), dtype=np.float32)
        result.multi_vector = TokenSets(np.ascontiguousarray(vectors, dtype=np.float32),
                                        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    if "sparse" in heads:
        vocab = vocab or _sparse_vocab(representation)
        indptr = np.zeros(n + 1, dtype=np.int64)
        cols, vals = [], []
        for i, row in enumerate(sparse_rows):
            c, v = row if row is not None else (np.zeros(0, np.int32), np.zeros(0, np.float32))
            cols.append(c)
            vals.append(v)
            indptr[i + 1] = indptr[i] + len(c)
        result.sparse = sp.csr_matrix((np.concatenate(vals) if n else np.zeros(0, np.float32),
                                       np.concatenate(cols) if n else np.zeros(0, np.int32), indptr),
                                      shape=(n, vocab))
    return result


def _sparse_vocab(representation) -> int:
    part = representation.parts["sparse"] if hasattr(representation, "parts") else representation
    return int(getattr(part, "vocab_size", 0))
