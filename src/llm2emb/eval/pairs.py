"""Pair classification (duplicate / paraphrase detection, 0/1 labels): MTEB's best-threshold accuracy and
F1 and average precision per scoring function, main score `max_ap` (`metrics.pair_metrics`), plus C-MTEB's
Spearman of cosine vs label, on a local sentence-pair file (`data.load_pairs`).

    from llm2emb.eval.pairs import evaluate_pairs
    evaluate_pairs(embedder, "pairs_zh/lcqmc_dev.tsv")["max_ap"]

`run_pairs` also returns the per-pair cosine and label (file order), for paired statistics over pairs.
"""
from __future__ import annotations

import os

import numpy as np

from llm2emb.errors import UserError
from llm2emb.eval.data import PairData, load_pairs
from llm2emb.eval.encoders import as_encoder
from llm2emb.eval.metrics import pair_scores
from llm2emb.eval.sts import PairRun, encode_pairs

MAIN_SCORE = "max_ap"


def run_pairs(embedder, path: str | os.PathLike[str] | PairData, instruction: str | None = None,
              batch_size: int = 32, max_length: int | None = None, dim: int | None = None,
              show_progress: bool = True) -> PairRun:
    """`evaluate_pairs`'s metrics plus each pair's cosine similarity and 0/1 label (`sts.PairRun`)."""
    encoder = as_encoder(embedder, dim=dim)
    data = path if isinstance(path, PairData) else load_pairs(path)
    if not data.is_binary:
        bad = next(s for s in data.scores if s not in (0.0, 1.0))
        raise UserError(f"{data.path} has label {bad:g}; pair classification needs 0/1 labels "
                        "(use an STS task for graded scores).")
    if len(np.unique(data.scores)) < 2:
        raise UserError(f"{data.path} has only label {int(data.scores[0])}; pair classification needs both 0 and 1.")
    labels = data.scores.astype(np.int64)
    if getattr(encoder, "representation", "dense") != "dense":  # multi_vector / sparse / hybrid: own similarity
        from llm2emb.eval.representations import pair_similarity, pair_similarity_metrics

        similarity = pair_similarity(encoder, data.texts1, data.texts2, instruction=instruction, batch_size=batch_size,
                                     max_length=max_length, show_progress=show_progress)
        return PairRun(pair_similarity_metrics(similarity, labels), {"cosine": similarity.tolist(),
                                                                     "label": labels.tolist()})
    emb1, emb2 = encode_pairs(encoder, data.texts1, data.texts2, instruction, batch_size, max_length, show_progress)
    metrics, cosine = pair_scores(emb1, emb2, labels)
    return PairRun(metrics, {"cosine": cosine.tolist(), "label": labels.tolist()})


def evaluate_pairs(embedder, path: str | os.PathLike[str] | PairData, instruction: str | None = None,
                   batch_size: int = 32, max_length: int | None = None, dim: int | None = None,
                   show_progress: bool = True) -> dict[str, float]:
    """Pair-classification metrics (`max_ap` is the main score) of `embedder` on a text1/text2/label file."""
    return run_pairs(embedder, path, instruction, batch_size, max_length, dim, show_progress).metrics
