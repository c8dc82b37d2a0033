"""SLERP: spherical linear interpolation between two models, tensor by tensor.

Shoemake 1985 ("Animating rotation with quaternion curves", SIGGRAPH) interpolation, applied to weights as
mergekit's `slerp` does (Goddard et al. 2024, "Arcee's MergeKit: A Toolkit for Merging Large Language
Models"). For the flattened tensors a (first input) and b (second) and t in [0, 1]:

    cos(theta) = <a / |a|, b / |b|>
    merged     = sin((1 - t) theta) / sin(theta) * a  +  sin(t theta) / sin(theta) * b

t = 0 gives the first input, t = 1 the second. When the two are (nearly) parallel or opposite
(|cos(theta)| > 0.9995, where sin(theta) ~ 0) the result is the linear interpolation (1 - t) a + t b; a
zero tensor counts as parallel to anything.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llm2emb.merge.registry import MergeMethod, register_merge

DOT_THRESHOLD = 0.9995   # mergekit's: beyond it, interpolate linearly
EPS = 1e-8


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Spherical interpolation of two same-shaped tensors (see the module docstring)."""
    norm_a, norm_b = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    dot = float((a / (norm_a if norm_a > EPS else 1.0) * (b / (norm_b if norm_b > EPS else 1.0))).sum())
    dot = max(-1.0, min(1.0, dot))
    if norm_a <= EPS or norm_b <= EPS or abs(dot) > DOT_THRESHOLD:
        return a * (1 - t) + b * t
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return a * (math.sin((1 - t) * theta) / sin_theta) + b * (math.sin(t * theta) / sin_theta)


@register_merge("slerp")
class SlerpMerge(MergeMethod):
    """Spherical interpolation between two models with factor t (0: first input, 1: second)."""

    min_inputs = 2
    max_inputs = 2

    @dataclass
    class Options:
        t: float = 0.5

        def validate(self) -> None:
            if not 0 <= self.t <= 1:
                raise ValueError(f"t must be in [0, 1] (0: the first input, 1: the second), got {self.t}")

    def merge(self, tensors: Sequence[Tensor], base: Tensor | None) -> Tensor:
        return slerp(tensors[0], tensors[1], self.options.t)
