"""Distillation losses (distill_kl, margin_mse, embedding_mse) against values computed by hand, their errors,
and their composition with the other losses (teacher data through the batcher: tests/test_distill_data.py)."""
from __future__ import annotations

import math

import pytest
import torch

from llm2emb.errors import UserError
from llm2emb.losses import LOSS_REGISTRY, EmbeddingObjective, TeacherBatch, parse_loss_specs

S = 1 / math.sqrt(2)


def objective(**entry) -> EmbeddingObjective:
    return EmbeddingObjective(parse_loss_specs([entry]), gather=False)


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def kl(p_t: list[float], p_s: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p_t, p_s) if a > 0)


def softmax(xs: list[float]) -> list[float]:
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


def test_registered():
    assert {"distill_kl", "margin_mse", "embedding_mse"} <= set(LOSS_REGISTRY)


# ------------------------------------------------------------------------------------------ distill_kl

def test_distill_kl_inbatch_by_hand():
    q, p = t([1, 0], [0, 1]), t([1, 0], [1, 1])            # student cosines: row 1 [1, 1/sqrt2], row 2 [1/sqrt2, 0]
    teacher = TeacherBatch(q=t([1, 0], [0, 1]), p=t([0.6, 0.8], [0, 1]))   # row 1 [0.6, 0], row 2 [1, 0.8]
    out = objective(name="distill_kl", temperature=0.5, teacher_temperature=0.25)(q, p, None, True, teacher=teacher)
    # candidates of a row: its own positive, then the other row's positive
    row1 = kl(softmax([0.6 / 0.25, 0.0]), softmax([1 / 0.5, S / 0.5]))
    row2 = kl(softmax([1 / 0.25, 0.8 / 0.25]), softmax([S / 0.5, 0.0]))
    assert out.total.item() == pytest.approx((row1 + row2) / 2, rel=1e-9)
    assert out.parts["distill_kl"] == pytest.approx((row1 + row2) / 2, rel=1e-6)
    # the same positive twice (equal content keys): the other row's positive is no candidate; one candidate, 0
    keys = torch.tensor([7, 7])
    dup = objective(name="distill_kl")(q, p, None, True, passage_keys=keys, teacher=teacher)
    assert dup.total.item() == 0.0
    # t2_scaling multiplies by the student temperature squared
    scaled = objective(name="distill_kl", temperature=0.5, teacher_temperature=0.25, t2_scaling=True)
    assert scaled(q, p, None, True, teacher=teacher).total.item() == pytest.approx(0.25 * (row1 + row2) / 2)


def test_distill_kl_hard_negatives_and_teacher_scores_by_hand():
    q, p, n = t([1, 0]), t([1, 0]), t([[0, 1], [-1, 0]])   # student cosines [1, 0, -1]
    scores = TeacherBatch(scores=t([2, 1, 0]))
    out = objective(name="distill_kl", temperature=0.5, teacher_temperature=2.0)(q, p, n, True, teacher=scores)
    want = kl(softmax([1.0, 0.5, 0.0]), softmax([2.0, 0.0, -2.0]))
    assert out.total.item() == pytest.approx(want, rel=1e-9)
    # a hard negative equal to the positive is dropped from both distributions
    keys = dict(passage_keys=torch.tensor([5]), negative_keys=torch.tensor([[9, 5]]))
    out = objective(name="distill_kl", temperature=0.5, teacher_temperature=2.0)(q, p, n, True, teacher=scores, **keys)
    assert out.total.item() == pytest.approx(kl(softmax([1.0, 0.5]), softmax([2.0, 0.0])), rel=1e-9)
    # teacher embeddings with negatives, in-batch off (task types without in-batch negatives)
    emb = TeacherBatch(q=t([1, 0]), p=t([0.6, 0.8]), n=t([[0, 1], [1, 0]]))   # teacher [0.6, 0, 1]
    out = objective(name="distill_kl", temperature=1.0, teacher_temperature=1.0)(q, p, n, False, teacher=emb)
    assert out.total.item() == pytest.approx(kl(softmax([0.6, 0.0, 1.0]), softmax([1.0, 0.0, -1.0])), rel=1e-9)


def test_distill_kl_gradient_pushes_towards_the_teacher():
    q = t([1, 0]).requires_grad_()
    p, n = t([1, 0]), t([[0, 1]])
    # the teacher prefers the negative: minimising the KL must raise cos(q, n)
    loss = objective(name="distill_kl")(q, p, n, False, teacher=TeacherBatch(scores=t([0, 1]))).total
    loss.backward()
    assert q.grad[0, 1] < 0          # gradient descent increases q's component along n = (0, 1)


def test_distill_kl_errors():
    q, p = t([1, 0], [0, 1]), t([1, 0], [0, 1])
    with pytest.raises(UserError, match="needs teacher embeddings or scores.*no teacher columns"):
        objective(name="distill_kl")(q, p, None, True)
    with pytest.raises(UserError, match="teacher_scores has 3 columns but the batch has 1 positive \\+ 1 negatives"):
        objective(name="distill_kl")(q, p, t([[0, 1]], [[1, 0]]), True,
                                     teacher=TeacherBatch(scores=t([1, 2, 3], [1, 2, 3])))
    with pytest.raises(UserError, match="teacher_source must be one of"):
        objective(name="distill_kl", teacher_source="reranker")
    with pytest.raises(UserError, match="needs teacher embeddings"):
        objective(name="distill_kl", teacher_source="embeddings")(q, p, None, True,
                                                                 teacher=TeacherBatch(scores=t([1], [1])))


# ------------------------------------------------------------------------------------------ margin_mse

def test_margin_mse_by_hand():
    q, p, n = t([1, 0]), t([1, 0]), t([[0, 1], [-1, 0]])   # student margins 1 - 0, 1 - (-1) = [1, 2]
    scores = TeacherBatch(scores=t([3, 1, 2]))                           # teacher margins [2, 1] x 0.5 = [1, 0.5]
    out = objective(name="margin_mse", teacher_scale=0.5)(q, p, n, True, teacher=scores)
    assert out.total.item() == pytest.approx((0 + 1.5 ** 2) / 2)
    # student_scale 2: [2, 4] vs [1, 0.5]
    out = objective(name="margin_mse", student_scale=2.0, teacher_scale=0.5)(q, p, n, True, teacher=scores)
    assert out.total.item() == pytest.approx((1 + 3.5 ** 2) / 2)
    # the second negative equals the positive: only the first pair counts
    keys = dict(passage_keys=torch.tensor([1]), negative_keys=torch.tensor([[2, 1]]))
    assert objective(name="margin_mse", teacher_scale=0.5)(q, p, n, True, teacher=scores, **keys).total.item() == 0.0
    # teacher embeddings: cos(tq, tp) = 0.6, cos(tq, tn) = [0, 1] -> margins [0.6, -0.4]
    emb = TeacherBatch(q=t([1, 0]), p=t([0.6, 0.8]), n=t([[0, 1], [1, 0]]))
    out = objective(name="margin_mse")(q, p, n, True, teacher=emb)
    assert out.total.item() == pytest.approx(((1 - 0.6) ** 2 + (2 + 0.4) ** 2) / 2)
    # auto prefers the scores when both are there
    both = TeacherBatch(q=emb.q, p=emb.p, n=emb.n, scores=scores.scores)
    assert objective(name="margin_mse", teacher_scale=0.5)(q, p, n, True, teacher=both).total.item() == \
        pytest.approx(1.125)
    # no hard negatives: nothing to compare, 0 (still part of the graph)
    qq = t([1, 0]).requires_grad_()
    zero = objective(name="margin_mse")(qq, p, None, True, teacher=TeacherBatch(scores=t([1]))).total
    zero.backward()
    assert zero.item() == 0.0 and qq.grad is not None


# ------------------------------------------------------------------------------------------ embedding_mse

def test_embedding_mse_by_hand():
    q, p = t([3, 4]), t([0, 2])
    teacher = TeacherBatch(q=t([1, 0]), p=t([0, 1]))
    # normalised: (0.6, 0.8) vs (1, 0) -> 0.16 + 0.64 = 0.8 = 2 - 2 * 0.6; (0, 1) vs (0, 1) -> 0
    assert objective(name="embedding_mse")(q, p, None, True, teacher=teacher).total.item() == pytest.approx(0.4)
    # raw vectors: |(2, 4)|^2 = 20, |(0, 1)|^2 = 1
    raw = objective(name="embedding_mse", normalize=False)(q, p, None, True, teacher=teacher)
    assert raw.total.item() == pytest.approx(10.5)
    # hard negatives the teacher embedded count as texts too: (0, -1) vs (0, 1) -> 4
    n, tn = t([[0, -5]]), t([[0, 1]])
    with_neg = objective(name="embedding_mse")(q, p, n, True, teacher=TeacherBatch(q=teacher.q, p=teacher.p, n=tn))
    assert with_neg.total.item() == pytest.approx((0.8 + 0 + 4) / 3)
    without = objective(name="embedding_mse", negatives=False)(q, p, n, True,
                                                              teacher=TeacherBatch(q=teacher.q, p=teacher.p, n=tn))
    assert without.total.item() == pytest.approx(0.4)


def test_embedding_mse_names_the_projection_when_dimensions_differ():
    with pytest.raises(UserError, match="have 2 dimensions but the teacher's 3.*head: linear and head_dim: 3"):
        objective(name="embedding_mse")(t([1, 0]), t([0, 1]), None, True,
                                        teacher=TeacherBatch(q=t([1, 0, 0]), p=t([0, 1, 0])))
    with pytest.raises(UserError, match="needs teacher embeddings"):
        objective(name="embedding_mse")(t([1, 0]), t([0, 1]), None, True, teacher=TeacherBatch(scores=t([1])))


def test_distillation_composes_with_contrastive():
    q, p = t([1, 0], [0, 1]), t([1, 0], [1, 1])
    teacher = TeacherBatch(q=t([1, 0], [0, 1]), p=t([0.6, 0.8], [0, 1]))
    both = EmbeddingObjective(parse_loss_specs([{"name": "contrastive"}, {"name": "distill_kl", "weight": 0.5}]),
                              gather=False)(q, p, None, True, teacher=teacher)
    alone = [objective(name=name)(q, p, None, True, teacher=teacher).total.item()
             for name in ("contrastive", "distill_kl")]
    assert both.total.item() == pytest.approx(alone[0] + 0.5 * alone[1])
    # contrastive alone ignores the teacher
    assert objective(name="contrastive")(q, p, None, True).total.item() == pytest.approx(alone[0])
