"""Matryoshka Representation Learning: the same loss on nested prefixes of the embedding.

Kusupati et al. 2022, "Matryoshka Representation Learning" (NeurIPS). Training the first d coordinates
as an embedding of their own, for every d in `dims`, lets users truncate vectors (e.g. 1024 -> 256 -> 128)
and keep most of the quality:

    loss = sum_d w_d * base(q[..., :d], p[..., :d], n[..., :d], use_inbatch)

The base loss (e.g. `ContrastiveLoss`) re-normalises the truncated vectors, so each prefix is scored by
its own cosine similarity.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from torch import Tensor, nn

from llm2emb.errors import UserError


class MatryoshkaLoss(nn.Module):
    """Weighted sum of `base` over the leading `dims` coordinates of every embedding.

    `weights` default to 1 for every dim. With `full_dim_weight` set, the full embedding (whatever its
    size D turns out to be) is also trained with that weight unless D is already listed in `dims`.
    """

    def __init__(self, base: nn.Module, dims: Sequence[int], weights: Sequence[float] | None = None,
                 *, full_dim_weight: float | None = None) -> None:
        super().__init__()
        dims = list(dims)
        if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in dims):
            raise UserError(f"mrl_dims must be a non-empty list of positive integers, got {dims}.")
        if len(set(dims)) != len(dims):
            raise UserError(f"mrl_dims lists a dimension twice ({dims}); list each dimension once.")
        weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
        if len(weights) != len(dims):
            raise UserError(f"mrl_dim_weights has {len(weights)} values but mrl_dims has {len(dims)} "
                            f"({dims}); give one weight per dimension.")
        if any(not math.isfinite(w) or w < 0 for w in weights):
            raise UserError(f"mrl_dim_weights must be finite and >= 0, got {weights}.")
        self.base = base
        self.dims = dims
        self.weights = weights
        self.full_dim_weight = full_dim_weight

    def dim_weights(self, full_dim: int) -> dict[int, float]:
        """{dimension: weight} used for embeddings of size `full_dim`, in increasing dimension."""
        too_big = [d for d in self.dims if d > full_dim]
        if too_big:
            raise UserError(f"mrl_dims {too_big} exceed the embedding size {full_dim}; "
                            f"use dimensions <= {full_dim}.")
        pairs = dict(zip(self.dims, self.weights))
        if self.full_dim_weight is not None:
            pairs.setdefault(full_dim, float(self.full_dim_weight))
        return dict(sorted(pairs.items()))

    def per_dim(self, q: Tensor, p: Tensor, n: Tensor | None, use_inbatch: bool, **kwargs: Any,
                ) -> dict[int, Tensor]:
        """Unweighted base loss at each dimension: {d: base(x[..., :d])}; `kwargs` go to the base unchanged."""
        return {d: self.base(q[..., :d], p[..., :d], None if n is None else n[..., :d], use_inbatch, **kwargs)
                for d in self.dim_weights(q.size(-1))}

    def forward(self, q: Tensor, p: Tensor, n: Tensor | None, use_inbatch: bool, **kwargs: Any) -> Tensor:
        weights = self.dim_weights(q.size(-1))
        losses = self.per_dim(q, p, n, use_inbatch, **kwargs)
        return sum(weights[d] * losses[d] for d in weights)  # type: ignore[return-value]
