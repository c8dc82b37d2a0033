"""The representation fields of a training config (TrainConfig, or a mapping with the same keys): what the
Embedder is built with, and the checks `TrainConfig.validate` runs on them (one sentence per error)."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from llm2emb.errors import UserError
from llm2emb.model.representations import DENSE, OPTION_NAMES, parse_options


def _get(cfg: Any):
    return cfg.get if isinstance(cfg, Mapping) else (lambda key, default=None: getattr(cfg, key, default))


def train_options(cfg: Any) -> dict[str, Any]:
    """`RepresentationOptions` values from the config's fields of the same names."""
    get = _get(cfg)
    return {name: get(name) for name in OPTION_NAMES if get(name) is not None}


def check_train_settings(cfg: Any, source: str = "config") -> None:
    """Representation rules of a training config; raises UserError naming `source` and the field."""
    import llm2emb.losses.representation  # noqa: F401  (registers the representation losses)

    get = _get(cfg)
    name = get("representation", DENSE) or DENSE
    parse_options(name, train_options(cfg), f"{source}: representation {name!r}")
    for field in ("flops_query_weight", "flops_doc_weight"):
        value = get(field, 0.0)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise UserError(f"{source}: field {field!r} must be a finite number >= 0, got {value!r}.")
    if name in ("multi_vector", "sparse"):
        mrl = bool(get("mrl_enabled", False)) or any(
            (entry or {}).get("mrl_dims") for entry in (get("losses") or []) if isinstance(entry, Mapping))
        if mrl:
            raise UserError(f"{source}: Matryoshka dimensions (mrl_enabled / mrl_dims) truncate dense vectors, but "
                            f"representation is {name!r}; set mrl_enabled to false, or use representation dense "
                            "or hybrid (whose dense head takes them).")
    heads = list(get("hybrid_heads") or []) if name == "hybrid" else [name]
    if "dense" not in heads:
        # parameters no loss reaches would break DDP (unused parameters) and be trained for nothing
        from llm2emb.model.pooling import POOLING_REGISTRY

        pooling = get("pooling_mode", "eos")
        if get("head"):
            raise UserError(f"{source}: field 'head' ({get('head')}) projects the pooled vector, which a {name} model "
                            "without a dense head does not have; set head to null.")
        if getattr(POOLING_REGISTRY.get(pooling), "trainable", False):
            raise UserError(f"{source}: pooling_mode {pooling!r} has trainable weights, but a {name} model without a "
                            "dense head does not pool; use pooling_mode eos or mean (or a hybrid with a dense head).")
    if get("hybrid_self_distill", False) and name != "hybrid":
        raise UserError(f"{source}: field 'hybrid_self_distill' is true but representation is {name!r}; "
                        "self-distillation needs representation hybrid.")
    if name != DENSE:
        from llm2emb.losses.representation import representation_loss_entries

        representation_loss_entries(cfg, source)  # every losses entry must score a head of this representation
