"""Margin-MSE distillation (registered as `margin_mse`).

Hofstätter et al. 2020, "Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge
Distillation": the student's score margin between a query's positive and each hard negative regresses onto
the teacher's margin,

    M_s(i, j) = student_scale * (cos(q_i, p_i) - cos(q_i, n_ij))
    M_t(i, j) = teacher_scale * (s_t(i, p_i) - s_t(i, n_ij))
    loss = mean over (i, j) of (M_s - M_t)^2

s_t is the teacher's score of [positive, negatives] (`teacher_scores`, e.g. a cross-encoder's logits; the
paper's setting) or, without them, the cosine of the teacher's embeddings (`teacher_source` picks). The
scales put the two on one range (a reranker's logit margins are ~10x a cosine margin). A hard negative
identical to the positive (same token ids) is left out. Batches without hard negatives contribute 0.

Distributed: a process's sum of squared errors is divided by the number of pairs over all processes and
multiplied by the number of processes, so the mean over processes (what DDP's gradient average computes)
is the one-process loss, also when processes hold different numbers of pairs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from llm2emb.losses.distill_kl import TEACHER_SOURCES, pick_teacher
from llm2emb.losses.distributed import gather_sizes, is_distributed, world_size
from llm2emb.losses.registry import EmbeddingBatch, LossTerm, register_loss


def _fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def cosine_margins(q: Tensor, p: Tensor, n: Tensor) -> Tensor:
    """(B, k): cos(q_i, p_i) - cos(q_i, n_ij)."""
    q, p, n = (F.normalize(_fp32(x), dim=-1) for x in (q, p, n))
    return (q * p).sum(-1, keepdim=True) - torch.einsum("bd,bkd->bk", q, n)


@register_loss("margin_mse")
class MarginMSE(LossTerm):
    """MSE between student and teacher score margins of (query, positive, negative) (Hofstätter et al. 2020)."""

    uses_teacher = True

    @dataclass
    class Options:
        student_scale: float = 1.0      # multiplies the student's cosine margins
        teacher_scale: float = 1.0      # multiplies the teacher's margins
        teacher_source: str = "auto"    # auto (scores when present, else embeddings) | embeddings | scores

        def validate(self) -> None:
            for name in ("student_scale", "teacher_scale"):
                if not math.isfinite(getattr(self, name)):
                    raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
            if self.teacher_source not in TEACHER_SOURCES:
                raise ValueError(f"teacher_source must be one of {', '.join(TEACHER_SOURCES)}, got "
                                 f"{self.teacher_source!r}")

    def forward(self, batch: EmbeddingBatch) -> tuple[Tensor, dict[str, float]]:
        opts = self.options
        source = pick_teacher(batch, opts.teacher_source, "margin_mse", prefer="scores")
        k = 0 if batch.n is None else batch.n.size(1)
        distributed = self.gather and is_distributed()
        rows = batch.q.size(0)
        keep = torch.ones(rows, k, dtype=torch.bool, device=batch.q.device)
        if k and batch.passage_keys is not None and batch.negative_keys is not None:
            keep = batch.negative_keys.view(rows, k) != batch.passage_keys.view(-1, 1)
        pairs = int(keep.sum())
        total = sum(gather_sizes(pairs, batch.q.device)) if distributed else pairs
        if k == 0 or total == 0:
            return batch.q.sum() * 0.0, {}
        student = opts.student_scale * cosine_margins(batch.q, batch.p, batch.n)
        teacher = batch.teacher
        with torch.no_grad():
            if source == "scores":
                scores = _fp32(teacher.scores)
                if scores.size(1) != 1 + k:
                    from llm2emb.errors import UserError
                    raise UserError(f"Loss 'margin_mse': teacher_scores has {scores.size(1)} columns but the batch "
                                    f"has 1 positive + {k} negatives per row; score exactly those candidates.")
                target = opts.teacher_scale * (scores[:, :1] - scores[:, 1:])
            else:
                target = opts.teacher_scale * cosine_margins(teacher.q, teacher.p, teacher.n)
        squared = (student - target).pow(2).masked_fill(~keep, 0.0)
        scale = (world_size() if distributed else 1) / total
        return squared.sum() * scale, {}
