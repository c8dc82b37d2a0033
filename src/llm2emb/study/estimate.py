"""A rough cost estimate of study cells before they run (`llm2emb study --dry-run`).

Training FLOPs ~ 6 x non-embedding parameters x tokens per step x steps (LoRA: 4x, no weight gradients of the
frozen weights), with tokens per step bounded by the batch size and the configured maximum lengths (real
batches are usually shorter: an upper bound); divided by this machine's matmul rate in the cell's precision
(bf16 where `precision` resolves to it), measured here in about a second. Cells already finished in the output folder
give measured seconds per step instead, which wins.
"""
from __future__ import annotations

import time
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def matmul_flops_per_second(dtype_name: str = "float32") -> float:
    """Best of a few n=1024 matmuls on the default device (a rough peak for the estimate)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name)
    a = torch.randn(1024, 1024, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ a
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * 1024 ** 3 / best


@lru_cache(maxsize=16)
def non_embedding_parameters(model_path: str) -> int:
    """~12 x layers x hidden^2 (attention + MLP) from the model's config, without loading weights."""
    from llm2emb.model.loading import load_config, resolve_model_path

    cfg = load_config(resolve_model_path(model_path))
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden = int(cfg.hidden_size)
    layers = int(cfg.num_hidden_layers)
    intermediate = int(getattr(cfg, "intermediate_size", 4 * hidden) or 4 * hidden)
    return layers * (4 * hidden * hidden + 3 * hidden * intermediate)


#: models whose size could not be read (not downloaded, no hub): not asked again
_UNKNOWN_MODELS: set[str] = set()


def training_seconds(config: dict[str, Any], measured_step_seconds: float | None = None) -> float | None:
    steps = config.get("train_steps", -1)
    if steps == 0:
        return 0.0   # an untrained recipe: evaluation only
    if steps is None or steps < 1:
        return None
    if measured_step_seconds is not None:
        return steps * measured_step_seconds
    model = str(config["model_path"])
    if model in _UNKNOWN_MODELS:
        return None
    try:
        params = non_embedding_parameters(model)
    except Exception:  # noqa: BLE001 - an estimate must never stop a dry run (the model may need the hub)
        _UNKNOWN_MODELS.add(model)   # asked once per dry run: a hub that cannot be reached retries for a minute
        return None
    query = config.get("query_max_length") or config["max_seq_length"]
    passage = config.get("passage_max_length") or config["max_seq_length"]
    negatives = config.get("num_hard_neg", 0)
    tokens = config["train_batch_size"] * (query + passage * (1 + negatives))
    factor = 4 if config.get("lora_enabled") else 6
    return steps * factor * params * tokens / matmul_flops_per_second(_matmul_dtype(config.get("precision", "auto")))


def _matmul_dtype(setting: str) -> str:
    """The matmul dtype the cell trains in: bf16 autocast where its precision resolves to bf16 / fp16."""
    import torch

    from llm2emb.errors import UserError
    from llm2emb.model.precision import resolve_precision

    try:
        name = resolve_precision(setting, "cuda" if torch.cuda.is_available() else "cpu").name
    except UserError:
        return "float32"
    return {"bf16": "bfloat16", "fp16": "float16"}.get(name, "float32")


def wall_seconds(cell_seconds: list[float], processes: int, max_parallel: int) -> float:
    """The study's training wall time when cells run `max_parallel` at a time in the given order (each taken by
    the first free lane) and each cell's `processes` processes split its steps perfectly (an ideal bound:
    communication and evaluation are not counted)."""
    lanes = [0.0] * max(1, max_parallel)
    for seconds in cell_seconds:
        i = lanes.index(min(lanes))
        lanes[i] += seconds / max(1, processes)
    return max(lanes)
