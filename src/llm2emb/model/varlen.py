"""Padding-free forward passes (`attn_implementation: varlen`): the real tokens of a batch are packed into one
row, each text keeps its own positions, and attention runs per text.

A padded batch computes every layer on B x T_max tokens; packed, only on the sum of the real lengths. The
attention must then not cross texts: transformers gets position ids that restart at 0 for every text and the
cumulative lengths (`cu_seq_lens_q/k`, the keyword arguments its flash-attention path already passes down to
each attention call), and this module's attention function runs

* on CUDA, PyTorch's variable-length flash attention (`torch.nn.attention.varlen.varlen_attn`) when this
  torch has it: one kernel over all texts, causal or bidirectional;
* elsewhere (and on older torch), `scaled_dot_product_attention` text by text: exact, but a Python loop,
  so on a CPU it only pays when batches carry much padding.

Works with causal and bidirectional attention (`module.is_causal`, which `model.bidirectional` switches off),
LoRA and gradient checkpointing. Models with sliding-window layers (Gemma 3, Mistral with a window) are
refused: their window is not applied here.
"""
from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llm2emb.errors import UserError

logger = logging.getLogger(__name__)

USER_NAME = "varlen"
REGISTERED_NAME = "llm2emb_varlen"
_registered = False
_flash_failed = False


@functools.cache
def _varlen_kernel() -> tuple[Callable | None, frozenset[str]]:
    """torch's varlen flash attention and its keyword names (they differ between torch releases), looked up
    once: the attention function runs in every layer of every forward pass."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _per_text(query, key, value, cu: torch.Tensor, causal: bool, scaling, dropout: float) -> torch.Tensor:
    """(1, H, N, D) inputs -> (1, H, N, D): sdpa on each text's slice."""
    bounds = cu.tolist()
    parts = []
    gqa = key.shape[1] != query.shape[1]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        parts.append(F.scaled_dot_product_attention(
            query[:, :, start:stop], key[:, :, start:stop], value[:, :, start:stop], is_causal=causal,
            scale=scaling, dropout_p=dropout, enable_gqa=gqa))
    return torch.cat(parts, dim=2)


def _flash_varlen(kernel, params: frozenset[str], query, key, value, cu: torch.Tensor, max_length: int,
                  causal: bool, scaling):
    """(1, H, N, D) -> (1, H, N, D) through torch's varlen flash attention (CUDA); `params`: its keyword names."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (N, H, D)
    kwargs = {"scale": scaling}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    elif "is_causal" in params:
        kwargs["is_causal"] = causal
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    out = kernel(q, k, v, cu, cu, max_length, max_length, **kwargs)
    return out.transpose(0, 1).unsqueeze(0)


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention interface: query (1, H, N, D), key/value (1, H_kv, N, D) of packed texts whose
    boundaries are `cu_seq_lens_q`; returns (1, N, H, D) as transformers' own implementations do."""
    global _flash_failed
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise RuntimeError("attn_implementation 'varlen' runs only through Embedder's packed forward pass")
    causal = bool(getattr(module, "is_causal", True))
    kernel, params = _varlen_kernel()
    dtype = query.dtype
    if query.is_cuda and torch.is_autocast_enabled("cuda"):
        # rotary embeddings promote q and k to float32 under autocast; sdpa casts back by itself (it is on
        # autocast's low-precision list), the varlen kernel does not
        dtype = torch.get_autocast_dtype("cuda")
    use_flash = (not _flash_failed and kernel is not None and query.is_cuda
                 and dtype in (torch.float16, torch.bfloat16) and dropout == 0.0)
    out = None
    if use_flash:
        try:
            out = _flash_varlen(kernel, params, query.to(dtype), key.to(dtype), value.to(dtype),
                                cu_seq_lens_q.to(torch.int32), int(max_length_q), causal, scaling)
        except RuntimeError as exc:  # e.g. a head size or GPU the kernel does not support
            if not _flash_failed:
                logger.warning("varlen flash attention failed (%s); using per-text sdpa", exc)
            _flash_failed = True
    if out is None:
        out = _per_text(query, key, value, cu_seq_lens_q, causal, scaling, dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs) -> None:
    """Mask interface: the texts' boundaries travel as cu_seq_lens, so no mask tensor is built."""
    return None


def register() -> str:
    """Register the attention function with transformers (once); returns the name models load with."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(REGISTERED_NAME, varlen_attention)
        AttentionMaskInterface.register(REGISTERED_NAME, _no_mask)
        _registered = True
    return REGISTERED_NAME


def check_supported(hf_config, source: str) -> None:
    """Refuse models whose attention is not plain full attention (sliding windows are not applied here)."""
    layer_types = getattr(hf_config, "layer_types", None) or []
    window = getattr(hf_config, "sliding_window", None)
    uses_window = getattr(hf_config, "use_sliding_window", True)
    if any(t != "full_attention" for t in layer_types) or (window and uses_window and not layer_types):
        raise UserError(f"{source}: attn_implementation 'varlen' (padding-free batches) supports full-attention "
                        f"models only, and {hf_config.model_type} has sliding-window layers; use sdpa.")


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor | int]:
    """Padded (B, T) inputs (left or right padding) -> one packed row: input_ids and position_ids (1, N), the
    cumulative lengths (B + 1,) int32, the longest length, and the boolean mask that unpacks."""
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    positions = (attention_mask.long().cumsum(dim=1) - 1)[mask]
    return {"input_ids": input_ids[mask].unsqueeze(0), "position_ids": positions.unsqueeze(0), "cu_seq_lens": cu,
            "max_length": int(lengths.max()), "mask": mask}


def unpack(packed_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1, N, H) -> (B, T, H) with zeros at padded positions."""
    out = packed_hidden.new_zeros(*mask.shape, packed_hidden.shape[-1])
    out[mask] = packed_hidden[0]
    return out
