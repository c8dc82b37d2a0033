"""Activation memory of a training step, and the automatic gradient-checkpointing decision.

A contrastive step keeps the graph of all its forward passes (queries, positives, hard negatives) until the
loss is backpropagated, so activation memory grows with the whole batch. Per decoder layer, activations take
about

    tokens x hidden x (34 + 5 x heads x seq / hidden) bytes at 2-byte precision

(Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", section 4.1; twice
that in fp32). The second term is the attention probabilities, kept only by kernels that materialise them
(eager attention, and the CPU's sdpa with a padding mask); fused GPU kernels keep none. With gradient
checkpointing a layer keeps only its input (tokens x hidden values) and one layer's activations are live at
a time during the backward. Checked against `bench/train_memory.py` on the CPU (SmolLM2-135M, LoRA, scifact_en
batch 16 x (256 + 256) tokens, fp32): 14.2 GiB of activations estimated, 15.1 GiB peak RSS measured with the
model, optimizer and allocator around them.

`gradient_checkpointing_auto` (on by default) turns checkpointing on when the estimate without it exceeds
AUTO_FRACTION of the memory still free once the model is loaded, and leaves it off otherwise (it costs a
second forward, ~30% of a step). With the gradient cache, one chunk's forward is live at a time, which is
usually small enough.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

#: checkpointing is turned on when the step's activations would take more than this share of free memory
AUTO_FRACTION = 0.8
GIB = 1024 ** 3


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int

    @classmethod
    def of(cls, backbone) -> "ModelShape":
        config = backbone.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return cls(int(config.num_hidden_layers), int(config.hidden_size), int(config.num_attention_heads))


def forward_passes(rows: int, query_length: int, passage_length: int, negatives: int,
                   chunk: int = 0) -> list[tuple[int, int]]:
    """(texts, length) of the forward passes whose graphs are alive together in one step (upper bounds)."""
    sides = [(rows, query_length), (rows, passage_length)] + ([(rows * negatives, passage_length)] if negatives else [])
    if chunk:  # gradient cache: one chunk of one side at a time
        return [max(((min(chunk, n), length) for n, length in sides), key=lambda s: s[0] * s[1])]
    return sides


def activation_bytes(shape: ModelShape, passes: list[tuple[int, int]], element_bytes: int, scores: bool,
                     checkpointing: bool = False) -> int:
    """Estimated activation bytes of the forward passes (module docstring)."""
    def layer(texts: int, length: int) -> float:
        per_token = 34 + (5 * shape.heads * length / shape.hidden if scores else 0)
        return texts * length * shape.hidden * per_token * element_bytes / 2

    full = sum(layer(n, s) for n, s in passes)
    if not checkpointing:
        return int(shape.layers * full)
    inputs = sum(n * s for n, s in passes) * shape.hidden * element_bytes
    return int(shape.layers * inputs + full)


def enable_activation_checkpointing(backbone) -> None:
    """Recompute each layer's activations in the backward (non-reentrant: works with LoRA's frozen inputs).
    transformers 5 renamed gradient checkpointing to activation checkpointing; older 5.x have the old name."""
    kwargs = {"use_reentrant": False}
    if hasattr(backbone, "activation_checkpointing_enable"):
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - transformers without the new name
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def free_bytes(device: torch.device) -> int | None:
    """Memory still free on `device` (GPU: the CUDA allocator's view; CPU: the kernel's MemAvailable)."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            import psutil

            return int(psutil.virtual_memory().available)
    except (RuntimeError, ImportError, OSError):  # pragma: no cover - no reading: no automatic decision
        return None
    return None


def materialises_scores(attn_implementation: str, device: torch.device) -> bool:
    """Does this attention kernel keep the (heads x seq x seq) probabilities for the backward?"""
    return attn_implementation == "eager" or device.type != "cuda"


def auto_checkpointing(shape: ModelShape, passes: list[tuple[int, int]], element_bytes: int,
                       attn_implementation: str, device: torch.device, free: int | None = None) -> tuple[bool, str]:
    """(turn checkpointing on, why): on when the step's activations exceed AUTO_FRACTION of free memory."""
    free = free_bytes(device) if free is None else free
    scores = materialises_scores(attn_implementation, device)
    need = activation_bytes(shape, passes, element_bytes, scores)
    if free is None:
        return False, f"activations ~{need / GIB:.1f} GiB, free memory unknown: left off"
    with_it = activation_bytes(shape, passes, element_bytes, scores, checkpointing=True)
    if need <= AUTO_FRACTION * free:
        return False, f"activations ~{need / GIB:.1f} GiB fit in {free / GIB:.1f} GiB free: left off"
    return True, (f"activations ~{need / GIB:.1f} GiB exceed {AUTO_FRACTION:.0%} of {free / GIB:.1f} GiB free: "
                  f"turned on (~{with_it / GIB:.1f} GiB with it)")
