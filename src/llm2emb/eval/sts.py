"""Semantic textual similarity: Spearman / Pearson of cosine similarity against gold scores (MTEB's STS
scores, `metrics.sts_metrics`), on a local sentence-pair file (`data.load_pairs`).

    from llm2emb.eval.sts import evaluate_sts
    evaluate_sts(embedder, "stsb_en/dev.tsv")["cosine_spearman"]
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from llm2emb.errors import UserError
from llm2emb.eval.data import PairData, load_pairs
from llm2emb.eval.encoders import as_encoder
from llm2emb.eval.metrics import sts_metrics

MAIN_SCORE = "cosine_spearman"


def encode_pairs(encoder, texts1: Sequence[str], texts2: Sequence[str], instruction: str | None = None,
                 batch_size: int = 32, max_length: int | None = None, show_progress: bool = True
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Embed both sides, each distinct text once (pair sets repeat sentences), in one length-sorted pass."""
    unique = list(dict.fromkeys([*texts1, *texts2]))
    row = {text: i for i, text in enumerate(unique)}
    vectors = encoder.encode(unique, instruction=instruction, batch_size=batch_size, max_length=max_length,
                             show_progress=show_progress)
    return vectors[[row[t] for t in texts1]], vectors[[row[t] for t in texts2]]


def evaluate_sts(embedder, path: str | os.PathLike[str] | PairData, instruction: str | None = None,
                 batch_size: int = 32, max_length: int | None = None, dim: int | None = None,
                 show_progress: bool = True) -> dict[str, float]:
    """STS metrics (`cosine_spearman` is the main score) of `embedder` on a sentence1/sentence2/score file.

    `instruction` (default none) is prepended to both sentences of every pair."""
    encoder = as_encoder(embedder, dim=dim)
    data = path if isinstance(path, PairData) else load_pairs(path)
    if len(data.scores) < 2 or np.ptp(data.scores) == 0:
        raise UserError(f"{data.path} needs at least two pairs with different scores to compute a correlation.")
    emb1, emb2 = encode_pairs(encoder, data.texts1, data.texts2, instruction, batch_size, max_length, show_progress)
    return sts_metrics(emb1, emb2, data.scores)
