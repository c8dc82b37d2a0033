"""Training objectives (stage 3 of the seed, "训练目标与损失设计").

Every objective is a registered `LossTerm` (`llm2emb.losses.registry`): `contrastive` (InfoNCE with
in-batch and hard negatives, optionally over Matryoshka prefixes) and `spread_out` (uniformity). A config
composes them with `losses: [{name, weight, ...options}]`; the seed's flat fields (temperature, mrl_*,
spread_*) describe the same composition and keep working. `EmbeddingObjective` is what the trainer calls:
the weighted sum of its terms.

Embeddings are gathered across processes with their gradients, and each process's loss is weighted so that
DDP's gradient averaging yields exactly the gradient of one process on the concatenated batch: the trainer
does not scale anything. A new loss must keep that property (see `llm2emb.losses.distributed`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import Tensor, nn

from llm2emb.errors import UserError
from llm2emb.losses.contrastive import ContrastiveLoss, InfoNCE
from llm2emb.losses.distributed import gather_with_grad
from llm2emb.losses.matryoshka import MatryoshkaLoss
from llm2emb.losses.registry import (LOSS_REGISTRY, EmbeddingBatch, LossSpec, LossTerm, loss_docs,
                                     parse_loss_specs, register_loss)
from llm2emb.losses.spread_out import SpreadOut, SpreadOutLoss
# distillation losses (teacher embeddings / scores in the prepared data): importing registers them
from llm2emb.losses import distill_kl as _distill_kl, embedding_mse as _embedding_mse  # noqa: E402,F401
from llm2emb.losses import margin_mse as _margin_mse  # noqa: E402,F401
from llm2emb.losses.registry import TeacherBatch  # noqa: E402,F401
# representation losses (multi_vector / sparse / hybrid heads): importing registers them
from llm2emb.losses import flops as _flops, late_interaction as _late_interaction  # noqa: E402,F401
from llm2emb.losses import self_distill as _self_distill, sparse_contrastive as _sparse_contrastive  # noqa: E402,F401
from llm2emb.losses.representation import RepresentationObjective, objective_for_config  # noqa: E402,F401

__all__ = ["LOSS_REGISTRY", "ContrastiveLoss", "EmbeddingBatch", "EmbeddingObjective", "InfoNCE", "LossOutput",
           "LossSpec", "LossTerm", "MatryoshkaLoss", "SpreadOut", "SpreadOutLoss", "gather_with_grad",
           "loss_docs", "parse_loss_specs", "register_loss", "seed_loss_entries"]


@dataclass
class LossOutput:
    """`total` is what to backpropagate; `parts` are detached values for logging.

    parts: one value per term under its name (the unweighted loss; "contrastive" is the MRL-weighted sum
    when MRL is on), plus what a term reports itself (e.g. "contrastive@<d>" per MRL dimension)."""
    total: Tensor
    parts: dict[str, float] = field(default_factory=dict)


def _get(cfg: Any):
    return cfg.get if isinstance(cfg, Mapping) else (lambda key, default=None: getattr(cfg, key, default))


def seed_loss_entries(cfg: Any) -> list[dict[str, Any]]:
    """The `losses` list a config means: its own `losses`, else the one the seed's flat fields describe
    (temperature, inbatch_hard_negatives, false_negative_margin, mrl_enabled/mrl_dims/mrl_dim_weights,
    spread_enabled/spread_weight/spread_t)."""
    get = _get(cfg)
    if get("losses"):
        return [dict(entry) for entry in get("losses")]
    contrastive: dict[str, Any] = {"name": "contrastive", "temperature": get("temperature", 0.05),
                                   "inbatch_hard_negatives": bool(get("inbatch_hard_negatives", False))}
    if get("false_negative_margin") is not None:
        contrastive["false_negative_margin"] = get("false_negative_margin")
    if get("mrl_enabled", False):
        if not get("mrl_dims"):
            raise UserError("mrl_enabled is true but mrl_dims is empty; list the dimensions to train "
                            "(e.g. [128, 256]) or set mrl_enabled to false.")
        contrastive["mrl_dims"] = list(get("mrl_dims"))
        contrastive["mrl_dim_weights"] = list(get("mrl_dim_weights") or [])
    entries = [contrastive]
    if get("spread_enabled", False) and float(get("spread_weight", 0.0) or 0.0) > 0:
        spread_t = get("spread_t", 2.0)
        entries.append({"name": "spread_out", "weight": float(get("spread_weight")),
                        "t": 2.0 if spread_t is None else spread_t})
    return entries


class EmbeddingObjective(nn.Module):
    """The weighted sum of registered loss terms, built from `LossSpec`s (or a config with `from_config`)."""

    def __init__(self, specs: Sequence[LossSpec], *, gather: bool = True) -> None:
        super().__init__()
        if not specs:
            raise UserError("losses is empty; give at least one loss, e.g. [{name: contrastive}].")
        self.specs = list(specs)
        self.terms = nn.ModuleList([spec.build(gather) for spec in self.specs])
        self.gather = gather

    @classmethod
    def from_config(cls, cfg: Any, source: str = "config", *, gather: bool = True) -> "EmbeddingObjective":
        """From a TrainConfig or a mapping with the seed's field names and/or `losses`."""
        return cls(parse_loss_specs(seed_loss_entries(cfg), source), gather=gather)

    @classmethod
    def build(cls, temperature: float = 0.05, inbatch_hard_negatives: bool = False,
              mrl_dims: Sequence[int] | None = None, mrl_dim_weights: Sequence[float] | None = None,
              spread_weight: float = 0.0, spread_t: float = 2.0, false_negative_margin: float | None = None,
              *, gather: bool = True) -> "EmbeddingObjective":
        """The seed's composition from keyword values: contrastive (MRL over `mrl_dims` when given) +
        `spread_weight` x spread-out."""
        if mrl_dim_weights and not mrl_dims:
            raise UserError("mrl_dim_weights is set but mrl_dims is empty; set mrl_dims or drop the weights.")
        if spread_weight < 0:
            raise UserError(f"spread_weight must be >= 0, got {spread_weight}.")
        return cls.from_config(dict(
            temperature=temperature, inbatch_hard_negatives=inbatch_hard_negatives, mrl_enabled=bool(mrl_dims),
            mrl_dims=list(mrl_dims or []), mrl_dim_weights=list(mrl_dim_weights or []),
            spread_enabled=spread_weight > 0, spread_weight=spread_weight, spread_t=spread_t,
            false_negative_margin=false_negative_margin), gather=gather)

    def forward(self, q: Tensor, p: Tensor, n: Tensor | None, use_inbatch: bool,
                passage_keys: Tensor | None = None, negative_keys: Tensor | None = None,
                teacher: TeacherBatch | None = None) -> LossOutput:
        """q, p: (B, D) un-normalised embeddings; n: (B, k, D) hard negatives or None; keys, teacher: see
        `EmbeddingBatch`."""
        batch = EmbeddingBatch(q, p, n, use_inbatch, passage_keys, negative_keys, teacher)
        parts: dict[str, float] = {}
        total: Tensor | None = None
        for spec, term in zip(self.specs, self.terms):
            value, extra = term(batch)
            parts.update(extra)
            parts[spec.name] = float(value.detach())
            weighted = value if spec.weight == 1.0 else spec.weight * value
            total = weighted if total is None else total + weighted
        return LossOutput(total=total, parts=parts)  # type: ignore[arg-type]
