"""Streaming text input and vector output for `llm2emb encode`, with bounded memory.

Input: `.txt` (one text per line, empty lines kept so row i is line i) or `.jsonl` (one JSON object per line,
text in `field`, optional id in `id_field`; blank lines skipped). The file is read twice: a first pass checks
every line (UTF-8, JSON, fields) and counts rows, so bad input fails before any compute with one sentence
naming the line; the second pass streams the texts in chunks.

Output: `.npy` (float32 matrix, row i = input record i, written through a memory map) or `.parquet` (columns
`id` and `vector`, one row group per chunk). Both are written to a temp file beside the target and renamed
into place on success, so an error or Ctrl-C never leaves a half-written file.
"""
from __future__ import annotations

import json
import os
import re
import signal
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from llm2emb.errors import UserError

INPUT_FORMATS = ("txt", "jsonl")
OUTPUT_FORMATS = {".npy": "npy", ".parquet": "parquet", ".pq": "parquet"}
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class InputSpec:
    path: Path
    format: str                      # "txt" | "jsonl"
    field: str = "text"
    id_field: str | None = None


@dataclass(frozen=True)
class InputSummary:
    count: int
    id_kind: str                     # "index" (row number) | "int" | "str"
    empty: int                       # empty texts


def input_format(path: Path, explicit: str | None = None) -> str:
    if explicit:
        return explicit
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".txt", ".text", ""):
        return "txt"
    raise UserError(f"Cannot tell the format of {path} from its extension; name it .txt or .jsonl, "
                    "or pass --format txt|jsonl.")


def output_format(path: Path) -> str:
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"--output {path} must end in .npy (vectors only) or .parquet (id + vector).")
    return fmt


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line without its line break); invalid UTF-8 names the line."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise UserError(f"Cannot read input file {path} ({exc.strerror or exc}).") from exc
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            raw = raw.rstrip(b"\n").rstrip(b"\r")
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path} line {lineno} is not valid UTF-8 (byte {exc.start + 1} of that line); "
                                "re-encode the file as UTF-8.") from None


def _parse_jsonl(spec: InputSpec, lineno: int, line: str) -> tuple[object, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{spec.path} line {lineno} is not valid JSON ({exc.msg} at column {exc.colno}); "
                        "fix or remove that line.") from None
    if not isinstance(record, dict):
        raise UserError(f"{spec.path} line {lineno} is a JSON {type(record).__name__}, not an object with a "
                        f"{spec.field!r} field.")
    if spec.field not in record:
        fields = ", ".join(map(repr, list(record)[:8])) or "none"
        raise UserError(f"{spec.path} line {lineno} has no {spec.field!r} field (it has {fields}); "
                        "name the text field with --field.")
    text = record[spec.field]
    if not isinstance(text, str):
        raise UserError(f"{spec.path} line {lineno}: field {spec.field!r} is a {type(text).__name__}, "
                        "not a string.")
    ident: object = None
    if spec.id_field is not None:
        if spec.id_field not in record:
            raise UserError(f"{spec.path} line {lineno} has no id field {spec.id_field!r}; every line needs "
                            "one when --id-field is given.")
        ident = record[spec.id_field]
        if isinstance(ident, bool) or not isinstance(ident, (int, str)):
            raise UserError(f"{spec.path} line {lineno}: id field {spec.id_field!r} is a "
                            f"{type(ident).__name__}; ids must be strings or integers.")
    return ident, text


#: control characters that are never part of text (tab, line feed, carriage return, and the form feed and
#: vertical tab that source files and old documents hold, are)
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")


def _check_text(spec: InputSpec, lineno: int, text: str) -> None:
    """Refuse a record holding control characters (NUL bytes, ...): such a line is not text (a binary file, a
    broken export), and embedding it would give a vector without a word."""
    bad = _CONTROL.search(text)
    if bad is not None:
        where = f"field {spec.field!r} of line {lineno}" if spec.format == "jsonl" else f"line {lineno}"
        raise UserError(f"{spec.path} {where} is not text: it holds the control character "
                        f"{bad.group()!r} at column {bad.start() + 1}; is it a binary file? Remove or clean that "
                        "line.")


def iter_records(spec: InputSpec) -> Iterator[tuple[object, str]]:
    """(id, text) per record, in file order; the id is the 0-based record number without an id field."""
    index = 0
    for lineno, line in _lines(spec.path):
        if spec.format == "jsonl":
            if not line.strip():
                continue
            ident, text = _parse_jsonl(spec, lineno, line)
        else:
            ident, text = None, line
        _check_text(spec, lineno, text)
        yield (index if ident is None else ident), text
        index += 1


def scan_input(spec: InputSpec) -> InputSummary:
    """Check the whole input (first pass) and count its records."""
    if spec.format not in INPUT_FORMATS:
        raise UserError(f"Unknown input format {spec.format!r}; choose txt or jsonl.")
    if spec.id_field is not None and spec.format != "jsonl":
        raise UserError("--id-field needs a .jsonl input; a .txt input's ids are its line numbers.")
    if not spec.path.is_file():
        raise UserError(f"Input file {spec.path} does not exist.")
    count = empty = 0
    kinds: set[str] = set()
    for ident, text in iter_records(spec):
        count += 1
        empty += not text
        if spec.id_field is not None:
            kinds.add("int" if isinstance(ident, int) else "str")
    if count == 0:
        raise UserError(f"{spec.path} has no texts to encode.")
    id_kind = "index" if spec.id_field is None else ("int" if kinds == {"int"} else "str")
    return InputSummary(count=count, id_kind=id_kind, empty=empty)


def chunked(records: Iterator[tuple[object, str]], size: int) -> Iterator[list[tuple[object, str]]]:
    while True:
        chunk = list(islice(records, size))
        if not chunk:
            return
        yield chunk


# ---------------------------------------------------------------------------------------------- writers
class VectorWriter:
    """Writes rows in order to a temp file; `commit` renames it onto the target, `abort` deletes it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        self.tmp = Path(tmp)
        self.rows = 0

    @contextmanager
    def _cleanup_on_error(self) -> Iterator[None]:
        """For subclass constructors: the caller gets no writer to abort if the constructor fails."""
        try:
            yield
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise

    def write(self, ids: Sequence[object], vectors: np.ndarray) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        self._close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self._close()
        except Exception:  # noqa: BLE001 - cleaning up after another error
            pass
        self.tmp.unlink(missing_ok=True)


class NpyWriter(VectorWriter):
    """float32 (count, dim) matrix through a memory map: memory stays bounded for any count."""

    array = None

    def __init__(self, path: Path, count: int, dim: int) -> None:
        super().__init__(path)
        with self._cleanup_on_error():
            self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float32, shape=(count, dim))

    def write(self, ids: Sequence[object], vectors: np.ndarray) -> None:
        self.array[self.rows:self.rows + len(vectors)] = vectors
        self.rows += len(vectors)

    def _close(self) -> None:
        if self.array is not None:
            self.array.flush()
            del self.array
            self.array = None


class ParquetWriter(VectorWriter):
    """Columns `id` (int64 or string) and `vector` (fixed-size list of float32); a row group per chunk."""

    writer = None

    def __init__(self, path: Path, dim: int, id_kind: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        super().__init__(path)
        self.pa = pa
        self.dim = dim
        self.id_type = pa.string() if id_kind == "str" else pa.int64()
        self.schema = pa.schema([("id", self.id_type), ("vector", pa.list_(pa.float32(), dim))])
        with self._cleanup_on_error():
            self.writer = pq.ParquetWriter(str(self.tmp), self.schema)

    def write(self, ids: Sequence[object], vectors: np.ndarray) -> None:
        pa = self.pa
        if self.id_type == pa.string():
            ids = [str(i) for i in ids]
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
        table = pa.Table.from_arrays([pa.array(ids, type=self.id_type),
                                      pa.FixedSizeListArray.from_arrays(flat, self.dim)], schema=self.schema)
        self.writer.write_table(table)
        self.rows += len(vectors)

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def open_writer(path: Path, count: int, dim: int, id_kind: str) -> VectorWriter:
    if output_format(path) == "npy":
        return NpyWriter(path, count, dim)
    return ParquetWriter(path, dim, id_kind)


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM (`kill`, a scheduler's time limit) into SystemExit while the block runs, so the cleanup
    that removes temp files runs too; Python's default would end the process on the spot."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
