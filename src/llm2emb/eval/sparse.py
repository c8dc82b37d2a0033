"""Exact scoring of sparse (vocabulary-weight) vectors: one sparse matrix product.

Queries and documents are `scipy.sparse.csr_matrix` rows (top-k pruned at encoding, see
`llm2emb.model.representations.encoding`); score = dot product, computed as Q @ D^T with scipy's sparse x
sparse product, so the cost follows the number of shared non-zero terms, like an inverted index. The index
holds, per document, its non-zero weights (float32) and their vocabulary ids (int32): 8 bytes per kept term
plus 8 bytes of row pointer.
"""
from __future__ import annotations

import numpy as np


def sparse_matrix(queries, docs) -> np.ndarray:
    """(n_queries, n_docs) float32 dot products of two CSR matrices with the same vocabulary."""
    if queries.shape[1] != docs.shape[1]:
        raise ValueError(f"vocabulary sizes differ: {queries.shape[1]} and {docs.shape[1]}")
    product = (queries.astype(np.float32) @ docs.astype(np.float32).T)
    return np.asarray(product.toarray(), dtype=np.float32)


def index_bytes(matrix) -> int:
    """Bytes of a CSR index: values, column ids and row pointers."""
    return int(matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes)
