"""Contamination check: synthetic text must not share word n-grams with evaluation text.

The usual test of training data against benchmarks (GPT-3, Brown et al. 2020, used 13-grams; short
queries call for shorter ones, default 8): texts are lower-cased words (`\\w+`, so code identifiers
count as words); every run of `n` words of an evaluation text (its queries and its documents) is
indexed, and an evaluation text shorter than `n` but at least `min_n` words is indexed whole. A synthetic
text is contaminated when any of its runs of words (length n, or the length of a short indexed text) is
in the index.

Evaluation sources (`--contamination`, repeatable): a BEIR folder, a pair / STS file (.tsv .csv .jsonl),
a table (.parquet .jsonl .csv .tsv: every text column) or `builtin:stdlib-heldout`, the documented
functions of the built-in code-search task's held-out packages (docstrings and code).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Sequence

from llm2emb.errors import UserError

_WORDS = re.compile(r"\w+")
BUILTIN_HELDOUT = "builtin:stdlib-heldout"


def words(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


class NgramIndex:
    def __init__(self, n: int = 8, min_n: int = 4) -> None:
        if n < 1 or min_n < 1:
            raise UserError(f"contamination n-gram sizes must be at least 1, got n={n}, min_n={min_n}.")
        self.n, self.min_n = n, min(min_n, n)
        self.grams: dict[tuple[str, ...], str] = {}   # gram -> the source that indexed it first
        self.short_lengths: set[int] = set()
        self.sources: dict[str, int] = {}

    def add(self, texts: Iterable[str], source: str) -> None:
        count = 0
        for text in texts:
            tokens = words(text)
            if len(tokens) >= self.n:
                for i in range(len(tokens) - self.n + 1):
                    self.grams.setdefault(tuple(tokens[i:i + self.n]), source)
            elif len(tokens) >= self.min_n:
                self.grams.setdefault(tuple(tokens), source)
                self.short_lengths.add(len(tokens))
            count += 1
        self.sources[source] = self.sources.get(source, 0) + count

    def match(self, text: str) -> str | None:
        """The evaluation source `text` overlaps with, or None."""
        tokens = words(text)
        for size in sorted({self.n, *self.short_lengths}):
            for i in range(len(tokens) - size + 1):
                hit = self.grams.get(tuple(tokens[i:i + size]))
                if hit is not None:
                    return hit
        return None

    def match_any(self, texts: Sequence[str]) -> str | None:
        for text in texts:
            hit = self.match(text)
            if hit is not None:
                return hit
        return None


def _table_texts(path: Path) -> list[str]:
    from llm2emb.data.formats import read_table

    frame = read_table(path)
    return [v for column in frame.columns for v in frame[column].tolist() if isinstance(v, str)]


def eval_texts(ref: str) -> tuple[str, list[str]]:
    """(name, texts) of one evaluation source: queries and documents, or both sides of pairs."""
    if ref == BUILTIN_HELDOUT:
        from llm2emb.data.builtin import extract_functions, is_held_out

        held = [f for f in extract_functions() if is_held_out(f.package)]
        return "stdlib-heldout", [t for f in held for t in (f.query, f.passage)]
    if ref.startswith("builtin:"):
        raise UserError(f"Unknown built-in evaluation set {ref!r} for --contamination; use {BUILTIN_HELDOUT} or "
                        "a BEIR folder / pair file.")
    path = Path(ref).expanduser()
    if path.is_dir():
        from llm2emb.eval.data import load_beir

        data = load_beir(path)
        return path.resolve().name, [*data.query_texts, *data.corpus_texts]
    if not path.is_file():
        raise UserError(f"Contamination source {path} does not exist; pass a BEIR folder, a pair file or "
                        f"{BUILTIN_HELDOUT}.")
    if path.suffix.lower() in (".tsv", ".csv", ".txt") or (path.suffix.lower() == ".jsonl" and _is_pair_jsonl(path)):
        from llm2emb.eval.data import load_pairs

        data = load_pairs(path)
        return f"{path.parent.name}/{path.stem}", [*data.texts1, *data.texts2]
    if path.suffix.lower() in (".parquet", ".jsonl", ".json"):
        return path.stem, _table_texts(path)
    raise UserError(f"Contamination source {path}: unsupported file type {path.suffix!r}; use a BEIR folder, a "
                    ".tsv/.csv/.jsonl pair file or a .parquet table.")


def _is_pair_jsonl(path: Path) -> bool:
    import json

    from llm2emb.eval.data import SCORE_COLUMNS

    with open(path, encoding="utf-8") as fh:
        first = fh.readline()
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(row, dict) and any(str(k).lower() in SCORE_COLUMNS for k in row)


def build_index(sources: Sequence[str], n: int, min_n: int) -> NgramIndex:
    index = NgramIndex(n, min_n)
    for ref in sources:
        name, texts = eval_texts(ref)
        if not texts:
            raise UserError(f"Contamination source {ref} holds no text.")
        index.add(texts, name)
    return index
