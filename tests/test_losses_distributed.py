"""2 CPU processes (gloo, DDP) each with part of a batch give the same gradients as 1 process on all of it.

A tiny shared linear "encoder" is wrapped in DistributedDataParallel, which averages gradients over the
processes exactly as it does in training; the losses must make that average equal the one-process
gradient without any scaling in the trainer. A control case gathers positives the way `accelerator.gather`
/ `dist.all_gather` do (no gradient through the other processes' rows) and must NOT match.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from two_process import process_group, run_two_processes

from llm2emb.losses import EmbeddingObjective

FEATURES, DIM, ROWS, K = 6, 8, 8, 2

# name -> (objective kwargs, use_inbatch, rows per process, gather positives without gradient)
CASES: dict[str, tuple[dict, bool, tuple[int, int], bool]] = {
    "inbatch+hard": (dict(temperature=0.1), True, (4, 4), False),
    "inbatch_hard_negatives+mrl+spread": (
        dict(temperature=0.1, inbatch_hard_negatives=True, mrl_dims=[2, 4], mrl_dim_weights=[0.3, 0.7],
             spread_weight=0.5, spread_t=2.0), True, (4, 4), False),
    "uneven 3+5": (dict(temperature=0.1, inbatch_hard_negatives=True, mrl_dims=[4], spread_weight=0.5),
                   True, (3, 5), False),
    "hard only": (dict(temperature=0.1, spread_weight=0.2), False, (4, 4), False),
    # duplicate positives across the two processes (rows 0 and 5), a hard negative equal to its positive,
    # and the margin mask: masks built from gathered keys must give the one-process gradient too
    "false negatives masked": (dict(temperature=0.1, inbatch_hard_negatives=True, false_negative_margin=0.05,
                                    dedup=True), True, (3, 5), False),
    "control: gather without grad": (dict(temperature=0.1), True, (4, 4), True),
}


def make_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same encoder weights and raw inputs in every process (fixed seed).

    float64, so that the 1e-6 tolerance measures the maths, not fp32 summation order (in fp32 the
    differences are ~5e-7 on gradients of size ~5).
    """
    gen = torch.Generator().manual_seed(1234)
    f64 = dict(generator=gen, dtype=torch.float64)
    encoder = nn.Linear(FEATURES, DIM, dtype=torch.float64)
    with torch.no_grad():
        encoder.weight.copy_(torch.randn(DIM, FEATURES, **f64))
        encoder.bias.copy_(torch.randn(DIM, **f64))
    xq = torch.randn(ROWS, FEATURES, **f64)
    xp = xq + 0.5 * torch.randn(ROWS, FEATURES, **f64)  # positives near their queries
    xn = torch.randn(ROWS, K, FEATURES, **f64)
    xp[5] = xp[0]
    xn[2, 1] = xp[2]
    return encoder, xq, xp, xn


def content_keys(rows: slice) -> dict[str, torch.Tensor]:
    passage = torch.arange(ROWS)
    passage[5] = passage[0]
    negative = 100 + torch.arange(ROWS * K).view(ROWS, K)
    negative[2, 1] = passage[2]
    return {"passage_keys": passage[rows], "negative_keys": negative[rows]}


def loss_and_grads(encoder: nn.Module, xq, xp, xn, kwargs: dict, use_inbatch: bool, rows=slice(None)):
    kwargs = dict(kwargs)
    keys = content_keys(rows) if kwargs.pop("dedup", False) else {}
    objective = EmbeddingObjective.build(**kwargs)
    out = objective(encoder(xq[rows]), encoder(xp[rows]), encoder(xn[rows]), use_inbatch, **keys)
    out.total.backward()
    return out.total.detach(), out.parts


def detached_all_gather(x: torch.Tensor, sizes=None) -> torch.Tensor:
    """What `accelerator.gather` gives: other processes' rows carry no gradient (own slice does)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def worker(rank: int, world: int, init_method: str, out_dir: str) -> None:
    with process_group(rank, world, init_method):
        import llm2emb.losses.contrastive as contrastive
        real_gather = contrastive.gather_with_grad
        results = {}
        for name, (kwargs, use_inbatch, sizes, detached) in CASES.items():
            contrastive.gather_with_grad = detached_all_gather if detached else real_gather
            encoder, xq, xp, xn = make_problem()
            ddp = nn.parallel.DistributedDataParallel(encoder)
            start = sum(sizes[:rank])
            rows = slice(start, start + sizes[rank])
            loss, _ = loss_and_grads(ddp, xq, xp, xn, kwargs, use_inbatch, rows)
            results[name] = {"loss": loss, "weight": encoder.weight.grad.clone(), "bias": encoder.bias.grad.clone()}
        contrastive.gather_with_grad = real_gather
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return run_two_processes(worker, out)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", [n for n in CASES if not CASES[n][3]])
def test_two_processes_match_one_process(two_process_results, name):
    kwargs, use_inbatch, _, _ = CASES[name]
    encoder, xq, xp, xn = make_problem()
    loss, _ = loss_and_grads(encoder, xq, xp, xn, kwargs, use_inbatch)
    r0, r1 = two_process_results[0][name], two_process_results[1][name]
    # DDP leaves the same averaged gradient on both processes ...
    torch.testing.assert_close(r0["weight"], r1["weight"], atol=0, rtol=0)
    # ... and it is the one-process gradient on the concatenated batch.
    torch.testing.assert_close(r0["weight"], encoder.weight.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(r0["bias"], encoder.bias.grad, atol=1e-6, rtol=0)
    # The mean of the per-process losses is the one-process loss (what a trainer would log).
    assert ((r0["loss"] + r1["loss"]) / 2).item() == pytest.approx(loss.item(), abs=1e-5)


@pytest.mark.timeout(180)
def test_gather_without_gradient_gets_a_different_gradient(two_process_results):
    """The F2LLM bug the design warns about: this test setup is sensitive enough to see it."""
    kwargs, use_inbatch, _, _ = CASES["control: gather without grad"]
    encoder, xq, xp, xn = make_problem()
    loss_and_grads(encoder, xq, xp, xn, kwargs, use_inbatch)
    got = two_process_results[0]["control: gather without grad"]["weight"]
    assert (got - encoder.weight.grad).abs().max() > 1e-3
