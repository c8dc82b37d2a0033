"""Semantic textual similarity: Spearman / Pearson of cosine similarity against gold scores (MTEB's STS
scores, `metrics.sts_metrics`), on a local sentence-pair file (`data.load_pairs`).

    from llm2emb.eval.sts import evaluate_sts
    evaluate_sts(embedder, "stsb_en/dev.tsv")["cosine_spearman"]

`run_sts` also returns the per-pair cosine and gold score (file order), for paired statistics over pairs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from llm2emb.errors import UserError
from llm2emb.eval.data import PairData, load_pairs
from llm2emb.eval.encoders import as_encoder
from llm2emb.eval.metrics import sts_scores

MAIN_SCORE = "cosine_spearman"


@dataclass
class PairRun:
    """Metrics of one pair-file evaluation and its per-pair values, in file order after `load_pairs`'s
    filtering: {"cosine": [...], "gold": [...]} for STS, {"cosine": [...], "label": [...]} for pairs."""

    metrics: dict[str, float]
    per_item: dict[str, list[Any]] = field(default_factory=dict)
    #: the main metric when it is not the task kind's (multi_vector / sparse / hybrid models)
    main_score: str | None = None


def encode_pairs(encoder, texts1: Sequence[str], texts2: Sequence[str], instruction: str | None = None,
                 batch_size: int = 32, max_length: int | None = None, show_progress: bool = True
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Embed both sides, each distinct text once (pair sets repeat sentences), in one length-sorted pass."""
    unique = list(dict.fromkeys([*texts1, *texts2]))
    row = {text: i for i, text in enumerate(unique)}
    vectors = encoder.encode(unique, instruction=instruction, batch_size=batch_size, max_length=max_length,
                             show_progress=show_progress)
    return vectors[[row[t] for t in texts1]], vectors[[row[t] for t in texts2]]


def run_sts(embedder, path: str | os.PathLike[str] | PairData, instruction: str | None = None,
            batch_size: int = 32, max_length: int | None = None, dim: int | None = None,
            show_progress: bool = True) -> PairRun:
    """`evaluate_sts`'s metrics plus each pair's cosine similarity and gold score (`PairRun`)."""
    encoder = as_encoder(embedder, dim=dim)
    data = path if isinstance(path, PairData) else load_pairs(path)
    if len(data.scores) < 2 or np.ptp(data.scores) == 0:
        raise UserError(f"{data.path} needs at least two pairs with different scores to compute a correlation.")
    if getattr(encoder, "representation", "dense") != "dense":  # multi_vector / sparse / hybrid: own similarity
        from llm2emb.eval.representations import pair_similarity, sts_similarity_metrics

        similarity = pair_similarity(encoder, data.texts1, data.texts2, instruction=instruction, batch_size=batch_size,
                                     max_length=max_length, show_progress=show_progress)
        # per_item "cosine": the model's own pair score, under the key paired statistics read
        return PairRun(sts_similarity_metrics(similarity, data.scores), {
            "cosine": similarity.tolist(), "gold": np.asarray(data.scores, dtype=np.float64).tolist()},
            main_score="similarity_spearman")
    emb1, emb2 = encode_pairs(encoder, data.texts1, data.texts2, instruction, batch_size, max_length, show_progress)
    metrics, cosine = sts_scores(emb1, emb2, data.scores)
    return PairRun(metrics, {"cosine": cosine.tolist(), "gold": np.asarray(data.scores, dtype=np.float64).tolist()})


def evaluate_sts(embedder, path: str | os.PathLike[str] | PairData, instruction: str | None = None,
                 batch_size: int = 32, max_length: int | None = None, dim: int | None = None,
                 show_progress: bool = True) -> dict[str, float]:
    """STS metrics (`cosine_spearman` is the main score) of `embedder` on a sentence1/sentence2/score file.

    `instruction` (default none) is prepended to both sentences of every pair."""
    return run_sts(embedder, path, instruction, batch_size, max_length, dim, show_progress).metrics
