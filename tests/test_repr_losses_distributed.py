"""2 CPU processes (gloo, DDP) give the 1-process gradient for the representation losses: InfoNCE over MaxSim
with ragged token matrices (each process pads to its own longest text), sparse InfoNCE + FLOPS, and a hybrid
with BGE-M3 self-distillation; uneven row counts and duplicate-passage masks included. A control that gathers
token matrices without gradient must NOT match (the test can see a wrong gather)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from two_process import process_group, run_two_processes

from llm2emb.losses import parse_loss_specs
from llm2emb.losses.representation import RepresentationObjective

FEATURES, DIM, VOCAB, ROWS, K, T = 5, 4, 7, 8, 2, 6

# name -> (representation config, use_inbatch, rows per process, detached gather of token matrices)
CASES = {
    "maxsim inbatch+hard": ({"representation": "multi_vector", "losses": [{"name": "maxsim", "temperature": 0.2}]},
                            True, (4, 4), False),
    "maxsim uneven + inbatch hard negatives + duplicates": (
        {"representation": "multi_vector",
         "losses": [{"name": "maxsim", "temperature": 0.2, "inbatch_hard_negatives": True}], "dedup": True},
        True, (3, 5), False),
    "sparse + flops": ({"representation": "sparse", "flops_query_weight": 0.05, "flops_doc_weight": 0.1,
                        "losses": [{"name": "sparse_contrastive", "temperature": 2.0, "inbatch_hard_negatives": True},
                                   {"name": "flops", "query_weight": 0.05, "doc_weight": 0.1}]},
                       True, (3, 5), False),
    "hybrid + self-distillation": ({"representation": "hybrid", "hybrid_heads": ["dense", "sparse", "multi_vector"],
                                    "hybrid_weights": [1.0, 0.3, 0.7], "hybrid_self_distill": True, "temperature": 0.1,
                                    "flops_query_weight": 0.01, "flops_doc_weight": 0.01}, True, (5, 3), False),
    "hard only": ({"representation": "multi_vector"}, False, (4, 4), False),
    "control: token gather without grad": ({"representation": "multi_vector"}, True, (4, 4), True),
}


class ToyEncoder(nn.Module):
    """Token features -> every head's output, like `Embedder.forward` of a hybrid model."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Linear(FEATURES, DIM, dtype=torch.float64)
        self.dense = nn.Linear(FEATURES, DIM, dtype=torch.float64)
        self.sparse = nn.Linear(FEATURES, VOCAB, dtype=torch.float64)

    def embed(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = (x * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        vectors = torch.nn.functional.normalize(self.tokens(x), dim=-1) * mask.unsqueeze(-1)
        return {"dense": self.dense(pooled), "sparse": torch.log1p(torch.relu(self.sparse(pooled))),
                "multi_vector": vectors, "multi_vector_mask": mask}

    def forward(self, q, p, n):
        rows = q[0].size(0)
        neg = self.embed(n[0].reshape(rows * K, *n[0].shape[2:]), n[1].reshape(rows * K, -1))
        return self.embed(*q), self.embed(*p), {k: v.view(rows, K, *v.shape[1:]) for k, v in neg.items()}


def make_problem():
    gen = torch.Generator().manual_seed(77)
    encoder = ToyEncoder()
    with torch.no_grad():
        for param in encoder.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64))

    def tokens(shape_rows, lengths):
        x = torch.randn(*shape_rows, T, FEATURES, generator=gen, dtype=torch.float64)
        mask = torch.arange(T).view(*([1] * len(shape_rows)), T) < lengths.unsqueeze(-1)
        return x * mask.unsqueeze(-1), mask

    q = tokens((ROWS,), torch.randint(1, T + 1, (ROWS,), generator=gen))
    p = tokens((ROWS,), torch.randint(1, T + 1, (ROWS,), generator=gen))
    n = tokens((ROWS, K), torch.randint(1, T + 1, (ROWS, K), generator=gen))
    p[0][5], p[1][5] = p[0][0], p[1][0]  # a duplicate positive across the two processes' rows
    return encoder, q, p, n


def content_keys(rows: slice) -> dict[str, torch.Tensor]:
    passage = torch.arange(ROWS)
    passage[5] = passage[0]
    negative = 100 + torch.arange(ROWS * K).view(ROWS, K)
    negative[2, 1] = passage[2]
    return {"passage_keys": passage[rows], "negative_keys": negative[rows]}


def local(pair, rows: slice):
    """This process's rows, cut to their own longest text (token matrices are ragged across processes)."""
    x, mask = pair[0][rows], pair[1][rows]
    longest = int(mask.sum(-1).max())
    return x[..., :longest, :], mask[..., :longest]


def loss_and_grads(encoder, problem, cfg: dict, use_inbatch: bool, rows=slice(None)):
    cfg = dict(cfg)
    keys = content_keys(rows) if cfg.pop("dedup", False) else {}
    objective = RepresentationObjective.from_config(cfg)
    _, q, p, n = problem
    out_q, out_p, out_n = encoder(local(q, rows), local(p, rows), local(n, rows))
    out = objective(out_q, out_p, out_n, use_inbatch, **keys)
    out.total.backward()
    return out.total.detach()


def detached_gather(x: torch.Tensor, sizes=None) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def worker(rank: int, world: int, init_method: str, out_dir: str) -> None:
    with process_group(rank, world, init_method):
        import llm2emb.losses.late_interaction as late
        real = late.gather_with_grad
        results = {}
        for name, (cfg, use_inbatch, sizes, detached) in CASES.items():
            late.gather_with_grad = detached_gather if detached else real
            problem = make_problem()
            encoder = problem[0]
            ddp = nn.parallel.DistributedDataParallel(encoder, find_unused_parameters=True)  # heads a case skips
            start = sum(sizes[:rank])
            loss = loss_and_grads(ddp, problem, cfg, use_inbatch, slice(start, start + sizes[rank]))
            results[name] = {"loss": loss, **{k: p.grad.clone() for k, p in encoder.named_parameters()
                                              if p.grad is not None}}
        late.gather_with_grad = real
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-repr")
    return run_two_processes(worker, out)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", [n for n in CASES if not CASES[n][3]])
def test_two_processes_match_one_process(two_process_results, name):
    cfg, use_inbatch, _, _ = CASES[name]
    problem = make_problem()
    encoder = problem[0]
    loss = loss_and_grads(encoder, problem, cfg, use_inbatch)
    r0, r1 = two_process_results[0][name], two_process_results[1][name]
    touched = 0
    for key, param in encoder.named_parameters():
        assert (key in r0) == (param.grad is not None)
        if param.grad is None:
            continue
        touched += 1
        torch.testing.assert_close(r0[key], r1[key], atol=0, rtol=0)
        torch.testing.assert_close(r0[key], param.grad, atol=1e-8, rtol=0)
    assert touched >= 1
    # the mean of the per-process losses is the one-process loss (what the trainer logs)
    assert ((r0["loss"] + r1["loss"]) / 2).item() == pytest.approx(loss.item(), abs=1e-8)


@pytest.mark.timeout(240)
def test_token_gather_without_gradient_gets_a_different_gradient(two_process_results):
    cfg, use_inbatch, _, _ = CASES["control: token gather without grad"]
    problem = make_problem()
    loss_and_grads(problem[0], problem, cfg, use_inbatch)
    got = two_process_results[0]["control: token gather without grad"]["tokens.weight"]
    assert (got - problem[0].tokens.weight.grad).abs().max() > 1e-4


def test_parse_is_consistent():
    assert [s.name for s in parse_loss_specs([{"name": "maxsim"}])] == ["maxsim"]
