"""Objectives of the non-dense representations: every loss term applied to the head it scores.

A representation (`llm2emb.model.representations`) outputs one value per head: "dense" (B, D), "sparse"
(B, V), "multi_vector" ((B, T, d) vectors, (B, T) mask). Every registered loss term scores one head, named
by its class attribute `head` (terms without one, like `contrastive` and `spread_out`, score "dense"), or all
heads of a hybrid (`self_distill`, head "hybrid"). `RepresentationObjective` gives each term the batch of its
head, multiplies the head's terms by the head's hybrid weight (1 for a single head) and sums.

Which terms (`representation_loss_entries`): the config's `losses` entries, grouped by head; a head with no
entry gets its default terms:
    dense         the seed's flat fields (temperature, MRL, spread-out), as a dense model
    multi_vector  maxsim
    sparse        sparse_contrastive, and flops with flops_query_weight / flops_doc_weight (when either > 0)
    hybrid        self_distill when hybrid_self_distill is true
A `losses` entry for a head the representation does not have is refused.

Distributed: each term keeps the one-process gradient on its own (see `distributed`), so the weighted sum
does too. Config access is duck-typed (TrainConfig or a mapping), as `seed_loss_entries`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Sequence

from torch import Tensor, nn

from llm2emb.errors import UserError
from llm2emb.losses import flops as _flops, late_interaction as _late  # noqa: F401  (register the terms)
from llm2emb.losses import self_distill as _self_distill, sparse_contrastive as _sparse  # noqa: F401
from llm2emb.losses.registry import LOSS_REGISTRY, EmbeddingBatch, LossSpec, parse_loss_specs

DEFAULT_HEAD = "dense"


def term_head(name: str) -> str:
    """The head a registered loss term scores ("dense" unless the class says otherwise)."""
    return getattr(LOSS_REGISTRY[name], "head", DEFAULT_HEAD)


def _get(cfg: Any):
    return cfg.get if isinstance(cfg, Mapping) else (lambda key, default=None: getattr(cfg, key, default))


class _WithoutLosses:
    """`cfg` seen with an empty `losses`, so `seed_loss_entries` reads the flat fields."""

    def __init__(self, cfg: Any) -> None:
        self._get = _get(cfg)

    def __getattr__(self, key: str) -> Any:
        return [] if key == "losses" else self._get(key)


def representation_heads(cfg: Any) -> dict[str, float]:
    """{head: weight} of the config's representation (one head with weight 1 unless hybrid)."""
    get = _get(cfg)
    name = get("representation", "dense") or "dense"
    if name != "hybrid":
        return {name: 1.0}
    heads = list(get("hybrid_heads") or [])
    weights = list(get("hybrid_weights") or [])
    if len(heads) != len(weights):
        raise UserError(f"hybrid_weights has {len(weights)} values but hybrid_heads has {len(heads)}; give one "
                        "weight per head.")
    return {head: float(w) for head, w in zip(heads, weights)}


def representation_loss_entries(cfg: Any, source: str = "config") -> list[dict[str, Any]]:
    """The `losses` entries the config means for its representation (module docstring)."""
    from llm2emb.losses import seed_loss_entries

    get = _get(cfg)
    name = get("representation", "dense") or "dense"
    heads = representation_heads(cfg)
    given = [dict(entry) for entry in (get("losses") or [])]
    specs = parse_loss_specs(given, source)
    covered = set()
    for i, spec in enumerate(specs):
        head = term_head(spec.name)
        allowed = head in heads or (head == "hybrid" and name == "hybrid")
        if not allowed:
            raise UserError(f"{source}: losses[{i}] ({spec.name}) scores the {head} head, which representation "
                            f"{name!r} does not have (heads: {', '.join(heads)}); drop it or change representation.")
        covered.add(head)
    entries = list(given)
    for head in heads:
        if head in covered:
            continue
        if head == "dense":
            entries += seed_loss_entries(_WithoutLosses(cfg))
        elif head == "multi_vector":
            entries.append({"name": "maxsim"})
        elif head == "sparse":
            entries.append({"name": "sparse_contrastive"})
            q_w, d_w = float(get("flops_query_weight", 3e-4)), float(get("flops_doc_weight", 1e-4))
            if q_w > 0 or d_w > 0:
                entries.append({"name": "flops", "query_weight": q_w, "doc_weight": d_w})
    if name == "hybrid" and get("hybrid_self_distill", False) and "hybrid" not in covered:
        entries.append({"name": "self_distill", "temperature": float(get("temperature", 0.05))})
    return entries


def _head_value(out: Any, head: str) -> Any:
    if head == "multi_vector":
        return out["multi_vector"], out["multi_vector_mask"]
    return out[head]


class RepresentationObjective(nn.Module):
    """Weighted sum of loss terms, each on its head's outputs; the trainer calls it like EmbeddingObjective."""

    def __init__(self, specs: Sequence[LossSpec], head_weights: dict[str, float], *, gather: bool = True) -> None:
        super().__init__()
        if not specs:
            raise UserError("losses is empty; give at least one loss.")
        self.specs = list(specs)
        self.head_weights = dict(head_weights)
        self.terms = nn.ModuleList([spec.build(gather) for spec in self.specs])
        self.heads = [term_head(spec.name) for spec in self.specs]
        temperatures = {head: float(getattr(spec.options, "temperature"))
                        for spec, head in zip(self.specs, self.heads)
                        if head in self.head_weights and hasattr(spec.options, "temperature")}
        for term, head in zip(self.terms, self.heads):
            if head == "hybrid":
                term.configure(self.head_weights, temperatures)

    @classmethod
    def from_config(cls, cfg: Any, source: str = "config", *, gather: bool = True) -> "RepresentationObjective":
        specs = parse_loss_specs(representation_loss_entries(cfg, source), source)
        return cls(specs, representation_heads(cfg), gather=gather)

    def forward(self, q: dict[str, Tensor], p: dict[str, Tensor], n: dict[str, Tensor] | None, use_inbatch: bool,
                passage_keys: Tensor | None = None, negative_keys: Tensor | None = None, teacher: Any = None):
        from llm2emb.losses import LossOutput

        parts: dict[str, float] = {}
        total: Tensor | None = None
        for spec, term, head in zip(self.specs, self.terms, self.heads):
            if head == "hybrid":
                pick = lambda out: None if out is None else {h: _head_value(out, h) for h in self.head_weights}  # noqa: E731
                weight = spec.weight
            else:
                pick = lambda out, h=head: None if out is None else _head_value(out, h)  # noqa: E731
                weight = spec.weight * self.head_weights[head]
            batch = EmbeddingBatch(pick(q), pick(p), pick(n), use_inbatch, passage_keys, negative_keys)
            if teacher is not None:  # distillation terms (teacher columns in the data) read it
                batch.teacher = teacher
            value, extra = term(batch)
            parts.update(extra)
            parts[spec.name] = float(value.detach())
            weighted = value if weight == 1.0 else weight * value
            total = weighted if total is None else total + weighted
        return LossOutput(total=total, parts=parts)  # type: ignore[arg-type]


def objective_for_config(cfg: Any, source: str = "config", *, gather: bool = True) -> nn.Module:
    """The training objective of `cfg`: `EmbeddingObjective` for a dense representation, else
    `RepresentationObjective`; both are called as objective(q, p, n, use_inbatch, passage_keys=, negative_keys=)."""
    from llm2emb.losses import EmbeddingObjective

    if (_get(cfg)("representation", "dense") or "dense") == "dense":
        return EmbeddingObjective.from_config(cfg, source, gather=gather)
    return RepresentationObjective.from_config(cfg, source, gather=gather)
