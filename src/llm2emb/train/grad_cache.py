"""Gradient-cached contrastive step: the contrastive batch no longer bounds memory.

GradCache (Gao, Zhang, Han & Callan 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup", arXiv 2101.06983): the loss of an in-batch contrastive objective couples every row with every other, so
the whole batch must be embedded before the loss exists. It is also cheap once the embeddings exist. So:

1. embed the batch in chunks of at most `chunk_size` texts WITHOUT a graph — queries, positives and hard
   negatives each cut into their own chunks, as sentence-transformers' CachedMNRL cuts each column — and
   remember each chunk's random state (dropout);
2. compute the loss on the concatenated embeddings, made leaf tensors, and backpropagate it to them only: the
   gradient of the loss with respect to every embedding (tiny: B x D);
3. re-run each chunk WITH a graph under the same random state and backpropagate `sum(embedding * its cached
   gradient)` before the next chunk runs (memory: one chunk's activations): by the chain rule the parameter
   gradients add up to those of the uncached step.

Everything the loss does on whole-batch embeddings (in-batch and hard negatives, the cross-process gather with
gradient, Matryoshka dimensions, spread-out, duplicate masking, distillation) is unchanged: it runs on the same
embeddings. Under DDP the chunks' backward passes run under `no_sync` except the last one with gradients (a
loss without hard negatives gives the negatives' pieces none), so parameter gradients are all-reduced once per
step, as in the uncached step.

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

from llm2emb.model.representations import reshape_rows
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


@dataclass
class Piece:
    """One chunk: texts [start, stop) of one side of the batch, as a model input of its own (the texts ride
    in the `queries` slot of an EncodedBatch without passages; TripletEncoder then embeds only them)."""

    side: int
    start: int
    stop: int
    batch: EncodedBatch


def split_pieces(encoded: EncodedBatch, chunk_size: int) -> list[Piece]:
    """Each side's padded inputs cut into consecutive chunks of at most `chunk_size` texts. Tensors are sliced,
    not re-padded, so every text is computed exactly as in the whole batch."""
    pieces = []
    for side, inputs in enumerate((encoded.queries, encoded.passages, encoded.negatives)):
        if inputs is None:
            continue
        count = int(inputs["input_ids"].shape[0])
        for start in range(0, count, chunk_size):
            stop = min(start + chunk_size, count)
            piece = replace(encoded, queries={k: v[start:stop] for k, v in inputs.items()}, passages=None,
                            negatives=None, num_negatives=0, rows=stop - start, passage_keys=None,
                            negative_keys=None, teacher=None)
            pieces.append(Piece(side, start, stop, piece))
    return pieces


def largest_side(encoded: EncodedBatch) -> int:
    """Texts in the largest of the batch's forward passes (the hard negatives when there are any)."""
    return max(int(d["input_ids"].shape[0]) for d in (encoded.queries, encoded.passages, encoded.negatives)
               if d is not None)


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


def _side_grads(leaves: list[torch.Tensor], flat_rows: int | None) -> list[torch.Tensor | None]:
    """The cached gradients of one side's leaves, hard negatives' (B, k, ...) flattened to (B * k, ...)."""
    out = []
    for leaf in leaves:
        grad = leaf.grad
        if grad is not None and flat_rows is not None:
            grad = grad.reshape(flat_rows, *grad.shape[2:])
        out.append(grad)
    return out


class GradCachedStep:
    """One gradient-cached step of `model` (a TripletEncoder, possibly wrapped by DDP / accelerate) over
    `encoded`: `embed()` gives leaf embeddings for the loss; `backward(loss, ...)` fills the parameter
    gradients."""

    def __init__(self, model: nn.Module, encoded: EncodedBatch, chunk_size: int) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.model = model
        self.rows, self.num_negatives = encoded.rows, encoded.num_negatives
        self.pieces = split_pieces(encoded, chunk_size)
        self.states: list[RandomState] = []
        self.outputs: tuple[Any, Any, Any] | None = None

    def embed(self) -> tuple[Any, Any, Any]:
        """(q, p, n) as the uncached model call returns them, but leaves of no graph: each chunk ran without
        one."""
        parts: list[list[Any]] = [[], [], []]
        device = self.pieces[0].batch.queries["input_ids"].device
        with torch.no_grad():
            for piece in self.pieces:
                self.states.append(RandomState.capture(device))
                parts[piece.side].append(self.model(piece.batch)[0])
        q, p = _concat(parts[0]), _concat(parts[1])
        n = reshape_rows(_concat(parts[2]), self.rows, self.num_negatives) if parts[2] else None
        self.outputs = (_as_leaf(q), _as_leaf(p), _as_leaf(n))
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
        flat = (None, None, self.rows * self.num_negatives)  # negatives: (B, k, ...) leaves, flat pieces
        cached = [_side_grads(_leaves(side), rows) for side, rows in zip(self.outputs, flat)]
        # the all-reduce runs with the last backward that has gradients: a loss that ignores a side (no hard
        # negatives in it) leaves that side's pieces without one, and a synchronised forward never followed by
        # a backward leaves DDP waiting for a reduction that never comes (it fails at the next step)
        with_grads = [i for i, piece in enumerate(self.pieces) if any(g is not None for g in cached[piece.side])]
        sync_index = with_grads[-1] if with_grads else len(self.pieces) - 1
        for index, (piece, state) in enumerate(zip(self.pieces, self.states)):
            has_grads = index in with_grads
            context = nullcontext() if index == sync_index else no_sync()
            with context, (nullcontext() if has_grads else torch.no_grad()):
                state.restore()   # a piece without gradients still runs: the random state moves on as before
                fresh = self.model(piece.batch)[0]
                tensors, grads = [], []
                for tensor, leaf_grad in zip(_leaves(fresh), cached[piece.side]):
                    if leaf_grad is not None:
                        tensors.append(tensor)
                        grads.append(leaf_grad[piece.start:piece.stop].to(tensor.dtype))
                if tensors:
                    torch.autograd.backward(tensors, grads)
        self.outputs = None
