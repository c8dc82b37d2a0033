"""Filters over generated rows, in a registry; each drop is counted with its reason.

| filter          | drops a row when                                                                  |
|-----------------|-----------------------------------------------------------------------------------|
| `length`        | its query has fewer than min / more than max words (or max characters), or equals  |
|                 | its passage                                                                       |
| `dedup`         | its query repeats an earlier kept query, exactly or with word-set Jaccard >= t     |
| `contamination` | any of its texts shares a word n-gram with an evaluation set (`contamination`)    |
| `consistency`   | its query does not retrieve its positive within the top k of the whole corpus     |
|                 | (round-trip filtering, PROMPTAGATOR / Gecko): BM25, or an embedder                |

They run in that order (cheap ones first); a row dropped by one is not seen by the next. Classification
rows (a corpus text and a label) are passed by the filters about generated queries.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from llm2emb.errors import UserError, did_you_mean
from llm2emb.synth.contamination import NgramIndex, words
from llm2emb.synth.corpus import Corpus
from llm2emb.synth.spec import FilterSettings

logger = logging.getLogger(__name__)


@dataclass
class SynthRow:
    passage_id: str       # the corpus passage the row was generated from
    positive_id: str      # the row's positive (differs after Gecko relabelling); "" when not a corpus text
    query: str
    passage: str
    negatives: list[str]
    generated_query: bool  # the query is model text (False for classification: query = corpus text)


@dataclass
class FilterContext:
    corpus: Corpus
    settings: FilterSettings
    instruction: str = ""                 # the query instruction (an embedding scorer encodes with it)
    contamination: NgramIndex | None = None  # built before generation, so a bad source fails early
    scorer_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Filter:
    name: str
    run: Callable[[Sequence[SynthRow], FilterContext], list[str | None]]  # per row: drop reason or None
    description: str


FILTERS: dict[str, Filter] = {}


def register_filter(f: Filter) -> Filter:
    FILTERS[f.name] = f
    return f


def _norm(text: str) -> str:
    return " ".join(words(text))


def _length(rows: Sequence[SynthRow], ctx: FilterContext) -> list[str | None]:
    s = ctx.settings
    out: list[str | None] = []
    for row in rows:
        n = len(row.query.split())
        if not row.generated_query:
            out.append(None)
        elif n < s.min_query_words:
            out.append("query_too_short")
        elif n > s.max_query_words or len(row.query) > s.max_query_chars:
            out.append("query_too_long")
        elif _norm(row.query) == _norm(row.passage):
            out.append("query_copies_passage")
        else:
            out.append(None)
    return out


def _dedup(rows: Sequence[SynthRow], ctx: FilterContext) -> list[str | None]:
    threshold = ctx.settings.dedup_jaccard
    exact: set[str] = set()
    kept_sets: list[frozenset[str]] = []
    by_word: dict[str, list[int]] = {}
    out: list[str | None] = []
    for row in rows:
        if not row.generated_query:
            out.append(None)
            continue
        norm = _norm(row.query)
        if norm in exact:
            out.append("duplicate_query")
            continue
        tokens = frozenset(norm.split())
        near = False
        if threshold < 1 and tokens:
            seen: set[int] = set()
            for w in tokens:  # only earlier queries sharing a word can be near
                for k in by_word.get(w, ()):
                    if k in seen:
                        continue
                    seen.add(k)
                    other = kept_sets[k]
                    if len(tokens & other) / len(tokens | other) >= threshold:
                        near = True
                        break
                if near:
                    break
        if near:
            out.append("near_duplicate_query")
            continue
        exact.add(norm)
        for w in tokens:
            by_word.setdefault(w, []).append(len(kept_sets))
        kept_sets.append(tokens)
        out.append(None)
    return out


def _contamination(rows: Sequence[SynthRow], ctx: FilterContext) -> list[str | None]:
    index = ctx.contamination
    if index is None:
        return [None] * len(rows)
    out: list[str | None] = []
    for row in rows:
        hit = index.match_any([row.query, row.passage, *row.negatives])
        out.append(f"contaminated:{hit}" if hit else None)
    return out


def _consistency(rows: Sequence[SynthRow], ctx: FilterContext) -> list[str | None]:
    from llm2emb.data.mining import build_scorer

    s = ctx.settings
    todo = [i for i, row in enumerate(rows) if row.generated_query and row.positive_id in ctx.corpus.by_id]
    out: list[str | None] = [None] * len(rows)
    if not todo:
        return out
    if s.consistency_scorer == "bm25":
        scorer = build_scorer("bm25")
    else:  # any model Embedder.from_pretrained loads
        scorer = build_scorer("embedding", s.consistency_scorer, **ctx.scorer_options)
    scorer.index(ctx.corpus.texts)
    queries = [rows[i].query for i in todo]
    targets = [[ctx.corpus.by_id[rows[i].positive_id]] for i in todo]
    k = min(s.consistency_top_k, len(ctx.corpus))
    _, ids, _ = scorer.search(queries, k, targets, ctx.instruction)
    for i, top, target in zip(todo, ids, targets):
        if target[0] not in {int(d) for d in top}:
            out[i] = f"not_in_top_{k}"
    return out


register_filter(Filter("length", _length, "query word / character limits; a query equal to its passage"))
register_filter(Filter("dedup", _dedup, "exact and near-duplicate queries (word-set Jaccard)"))
register_filter(Filter("contamination", _contamination, "word n-gram overlap with evaluation sets"))
register_filter(Filter("consistency", _consistency, "the query retrieves its positive in the top k"))


def parse_filter_list(text: str | None) -> list[str]:
    """`--filter length,dedup` -> names in registry order; None -> all; 'none' -> []."""
    if text is None:
        return list(FILTERS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return []
    for name in names:
        if name not in FILTERS:
            raise UserError(f"--filter: unknown filter {name!r}; use any of {', '.join(FILTERS)} (comma-separated) "
                            f"or none.{did_you_mean(name, FILTERS)}")
    return [n for n in FILTERS if n in names]


def apply_filters(rows: list[SynthRow], names: Sequence[str], ctx: FilterContext,
                  ) -> tuple[list[SynthRow], list[tuple[SynthRow, str]], list[dict[str, Any]]]:
    """(kept rows, dropped rows with reasons, one report entry per filter)."""
    kept = list(rows)
    dropped: list[tuple[SynthRow, str]] = []
    report: list[dict[str, Any]] = []
    for name in names:
        reasons = FILTERS[name].run(kept, ctx)
        counts: dict[str, int] = {}
        survivors = []
        for row, reason in zip(kept, reasons):
            if reason is None:
                survivors.append(row)
            else:
                counts[reason] = counts.get(reason, 0) + 1
                dropped.append((row, f"{name}: {reason}"))
        report.append({"filter": name, "input": len(kept), "dropped": len(kept) - len(survivors),
                       "kept": len(survivors), "reasons": dict(sorted(counts.items()))})
        logger.info("filter %s: %d of %d rows dropped", name, len(kept) - len(survivors), len(kept))
        kept = survivors
    return kept, dropped, report
