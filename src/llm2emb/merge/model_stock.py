"""Model Stock: average fine-tuned models, then move back towards the base by the angle between them.

Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models" (ECCV). With the base weights
theta_0 and N >= 2 fine-tuned models theta_1..theta_N, per tensor (flattened):

    cos  = mean over pairs i < j of cos(theta_i - theta_0, theta_j - theta_0)
    t    = N cos / (1 + (N - 1) cos)
    merged = t * mean_i theta_i + (1 - t) * theta_0

t is the interpolation ratio the paper derives (eq. 5-6 for N = 2, its generalisation for N models). The
paper's geometry assumes an angle below 90 degrees; a negative mean cosine (e.g. a tensor the fine-tunes
barely moved, in unrelated directions) gives t = 0, the base weight, where mergekit would extrapolate
away from the average. A task vector of zero norm has cosine 0 with everything. Inputs are unweighted, as
in the paper.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llm2emb.merge.registry import MergeMethod, register_merge

EPS = 1e-6   # norm products below this count as a zero task vector (mergekit's clamp)


def interpolation_ratio(tensors: Sequence[Tensor], base: Tensor) -> float:
    """t of the module docstring for one tensor."""
    offsets = [(tensor - base).reshape(-1) for tensor in tensors]
    norms = [float(torch.linalg.vector_norm(o)) for o in offsets]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            product = norms[i] * norms[j]
            cosines.append(0.0 if product < EPS else
                           max(-1.0, min(1.0, float((offsets[i] * offsets[j]).sum()) / product)))
    cos = max(0.0, sum(cosines) / len(cosines))
    n = len(tensors)
    return n * cos / (1 + (n - 1) * cos)


def model_stock(tensors: Sequence[Tensor], base: Tensor) -> Tensor:
    t = interpolation_ratio(tensors, base)
    average = tensors[0].clone()
    for tensor in tensors[1:]:
        average.add_(tensor)
    average.div_(len(tensors))
    return average * t + base * (1 - t)


@register_merge("model_stock")
class ModelStockMerge(MergeMethod):
    """Model Stock: the fine-tunes' average, pulled towards the base by their angle (Jang et al. 2024)."""

    uses_base = True
    min_inputs = 2

    @dataclass
    class Options:
        pass

    def merge(self, tensors: Sequence[Tensor], base: Tensor | None) -> Tensor:
        assert base is not None
        return model_stock(tensors, base)
