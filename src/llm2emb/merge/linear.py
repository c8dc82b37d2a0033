"""Linear merge: the weighted average of the inputs' weights.

"Model soups" (Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", ICML) average fine-tuned models of one base; averaging the
checkpoints along one run is Izmailov et al. 2018 (SWA, "Averaging Weights Leads to Wider Optima and Better
Generalization"). For inputs theta_1..theta_N with weights w_i:

    merged = sum_i w_i theta_i / sum_i w_i        (normalize=true, the default; as mergekit's `linear`)
    merged = sum_i w_i theta_i                    (normalize=false)

Without `--weights` every input weighs 1.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from llm2emb.merge.registry import MergeMethod, register_merge


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    out = tensors[0] * weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:]):
        out.add_(tensor, alpha=weight)
    return out


@register_merge("linear")
class LinearMerge(MergeMethod):
    """Weighted average of the inputs (model soup; checkpoint averaging)."""

    uses_weights = True
    min_inputs = 2

    @dataclass
    class Options:
        normalize: bool = True      # divide by the sum of the weights

    def __init__(self, options: "LinearMerge.Options", weights: Sequence[float]) -> None:
        super().__init__(options, weights)
        total = sum(self.weights)
        if options.normalize and total == 0:
            from llm2emb.errors import UserError
            raise UserError("The merge weights sum to 0, so they cannot be normalised; give weights with a "
                            "non-zero sum or --param normalize=false.")
        self.scaled = [w / total for w in self.weights] if options.normalize else list(self.weights)

    def merge(self, tensors: Sequence[Tensor], base: Tensor | None) -> Tensor:
        return weighted_sum(tensors, self.scaled)
