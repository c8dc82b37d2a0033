"""Corpora to generate from: passages with ids, read from files, BEIR folders or built-in sources.

| --corpus                     | passages                                                              |
|------------------------------|-----------------------------------------------------------------------|
| a BEIR folder                | corpus.jsonl rows (`title` + `text`, as evaluation joins them)         |
| .jsonl / .json               | one record per passage; text field `text`, `passage`, `content`, ...   |
| .parquet / .csv / .tsv       | one row per passage; the same column names                             |
| .txt                         | one passage per non-empty line                                         |
| builtin:stdlib-undocumented  | standard-library functions WITHOUT a docstring, training packages only |

Ids come from `_id` / `id` (else the line or row number). Rows with empty text are skipped and counted; a
source with no text at all is a UserError. Repeated texts are kept once. Built-in sources are a registry.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from llm2emb.errors import UserError, did_you_mean

logger = logging.getLogger(__name__)

TEXT_FIELDS = ("text", "passage", "content", "contents", "document", "body", "code")
ID_FIELDS = ("_id", "id", "doc_id", "docid")
BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class Passage:
    id: str
    text: str


@dataclass
class Corpus:
    name: str
    passages: list[Passage]
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.by_id = {p.id: i for i, p in enumerate(self.passages)}

    def __len__(self) -> int:
        return len(self.passages)

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.passages]

    def fingerprint(self) -> str:
        """SHA-256 over ids and texts in order: a different corpus is a different run."""
        digest = hashlib.sha256()
        for p in self.passages:
            digest.update(p.id.encode("utf-8") + b"\0" + p.text.encode("utf-8") + b"\0")
        return digest.hexdigest()


BUILTIN_CORPORA: dict[str, tuple[Callable[[], list[Passage]], str]] = {}


def register_builtin_corpus(name: str, description: str):
    def wrap(factory: Callable[[], list[Passage]]) -> Callable[[], list[Passage]]:
        BUILTIN_CORPORA[name] = (factory, description)
        return factory
    return wrap


@register_builtin_corpus("stdlib-undocumented", "standard-library functions without a docstring, from the "
                         "training packages of the built-in code-search task (held-out packages never)")
def _stdlib_undocumented() -> list[Passage]:
    from llm2emb.data.builtin import undocumented_training_functions

    passages: list[Passage] = []
    seen: dict[str, int] = {}
    for f in undocumented_training_functions():
        # a property's getter and setter share a qualified name: number the later ones
        seen[f.id] = seen.get(f.id, 0) + 1
        passages.append(Passage(f.id if seen[f.id] == 1 else f"{f.id}#{seen[f.id]}", f.passage))
    return passages


def _pick(names: list[str], wanted: str | None, candidates: tuple[str, ...], source: str, what: str,
          required: bool) -> str | None:
    if wanted is not None:
        if wanted not in names:
            raise UserError(f"{source} has no {what} field {wanted!r} (fields: {', '.join(names) or 'none'})."
                            f"{did_you_mean(wanted, names)}")
        return wanted
    found = next((c for c in candidates if c in names), None)
    if found is None and required:
        raise UserError(f"{source} has no text: none of its fields ({', '.join(names) or 'none'}) is one of "
                        f"{', '.join(candidates)}; name the text field with --text-field.")
    return found


def _records(path: Path) -> list[dict]:
    from llm2emb.data.formats import read_table

    return read_table(path).to_dict(orient="records")


def _from_records(records: list[dict], source: str, text_field: str | None, id_field: str | None,
                  ) -> tuple[list[Passage], int]:
    names = sorted({str(k) for r in records for k in r})
    text_key = _pick(names, text_field, TEXT_FIELDS, source, "text", required=True)
    id_key = _pick(names, id_field, ID_FIELDS, source, "id", required=False)
    passages, empty = [], 0
    for i, rec in enumerate(records, start=1):
        text = rec.get(text_key)
        if text is None or (isinstance(text, float) and text != text):
            empty += 1
            continue
        if not isinstance(text, str):
            raise UserError(f"{source}, row {i}: field {text_key!r} holds a {type(text).__name__} "
                            f"({str(text)[:40]!r}); every text must be a string.")
        title = rec.get("title")
        if isinstance(title, str) and title.strip() and text_key == "text":
            from llm2emb.eval.data import document_text
            text = document_text(title, text)
        if not text.strip():
            empty += 1
            continue
        raw_id = rec.get(id_key) if id_key else None
        passages.append(Passage(str(raw_id) if raw_id is not None else f"row-{i}", text))
    return passages, empty


def load_corpus(ref: str, text_field: str | None = None, id_field: str | None = None) -> Corpus:
    """The passages of `ref` (see the module docstring), in source order, texts unique."""
    if ref.startswith(BUILTIN_PREFIX):
        name = ref[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_CORPORA:
            raise UserError(f"Unknown built-in corpus {ref!r}; use one of: "
                            f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_CORPORA)}.{did_you_mean(name, BUILTIN_CORPORA)}")
        passages, empty, source = BUILTIN_CORPORA[name][0](), 0, ref
    else:
        path = Path(ref).expanduser()
        source = str(path)
        if path.is_dir():
            if not (path / "corpus.jsonl").is_file():
                raise UserError(f"Corpus folder {path} has no corpus.jsonl; pass a BEIR folder or a .jsonl, "
                                ".parquet, .csv, .tsv or .txt file.")
            path = path / "corpus.jsonl"
            source = str(path)
        if not path.is_file():
            raise UserError(f"Corpus {path} does not exist; pass a file, a BEIR folder or one of "
                            f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_CORPORA)}.")
        text = None
        if path.suffix in (".txt", ".jsonl", ".json", ".csv", ".tsv"):
            from llm2emb.structured import read_text_utf8

            try:
                text = read_text_utf8(path, "corpus")     # not UTF-8: the line and the fix (iconv)
            except OSError as exc:
                raise UserError(f"Cannot read {path} ({exc}).") from exc
            if not text.strip():
                raise UserError(f"Corpus {path} is empty; give it passages to generate from (one per line in a "
                                ".txt file, or rows with a text field).")
        if path.suffix == ".txt":
            lines = (text or "").splitlines()
            passages = [Passage(f"line-{i}", line.strip()) for i, line in enumerate(lines, start=1) if line.strip()]
            empty = len(lines) - len(passages)
        elif path.suffix in (".jsonl", ".json", ".parquet", ".csv", ".tsv"):
            records = _records(path)
            if not records:
                raise UserError(f"Corpus {path} has no rows; give it passages to generate from.")
            passages, empty = _from_records(records, source, text_field, id_field)
        else:
            raise UserError(f"Corpus {path}: unsupported file type {path.suffix!r}; use .jsonl, .json, .parquet, "
                            ".csv, .tsv or .txt, or a BEIR folder.")
    if not passages:
        raise UserError(f"Corpus {source} has no text: {empty} rows, all empty; give it passages to generate from.")
    seen_ids: dict[str, int] = {}
    seen_texts: set[str] = set()
    unique: list[Passage] = []
    for i, p in enumerate(passages, start=1):
        if p.id in seen_ids:
            raise UserError(f"Corpus {source}: id {p.id!r} occurs twice (rows {seen_ids[p.id]} and {i}); ids "
                            "must be unique.")
        seen_ids[p.id] = i
        if p.text not in seen_texts:
            seen_texts.add(p.text)
            unique.append(p)
    notes = []
    if empty:
        notes.append(f"{empty} rows without text skipped")
    if len(unique) < len(passages):
        notes.append(f"{len(passages) - len(unique)} repeated texts kept once")
    for note in notes:
        logger.info("corpus %s: %s", source, note)
    return Corpus(source, unique, notes)
