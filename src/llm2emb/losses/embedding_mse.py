"""Embedding MSE distillation (registered as `embedding_mse`).

Reimers & Gurevych 2020, "Making Monolingual Sentence Embeddings Multilingual using Knowledge
Distillation" (EMNLP): the student's embedding of a text regresses onto the teacher's embedding of it,

    loss = mean over texts t of || f(s_t) - g(e_t) ||^2

over the batch's queries, positives and hard negatives (those the teacher embedded), with f = g = L2
normalisation by default (`normalize`; then the loss is 2 - 2 cos per text) or the raw vectors. This is the
squared distance per text, i.e. the dimension times the element-wise MSE the paper writes.

When the student's and the teacher's dimensions differ, the student needs a learned projection into the
teacher's space; as in the paper's code (a Dense layer appended to the student), that is the student's
head: `head: linear` and `head_dim: <teacher dim>` in the training config. The loss says so when the
dimensions differ.

Distributed: a process's sum is divided by the number of texts over all processes and multiplied by the
number of processes, so DDP's gradient average is the one-process gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from llm2emb.errors import UserError
from llm2emb.losses.distill_kl import pick_teacher
from llm2emb.losses.distributed import gather_sizes, is_distributed, world_size
from llm2emb.losses.registry import EmbeddingBatch, LossTerm, register_loss


def _fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


@register_loss("embedding_mse")
class EmbeddingMSE(LossTerm):
    """Squared distance between student and teacher embeddings of each text (Reimers & Gurevych 2020)."""

    uses_teacher = True

    @dataclass
    class Options:
        normalize: bool = True     # compare L2-normalised vectors (2 - 2 cos); false: the raw vectors
        negatives: bool = True     # include the hard negatives the teacher embedded

    def forward(self, batch: EmbeddingBatch) -> tuple[Tensor, dict[str, float]]:
        pick_teacher(batch, "embeddings", "embedding_mse", prefer="embeddings")
        teacher = batch.teacher
        pairs = [(batch.q, teacher.q), (batch.p, teacher.p)]
        if self.options.negatives and batch.n is not None and teacher.n is not None and batch.n.size(1):
            pairs.append((batch.n.reshape(-1, batch.n.size(-1)), teacher.n.reshape(-1, teacher.n.size(-1))))
        student_dim, teacher_dim = batch.q.size(-1), teacher.q.size(-1)
        if student_dim != teacher_dim:
            raise UserError(f"Loss 'embedding_mse': the student's embeddings have {student_dim} dimensions but the "
                            f"teacher's {teacher_dim}; give the student a learned projection into the teacher's "
                            f"space with head: linear and head_dim: {teacher_dim} in the training config.")
        texts = sum(s.size(0) for s, _ in pairs)
        distributed = self.gather and is_distributed()
        total = sum(gather_sizes(texts, batch.q.device)) if distributed else texts
        loss = None
        for student, target in pairs:
            student, target = _fp32(student), _fp32(target).detach()
            if self.options.normalize:
                student, target = F.normalize(student, dim=-1), F.normalize(target, dim=-1)
            part = (student - target).pow(2).sum()
            loss = part if loss is None else loss + part
        return loss * ((world_size() if distributed else 1) / total), {}
