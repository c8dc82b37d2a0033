"""Hard negatives for generated rows.

| mode        | negatives per row | where they come from                                                     |
|-------------|-------------------|--------------------------------------------------------------------------|
| `none`      | 0                 | in-batch negatives only                                                  |
| `retrieved` | `negatives.num`   | BM25 candidates for the generated query (`bm25s`, the `mining` scorer);  |
|             |                   | with `relabel`, the LLM judges them (Gecko, Lee et al. 2024, "Gecko:     |
|             |                   | Versatile Text Embeddings Distilled from Large Language Models"): it sees |
|             |                   | the source passage among the candidates in a seeded order, names the      |
|             |                   | best one (which becomes the positive with `positive_relabel`) and the     |
|             |                   | relevant ones (never negatives); the rest, hardest first, are negatives   |
| `generated` | 1                 | the reply's own `hard_negative` (e5-mistral, Wang et al. 2024)            |
| `label`     | 1                 | another label of the spec, drawn with a seed (classification)            |

A judge reply that never parses falls back to the unjudged candidates (counted as `judge_failed`); too few
candidates are filled with random corpus passages (counted as `random_fill`). The source passage is never
a negative of its own query.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

import numpy as np

from llm2emb.errors import UserError
from llm2emb.synth.corpus import Corpus
from llm2emb.synth.generators import Generator
from llm2emb.synth.replies import parse_judgement
from llm2emb.synth.retry import cut, generate_with_retries
from llm2emb.synth.spec import SynthSpec


class CandidateRetriever:
    """BM25 over the whole corpus: the candidates a generated query retrieves."""

    def __init__(self, corpus: Corpus) -> None:
        from llm2emb.data.mining import BM25Scorer

        self.scorer = BM25Scorer()
        self.scorer.index(corpus.texts)
        self.size = len(corpus)

    def top(self, queries: Sequence[str], k: int, exclude: Sequence[int]) -> list[list[int]]:
        """The best `k` corpus indices per query, leaving out `exclude[i]` (its own passage)."""
        _, ids, _ = self.scorer.search(list(queries), min(k + 1, self.size), [[0]] * len(queries))
        return [[int(d) for d in row if int(d) != own][:k] for row, own in zip(np.asarray(ids), exclude)]


def check_corpus_size(spec: SynthSpec, corpus: Corpus) -> None:
    if spec.negatives.mode == "retrieved" and len(corpus) < spec.negatives.num + 2:
        raise UserError(f"Corpus {corpus.name} has {len(corpus)} passages, too few for {spec.negatives.num} "
                        "retrieved negatives per row; lower negatives.num or use a larger corpus.")


def _random_fill(corpus: Corpus, chosen: list[int], banned: set[int], num: int, rng: random.Random) -> int:
    filled = 0
    taken = set(chosen) | banned
    while len(chosen) < num:
        d = rng.randrange(len(corpus))
        if d not in taken:
            chosen.append(d)
            taken.add(d)
            filled += 1
    return filled


def assign_negatives(spec: SynthSpec, corpus: Corpus, generator: Generator, records: list[dict[str, Any]],
                     seed: int, chunk: int, retriever: CandidateRetriever | None) -> None:
    """Add `negatives` (corpus ids) or `negative_texts` to every parsed record, in place."""
    mode = spec.negatives.mode
    ok = [r for r in records if r["status"] == "ok"]
    if mode == "none":
        return
    if mode == "generated":
        for r in ok:
            r["negative_texts"] = [r["fields"]["hard_negative"]]
        return
    if mode == "label":
        for r in ok:
            others = [label for label in spec.labels if label != r["fields"]["label"]]
            r["negative_texts"] = [random.Random(f"{seed}\0{r['id']}\0label").choice(others)]
        return
    assert retriever is not None
    neg = spec.negatives
    own = [corpus.by_id[r["id"]] for r in ok]
    candidates = retriever.top([r["fields"]["query"] for r in ok], max(neg.candidates, neg.skip_top + neg.num), own)
    judged: list[tuple[int, list[int]] | None] = [None] * len(ok)
    if neg.relabel and ok:
        assert spec.relabel_template is not None
        shown_lists, prompts = [], []
        for r, o, cands in zip(ok, own, candidates):
            shown = [o, *cands[:neg.candidates]]
            random.Random(f"{seed}\0{r['id']}\0judge").shuffle(shown)  # the source is not always [1]
            listing = "\n\n".join(f"[{i}] {cut(corpus.passages[d].text, neg.relabel_passage_chars)}"
                                  for i, d in enumerate(shown, start=1))
            shown_lists.append(shown)
            prompts.append(spec.relabel_template.render({**r["placeholders"], "query": r["fields"]["query"],
                                                         "candidates": listing, "num_candidates": str(len(shown))}))
        outcomes = generate_with_retries(generator, prompts,
                                         lambda i, text: parse_judgement(text, len(shown_lists[i])),
                                         spec, (seed, chunk, "judge"))
        for i, (r, shown, out) in enumerate(zip(ok, shown_lists, outcomes)):
            r["judge"] = {"status": "ok" if out.parsed is not None else "failed", "attempts": out.attempts,
                          "reasons": out.reasons, "shown": [corpus.passages[d].id for d in shown]}
            if out.parsed is not None:
                best, relevant = out.parsed
                judged[i] = (shown[best - 1], [shown[j - 1] for j in relevant])
                r["judge"].update(best=corpus.passages[shown[best - 1]].id,
                                  relevant=[corpus.passages[shown[j - 1]].id for j in relevant])
            else:
                r["judge"]["reply"] = out.reply[:500]
    for i, (r, o, cands) in enumerate(zip(ok, own, candidates)):
        if judged[i] is not None:
            best, relevant = judged[i]
            positive = best if neg.positive_relabel else o
            banned = {o, positive, best, *relevant}
            chosen = [d for d in cands if d not in banned][:neg.num]
        else:
            positive = o
            banned = {o}
            chosen = [d for d in cands[neg.skip_top:]][:neg.num]
        filled = _random_fill(corpus, chosen, banned, neg.num, random.Random(f"{seed}\0{r['id']}\0fill"))
        r["positive"] = corpus.passages[positive].id
        r["negatives"] = [corpus.passages[d].id for d in chosen]
        r["random_fill"] = filled
