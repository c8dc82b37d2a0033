"""Representations: what an `Embedder` makes of the backbone's token states.

| name           | output of `Embedder.forward`                                    | scored by                        |
|----------------|-----------------------------------------------------------------|----------------------------------|
| `dense`        | (B, D) pooled vector (pooling + head), the default              | cosine                           |
| `multi_vector` | {"multi_vector": (B, T, d) unit token vectors, "multi_vector_mask": (B, T)} | MaxSim (ColBERT) |
| `sparse`       | {"sparse": (B, V) vocabulary weights from the LLM's LM head}     | dot product (SPLADE)             |
| `hybrid`       | the union of its heads' outputs ({"dense": (B, D), ...})        | weighted sum of the heads' scores|

A dense Embedder keeps `embedder.representation = None` and the plain tensor output, so dense models, their
saved folders and fingerprints are exactly what they were before representations existed. Every other
representation is an `nn.Module` built from this registry; its trainable weights are saved with the Embedder
(`modules.safetensors`, prefix `representation.`). Adding one is a `Representation` subclass in its own file
with `@register_representation("name")` and its import at the bottom of this file.

Token sets (multi_vector, sparse max-pool) are the real tokens of a text, minus the instruction prefix when
the Embedder's `skip_instruction` is on, minus the tokenizer's special tokens (BOS, EOS / end token, pad)
with `skip_special_tokens`, and for `sparse` minus the first position (`sparse_skip_first`: the attention
sink, see `sparse.py`). A text left with no token keeps all its real tokens.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from llm2emb.errors import UserError, did_you_mean

REPRESENTATION_REGISTRY: dict[str, type["Representation"]] = {}
DENSE = "dense"


def register_representation(name: str) -> Callable[[type["Representation"]], type["Representation"]]:
    def wrap(cls: type["Representation"]) -> type["Representation"]:
        REPRESENTATION_REGISTRY[name] = cls
        cls.name = name
        return cls
    return wrap


@dataclass
class RepresentationOptions:
    """Settings of the non-dense representations (saved in `llm2emb_config.json: representation_options`)."""

    token_dim: int = 128                 # multi_vector: projection size of every token vector
    skip_special_tokens: bool = True     # multi_vector / sparse: special tokens are not in the token sets
    sparse_skip_first: bool = True       # sparse: the first position (attention sink) is not max-pooled
    sparse_query_top_k: int = 64         # sparse: weights kept per query at inference (0: all)
    sparse_doc_top_k: int = 256          # sparse: weights kept per document at inference (0: all)
    hybrid_heads: list[str] = field(default_factory=lambda: ["dense", "sparse", "multi_vector"])
    hybrid_weights: list[float] = field(default_factory=lambda: [1.0, 0.3, 1.0])  # BGE-M3's w1, w2, w3

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(RepresentationOptions))


def parse_options(name: str, values: Mapping[str, Any] | None, source: str = "representation") -> RepresentationOptions:
    """Validated `RepresentationOptions` for representation `name`; raises UserError (one sentence)."""
    if name not in REPRESENTATION_REGISTRY:
        raise UserError(f"{source}: unknown representation {name!r}; choose one of: "
                        f"{', '.join(REPRESENTATION_REGISTRY)}." + did_you_mean(str(name), REPRESENTATION_REGISTRY))
    values = dict(values or {})
    unknown = [k for k in values if k not in OPTION_NAMES]
    if unknown:
        raise UserError(f"{source}: unknown representation option {unknown[0]!r}; options are: "
                        f"{', '.join(OPTION_NAMES)}." + did_you_mean(unknown[0], OPTION_NAMES))
    options = RepresentationOptions(**values)
    for key in ("skip_special_tokens", "sparse_skip_first"):
        if not isinstance(getattr(options, key), bool):
            raise UserError(f"{source}: {key} must be true or false, got {getattr(options, key)!r}.")
    for key in ("token_dim", "sparse_query_top_k", "sparse_doc_top_k"):
        value = getattr(options, key)
        low = 1 if key == "token_dim" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"{source}: {key} must be an integer >= {low}, got {value!r}.")
    heads = list(options.hybrid_heads)
    weights = list(options.hybrid_weights)
    if name == "hybrid":
        bad = [h for h in heads if h not in REPRESENTATION_REGISTRY or h == "hybrid"]
        if not heads or bad:
            choices = [h for h in REPRESENTATION_REGISTRY if h != "hybrid"]
            raise UserError(f"{source}: hybrid_heads must list heads from {', '.join(choices)}, got {heads!r}."
                            + (did_you_mean(str(bad[0]), choices) if bad else ""))
        if len(set(heads)) != len(heads):
            raise UserError(f"{source}: hybrid_heads lists a head twice ({heads!r}); give each head once.")
        if len(weights) != len(heads):
            raise UserError(f"{source}: hybrid_weights has {len(weights)} values but hybrid_heads has {len(heads)} "
                            f"({', '.join(heads)}); give one weight per head.")
        if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0
               for w in weights):
            raise UserError(f"{source}: hybrid_weights must be finite numbers >= 0, got {weights!r}.")
        options.hybrid_weights = [float(w) for w in weights]
    return options


class Representation(nn.Module):
    """Token states -> a dict of named tensors (see the module docstring). Subclasses set `heads`."""

    name: ClassVar[str] = ""
    #: the score heads this representation outputs ("dense", "multi_vector", "sparse")
    heads: ClassVar[tuple[str, ...]] = ()

    def __init__(self, embedder, options: RepresentationOptions) -> None:
        super().__init__()
        self.options = options

    def attach(self, embedder, source: str) -> None:
        """Called once the backbone is loaded from `source` (folder or hub id): load what comes from it."""

    def forward(self, embedder, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                prefix_lengths: torch.Tensor | None) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    @property
    def head_names(self) -> tuple[str, ...]:
        """The score heads this model outputs, in order."""
        return tuple(self.heads)

    @property
    def weights(self) -> dict[str, float]:
        """Weight of each head in the combined score (1.0 for a single head)."""
        return {head: 1.0 for head in self.head_names}


def special_token_ids(embedder) -> list[int]:
    """The tokenizer's special ids plus the configured end tokens (the ids a token set leaves out)."""
    tok = embedder.tokenizer
    ids = set(getattr(tok, "all_special_ids", None) or [])
    ids.update(embedder.config.end_token_ids or [])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tok, name, None)
        if value is not None:
            ids.add(int(value))
    return sorted(ids)


def token_set_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_lengths: torch.Tensor | None,
                   special_ids: list[int] | None = None, skip_first: bool = False) -> torch.Tensor:
    """(B, T) bool: the tokens of each text that a token set keeps (module docstring), for either padding side."""
    from llm2emb.model.pooling import content_mask, token_index

    real = attention_mask.bool()
    keep = content_mask(attention_mask, prefix_lengths)
    if special_ids:
        keep = keep & ~torch.isin(input_ids, torch.as_tensor(special_ids, device=input_ids.device))
    if skip_first:
        keep = keep & (token_index(attention_mask) != 0)
    empty = ~keep.any(dim=1, keepdim=True)
    return torch.where(empty, real, keep)


def build_representation(name: str, embedder, options: Mapping[str, Any] | RepresentationOptions | None = None
                         ) -> Representation | None:
    """The representation module for `embedder`, or None for `dense` (the Embedder's own pooling + head)."""
    if not isinstance(options, RepresentationOptions):
        options = parse_options(name, options, source=f"representation {name!r}")
    if name == DENSE:
        return None
    return REPRESENTATION_REGISTRY[name](embedder, options)


def reshape_rows(output, rows: int, per_row: int):
    """(rows * per_row, ...) outputs -> (rows, per_row, ...), for a tensor or a dict of tensors."""
    if isinstance(output, dict):
        return {key: value.view(rows, per_row, *value.shape[1:]) for key, value in output.items()}
    return output.view(rows, per_row, -1)


from llm2emb.model.representations import dense as _dense  # noqa: E402,F401  (registers "dense")
from llm2emb.model.representations import multi_vector as _multi_vector  # noqa: E402,F401
from llm2emb.model.representations import sparse as _sparse  # noqa: E402,F401
from llm2emb.model.representations import hybrid as _hybrid  # noqa: E402,F401
