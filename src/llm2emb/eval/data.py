"""Readers for local evaluation data, with one clear error sentence per kind of bad input.

* BEIR retrieval folder: `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl` (`_id`, `text`, optional
  `metadata.self_doc_id`: a corpus doc identical to the query, dropped from that query's ranking as BEIR's
  `ignore_identical_ids` does) and `qrels/<split>.tsv` (`query-id corpus-id score`, header optional).
* Sentence-pair file (STS or pair classification): `.tsv`/`.txt` (tab), `.csv` (comma, BOM allowed) or
  `.jsonl`; two texts and a score or 0/1 label per row, header optional.
* `sample_queries`: the seed's `--limits N` (N queries drawn deterministically with a seed; corpus kept).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from llm2emb.errors import UserError

logger = logging.getLogger(__name__)

CORPUS_FILE = "corpus.jsonl"
QUERIES_FILE = "queries.jsonl"
QRELS_DIR = "qrels"
#: split picked when the caller names none, in this order
DEFAULT_SPLITS: tuple[str, ...] = ("test", "dev", "validation", "val")


@dataclass
class RetrievalData:
    """A BEIR-layout retrieval set. Corpus texts are MTEB's document texts: `title + " " + text`, stripped."""

    path: Path
    split: str
    corpus_ids: list[str]
    corpus_texts: list[str]
    corpus_titles: list[str]
    corpus_bodies: list[str]
    query_ids: list[str]
    query_texts: list[str]
    self_doc_ids: dict[str, str] = field(default_factory=dict)   # query id -> corpus id to ignore
    qrels: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    def evaluable_query_ids(self) -> list[str]:
        """Queries (file order) with at least one qrels row, the ones MTEB evaluates."""
        return [q for q in self.query_ids if self.qrels.get(q)]

    def corpus_digest(self) -> str:
        """Content hash of the corpus as encoded (ids and texts), for the embedding cache key."""
        return texts_digest(self.corpus_texts, self.corpus_ids)


def texts_digest(texts: Sequence[str], ids: Sequence[str] | None = None) -> str:
    digest = hashlib.sha256()
    for i, text in enumerate(texts):
        if ids is not None:
            digest.update(ids[i].encode("utf-8", "surrogatepass"))
        digest.update(b"\x1f")
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\x1e")
    return digest.hexdigest()


def document_text(title: str | None, text: str) -> str:
    """The text a model reads for a corpus entry, exactly as mteb's `_corpus_to_dict` builds it."""
    return (title + " " + text).strip() if title else text.strip()


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8-sig") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} line {line_no} is not valid JSON ({exc.msg}); "
                                "fix or remove that line.") from exc
            if not isinstance(row, dict):
                raise UserError(f"{path} line {line_no} is not a JSON object; each line must be one object.")
            yield line_no, row


def _field_text(path: Path, line_no: int, row: dict, key: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise UserError(f"{path} line {line_no} has no {key!r} field; every row needs one.")
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key == "_id":
        return str(value)
    if not isinstance(value, str):
        raise UserError(f"{path} line {line_no}: field {key!r} must be a string, got {type(value).__name__}.")
    return value


def _pick_split(qrels_dir: Path, split: str | None) -> Path:
    available = sorted(p.stem for p in qrels_dir.glob("*.tsv"))
    if not available:
        raise UserError(f"{qrels_dir} holds no <split>.tsv file; add e.g. qrels/test.tsv "
                        "(columns query-id, corpus-id, score).")
    if split is not None:
        if split not in available:
            raise UserError(f"Split {split!r} not found in {qrels_dir}; available: {', '.join(available)}.")
        return qrels_dir / f"{split}.tsv"
    for name in DEFAULT_SPLITS:
        if name in available:
            return qrels_dir / f"{name}.tsv"
    if len(available) == 1:
        return qrels_dir / f"{available[0]}.tsv"
    raise UserError(f"{qrels_dir} has several splits ({', '.join(available)}) and none is 'test' or 'dev'; "
                    "pick one with --split.")


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8-sig", newline="") as fh:
        for line_no, line in enumerate(fh, start=1):
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) == 1 and not parts[0].strip():
                continue
            if len(parts) == 4:  # TREC layout: query-id, iteration, corpus-id, score
                parts = [parts[0], parts[2], parts[3]]
            if len(parts) != 3:
                raise UserError(f"{path} line {line_no} has {len(parts)} tab-separated fields; expected 3 "
                                "(query-id, corpus-id, score).")
            qid, did, score = (p.strip() for p in parts)
            try:
                grade = int(float(score))
            except ValueError:
                if line_no == 1:  # header
                    continue
                raise UserError(f"{path} line {line_no}: score {score!r} is not a number.") from None
            qrels.setdefault(qid, {})[did] = grade
    return qrels


def load_beir(path: str | Path, split: str | None = None) -> RetrievalData:
    """Read a BEIR folder; checks that files exist, ids are unique and the qrels match queries and corpus."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"Retrieval task folder {folder} does not exist.")
    missing = [name for name in (CORPUS_FILE, QUERIES_FILE, QRELS_DIR) if not (folder / name).exists()]
    if missing:
        raise UserError(f"Retrieval task folder {folder} is missing {', '.join(missing)}; a BEIR folder needs "
                        f"{CORPUS_FILE}, {QUERIES_FILE} and {QRELS_DIR}/<split>.tsv.")
    qrels_path = _pick_split(folder / QRELS_DIR, split)

    corpus_ids: list[str] = []
    titles: list[str] = []
    bodies: list[str] = []
    seen: dict[str, int] = {}
    corpus_path = folder / CORPUS_FILE
    for line_no, row in _read_jsonl(corpus_path):
        doc_id = _field_text(corpus_path, line_no, row, "_id")
        if doc_id in seen:
            raise UserError(f"{corpus_path} line {line_no} repeats _id {doc_id!r} (first at line {seen[doc_id]}); "
                            "corpus ids must be unique.")
        seen[doc_id] = line_no
        corpus_ids.append(doc_id)
        titles.append(_field_text(corpus_path, line_no, row, "title", required=False))
        bodies.append(_field_text(corpus_path, line_no, row, "text"))
    if not corpus_ids:
        raise UserError(f"{corpus_path} is empty; a retrieval task needs at least one document.")

    query_ids: list[str] = []
    query_texts: list[str] = []
    self_docs: dict[str, str] = {}
    seen = {}
    queries_path = folder / QUERIES_FILE
    for line_no, row in _read_jsonl(queries_path):
        qid = _field_text(queries_path, line_no, row, "_id")
        if qid in seen:
            raise UserError(f"{queries_path} line {line_no} repeats _id {qid!r} (first at line {seen[qid]}); "
                            "query ids must be unique.")
        seen[qid] = line_no
        query_ids.append(qid)
        query_texts.append(_field_text(queries_path, line_no, row, "text"))
        metadata = row.get("metadata") or {}
        if isinstance(metadata, dict) and metadata.get("self_doc_id") is not None:
            self_docs[qid] = str(metadata["self_doc_id"])
    if not query_ids:
        raise UserError(f"{queries_path} is empty; a retrieval task needs at least one query.")

    qrels = _read_qrels(qrels_path)
    corpus_set, query_set = set(corpus_ids), set(query_ids)
    rows = sum(len(docs) for docs in qrels.values())
    unknown_q = sum(len(docs) for q, docs in qrels.items() if q not in query_set)
    unknown_d = sum(1 for q, docs in qrels.items() for d in docs if d not in corpus_set)
    matched = sum(1 for q, docs in qrels.items() if q in query_set for d in docs if d in corpus_set)
    if rows == 0:
        raise UserError(f"{qrels_path} has no judgement rows; add lines 'query-id<TAB>corpus-id<TAB>score'.")
    if matched == 0:
        raise UserError(f"None of the {rows} qrels rows in {qrels_path} match both a query and a document: "
                        f"{unknown_q} name a query id not in {QUERIES_FILE} and {unknown_d} a corpus id not in "
                        f"{CORPUS_FILE}; check that the ids are the same strings.")
    if unknown_q or unknown_d:
        logger.warning("%s: %d of %d qrels rows name a query id not in %s and %d a corpus id not in %s; "
                       "they are kept as MTEB keeps them (unknown documents count as relevant but unretrievable)",
                       qrels_path, unknown_q, rows, QUERIES_FILE, unknown_d, CORPUS_FILE)
    unknown_self = [q for q, d in self_docs.items() if d not in corpus_set]
    if unknown_self:
        logger.warning("%s: %d queries name a metadata.self_doc_id that is not in %s", queries_path,
                       len(unknown_self), CORPUS_FILE)
    return RetrievalData(path=folder, split=qrels_path.stem, corpus_ids=corpus_ids,
                         corpus_texts=[document_text(t, b) for t, b in zip(titles, bodies)], corpus_titles=titles,
                         corpus_bodies=bodies, query_ids=query_ids, query_texts=query_texts,
                         self_doc_ids=self_docs, qrels=qrels)


def check_limits(limits: int | None) -> None:
    if limits is not None and (isinstance(limits, bool) or not isinstance(limits, int) or limits < 1):
        raise UserError(f"limits must be a positive number of queries (or unset for all), got {limits!r}.")


def sample_queries(query_ids: Sequence[str], limits: int | None, seed: int = 42) -> list[str]:
    """The seed's `limits=N`: N of `query_ids` drawn without replacement with `seed`, kept in input order.

    All of them when `limits` is None or not smaller than their number. The same draw is used for local
    folders and MTEB tasks, so both paths score the same queries."""
    check_limits(limits)
    ids = list(query_ids)
    if limits is None or limits >= len(ids):
        return ids
    picked = np.random.default_rng(seed).choice(len(ids), size=limits, replace=False)
    return [ids[i] for i in sorted(int(i) for i in picked)]


# ----------------------------------------------------------------------------- sentence-pair files

TEXT1_COLUMNS = ("sentence1", "sentence_1", "s1", "text_1", "text1", "text_a", "query", "q1", "question1")
TEXT2_COLUMNS = ("sentence2", "sentence_2", "s2", "text_2", "text2", "text_b", "passage", "q2", "question2")
SCORE_COLUMNS = ("score", "label", "labels", "similarity", "similarity_score", "gold", "relevance")


@dataclass
class PairData:
    """Two aligned text lists and a float score per pair (STS 0-5 or 0/1 labels)."""

    path: Path
    texts1: list[str]
    texts2: list[str]
    scores: np.ndarray

    @property
    def name(self) -> str:
        return self.path.stem if self.path.parent.name in ("", ".") else f"{self.path.parent.name}/{self.path.stem}"

    @property
    def is_binary(self) -> bool:
        return bool(len(self.scores)) and bool(np.isin(self.scores, (0.0, 1.0)).all())


def _parse_score(value: str) -> float | None:
    try:
        score = float(value)
    except (TypeError, ValueError):
        return None
    return score if np.isfinite(score) else None


def _column_index(header: list[str], names: Sequence[str]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    return None


def _pair_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for line_no, row in _read_jsonl(path):
            yield line_no, row  # type: ignore[misc]  # dicts, handled by the caller
        return
    delimiter = "," if suffix == ".csv" else "\t"
    quoting = csv.QUOTE_MINIMAL if suffix == ".csv" else csv.QUOTE_NONE
    with open(path, encoding="utf-8-sig", newline="") as fh:
        for line_no, row in enumerate(csv.reader(fh, delimiter=delimiter, quoting=quoting), start=1):
            if row and any(cell.strip() for cell in row):
                yield line_no, row


def load_pairs(path: str | Path) -> PairData:
    """Read a sentence-pair file (see module docstring); columns by header name when there is a header,
    else first two columns are the texts and the last is the score."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"Pair file {file} does not exist.")
    texts1: list[str] = []
    texts2: list[str] = []
    scores: list[float] = []
    columns: tuple[int, int, int] | None = None
    for line_no, row in _pair_rows(file):
        if isinstance(row, dict):
            keys = list(row)
            i1, i2, i3 = (_column_index(keys, names) for names in (TEXT1_COLUMNS, TEXT2_COLUMNS, SCORE_COLUMNS))
            if i1 is None or i2 is None or i3 is None:
                raise UserError(f"{file} line {line_no} needs two text fields and a score field, e.g. "
                                f"'sentence1', 'sentence2', 'score'; found {', '.join(keys)}.")
            row = [row[keys[i1]], row[keys[i2]], row[keys[i3]]]
            row = ["" if v is None else v if isinstance(v, str) else str(v) for v in row]
            cols = (0, 1, 2)
        else:
            if columns is None:
                if len(row) < 3:
                    raise UserError(f"{file} line {line_no} has {len(row)} column(s); a pair file needs two texts "
                                    "and a score per row.")
                if _parse_score(row[-1]) is None:  # a header row
                    i1, i2, i3 = (_column_index(row, names) for names in (TEXT1_COLUMNS, TEXT2_COLUMNS, SCORE_COLUMNS))
                    columns = (0 if i1 is None else i1, 1 if i2 is None else i2, len(row) - 1 if i3 is None else i3)
                    continue
                columns = (0, 1, len(row) - 1)
            cols = columns
            if len(row) <= max(cols):
                raise UserError(f"{file} line {line_no} has {len(row)} column(s), expected at least {max(cols) + 1}.")
        score = _parse_score(row[cols[2]])
        if score is None:
            raise UserError(f"{file} line {line_no}: score {row[cols[2]]!r} is not a number.")
        texts1.append(row[cols[0]])
        texts2.append(row[cols[1]])
        scores.append(score)
    if not scores:
        raise UserError(f"Pair file {file} has no rows.")
    return PairData(path=file, texts1=texts1, texts2=texts2, scores=np.asarray(scores, dtype=np.float64))
