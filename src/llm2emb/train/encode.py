"""Turning a `TrainBatch` into embeddings: queries, positives and negatives each in their own forward pass,
each padded only to its own longest member.

F2LLM stacks [queries | positives | negatives] into one tensor padded to the longest passage; with short
queries and long passages most of the query compute then goes to padding. Here the three sides are
collated separately (and the batcher groups rows of similar length), so padding stays small.

`TripletEncoder` runs the three passes inside ONE module call, so DDP sees a single forward per step (one
gradient all-reduce, and no "marked ready twice" surprises with gradient checkpointing).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn


def truncate(ids: Sequence[int], max_length: int, keep_last: int = 1) -> list[int]:
    """Cut to max_length tokens keeping the last `keep_last` ones (EOS; with a summary token at the end, EOS
    and it) last, as `encode_texts` does."""
    if len(ids) <= max_length:
        return list(ids)
    keep_last = min(keep_last, max_length - 1)
    return list(ids[: max_length - keep_last]) + list(ids[len(ids) - keep_last:])


@dataclass
class EncodedBatch:
    """Model inputs of one step; `negatives` is None when the batch has no hard negatives."""

    queries: dict[str, torch.Tensor]
    passages: dict[str, torch.Tensor]
    negatives: dict[str, torch.Tensor] | None
    num_negatives: int
    use_inbatch: bool
    dataset: str
    rows: int
    passage_keys: torch.Tensor | None = None    # (B,) content keys: equal keys = identical token ids
    negative_keys: torch.Tensor | None = None   # (B, k)
    teacher: Any = None                         # losses.registry.TeacherBatch when the data has teacher columns

    def to(self, device: torch.device) -> "EncodedBatch":
        def move(d):
            return None if d is None else {k: v.to(device, non_blocking=True) for k, v in d.items()}

        def keys(t):
            return None if t is None else t.to(device, non_blocking=True)
        return EncodedBatch(move(self.queries), move(self.passages), move(self.negatives), self.num_negatives,
                            self.use_inbatch, self.dataset, self.rows, keys(self.passage_keys),
                            keys(self.negative_keys), None if self.teacher is None else self.teacher.to(device))

    @property
    def loss_keys(self) -> dict[str, torch.Tensor | None]:
        """Keyword arguments of `EmbeddingObjective` that identify the texts (duplicate masking), plus the
        teacher's view of the rows when the data has one (distillation losses)."""
        keys = {"passage_keys": self.passage_keys, "negative_keys": self.negative_keys}
        if self.teacher is not None:
            keys["teacher"] = self.teacher
        return keys


def content_keys(id_lists: Sequence[Sequence[int]]) -> torch.Tensor:
    """One int64 per text, equal for equal token id lists (tuple hashes of ints are not salted, so the
    keys agree across processes)."""
    return torch.tensor([hash(tuple(ids)) for ids in id_lists], dtype=torch.long)


def collate_batch(embedder, batch, query_max_length: int, passage_max_length: int) -> EncodedBatch:
    """TrainBatch (token id lists) -> padded tensors for the three forward passes."""
    keep = max(1, getattr(embedder, "tail_length", 1))
    queries = [truncate(ids, query_max_length, keep) for ids in batch.query_ids]
    # an instruction prefix can never cover the EOS that pooling may need
    prefix = [min(p, len(q) - 1) for p, q in zip(batch.query_prefix_lengths, queries)]
    passages = [truncate(ids, passage_max_length, keep) for ids in batch.passage_ids]
    # a span strategy (echo) pools only each passage's / negative's span, as Embedder.encode does
    passage_prefix = _spans(getattr(batch, "passage_prefix_lengths", None), passages)
    k = batch.num_negatives if batch.negative_ids else 0
    negatives = negative_keys = None
    if k > 0:
        negative_ids = [truncate(ids, passage_max_length, keep) for ids in batch.negative_ids]
        negatives = embedder.collate(negative_ids, _spans(getattr(batch, "negative_prefix_lengths", None),
                                                          negative_ids))
        negative_keys = content_keys(negative_ids).view(len(queries), k)
    return EncodedBatch(embedder.collate(queries, prefix), embedder.collate(passages, passage_prefix), negatives, k,
                        batch.use_inbatch, batch.dataset, len(queries), content_keys(passages), negative_keys,
                        teacher_batch(getattr(batch, "teacher", None), k))


def _spans(prefix_lengths: Sequence[int] | None, id_lists: Sequence[Sequence[int]]) -> list[int] | None:
    """Tokens before each text's pooled span, capped so a span keeps at least its last token (None: none)."""
    if prefix_lengths is None:
        return None
    return [min(p, len(ids) - 1) for p, ids in zip(prefix_lengths, id_lists)]


def teacher_batch(teacher: dict | None, k: int):
    """TrainBatch.teacher (numpy arrays) -> losses.registry.TeacherBatch of tensors (None when absent)."""
    if not teacher:
        return None
    from llm2emb.losses.registry import TeacherBatch

    def tensor(name):
        return None if name not in teacher else torch.from_numpy(teacher[name])
    return TeacherBatch(q=tensor("q"), p=tensor("p"), n=tensor("n") if k else None, scores=tensor("scores"))


class TripletEncoder(nn.Module):
    """Wraps an Embedder: forward(batch) -> (q (B, D), p (B, D), n (B, k, D) or None)."""

    def __init__(self, embedder: nn.Module) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, batch: EncodedBatch):
        q = self.embedder(**batch.queries)
        p = None if batch.passages is None else self.embedder(**batch.passages)  # None: a gradient-cache piece
        n = None
        if batch.negatives is not None:
            n = self.embedder(**batch.negatives).view(batch.rows, batch.num_negatives, -1)
        return q, p, n
