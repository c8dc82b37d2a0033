"""Representation losses against explicit loops: MaxSim (masks, padding sides), InfoNCE over MaxSim and over
sparse dot products (in-batch + hard negatives, duplicate masking), FLOPS, BGE-M3 self-distillation, and the
per-head composition of `RepresentationObjective`."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llm2emb.errors import UserError
from llm2emb.losses import LOSS_REGISTRY, ContrastiveLoss, parse_loss_specs
from llm2emb.losses.flops import Flops
from llm2emb.losses.late_interaction import MaxSimInfoNCE, MaxSimScorer, maxsim
from llm2emb.losses.registry import EmbeddingBatch
from llm2emb.losses.representation import RepresentationObjective, representation_loss_entries
from llm2emb.losses.scored import CosineScorer, candidate_scores
from llm2emb.losses.self_distill import SelfDistill
from llm2emb.losses.sparse_contrastive import SparseInfoNCE

B, K, DIM = 4, 2, 6
gen = torch.Generator().manual_seed(0)


def token_set(rows: int, lengths: list[int], side: str = "right", junk: float = 0.0):
    """Random token vectors with the given real lengths, padded on `side`; pads hold `junk`."""
    longest = max(lengths)
    vectors = torch.full((rows, longest, DIM), junk, dtype=torch.float64)
    mask = torch.zeros((rows, longest), dtype=torch.bool)
    real = [torch.randn(n, DIM, generator=gen, dtype=torch.float64) for n in lengths]
    for i, n in enumerate(lengths):
        span = slice(longest - n, longest) if side == "left" else slice(0, n)
        vectors[i, span], mask[i, span] = real[i], True
    return vectors, mask, real


def loop_maxsim(q: torch.Tensor, d: torch.Tensor) -> float:
    return sum(max(float(qi @ dj) for dj in d) for qi in q) / len(q)


def test_maxsim_equals_loops_and_ignores_padding_on_either_side():
    qv, qm, q_real = token_set(3, [2, 5, 1])
    dv, dm, d_real = token_set(4, [3, 1, 6, 2])
    expected = torch.tensor([[loop_maxsim(q, d) for d in d_real] for q in q_real], dtype=torch.float64)
    torch.testing.assert_close(maxsim(qv, qm, dv, dm), expected)
    # left padding and large values in the padded positions: same scores
    qv2 = torch.full_like(qv, 50.0)
    dv2 = torch.full_like(dv, 50.0)
    for i, t in enumerate(q_real):
        qv2[i, qv.size(1) - len(t):] = t
    for i, t in enumerate(d_real):
        dv2[i, dv.size(1) - len(t):] = t
    qm2 = torch.stack([torch.arange(qv.size(1)) >= qv.size(1) - len(t) for t in q_real])
    dm2 = torch.stack([torch.arange(dv.size(1)) >= dv.size(1) - len(t) for t in d_real])
    torch.testing.assert_close(maxsim(qv2, qm2, dv2, dm2), expected)


def _problem(junk: float = 0.0):
    q = token_set(B, [2, 3, 1, 4], junk=junk)
    p = token_set(B, [3, 2, 5, 1], junk=junk)
    n_lengths = [1, 4, 2, 3, 2, 2, 5, 1]
    nv, nm, n_real = token_set(B * K, n_lengths, junk=junk)
    n = (nv.view(B, K, *nv.shape[1:]), nm.view(B, K, -1), [n_real[i * K:(i + 1) * K] for i in range(B)])
    return q, p, n


def _loop_infonce(score, q_real, p_real, n_real, temperature, use_inbatch, inbatch_hard, drop_keys=None):
    """Sum of the hard and in-batch InfoNCE terms, by explicit loops over rows and candidates."""
    passage_keys, negative_keys = drop_keys or (None, None)
    hard, inbatch = [], []
    for i in range(B):
        cands = [score(q_real[i], p_real[i])]
        for j in range(K):
            same = passage_keys is not None and negative_keys[i][j] == passage_keys[i]
            cands.append(float("-inf") if same else score(q_real[i], n_real[i][j]))
        logits = torch.tensor(cands, dtype=torch.float64) / temperature
        hard.append(-(logits[0] - torch.logsumexp(logits, 0)))
        cols = [(score(q_real[i], p_real[m]), passage_keys[m] if passage_keys else None, m == i) for m in range(B)]
        if inbatch_hard:
            cols += [(score(q_real[i], n_real[m][j]), negative_keys[m][j] if negative_keys else None, False)
                     for m in range(B) for j in range(K)]
        values = [s / temperature for s, key, own in cols
                  if own or passage_keys is None or key != passage_keys[i]]
        own = score(q_real[i], p_real[i]) / temperature
        inbatch.append(-(own - torch.logsumexp(torch.tensor(values, dtype=torch.float64), 0)))
    total = torch.stack(hard).mean()
    if use_inbatch:
        total = total + torch.stack(inbatch).mean()
    return total


@pytest.mark.parametrize("use_inbatch, inbatch_hard", [(True, False), (True, True), (False, False)])
def test_maxsim_infonce_equals_loops(use_inbatch, inbatch_hard):
    (qv, qm, q_real), (pv, pm, p_real), (nv, nm, n_real) = _problem(junk=7.0)
    term = MaxSimInfoNCE(MaxSimInfoNCE.Options(temperature=0.2, inbatch_hard_negatives=inbatch_hard))
    got, _ = term(EmbeddingBatch((qv, qm), (pv, pm), (nv, nm), use_inbatch))
    expected = _loop_infonce(loop_maxsim, q_real, p_real, n_real, 0.2, use_inbatch, inbatch_hard)
    assert float(got) == pytest.approx(float(expected), rel=1e-9)


def test_maxsim_infonce_masks_duplicate_passages():
    (qv, qm, q_real), (pv, pm, p_real), (nv, nm, n_real) = _problem()
    passage_keys = torch.tensor([10, 11, 10, 12])         # rows 0 and 2 share a positive
    negative_keys = torch.tensor([[20, 21], [11, 22], [23, 24], [25, 10]])  # row 1's first negative = its positive
    keys = dict(passage_keys=passage_keys, negative_keys=negative_keys)
    term = MaxSimInfoNCE(MaxSimInfoNCE.Options(temperature=0.3, inbatch_hard_negatives=True))
    got, _ = term(EmbeddingBatch((qv, qm), (pv, pm), (nv, nm), True, **keys))
    expected = _loop_infonce(loop_maxsim, q_real, p_real, n_real, 0.3, True, True,
                             (passage_keys.tolist(), negative_keys.tolist()))
    unmasked, _ = term(EmbeddingBatch((qv, qm), (pv, pm), (nv, nm), True))
    assert float(got) == pytest.approx(float(expected), rel=1e-9)
    assert abs(float(got) - float(unmasked)) > 1e-3


def test_candidate_scores_with_cosine_equal_the_dense_contrastive_loss():
    q, p = torch.randn(B, DIM, generator=gen), torch.randn(B, DIM, generator=gen)
    n = torch.randn(B, K, DIM, generator=gen)
    keys = dict(passage_keys=torch.tensor([1, 2, 1, 3]), negative_keys=torch.tensor([[4, 5], [2, 6], [7, 8], [9, 1]]))
    dense = ContrastiveLoss(temperature=0.07, inbatch_hard_negatives=True).terms(q, p, n, True, **keys)
    ours = candidate_scores(CosineScorer(), q, p, n, True, inbatch_hard_negatives=True, **keys)
    for name in ("hard", "inbatch"):
        torch.testing.assert_close(ours[name].loss(0.07), dense[name])


def test_sparse_infonce_equals_loops_on_dot_products():
    q = torch.relu(torch.randn(B, 9, generator=gen, dtype=torch.float64))
    p = torch.relu(torch.randn(B, 9, generator=gen, dtype=torch.float64))
    n = torch.relu(torch.randn(B, K, 9, generator=gen, dtype=torch.float64))
    term = SparseInfoNCE(SparseInfoNCE.Options())
    got, _ = term(EmbeddingBatch(q, p, n, True))
    expected = _loop_infonce(lambda a, b: float(a @ b), list(q), list(p), [list(r) for r in n], 1.0, True, False)
    assert float(got) == pytest.approx(float(expected), rel=1e-9)


def test_flops_equals_the_formula_with_separate_query_and_document_weights():
    q = torch.relu(torch.randn(B, 9, generator=gen, dtype=torch.float64))
    p = torch.relu(torch.randn(B, 9, generator=gen, dtype=torch.float64))
    n = torch.relu(torch.randn(B, K, 9, generator=gen, dtype=torch.float64))
    term = Flops(Flops.Options(query_weight=0.5, doc_weight=2.0))
    got, parts = term(EmbeddingBatch(q, p, n, True))
    docs = list(p) + [n[i, j] for i in range(B) for j in range(K)]
    q_flops = sum((sum(float(row[j]) for row in q) / B) ** 2 for j in range(9))
    d_flops = sum((sum(float(row[j]) for row in docs) / len(docs)) ** 2 for j in range(9))
    assert float(got) == pytest.approx(0.5 * q_flops + 2.0 * d_flops, rel=1e-9)
    assert parts["flops/query"] == pytest.approx(q_flops) and parts["flops/doc"] == pytest.approx(d_flops)


def test_self_distill_equals_bge_m3_formula_by_loops():
    dense_q, dense_p = torch.randn(B, DIM, generator=gen, dtype=torch.float64), torch.randn(B, DIM, generator=gen,
                                                                                           dtype=torch.float64)
    sparse_q = torch.relu(torch.randn(B, 9, generator=gen, dtype=torch.float64))
    sparse_p = torch.relu(torch.randn(B, 9, generator=gen, dtype=torch.float64))
    weights = {"dense": 1.0, "sparse": 0.3}
    temps = {"dense": 0.05, "sparse": 1.0}
    term = SelfDistill(SelfDistill.Options(temperature=0.1))
    term.configure(weights, temps)
    got, _ = term(EmbeddingBatch({"dense": dense_q, "sparse": sparse_q}, {"dense": dense_p, "sparse": sparse_p},
                                 None, True))
    cos = F.normalize(dense_q, dim=-1) @ F.normalize(dense_p, dim=-1).T
    dot = sparse_q @ sparse_p.T
    total = 0.0
    for i in range(B):
        inter = [weights["dense"] * float(cos[i, m]) + weights["sparse"] * float(dot[i, m]) for m in range(B)]
        z = [s / 0.1 for s in inter]
        lse = math.log(sum(math.exp(v) for v in z))
        teacher = [math.exp(v - lse) for v in z]
        row = -(z[i] - lse)
        for head, s in (("dense", cos), ("sparse", dot)):
            zh = [float(s[i, m]) / temps[head] for m in range(B)]
            lse_h = math.log(sum(math.exp(v) for v in zh))
            row += weights[head] * -sum(t * (v - lse_h) for t, v in zip(teacher, zh))
        total += row / B
    assert float(got) == pytest.approx(total, rel=1e-9)


def test_representation_objective_weights_each_head_and_routes_its_outputs():
    cfg = {"representation": "hybrid", "hybrid_heads": ["dense", "sparse", "multi_vector"],
           "hybrid_weights": [1.0, 0.3, 2.0], "temperature": 0.05, "flops_query_weight": 0.0,
           "flops_doc_weight": 0.0}
    entries = representation_loss_entries(cfg)
    assert [e["name"] for e in entries] == ["contrastive", "sparse_contrastive", "maxsim"]
    objective = RepresentationObjective.from_config(cfg)
    (qv, qm, _), (pv, pm, _), (nv, nm, _) = _problem()
    dq, dp, dn = torch.randn(B, DIM, generator=gen), torch.randn(B, DIM, generator=gen), torch.randn(B, K, DIM,
                                                                                                   generator=gen)
    sq, sp, sn = (torch.relu(torch.randn(*s, generator=gen)) for s in ((B, 9), (B, 9), (B, K, 9)))
    q = {"dense": dq, "sparse": sq, "multi_vector": qv, "multi_vector_mask": qm}
    p = {"dense": dp, "sparse": sp, "multi_vector": pv, "multi_vector_mask": pm}
    n = {"dense": dn, "sparse": sn, "multi_vector": nv, "multi_vector_mask": nm}
    out = objective(q, p, n, True)
    dense = ContrastiveLoss(0.05)(dq, dp, dn, True)
    sparse, _ = SparseInfoNCE(SparseInfoNCE.Options())(EmbeddingBatch(sq, sp, sn, True))
    multi, _ = MaxSimInfoNCE(MaxSimInfoNCE.Options())(EmbeddingBatch((qv, qm), (pv, pm), (nv, nm), True))
    expected = 1.0 * dense + 0.3 * sparse + 2.0 * multi.float()
    assert float(out.total) == pytest.approx(float(expected), rel=1e-6)
    assert out.parts["maxsim"] == pytest.approx(float(multi), rel=1e-6)


def test_default_sparse_losses_and_self_distillation_entries():
    cfg = {"representation": "sparse", "flops_query_weight": 1e-3, "flops_doc_weight": 2e-3}
    assert representation_loss_entries(cfg) == [{"name": "sparse_contrastive"},
                                                {"name": "flops", "query_weight": 1e-3, "doc_weight": 2e-3}]
    cfg = {"representation": "hybrid", "hybrid_heads": ["sparse", "multi_vector"], "hybrid_weights": [1, 1],
           "hybrid_self_distill": True, "losses": [{"name": "maxsim", "temperature": 0.5}]}
    names = [e["name"] for e in representation_loss_entries(cfg)]
    assert names == ["maxsim", "sparse_contrastive", "flops", "self_distill"]
    specs = parse_loss_specs(representation_loss_entries(cfg))
    objective = RepresentationObjective(specs, {"sparse": 1.0, "multi_vector": 1.0})
    distill = objective.terms[names.index("self_distill")]
    assert distill.temperatures == {"sparse": 1.0, "multi_vector": 0.5}


def test_a_loss_for_a_head_the_representation_lacks_is_a_user_error():
    with pytest.raises(UserError, match="scores the dense head"):
        representation_loss_entries({"representation": "multi_vector", "losses": [{"name": "contrastive"}]})
    with pytest.raises(UserError, match="self_distill"):
        representation_loss_entries({"representation": "sparse", "losses": [{"name": "self_distill"}]})


def test_every_representation_loss_is_registered_with_its_head():
    heads = {name: getattr(cls, "head", "dense") for name, cls in LOSS_REGISTRY.items()}
    assert {k: heads[k] for k in ("maxsim", "sparse_contrastive", "flops", "self_distill")} == {
        "maxsim": "multi_vector", "sparse_contrastive": "sparse", "flops": "sparse", "self_distill": "hybrid"}
    assert MaxSimScorer().rows(token_set(3, [1, 2, 3])[:2]) == 3
