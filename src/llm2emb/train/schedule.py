"""Learning-rate schedules: linear warmup, then a decay from `learning_rate` down to `min_lr`.

The factor multiplies the optimizer's base learning rate. Unlike F2LLM, which clamps the rate at `min_lr`
after a cosine decay to zero, the decay here ends at `min_lr` smoothly: lr(t) = min_lr + (lr - min_lr) * d(t).
Warmup starts at lr / (warmup_steps + 1) rather than 0 so the first step is not wasted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

DECAYS: dict[str, Callable[[float], float]] = {
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "linear": lambda progress: 1.0 - progress,
    "constant": lambda progress: 1.0,
}


@dataclass
class WarmupDecay:
    """Picklable lr factor for step t (0-based): warmup, then DECAYS[kind] from 1 to min_lr / lr."""

    kind: str
    warmup_steps: int
    total_steps: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps - 1)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * DECAYS[self.kind](progress)


def build_scheduler(optimizer: Optimizer, kind: str, warmup_steps: int, total_steps: int, learning_rate: float,
                    min_lr: float) -> LambdaLR:
    """LambdaLR with a WarmupDecay factor; `kind` is a key of DECAYS."""
    if kind not in DECAYS:
        raise KeyError(kind)
    min_ratio = min_lr / learning_rate if learning_rate > 0 else 0.0
    return LambdaLR(optimizer, WarmupDecay(kind, warmup_steps, total_steps, min_ratio))
