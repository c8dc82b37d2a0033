"""InfoNCE over any similarity ("scorer"), with in-batch and hard negatives gathered across processes.

`ContrastiveLoss` (contrastive.py) is InfoNCE over cosine similarity of dense vectors. The multi-vector and
sparse representations score differently (MaxSim over token sets, dot product of vocabulary weights) and the
hybrid self-distillation combines several scores over the same candidates; this module is the shared part:
which candidates a query is scored against, which are masked, where the positive is, and how each process's
loss is weighted. It follows contrastive.py term by term:

    hard term      candidates of row i: [p_i, n_i1 .. n_ik]; target column 0; a negative whose content key
                   equals the row's positive key is masked
    in-batch term  candidates: every process's positives (gathered with their gradient), plus every row's hard
                   negatives with `inbatch_hard_negatives`; target: the row's own positive; other columns
                   whose key equals the row's positive key are masked (in-batch false negatives)
    loss           mean over rows of cross-entropy(scores / temperature), times `row_weight` (1.0 for even
                   batches) so that DDP's gradient average equals the one-process gradient

A scorer knows how to gather, flatten and score one kind of value: a (R, D) tensor for dense / sparse, a
(vectors (R, T, d), mask (R, T)) pair for token sets (late_interaction.py). Only torch and errors here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from llm2emb.losses.distributed import gather_sizes, gather_with_grad, is_distributed, rank, row_weight
from llm2emb.losses.registry import EmbeddingBatch, LossTerm


def at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class Scorer:
    """Similarity of one representation; values are (R, D) tensors here (subclasses may use other shapes)."""

    name = "dot"

    def prepare(self, x: Any) -> Any:
        """Cast (and for cosine normalise) a value before scoring."""
        return at_least_fp32(x)

    def rows(self, x: Any) -> int:
        return int(x.size(0))

    def device(self, x: Any) -> torch.device:
        return x.device

    def gather(self, x: Any, sizes: list[int]) -> Any:
        return gather_with_grad(x, sizes)

    def flatten(self, n: Any) -> Any:
        """(B, k, ...) hard negatives -> (B * k, ...) rows, row-major."""
        return n.reshape(-1, n.size(-1))

    def num_negatives(self, n: Any) -> int:
        return int(n.size(1))

    def join(self, parts: list[Any]) -> Any:
        """Concatenate candidate rows."""
        return torch.cat(parts)

    def score(self, q: Any, c: Any) -> Tensor:
        """(B, C): query row b against every candidate row c."""
        return q @ c.T

    def score_rows(self, q: Any, p: Any, n: Any) -> Tensor:
        """(B, 1 + k): query row b against its own positive and its own k hard negatives."""
        candidates = torch.cat([p.unsqueeze(1), n], dim=1)
        return torch.einsum("bd,bcd->bc", q, candidates)


class DotScorer(Scorer):
    """Inner product (SPLADE's score of two vocabulary-weight vectors)."""

    name = "dot"


class CosineScorer(Scorer):
    """Cosine similarity (the dense head's score)."""

    name = "cosine"

    def prepare(self, x: Tensor) -> Tensor:
        return F.normalize(at_least_fp32(x), dim=-1)


@dataclass
class Logits:
    """One InfoNCE term before the temperature: raw similarities, masked columns, target column, weight."""

    scores: Tensor           # (B, C)
    drop: Tensor | None      # (B, C) bool: columns that are never candidates for that row
    target: Tensor           # (B,)
    weight: float            # row_weight of this process

    def logits(self, temperature: float) -> Tensor:
        out = self.scores / temperature
        return out if self.drop is None else out.masked_fill(self.drop, float("-inf"))

    def loss(self, temperature: float) -> Tensor:
        return F.cross_entropy(self.logits(temperature), self.target) * self.weight


def candidate_scores(scorer: Scorer, q: Any, p: Any, n: Any | None, use_inbatch: bool, *, gather: bool = True,
                     inbatch_hard_negatives: bool = False, passage_keys: Tensor | None = None,
                     negative_keys: Tensor | None = None) -> dict[str, Logits]:
    """The InfoNCE terms that apply ({"hard": ..., "inbatch": ...}; module docstring), as raw scores.

    All processes must make the same call (same use_inbatch, same number of negatives)."""
    q, p = scorer.prepare(q), scorer.prepare(p)
    k = 0 if n is None else scorer.num_negatives(n)
    n = scorer.prepare(n) if k else None
    rows = scorer.rows(q)
    device = scorer.device(q)
    distributed = gather and is_distributed()
    sizes = gather_sizes(rows, device) if distributed else [rows]
    weight = row_weight(sizes) if distributed else 1.0
    out: dict[str, Logits] = {}
    if k:
        scores = scorer.score_rows(q, p, n)
        drop = None
        if passage_keys is not None and negative_keys is not None:
            same = negative_keys.view(rows, k) == passage_keys.view(-1, 1)
            drop = torch.cat([torch.zeros_like(same[:, :1]), same], 1)
        out["hard"] = Logits(scores, drop, torch.zeros(rows, dtype=torch.long, device=device), weight)
    if use_inbatch or not k:
        columns = [scorer.gather(p, sizes) if distributed else p]
        key_columns = None
        if passage_keys is not None:
            flat = passage_keys.view(-1)
            key_columns = [gather_with_grad(flat, sizes) if distributed else flat]
        if inbatch_hard_negatives and k:
            flat_n = scorer.flatten(n)
            columns.append(scorer.gather(flat_n, [s * k for s in sizes]) if distributed else flat_n)
            if key_columns is not None and negative_keys is not None:
                flat_keys = negative_keys.reshape(-1)
                key_columns.append(gather_with_grad(flat_keys, [s * k for s in sizes]) if distributed else flat_keys)
            else:
                key_columns = None
        scores = scorer.score(q, scorer.join(columns))
        offset = sum(sizes[: rank()]) if distributed else 0
        target = torch.arange(rows, device=device) + offset
        drop = None
        if key_columns is not None:
            not_own = torch.ones_like(scores, dtype=torch.bool)
            not_own[torch.arange(rows, device=device), target] = False
            drop = (torch.cat(key_columns).view(1, -1) == passage_keys.view(-1, 1)) & not_own
        out["inbatch"] = Logits(scores, drop, target, weight)
    return out


class ScoredInfoNCE(LossTerm):
    """InfoNCE with in-batch and hard negatives over `scorer`'s scores of one head's outputs; a registered
    subclass sets `head`, `scorer` and, through its own `Options`, the default temperature."""

    head = ""
    scorer: Scorer

    @dataclass
    class Options:
        temperature: float = 0.05
        inbatch_hard_negatives: bool = False

        def validate(self) -> None:
            if not (math.isfinite(self.temperature) and self.temperature > 0):
                raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")

    def forward(self, batch: EmbeddingBatch) -> tuple[Tensor, dict[str, float]]:
        terms = candidate_scores(self.scorer, batch.q, batch.p, batch.n, batch.use_inbatch, gather=self.gather,
                                 inbatch_hard_negatives=self.options.inbatch_hard_negatives,
                                 passage_keys=batch.passage_keys, negative_keys=batch.negative_keys)
        return sum(t.loss(self.options.temperature) for t in terms.values()), {}  # type: ignore[return-value]
