"""Losses against values worked out by hand on 2-D / 3-D vectors (cosines written out with plain math)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from llm2emb.errors import UserError
from llm2emb.losses import ContrastiveLoss, EmbeddingObjective, LossOutput, MatryoshkaLoss, SpreadOutLoss
from llm2emb.losses.distributed import gather_with_grad

R = 1 / math.sqrt(2)  # cos 45 degrees


def softplus(x: float) -> float:
    """-log(e^a / (e^a + e^b)) = log(1 + e^(b - a))."""
    return math.log1p(math.exp(x))


@pytest.fixture
def batch():
    # q1 = (1, 0), q2 = (0, 1) after normalisation; p1 = (1, 0), p2 = (1, 1)/sqrt2;
    # n1 = (0, 1), n2 = (-1, 0). Lengths deliberately not 1: the loss must normalise.
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    n = torch.tensor([[[0.0, 5.0]], [[-1.0, 0.0]]])
    return q, p, n


def inbatch_by_hand(tau: float) -> float:
    # cos(q1, p1) = 1, cos(q1, p2) = R; cos(q2, p1) = 0, cos(q2, p2) = R
    l1 = softplus((R - 1) / tau)
    l2 = softplus((0 - R) / tau)
    return (l1 + l2) / 2


def hard_by_hand(tau: float) -> float:
    # row 1: [cos(q1, p1), cos(q1, n1)] = [1, 0]; row 2: [cos(q2, p2), cos(q2, n2)] = [R, 0]
    return (softplus(-1 / tau) + softplus(-R / tau)) / 2


@pytest.mark.parametrize("tau", [1.0, 0.5, 0.05])
def test_inbatch_term_by_hand(batch, tau):
    q, p, _ = batch
    got = ContrastiveLoss(temperature=tau)(q, p, None, use_inbatch=True)
    assert got.item() == pytest.approx(inbatch_by_hand(tau), rel=1e-5)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_hard_term_only_by_hand(batch, tau):
    q, p, n = batch
    got = ContrastiveLoss(temperature=tau)(q, p, n, use_inbatch=False)
    assert got.item() == pytest.approx(hard_by_hand(tau), rel=1e-5)


def test_both_terms_add_up(batch):
    q, p, n = batch
    loss = ContrastiveLoss(temperature=0.5)
    assert loss(q, p, n, True).item() == pytest.approx(inbatch_by_hand(0.5) + hard_by_hand(0.5), rel=1e-5)
    assert set(loss.terms(q, p, n, True)) == {"inbatch", "hard"}
    assert set(loss.terms(q, p, n, False)) == {"hard"}


def test_inbatch_hard_negatives_by_hand(batch):
    q, p, n = batch
    e = math.exp
    # in-batch candidates for every query: [p1, p2, n1, n2]
    # q1: cos = [1, R, 0, -1], target p1;  q2: cos = [0, R, 1, 0], target p2  (tau = 1)
    l1 = -math.log(e(1) / (e(1) + e(R) + e(0) + e(-1)))
    l2 = -math.log(e(R) / (e(0) + e(R) + e(1) + e(0)))
    expected = (l1 + l2) / 2 + hard_by_hand(1.0)
    got = ContrastiveLoss(temperature=1.0, inbatch_hard_negatives=True)(q, p, n, True)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_no_negatives_and_no_inbatch_falls_back_to_inbatch(batch):
    q, p, _ = batch
    loss = ContrastiveLoss(temperature=1.0)
    expected = inbatch_by_hand(1.0)
    assert loss(q, p, None, use_inbatch=False).item() == pytest.approx(expected, rel=1e-5)
    assert loss(q, p, torch.empty(2, 0, 2), use_inbatch=False).item() == pytest.approx(expected, rel=1e-5)


def test_contrastive_rejects_bad_shapes(batch):
    q, p, n = batch
    loss = ContrastiveLoss()
    with pytest.raises(ValueError, match="q and p"):
        loss(q, p[:1], None, True)
    with pytest.raises(ValueError, match=r"n must be \(B, k, D\)"):
        loss(q, p, n[:, :, :1], True)
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveLoss(temperature=0)


# --- Matryoshka ---------------------------------------------------------------------------------

MRL_Q = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0]])
MRL_P = torch.tensor([[2.0, 0.0, 1.0], [-1.0, 0.0, 3.0]])
# d = 1: normalised coordinates are q = (1, -1), p = (1, -1): cos = [[1, -1], [-1, 1]]
MRL_D1 = softplus(-2.0)
# d = 3: q1 = (1,0,0), q2 = (-1,1,0)/sqrt2, p1 = (2,0,1)/sqrt5, p2 = (-1,0,3)/sqrt10
_c11, _c12 = 2 / math.sqrt(5), -1 / math.sqrt(10)
_c21, _c22 = -2 / math.sqrt(10), 1 / math.sqrt(20)
MRL_D3 = (softplus(_c12 - _c11) + softplus(_c21 - _c22)) / 2


def test_matryoshka_weighted_sum_by_hand():
    base = ContrastiveLoss(temperature=1.0)
    plain = MatryoshkaLoss(base, dims=[1], weights=[0.5])
    assert plain(MRL_Q, MRL_P, None, True).item() == pytest.approx(0.5 * MRL_D1, rel=1e-5)
    listed = MatryoshkaLoss(base, dims=[3, 1], weights=[2.0, 0.5])
    assert listed(MRL_Q, MRL_P, None, True).item() == pytest.approx(0.5 * MRL_D1 + 2.0 * MRL_D3, rel=1e-5)
    default_weights = MatryoshkaLoss(base, dims=[1, 3])
    assert default_weights(MRL_Q, MRL_P, None, True).item() == pytest.approx(MRL_D1 + MRL_D3, rel=1e-5)


def test_objective_adds_full_dim_with_weight_one_unless_listed():
    extra = EmbeddingObjective.build(temperature=1.0, mrl_dims=[1], mrl_dim_weights=[0.5])
    out = extra(MRL_Q, MRL_P, None, True)
    assert out.total.item() == pytest.approx(0.5 * MRL_D1 + MRL_D3, rel=1e-5)
    assert out.parts["contrastive@1"] == pytest.approx(MRL_D1, rel=1e-5)
    assert out.parts["contrastive@3"] == pytest.approx(MRL_D3, rel=1e-5)
    listed = EmbeddingObjective.build(temperature=1.0, mrl_dims=[1, 3], mrl_dim_weights=[0.5, 0.25])
    assert listed(MRL_Q, MRL_P, None, True).total.item() == pytest.approx(0.5 * MRL_D1 + 0.25 * MRL_D3,
                                                                           rel=1e-5)


def test_matryoshka_bad_dims_and_weights():
    base = ContrastiveLoss()
    with pytest.raises(UserError, match="exceed the embedding size 3"):
        MatryoshkaLoss(base, dims=[2, 4])(MRL_Q, MRL_P, None, True)
    with pytest.raises(UserError, match="one weight per dimension"):
        MatryoshkaLoss(base, dims=[1, 2], weights=[1.0])
    with pytest.raises(UserError, match="positive integers"):
        MatryoshkaLoss(base, dims=[0, 2])
    with pytest.raises(UserError, match="twice"):
        MatryoshkaLoss(base, dims=[2, 2])
    with pytest.raises(UserError, match="finite and >= 0"):
        MatryoshkaLoss(base, dims=[1, 2], weights=[1.0, -1.0])


# --- spread-out ---------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [1.0, 2.0])
def test_spread_out_known_points(t):
    loss = SpreadOutLoss(t=t)
    # antipodal pair: ||x - y||^2 = 4
    assert loss(torch.tensor([[2.0, 0.0], [-1.0, 0.0]])).item() == pytest.approx(-4 * t, rel=1e-5)
    # four points at 90 degrees: 8 ordered neighbour pairs at distance^2 2, 4 opposite pairs at 4
    square = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [0.0, -1.0]])
    expected = math.log((8 * math.exp(-2 * t) + 4 * math.exp(-4 * t)) / 12)
    assert loss(square).item() == pytest.approx(expected, rel=1e-5)
    # collapsed: every distance 0 -> log 1 = 0, the maximum
    assert loss(torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_spread_out_rejects_one_row():
    with pytest.raises(ValueError, match="M >= 2"):
        SpreadOutLoss()(torch.ones(1, 3))
    with pytest.raises(ValueError, match="spread_t"):
        SpreadOutLoss(t=0)


def test_objective_total_is_contrastive_plus_weighted_spread(batch):
    q, p, n = batch
    obj = EmbeddingObjective.build(temperature=0.5, spread_weight=0.1, spread_t=2.0)
    out = obj(q, p, n, True)
    assert isinstance(out, LossOutput)
    # spread over cat(q, p) = {(1,0), (0,1), (1,0), (1,1)/sqrt2}, 12 ordered pairs:
    # (1,0)-(1,0): d2 = 0 (x2); (1,0)-(0,1): 2 (x4); (1,0)-diag: 2 - 2R (x4); (0,1)-diag: 2 - 2R (x2)
    t = 2.0
    spread = math.log((2 + 4 * math.exp(-2 * t) + 6 * math.exp(-t * (2 - 2 * R))) / 12)
    contrastive = inbatch_by_hand(0.5) + hard_by_hand(0.5)
    assert out.parts["spread_out"] == pytest.approx(spread, rel=1e-5)
    assert out.parts["contrastive"] == pytest.approx(contrastive, rel=1e-5)
    assert out.total.item() == pytest.approx(contrastive + 0.1 * spread, rel=1e-5)
    assert set(EmbeddingObjective.build()(q, p, n, True).parts) == {"contrastive"}


# --- gradients ----------------------------------------------------------------------------------

def test_gradients_finite_on_awkward_inputs():
    torch.manual_seed(0)
    q = torch.randn(6, 16) * 100
    q[1] = 0.0                        # zero vector (normalize must not divide by 0)
    p = torch.randn(6, 16)
    p[2] = p[3]                       # duplicate positives (spread-out distance 0)
    n = torch.randn(6, 3, 16)
    for dtype in (torch.float32, torch.bfloat16):
        leaves = [x.clone().to(dtype).requires_grad_() for x in (q, p, n)]
        obj = EmbeddingObjective.build(temperature=0.01, inbatch_hard_negatives=True, mrl_dims=[4, 8],
                                 spread_weight=0.5, spread_t=4.0)
        out = obj(*leaves, True)
        out.total.backward()
        assert torch.isfinite(out.total)
        for leaf in leaves:
            assert leaf.grad is not None and torch.isfinite(leaf.grad.float()).all()
        assert leaves[2].grad.abs().sum() > 0  # negatives get a gradient


def test_gradients_match_finite_differences():
    torch.manual_seed(1)
    q, p, n = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((4, 6), (4, 6), (4, 2, 6)))
    obj = EmbeddingObjective.build(temperature=0.5, inbatch_hard_negatives=True, mrl_dims=[3], spread_weight=0.3)
    assert torch.autograd.gradcheck(lambda a, b, c: obj(a, b, c, True).total, (q, p, n))


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 4)
    assert gather_with_grad(x) is x


# --- config -------------------------------------------------------------------------------------

def test_from_config_reads_seed_fields():
    cfg = SimpleNamespace(temperature=0.02, inbatch_hard_negatives=True, mrl_enabled=True, mrl_dims=[1],
                          mrl_dim_weights=[0.5], spread_enabled=True, spread_weight=0.2, spread_t=3.0, losses=[])
    obj = EmbeddingObjective.from_config(cfg)
    (contrastive, spread) = obj.terms
    assert [s.name for s in obj.specs] == ["contrastive", "spread_out"] and obj.specs[1].weight == 0.2
    assert contrastive.contrastive.temperature == 0.02 and contrastive.contrastive.inbatch_hard_negatives
    assert contrastive.matryoshka is not None and contrastive.matryoshka.dim_weights(3) == {1: 0.5, 3: 1.0}
    assert spread.spread.t == 3.0

    off = EmbeddingObjective.from_config({"mrl_enabled": False, "mrl_dims": [1], "spread_enabled": False,
                                          "spread_weight": 0.2})
    assert [s.name for s in off.specs] == ["contrastive"] and off.terms[0].matryoshka is None
    assert off.terms[0].contrastive.temperature == 0.05

    with pytest.raises(UserError, match="mrl_enabled is true but mrl_dims is empty"):
        EmbeddingObjective.from_config({"mrl_enabled": True, "mrl_dims": []})


# --- the loss registry ---------------------------------------------------------------------------

def test_losses_list_equals_the_seed_fields(batch):
    from llm2emb.losses import EmbeddingObjective

    q, p, n = batch
    seed = EmbeddingObjective.build(temperature=0.5, mrl_dims=[1], spread_weight=0.1, spread_t=2.0)
    listed = EmbeddingObjective.from_config({"losses": [
        {"name": "contrastive", "temperature": 0.5, "mrl_dims": [1]},
        {"name": "spread_out", "weight": 0.1, "t": 2.0}]})
    a, b = seed(q, p, n, True), listed(q, p, n, True)
    assert a.total.item() == pytest.approx(b.total.item(), rel=1e-6) and a.parts == pytest.approx(b.parts)


@pytest.mark.parametrize("entry, message", [
    ({"name": "contrastiv"}, "unknown loss 'contrastiv'.*Did you mean 'contrastive'"),
    ({"name": "contrastive", "temprature": 0.1}, "no option 'temprature'.*Did you mean 'temperature'"),
    ({"name": "contrastive", "temperature": "hot"}, "option 'temperature' of loss 'contrastive' must be"),
    ({"name": "contrastive", "temperature": 0}, "temperature must be a finite number > 0"),
    ({"name": "spread_out", "weight": -1}, "weight must be a finite number >= 0"),
    ("contrastive", "must be a mapping"),
])
def test_loss_entries_are_validated(entry, message):
    from llm2emb.losses import parse_loss_specs

    with pytest.raises(UserError, match=message):
        parse_loss_specs([entry], "cfg.yaml")


def test_losses_in_a_training_config(tmp_path):
    from llm2emb.config import load_train_config

    base = dict(model_path="m", experiment_id="e", train_data_path="d")
    cfg = load_train_config(None, ['losses=[{"name": "contrastive", "mrl_dims": [8]}]'], **base)
    assert cfg.losses == [{"name": "contrastive", "mrl_dims": [8]}]
    with pytest.raises(UserError, match="loss 'contrastive' option 'mrl_dims' has 8"):
        cfg.validate_for_model(4)
    with pytest.raises(UserError, match="losses: set together with|describe every objective in losses"):
        load_train_config(None, ['losses=[{"name": "contrastive"}]', "spread_enabled=true",
                                 "spread_weight=0.1"], **base)
    with pytest.raises(UserError, match=r"losses\[0\]: unknown loss 'nope'"):
        load_train_config(None, ['losses=[{"name": "nope"}]'], **base)


def test_a_new_loss_is_one_registered_class(batch):
    """Adding an objective needs no change anywhere else: register, then name it in `losses`."""
    from dataclasses import dataclass

    from llm2emb.losses import LOSS_REGISTRY, EmbeddingObjective, LossTerm, register_loss

    @register_loss("mean_norm_test")
    class MeanNorm(LossTerm):
        """Mean L2 norm of the queries (a toy objective for this test)."""

        @dataclass
        class Options:
            scale: float = 1.0

        def forward(self, b):
            return self.options.scale * b.q.norm(dim=-1).mean(), {}

    try:
        q, p, n = batch
        obj = EmbeddingObjective.from_config({"losses": [{"name": "mean_norm_test", "scale": 2.0, "weight": 0.5}]})
        assert obj(q, p, n, True).total.item() == pytest.approx(0.5 * 2.0 * q.norm(dim=-1).mean().item())
    finally:
        LOSS_REGISTRY.pop("mean_norm_test")


# --- in-batch false negatives ----------------------------------------------------------------------

def test_identical_positives_are_not_in_batch_negatives():
    """Rows 0 and 2 share a positive: without masking each counts the other's copy as a negative."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.2]])
    p = torch.tensor([[1.0, 0.1], [0.0, 1.0], [1.0, 0.1]])
    loss = ContrastiveLoss(temperature=1.0)
    keys = torch.tensor([7, 8, 7])
    got = loss(q, p, None, True, passage_keys=keys).item()
    qn, pn = F.normalize(q, dim=-1), F.normalize(p, dim=-1)
    cos = qn @ pn.T
    # by hand: each row's denominator drops the other copy of its own positive
    expected = 0.0
    for i, allowed in enumerate([[0, 1], [0, 1, 2], [1, 2]]):
        expected += -(cos[i, i] - torch.logsumexp(cos[i, allowed], 0)).item()
    assert got == pytest.approx(expected / 3, rel=1e-6)
    unmasked = loss(q, p, None, True).item()
    assert unmasked > got + 1e-3   # the test can fail: masking changes the value


def test_hard_negative_identical_to_the_positive_is_masked():
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[1.0, 0.5]])
    n = torch.tensor([[[1.0, 0.5], [0.0, 1.0]]])  # first "negative" is the positive itself
    loss = ContrastiveLoss(temperature=1.0)
    got = loss.terms(q, p, n, False, passage_keys=torch.tensor([3]), negative_keys=torch.tensor([[3, 4]]))["hard"]
    qn, pn, nn_ = F.normalize(q, dim=-1), F.normalize(p, dim=-1), F.normalize(n[0, 1:], dim=-1)
    pos, neg = (qn @ pn.T)[0, 0], (qn @ nn_.T)[0, 0]
    assert got.item() == pytest.approx(-(pos - torch.logsumexp(torch.stack([pos, neg]), 0)).item(), rel=1e-6)


def test_margin_mask_drops_candidates_above_the_positive():
    q = torch.tensor([[1.0, 0.0], [1.0, 0.05]])
    # row 0: own positive cos 0.6, row 1's positive cos ~0.999 > 0.6 + 0.1 -> dropped as a false negative;
    # row 1: own positive cos 1.0, row 0's positive cos ~0.64 -> kept
    p = torch.tensor([[0.6, 0.8], [1.0, 0.05]])
    margin = ContrastiveLoss(temperature=1.0, false_negative_margin=0.1)
    plain = ContrastiveLoss(temperature=1.0)
    qn, pn = F.normalize(q, dim=-1), F.normalize(p, dim=-1)
    cos = qn @ pn.T
    assert cos[0, 1] > cos[0, 0] + 0.1 and cos[1, 0] <= cos[1, 1] + 0.1
    row0 = 0.0                                      # only its own positive remains: log-softmax = 0
    row1 = -(cos[1, 1] - torch.logsumexp(cos[1], 0)).item()
    assert margin(q, p, None, True).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert plain(q, p, None, True).item() > margin(q, p, None, True).item() + 1e-3
