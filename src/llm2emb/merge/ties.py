"""TIES merging: trim, elect sign, disjoint mean of task vectors.

Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS). With the base
weights theta_0 and task vectors tau_i = theta_i - theta_0, per tensor:

  1. trim:   keep the k = max(1, floor(density * numel)) entries of tau_i largest in magnitude, zero the rest
             (each task vector separately; the paper keeps the top 20%, density 0.2);
  2. elect:  gamma = sign(sum_i w_i tau_i_trimmed) per entry (0 counts as +, as in mergekit);
  3. merge:  the disjoint mean over the inputs whose trimmed entry has the elected sign,
             tau = sum_{i in A} w_i tau_i / sum_{i in A} w_i     (A: the agreeing inputs; 0 when none)
  merged = theta_0 + lambda * tau.

Weights default to 1 (the paper's unweighted form); with weights this is mergekit's `ties` with
normalize=true. Entries where every trimmed task vector is 0 keep the base weight.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llm2emb.merge.registry import MergeMethod, register_merge


def trim(delta: Tensor, density: float) -> Tensor:
    """`delta` with all but its k = max(1, floor(density * numel)) largest-magnitude entries set to 0."""
    if density >= 1 or delta.numel() == 0:
        return delta
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    keep = torch.topk(flat.abs(), k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.view_as(delta)


def ties(tensors: Sequence[Tensor], base: Tensor, weights: Sequence[float], density: float,
         scale: float = 1.0) -> Tensor:
    """TIES merge of one tensor (see the module docstring)."""
    total = torch.zeros_like(base)          # sum_i w_i tau_i over all inputs: decides the sign
    trimmed = []
    for tensor, weight in zip(tensors, weights):
        delta = trim(tensor - base, density) * weight
        trimmed.append(delta)
        total.add_(delta)
    elected = torch.where(total >= 0, 1.0, -1.0).to(base.dtype)
    merged = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for delta, weight in zip(trimmed, weights):
        agree = (torch.sign(delta) == elected).to(base.dtype)
        merged.add_(delta * agree)
        divisor.add_(agree * weight)
    divisor[divisor == 0] = 1
    return base + scale * (merged / divisor)


@register_merge("ties")
class TiesMerge(MergeMethod):
    """TIES: trim task vectors by magnitude, elect a sign per weight, average those that agree."""

    uses_base = True
    uses_weights = True
    min_inputs = 2

    @dataclass
    class Options:
        density: float = 0.2     # share of each task vector's entries kept (the paper's top-20%)
        scale: float = 1.0       # lambda: the merged task vector's scale

        def validate(self) -> None:
            if not 0 < self.density <= 1:
                raise ValueError(f"density must be in (0, 1], got {self.density}")

    def merge(self, tensors: Sequence[Tensor], base: Tensor | None) -> Tensor:
        assert base is not None
        return ties(tensors, base, self.weights, self.options.density, self.options.scale)
