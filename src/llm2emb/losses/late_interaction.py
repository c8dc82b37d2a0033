"""Late interaction: MaxSim scores of token sets and InfoNCE over them (registered as `maxsim`).

ColBERT (Khattab & Zaharia 2020): a query q with token vectors q_1..q_m and a document d with token
vectors d_1..d_n score

    MaxSim(q, d) = (1 / m) * sum_i max_j <q_i, d_j>

over the tokens each text's mask keeps; pad and excluded tokens never score (a document token outside the
mask is never a max, a query token outside it adds nothing). ColBERT and PyLate sum over query tokens; the
mean used here (as BGE-M3's multi-vector score) ranks the documents of one query identically and keeps the
score on the cosine scale, so one temperature fits dense and multi-vector heads alike.

The loss is InfoNCE over MaxSim with in-batch and hard negatives (`scored.candidate_scores`), as PyLate's
`Contrastive`. Token matrices are ragged across processes: every process pads its (R, T, d) vectors and
(R, T) mask to the longest T of all processes before `gather_with_grad`, and the padding is masked, so two
processes give the one-process gradient (tests/test_repr_losses_distributed.py).
"""
from __future__ import annotations


import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from llm2emb.losses.distributed import gather_with_grad, is_distributed
from llm2emb.losses.registry import register_loss
from llm2emb.losses.scored import ScoredInfoNCE, Scorer, at_least_fp32

TokenSet = tuple[Tensor, Tensor]  # vectors (R, T, d), mask (R, T) bool


def maxsim(q: Tensor, q_mask: Tensor, d: Tensor, d_mask: Tensor) -> Tensor:
    """(Q, D) MaxSim of every query token set against every document token set (module docstring).

    q (Q, Tq, dim), q_mask (Q, Tq); d (D, Td, dim), d_mask (D, Td). A document without any token scores 0."""
    sims = torch.einsum("aid,bjd->abij", q, d)                                 # (Q, D, Tq, Td)
    sims = sims.masked_fill(~d_mask.bool()[None, :, None, :], float("-inf"))
    best = sims.amax(dim=-1)                                                  # (Q, D, Tq)
    best = torch.where(torch.isfinite(best), best, torch.zeros_like(best))
    weights = q_mask.to(best.dtype)[:, None, :]
    return (best * weights).sum(-1) / weights.sum(-1).clamp(min=1)


def maxsim_rows(q: Tensor, q_mask: Tensor, d: Tensor, d_mask: Tensor) -> Tensor:
    """(B, K) MaxSim of query row b against its own K candidates d (B, K, Td, dim), d_mask (B, K, Td)."""
    sims = torch.einsum("bid,bkjd->bkij", q, d)                               # (B, K, Tq, Td)
    sims = sims.masked_fill(~d_mask.bool()[:, :, None, :], float("-inf"))
    best = sims.amax(dim=-1)
    best = torch.where(torch.isfinite(best), best, torch.zeros_like(best))
    weights = q_mask.to(best.dtype)[:, None, :]
    return (best * weights).sum(-1) / weights.sum(-1).clamp(min=1)


def _longest(tokens: int, device: torch.device) -> int:
    """The longest token count over all processes (collective)."""
    if not is_distributed():
        return tokens
    value = torch.tensor([tokens], dtype=torch.long, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


class MaxSimScorer(Scorer):
    """Token sets scored with MaxSim; gathered padded to the longest T of all processes."""

    name = "maxsim"

    def prepare(self, x: TokenSet) -> TokenSet:
        vectors, mask = x
        return at_least_fp32(vectors), mask.bool()

    def rows(self, x: TokenSet) -> int:
        return int(x[0].size(0))

    def device(self, x: TokenSet) -> torch.device:
        return x[0].device

    def gather(self, x: TokenSet, sizes: list[int]) -> TokenSet:
        vectors, mask = x
        longest = _longest(vectors.size(1), vectors.device)
        pad = longest - vectors.size(1)
        if pad:
            vectors = F.pad(vectors, (0, 0, 0, pad))
            mask = F.pad(mask, (0, pad))
        # the mask travels as float (gloo / NCCL gather any dtype, but gradients need a float tensor path)
        return gather_with_grad(vectors, sizes), gather_with_grad(mask.to(vectors.dtype), sizes) > 0.5

    def flatten(self, n: TokenSet) -> TokenSet:
        vectors, mask = n
        return vectors.reshape(-1, *vectors.shape[2:]), mask.reshape(-1, mask.size(-1))

    def num_negatives(self, n: TokenSet) -> int:
        return int(n[0].size(1))

    def join(self, parts: list[TokenSet]) -> TokenSet:
        longest = max(p[0].size(1) for p in parts)
        vectors = [F.pad(v, (0, 0, 0, longest - v.size(1))) for v, _ in parts]
        masks = [F.pad(m, (0, longest - m.size(1))) for _, m in parts]
        return torch.cat(vectors), torch.cat(masks)

    def score(self, q: TokenSet, c: TokenSet) -> Tensor:
        return maxsim(q[0], q[1], c[0], c[1])

    def score_rows(self, q: TokenSet, p: TokenSet, n: TokenSet) -> Tensor:
        (pv, pm), (nv, nm) = p, n
        longest = max(pv.size(1), nv.size(2))
        pv, pm = F.pad(pv, (0, 0, 0, longest - pv.size(1))), F.pad(pm, (0, longest - pm.size(1)))
        nv, nm = F.pad(nv, (0, 0, 0, longest - nv.size(2))), F.pad(nm, (0, longest - nm.size(2)))
        candidates = torch.cat([pv.unsqueeze(1), nv], dim=1)
        masks = torch.cat([pm.unsqueeze(1), nm], dim=1)
        return maxsim_rows(q[0], q[1], candidates, masks)


@register_loss("maxsim")
class MaxSimInfoNCE(ScoredInfoNCE):
    """InfoNCE over MaxSim scores of token sets (ColBERT / PyLate), in-batch and hard negatives."""

    head = "multi_vector"
    scorer = MaxSimScorer()
