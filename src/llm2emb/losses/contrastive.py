"""InfoNCE with in-batch and hard negatives (the F2LLM recipe, with gradients across processes).

InfoNCE: van den Oord et al. 2018, "Representation Learning with Contrastive Predictive Coding"; with
in-batch negatives as in DPR (Karpukhin et al. 2020) and hard negatives as in F2LLM (Zhang et al. 2025,
"F2LLM Technical Report: Matching SOTA Embedding Performance with 6 Million Open-Source Data").

For query i with positive p_i and hard negatives n_i1..n_ik, with s(a, b) = cos(a, b) / temperature:

    hard term      L_hard_i = -log  exp s(q_i, p_i) / (exp s(q_i, p_i) + sum_j exp s(q_i, n_ij))
    in-batch term  L_ib_i   = -log  exp s(q_i, p_i) / sum_{m in all processes' rows} exp s(q_i, p_m)
                              [+ exp s(q_i, n_mj) for all rows' negatives, with inbatch_hard_negatives]

    loss = mean_i L_ib_i (when use_inbatch) + mean_i L_hard_i (when k > 0)

False negatives in the batch (Qwen3-Embedding, Zhang et al. 2025, "Qwen3 Embedding: Advancing Text Embedding
and Reranking Through Foundation Models", masks them too): a candidate whose token ids equal the row's own
positive (the same passage twice in a batch, common in pairs/NLI data, and length grouping puts equal-length
duplicates together) is never a negative, in either term; with `false_negative_margin` m, in-batch
candidates scoring above the row's positive + m (cosine) are dropped as likely unlabelled positives.

If a batch has neither (no negatives and use_inbatch=False), the in-batch term is used so that there is
something to learn from. The caller passes use_inbatch=False for classification / clustering / sts data,
whose in-batch "negatives" are often the same class (false negatives), as F2LLM does.

Distributed: positives (and negatives, with inbatch_hard_negatives) are gathered from every process with
`gather_with_grad`, and the per-process loss is weighted so that the mean over processes equals the loss
of one process on the concatenated batch. DDP / DeepSpeed / FSDP average the gradients over processes, so
the trainer gets exactly the one-process gradient and needs no scaling of its own (see
`llm2emb.losses.distributed`). All processes must make the same call (same use_inbatch, same k).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm2emb.losses.matryoshka import MatryoshkaLoss
from llm2emb.losses.registry import EmbeddingBatch, LossTerm, register_loss
from llm2emb.losses.distributed import gather_sizes, gather_with_grad, is_distributed, rank, row_weight


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class ContrastiveLoss(nn.Module):
    """InfoNCE over cosine similarities / temperature; see the module docstring for the exact terms."""

    def __init__(self, temperature: float = 0.05, inbatch_hard_negatives: bool = False,
                 gather: bool = True, false_negative_margin: float | None = None) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.inbatch_hard_negatives = inbatch_hard_negatives
        self.gather = gather
        self.false_negative_margin = false_negative_margin

    def terms(self, q: Tensor, p: Tensor, n: Tensor | None, use_inbatch: bool,
              passage_keys: Tensor | None = None, negative_keys: Tensor | None = None) -> dict[str, Tensor]:
        """The loss terms that apply to this batch: {"inbatch": ..., "hard": ...} (one or both).

        passage_keys (B,), negative_keys (B, k): content keys of the texts (equal = same token ids), for
        masking duplicates of a row's positive; None: no duplicate masking."""
        if q.dim() != 2 or p.shape != q.shape:
            raise ValueError(f"q and p must both be (B, D); got {tuple(q.shape)} and {tuple(p.shape)}")
        if n is not None and (n.dim() != 3 or n.size(0) != q.size(0) or n.size(2) != q.size(1)):
            raise ValueError(f"n must be (B, k, D) = ({q.size(0)}, k, {q.size(1)}); got {tuple(n.shape)}")
        k = 0 if n is None else n.size(1)
        # Similarities in at least fp32: bf16 cosines / 0.05 lose the small differences the loss is about.
        q, p = F.normalize(_at_least_fp32(q), dim=-1), F.normalize(_at_least_fp32(p), dim=-1)
        n = F.normalize(_at_least_fp32(n), dim=-1) if k else None

        distributed = self.gather and is_distributed()
        sizes = gather_sizes(q.size(0), q.device) if distributed else [q.size(0)]
        # Per-process weight so that the mean over processes is the one-process loss (1.0 for even batches).
        weight = row_weight(sizes) if distributed else 1.0

        out: dict[str, Tensor] = {}
        own_cos = (q * p).sum(-1)                                               # (B,)
        if k:
            candidates = torch.cat([p.unsqueeze(1), n], dim=1)                 # (B, 1 + k, D)
            logits = torch.einsum("bd,bcd->bc", q, candidates) / self.temperature
            if passage_keys is not None and negative_keys is not None:
                # a "hard negative" identical to the row's positive is a data error, not a negative
                same = negative_keys.view(q.size(0), k) == passage_keys.view(-1, 1)
                logits = logits.masked_fill(torch.cat([torch.zeros_like(same[:, :1]), same], 1), float("-inf"))
            target = torch.zeros(q.size(0), dtype=torch.long, device=q.device)  # own positive is column 0
            out["hard"] = F.cross_entropy(logits, target) * weight
        if use_inbatch or not k:
            all_p = gather_with_grad(p, sizes) if distributed else p            # (sum B, D)
            columns = [all_p]
            key_columns = None
            if passage_keys is not None:
                key_columns = [gather_with_grad(passage_keys.view(-1), sizes) if distributed else passage_keys.view(-1)]
            if self.inbatch_hard_negatives and k:
                flat = n.reshape(-1, n.size(-1))                                # (B * k, D), row-major
                columns.append(gather_with_grad(flat, [s * k for s in sizes]) if distributed else flat)
                if key_columns is not None and negative_keys is not None:
                    flat_keys = negative_keys.reshape(-1)
                    key_columns.append(gather_with_grad(flat_keys, [s * k for s in sizes]) if distributed
                                       else flat_keys)
                elif key_columns is not None:
                    key_columns = None
            cos = q @ torch.cat(columns).T
            offset = sum(sizes[: rank()]) if distributed else 0
            target = torch.arange(q.size(0), device=q.device) + offset          # own positive's global row
            not_own = torch.ones_like(cos, dtype=torch.bool)
            not_own[torch.arange(q.size(0), device=q.device), target] = False
            drop = torch.zeros_like(not_own)
            if key_columns is not None:
                drop |= (torch.cat(key_columns).view(1, -1) == passage_keys.view(-1, 1)) & not_own
            if self.false_negative_margin is not None:
                drop |= (cos.detach() > own_cos.detach().unsqueeze(1) + self.false_negative_margin) & not_own
            logits = (cos / self.temperature).masked_fill(drop, float("-inf"))
            out["inbatch"] = F.cross_entropy(logits, target) * weight
        return out

    def forward(self, q: Tensor, p: Tensor, n: Tensor | None, use_inbatch: bool,
                passage_keys: Tensor | None = None, negative_keys: Tensor | None = None) -> Tensor:
        """q, p: (B, D) un-normalised; n: (B, k, D) or None. Returns the scalar loss."""
        return sum(self.terms(q, p, n, use_inbatch, passage_keys, negative_keys).values())  # type: ignore[return-value]


@register_loss("contrastive")
class InfoNCE(LossTerm):
    """InfoNCE with in-batch and hard negatives (F2LLM), optionally over Matryoshka prefixes."""

    @dataclass
    class Options:
        temperature: float = 0.05
        inbatch_hard_negatives: bool = False
        false_negative_margin: float | None = None
        mrl_dims: list[int] = field(default_factory=list)
        mrl_dim_weights: list[float] = field(default_factory=list)

        def validate(self) -> None:
            if not (math.isfinite(self.temperature) and self.temperature > 0):
                raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
            if self.false_negative_margin is not None and not math.isfinite(self.false_negative_margin):
                raise ValueError(f"false_negative_margin must be finite or null, got {self.false_negative_margin}")
            if self.mrl_dim_weights and not self.mrl_dims:
                raise ValueError("mrl_dim_weights is set but mrl_dims is empty")

    def __init__(self, options: "InfoNCE.Options", gather: bool = True) -> None:
        super().__init__(options, gather)
        self.contrastive = ContrastiveLoss(options.temperature, options.inbatch_hard_negatives, gather,
                                           options.false_negative_margin)
        # With MRL the full embedding is trained too, with weight 1 unless listed with its own weight.
        self.matryoshka = (MatryoshkaLoss(self.contrastive, options.mrl_dims, options.mrl_dim_weights or None,
                                          full_dim_weight=1.0) if options.mrl_dims else None)

    def forward(self, batch: EmbeddingBatch) -> tuple[Tensor, dict[str, float]]:
        args = (batch.q, batch.p, batch.n, batch.use_inbatch)
        keys = {"passage_keys": batch.passage_keys, "negative_keys": batch.negative_keys}
        if self.matryoshka is None:
            return self.contrastive(*args, **keys), {}
        weights = self.matryoshka.dim_weights(batch.q.size(-1))
        per_dim = self.matryoshka.per_dim(*args, **keys)
        total = sum(weights[d] * per_dim[d] for d in weights)
        return total, {f"contrastive@{d}": float(loss.detach()) for d, loss in per_dim.items()}
