"""Score distillation by KL divergence (registered as `distill_kl`).

Hinton et al. 2015, "Distilling the Knowledge in a Neural Network": the student matches the teacher's
softened distribution. For retrieval as in sentence-transformers' DistillKLDivLoss and Tevatron's
distillation: for query i and its candidates c (its positive, its hard negatives, and with `inbatch` every
other row's positive of the global batch),

    P_t(c | i) = softmax_c( s_t(i, c) / teacher_temperature )
    P_s(c | i) = softmax_c( cos(q_i, c) / temperature )
    loss = mean_i KL(P_t(. | i) || P_s(. | i)) = mean_i sum_c P_t (log P_t - log P_s)     [x temperature^2
                                                  with t2_scaling, Hinton's gradient-scale correction]

The teacher's s_t is the cosine of its embeddings (the `teacher_*` columns of the prepared data) or, with
only `teacher_scores` ([positive, negatives] per row, e.g. a reranker's), those scores; in-batch
candidates need the embeddings. Candidates identical to the row's positive (same token ids: duplicates in
the batch, a hard negative equal to the positive) are dropped from both distributions, as in the
contrastive loss. Rows of data whose task type allows no in-batch negatives (classification, ...) use
their own candidates only.

Distributed: positives are gathered with `gather_with_grad` (teacher embeddings without gradient), and the
per-row mean is weighted by `row_weight`, so DDP's averaged gradient is the one-process gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from llm2emb.errors import UserError
from llm2emb.losses.distributed import gather_sizes, gather_with_grad, is_distributed, rank, row_weight
from llm2emb.losses.registry import EmbeddingBatch, LossTerm, register_loss

TEACHER_HINT = ("the prepared data has no teacher columns; add them with a pipeline stage's `teacher:` "
                "setting (llm2emb pipeline), or `llm2emb.pipeline.teacher.add_teacher_columns`")


TEACHER_SOURCES = ("auto", "embeddings", "scores")


def pick_teacher(batch: EmbeddingBatch, wanted: str, loss: str, prefer: str) -> str:
    """"embeddings" or "scores": what the loss takes from `batch.teacher` (`wanted`: auto picks `prefer` when
    the batch has it, else the other); a UserError when the batch lacks it."""
    teacher = batch.teacher
    has = {"embeddings": teacher is not None and teacher.q is not None and teacher.p is not None,
           "scores": teacher is not None and teacher.scores is not None}
    if wanted == "auto":
        wanted = prefer if has[prefer] else next(k for k in has if k != prefer)
    if not has[wanted]:
        what = "teacher embeddings or scores" if not any(has.values()) else f"teacher {wanted}"
        raise UserError(f"Loss {loss!r} needs {what}, but the batch has none: {TEACHER_HINT}.")
    return wanted


def _fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def candidate_logits(q: Tensor, p: Tensor, n: Tensor | None, inbatch: bool, passage_keys: Tensor | None,
                     negative_keys: Tensor | None, sizes: list[int], distributed: bool) -> tuple[Tensor, Tensor]:
    """Cosines of each row's query with its candidates and the mask of dropped candidates.

    Columns: [own positive, own k negatives, (with inbatch) every process's positives in rank order]; the
    row's own positive appears in the in-batch block too and is dropped there. Returns (cos (B, C), drop (B, C))."""
    q, p = F.normalize(_fp32(q), dim=-1), F.normalize(_fp32(p), dim=-1)
    rows = q.size(0)
    blocks = [(q * p).sum(-1, keepdim=True)]
    drops = [torch.zeros(rows, 1, dtype=torch.bool, device=q.device)]
    if n is not None and n.size(1) > 0:
        n = F.normalize(_fp32(n), dim=-1)
        blocks.append(torch.einsum("bd,bkd->bk", q, n))
        same = torch.zeros(rows, n.size(1), dtype=torch.bool, device=q.device)
        if passage_keys is not None and negative_keys is not None:
            same = negative_keys.view(rows, -1) == passage_keys.view(-1, 1)
        drops.append(same)
    if inbatch:
        all_p = gather_with_grad(p, sizes) if distributed else p
        blocks.append(q @ all_p.T)
        offset = sum(sizes[: rank()]) if distributed else 0
        drop = torch.zeros(rows, all_p.size(0), dtype=torch.bool, device=q.device)
        drop[torch.arange(rows, device=q.device), torch.arange(rows, device=q.device) + offset] = True
        if passage_keys is not None:
            keys = gather_with_grad(passage_keys.view(-1), sizes) if distributed else passage_keys.view(-1)
            drop |= keys.view(1, -1) == passage_keys.view(-1, 1)
        drops.append(drop)
    return torch.cat(blocks, 1), torch.cat(drops, 1)


def masked_kl(teacher_logits: Tensor, student_logits: Tensor, drop: Tensor) -> Tensor:
    """Per row: sum over kept columns of P_t (log P_t - log P_s), both softmaxes over the kept columns."""
    log_t = torch.log_softmax(teacher_logits.masked_fill(drop, float("-inf")), dim=-1)
    log_s = torch.log_softmax(student_logits.masked_fill(drop, float("-inf")), dim=-1)
    # dropped columns: P_t = 0 and both logs -inf; zero them before subtracting (no inf - inf, no NaN gradient)
    return (log_t.exp() * (log_t.masked_fill(drop, 0.0) - log_s.masked_fill(drop, 0.0))).sum(-1)


@register_loss("distill_kl")
class DistillKL(LossTerm):
    """KL(teacher || student) over softmaxed scores of in-batch and hard-negative candidates (Hinton et al. 2015)."""

    uses_teacher = True

    @dataclass
    class Options:
        temperature: float = 0.05            # student: cosine / temperature
        teacher_temperature: float = 0.05    # teacher: its cosine (or score) / teacher_temperature
        inbatch: bool = True                 # other rows' positives are candidates too (needs teacher embeddings)
        t2_scaling: bool = False             # multiply by temperature^2 (Hinton; sentence-transformers)
        teacher_source: str = "auto"         # auto (embeddings when present, else scores) | embeddings | scores

        def validate(self) -> None:
            if self.teacher_source not in TEACHER_SOURCES:
                raise ValueError(f"teacher_source must be one of {', '.join(TEACHER_SOURCES)}, got "
                                 f"{self.teacher_source!r}")
            for name in ("temperature", "teacher_temperature"):
                value = getattr(self, name)
                if not (math.isfinite(value) and value > 0):
                    raise ValueError(f"{name} must be a finite number > 0, got {value}")

    def forward(self, batch: EmbeddingBatch) -> tuple[Tensor, dict[str, float]]:
        opts = self.options
        embeddings = pick_teacher(batch, opts.teacher_source, "distill_kl", prefer="embeddings") == "embeddings"
        teacher = batch.teacher
        k = 0 if batch.n is None else batch.n.size(1)
        inbatch = opts.inbatch and batch.use_inbatch and embeddings
        if not embeddings and (teacher.scores.size(1) != 1 + k):
            raise UserError(f"Loss 'distill_kl': teacher_scores has {teacher.scores.size(1)} columns but the batch "
                            f"has 1 positive + {k} negatives per row; score exactly those candidates.")
        distributed = self.gather and is_distributed()
        sizes = gather_sizes(batch.q.size(0), batch.q.device) if distributed else [batch.q.size(0)]
        weight = row_weight(sizes) if distributed else 1.0
        if k == 0 and not inbatch:     # one candidate per row: nothing to distribute probability over
            return batch.q.sum() * 0.0, {}
        student, drop = candidate_logits(batch.q, batch.p, batch.n, inbatch, batch.passage_keys,
                                         batch.negative_keys, sizes, distributed)
        with torch.no_grad():
            if embeddings:
                n = teacher.n if k else None
                target, _ = candidate_logits(teacher.q, teacher.p, n, inbatch, None, None, sizes, distributed)
            else:
                target = _fp32(teacher.scores)
        loss = masked_kl(target / opts.teacher_temperature, student / opts.temperature, drop).mean() * weight
        if opts.t2_scaling:
            loss = loss * opts.temperature ** 2
        return loss, {}
