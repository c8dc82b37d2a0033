"""Gradient-cached contrastive step: the contrastive batch no longer bounds memory.

GradCache (Gao, Zhang, Han & Callan 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup", arXiv 2101.06983): the loss of an in-batch contrastive objective couples every row with every other, so
the whole batch must be embedded before the loss exists. It is also cheap once the embeddings exist. So:

1. embed the batch in row chunks WITHOUT a graph (memory: one chunk's activations), remembering each chunk's
   random state (dropout);
2. compute the loss on the concatenated embeddings, made leaf tensors, and backpropagate it to them only: the
   gradient of the loss with respect to every embedding (tiny: B x D);
3. re-run each chunk WITH a graph under the same random state and backpropagate `sum(embedding * its cached
   gradient)`: by the chain rule the parameter gradients add up to those of the uncached step.

Everything the loss does on whole-batch embeddings (in-batch and hard negatives, the cross-process gather with
gradient, Matryoshka dimensions, spread-out, duplicate masking, distillation) is unchanged: it runs on the same
embeddings. Under DDP the chunks' backward passes run under `no_sync` except the last, so parameter gradients
are all-reduced once per step, as in the uncached step.

Costs one extra forward pass per step (about a third more compute); with gradient checkpointing on, memory per
chunk drops further at another forward's cost.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from llm2emb.train.encode import EncodedBatch


@dataclass
class RandomState:
    """The torch random generators a forward pass draws from (CPU, and the accelerator's when inputs live
    there), so a chunk re-runs with the dropout masks of its first run."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    device: torch.device

    @classmethod
    def capture(cls, device: torch.device) -> "RandomState":
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def _rows(inputs: dict[str, torch.Tensor] | None, start: int, stop: int) -> dict[str, torch.Tensor] | None:
    return None if inputs is None else {k: v[start:stop] for k, v in inputs.items()}


def split_rows(encoded: EncodedBatch, chunk_size: int) -> list[EncodedBatch]:
    """The batch as consecutive row chunks of at most `chunk_size` rows (a row: a query, its positive and its
    k hard negatives). Tensors are sliced, not re-padded, so every row is computed exactly as in the whole
    batch."""
    k = encoded.num_negatives
    chunks = []
    for start in range(0, encoded.rows, chunk_size):
        stop = min(start + chunk_size, encoded.rows)
        chunks.append(replace(encoded, queries=_rows(encoded.queries, start, stop),
                              passages=_rows(encoded.passages, start, stop),
                              negatives=_rows(encoded.negatives, start * k, stop * k), rows=stop - start,
                              passage_keys=None, negative_keys=None, teacher=None))
    return chunks


def _concat(parts: list[Any]) -> Any:
    """Chunk outputs (a tensor, a dict of tensors, or None) joined along rows."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, dict):
        return {key: torch.cat([p[key] for p in parts]) for key in first}
    return torch.cat(parts)


def _leaves(output: Any) -> list[torch.Tensor]:
    """The differentiable tensors of one model output, in a fixed order (masks and ints are not)."""
    if output is None:
        return []
    if isinstance(output, dict):
        return [t for key in sorted(output) for t in _leaves(output[key])]
    return [output] if output.is_floating_point() else []


def _as_leaf(output: Any) -> Any:
    if output is None:
        return None
    if isinstance(output, dict):
        return {key: _as_leaf(value) for key, value in output.items()}
    if not output.is_floating_point():
        return output
    return output.detach().requires_grad_()


class GradCachedStep:
    """One gradient-cached step of `model` (a TripletEncoder, possibly wrapped by DDP / accelerate) over
    `encoded`: `embed()` gives leaf embeddings for the loss; `backward(loss, ...)` fills the parameter
    gradients."""

    def __init__(self, model: nn.Module, encoded: EncodedBatch, chunk_size: int) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.model = model
        self.chunks = split_rows(encoded, chunk_size)
        self.states: list[RandomState] = []
        self.outputs: tuple[Any, Any, Any] | None = None

    def embed(self) -> tuple[Any, Any, Any]:
        """(q, p, n) as the uncached model call returns them, but leaves of no graph: each chunk ran without
        one."""
        parts = []
        device = self.chunks[0].queries["input_ids"].device
        with torch.no_grad():
            for chunk in self.chunks:
                self.states.append(RandomState.capture(device))
                parts.append(self.model(chunk))
        self.outputs = tuple(_as_leaf(_concat([part[i] for part in parts])) for i in range(3))
        return self.outputs

    def backward(self, loss: torch.Tensor, loss_backward: Callable[[torch.Tensor], None],
                 no_sync: Callable[[], AbstractContextManager] = nullcontext) -> None:
        """Backpropagate `loss` through the cached embeddings into the model.

        `loss_backward(loss)` runs the launcher's backward on the loss alone (fp16 loss scaling applies there,
        so the cached gradients are already scaled); `no_sync()` is the launcher's context that defers the
        gradient all-reduce (every chunk but the last runs in it)."""
        if self.outputs is None:
            raise RuntimeError("embed() must run before backward()")
        loss_backward(loss)
        offsets = [0]
        for chunk in self.chunks:
            offsets.append(offsets[-1] + chunk.rows)
        cached = [_leaves(side) for side in self.outputs]
        for index, (chunk, state) in enumerate(zip(self.chunks, self.states)):
            start, stop = offsets[index], offsets[index + 1]
            last = index == len(self.chunks) - 1
            with (nullcontext() if last else no_sync()):
                state.restore()
                outputs = self.model(chunk)
                tensors, grads = [], []
                for side, leaves in zip(outputs, cached):
                    for fresh, leaf in zip(_leaves(side), leaves):
                        if leaf.grad is not None:
                            tensors.append(fresh)
                            grads.append(leaf.grad[start:stop].to(fresh.dtype))
                if tensors:
                    torch.autograd.backward(tensors, grads)
        self.outputs = None
