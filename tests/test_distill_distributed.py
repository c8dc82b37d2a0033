"""Distillation losses on 2 CPU processes (gloo, DDP) give the gradients of 1 process on the whole batch.

Modelled on tests/test_losses_distributed.py: a shared float64 linear "encoder" wrapped in DDP; the teacher's
embeddings and scores are fixed tensors, sliced per process like the rows. Uneven row counts and masks that
leave the processes different numbers of candidates / pairs (duplicate positives across processes, a hard
negative equal to its positive) are included: the per-process weighting must still make DDP's average the
one-process gradient.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from two_process import process_group, run_two_processes

from llm2emb.losses import EmbeddingObjective, TeacherBatch, parse_loss_specs

FEATURES, DIM, ROWS, K = 6, 8, 8, 2

# name -> (losses entries, use_inbatch, rows per process, with content keys, teacher parts given)
CASES: dict[str, tuple[list[dict], bool, tuple[int, int], bool, tuple[str, ...]]] = {
    "distill_kl inbatch+hard": ([{"name": "distill_kl", "temperature": 0.1, "teacher_temperature": 0.2}],
                                True, (4, 4), False, ("q", "p", "n")),
    "distill_kl uneven 3+5, masked": ([{"name": "distill_kl", "temperature": 0.1, "teacher_temperature": 0.2}],
                                      True, (3, 5), True, ("q", "p", "n")),
    "distill_kl scores, no inbatch": ([{"name": "distill_kl", "teacher_temperature": 1.0}], False, (3, 5), True,
                                      ("scores",)),
    "margin_mse uneven, masked": ([{"name": "margin_mse", "teacher_scale": 0.5}], True, (3, 5), True, ("scores",)),
    "margin_mse embeddings": ([{"name": "margin_mse"}], True, (4, 4), True, ("q", "p", "n")),
    "embedding_mse uneven": ([{"name": "embedding_mse"}], True, (3, 5), False, ("q", "p", "n")),
    "all with contrastive": ([{"name": "contrastive", "temperature": 0.1},
                              {"name": "distill_kl", "weight": 0.5, "t2_scaling": True},
                              {"name": "margin_mse", "weight": 0.3}, {"name": "embedding_mse", "weight": 2.0}],
                             True, (3, 5), True, ("q", "p", "n", "scores")),
}


def make_problem():
    gen = torch.Generator().manual_seed(4321)
    f64 = dict(generator=gen, dtype=torch.float64)
    encoder = nn.Linear(FEATURES, DIM, dtype=torch.float64)
    with torch.no_grad():
        encoder.weight.copy_(torch.randn(DIM, FEATURES, **f64))
        encoder.bias.copy_(torch.randn(DIM, **f64))
    xq = torch.randn(ROWS, FEATURES, **f64)
    xp = xq + 0.5 * torch.randn(ROWS, FEATURES, **f64)
    xn = torch.randn(ROWS, K, FEATURES, **f64)
    xp[5] = xp[0]
    xn[2, 1] = xp[2]
    teacher = {"q": torch.randn(ROWS, DIM, **f64), "p": torch.randn(ROWS, DIM, **f64),
               "n": torch.randn(ROWS, K, DIM, **f64), "scores": 3 * torch.randn(ROWS, 1 + K, **f64)}
    teacher["p"][5] = teacher["p"][0]
    return encoder, xq, xp, xn, teacher


def content_keys(rows: slice) -> dict[str, torch.Tensor]:
    passage = torch.arange(ROWS)
    passage[5] = passage[0]
    negative = 100 + torch.arange(ROWS * K).view(ROWS, K)
    negative[2, 1] = passage[2]
    return {"passage_keys": passage[rows], "negative_keys": negative[rows]}


def loss_and_grads(encoder, xq, xp, xn, teacher, case, rows=slice(None)):
    entries, use_inbatch, _, keyed, parts = case
    keys = content_keys(rows) if keyed else {}
    batch = TeacherBatch(**{name: teacher[name][rows] for name in parts})
    objective = EmbeddingObjective(parse_loss_specs(entries))
    out = objective(encoder(xq[rows]), encoder(xp[rows]), encoder(xn[rows]), use_inbatch, teacher=batch, **keys)
    out.total.backward()
    return out.total.detach()


def worker(rank: int, world: int, init_method: str, out_dir: str) -> None:
    with process_group(rank, world, init_method):
        results = {}
        for name, case in CASES.items():
            encoder, xq, xp, xn, teacher = make_problem()
            ddp = nn.parallel.DistributedDataParallel(encoder)
            sizes = case[2]
            start = sum(sizes[:rank])
            loss = loss_and_grads(ddp, xq, xp, xn, teacher, case, slice(start, start + sizes[rank]))
            results[name] = {"loss": loss, "weight": encoder.weight.grad.clone(), "bias": encoder.bias.grad.clone()}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-distill")
    return run_two_processes(worker, out)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_match_one_process(two_process_results, name):
    encoder, xq, xp, xn, teacher = make_problem()
    loss = loss_and_grads(encoder, xq, xp, xn, teacher, CASES[name])
    r0, r1 = two_process_results[0][name], two_process_results[1][name]
    torch.testing.assert_close(r0["weight"], r1["weight"], atol=0, rtol=0)
    assert encoder.weight.grad.abs().max() > 1e-3          # a gradient worth comparing
    torch.testing.assert_close(r0["weight"], encoder.weight.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(r0["bias"], encoder.bias.grad, atol=1e-6, rtol=0)
    assert ((r0["loss"] + r1["loss"]) / 2).item() == pytest.approx(loss.item(), abs=1e-5)
