"""`TripletEncoder` for multi-vector, sparse and hybrid models (`llm2emb.model.representations`).

The same three forward passes inside one module call (queries, positives, hard negatives, each padded to
its own longest text); the Embedder returns a dict of head tensors instead of one (B, D) tensor, so the hard
negatives' outputs are reshaped tensor by tensor from (B * k, ...) to (B, k, ...): token vectors
(B, k, T, d) and their mask (B, k, T), sparse weights (B, k, V), dense vectors (B, k, D)."""
from __future__ import annotations

from llm2emb.model.representations import reshape_rows
from llm2emb.train.encode import EncodedBatch, TripletEncoder


class RepresentationTripletEncoder(TripletEncoder):
    """Wraps a non-dense Embedder: forward(batch) -> (q, p, n) dicts of head tensors (n None without negatives)."""

    def forward(self, batch: EncodedBatch):
        q = self.embedder(**batch.queries)
        p = None if batch.passages is None else self.embedder(**batch.passages)  # None: a gradient-cache piece
        n = None
        if batch.negatives is not None:
            n = reshape_rows(self.embedder(**batch.negatives), batch.rows, batch.num_negatives)
        return q, p, n
