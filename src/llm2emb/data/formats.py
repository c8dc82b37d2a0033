"""Raw training data in several layouts, converted to one: the F2LLM raw layout.

Canonical layout (what `llm2emb prepare` tokenises and `llm2emb mine` writes): one table per dataset with
string columns `query`, `passage`, `negative_1` .. `negative_k` (k may be 0: pairs, in-batch negatives only).

Accepted inputs, one dataset per file (or per folder of parquet shards, as the F2LLM hub download has):

| format | columns | files |
|---|---|---|
| `f2llm` | `query`, `passage`, `negative_1..k` | .parquet .jsonl .json .csv .tsv |
| `bge` | `query`, `pos` (list), `neg` (list), optional `prompt`, `type` (FlagEmbedding fine-tune jsonl) | .jsonl .json .parquet |
| `sentence-transformers` | `anchor`, `positive`, optional `negative` or `negative_1..k` | .parquet .jsonl .json .csv .tsv |

The format is detected from the columns; `format=` forces one. A BGE row with several positives becomes one
row per positive. BGE rows with fewer negatives than the longest list in the file get theirs repeated
cyclically (FlagEmbedding samples with repetition in that case too), so every row has k negatives.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pandas as pd

from llm2emb.atomic import atomic_path, write_json_atomic
from llm2emb.data.manifest import DatasetSpec
from llm2emb.errors import UserError, did_you_mean

logger = logging.getLogger(__name__)

TEXT_COLUMNS = ("query", "passage")
NEGATIVE_RE = re.compile(r"^negative_(\d+)$")
# Files in a data folder that are metadata, never datasets.
METADATA_FILES = frozenset({"manifest.json", "data_stats.json", "prepare_info.json", "mine_info.json"})
TABLE_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".tsv")
DEFAULT_PROMPT_TEMPLATE = "Instruct: {prompt}\nQuery: "


@dataclass
class RawDataset:
    """One dataset in the canonical layout."""

    name: str
    source: Path
    format: str
    frame: pd.DataFrame                      # query, passage, negative_1..k: all non-null strings
    defaults: DatasetSpec | None = None      # type / instruction the file itself carries (BGE type, prompt)
    notes: list[str] = field(default_factory=list)  # conversions worth telling the user about

    @property
    def num_negatives(self) -> int:
        return len(negative_columns(self.frame.columns, str(self.source)))

    @property
    def text_columns(self) -> list[str]:
        return ["query", "passage", *negative_columns(self.frame.columns, str(self.source))]


@dataclass(frozen=True)
class DatasetFile:
    """A dataset found in an input folder: a file, or a folder of parquet shards."""

    name: str
    path: Path


# ----------------------------------------------------------------------------------------------- reading

def _read_json_records(path: Path) -> list[dict]:
    """JSON lines (or one JSON array); errors name the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"Cannot read {path} ({exc}).") from exc
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}).") from exc
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}, line {lineno}: not valid JSON ({exc.msg}); "
                                "expected one JSON object per line.") from exc
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise UserError(f"{path}, record {i + 1}: expected a JSON object, got {type(rec).__name__}.")
    return records


def check_readable(files: list["DatasetFile"]) -> None:
    """Read the footer of every parquet input (a few KiB each), so that a truncated file is named before any
    output is written rather than after the datasets before it were processed."""
    import pyarrow.parquet as pq

    for file in files:
        shards = sorted(file.path.glob("*.parquet")) if file.path.is_dir() else \
            [file.path] if file.path.suffix == ".parquet" else []
        for shard in shards:
            try:
                pq.read_metadata(shard)
            except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a cut or foreign file
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise UserError(f"Cannot read {shard} ({type(exc).__name__}: {first}): it is not a complete parquet "
                                "file (an interrupted copy or download?); copy or write it again.") from None


def check_raw_input(path: str | Path, where: str, manifest: bool = True) -> None:
    """Check a raw-data input (a folder or a dataset file) as `prepare` will read it, without reading its rows:
    datasets are found, parquet files are complete, and (with `manifest`) the manifest.json beside them parses
    and names only datasets that exist. Studies and pipelines run it when their file is read, so that a bad
    input is refused before anything is computed. Errors start with `where`."""
    from llm2emb.data.manifest import MANIFEST_NAME, read_manifest, resolve_manifest

    root = Path(path)
    try:
        files = list_datasets(root)
        check_readable(files)
        if manifest:
            manifest_dir = root if root.is_dir() else root.parent
            resolve_manifest(read_manifest(manifest_dir), [f.name for f in files], str(manifest_dir / MANIFEST_NAME))
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def read_table(path: Path) -> pd.DataFrame:
    """Read one dataset file (or folder of parquet shards) into a DataFrame, without type guessing."""
    try:
        if path.is_dir() or path.suffix == ".parquet":
            return pd.read_parquet(path)
        if path.suffix in (".jsonl", ".json"):
            return pd.DataFrame.from_records(_read_json_records(path))
        if path.suffix in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", dtype=str,
                               keep_default_na=False, na_values=[])
    except UserError:
        raise
    except Exception as exc:  # pyarrow / pandas raise many types for a corrupt or unreadable file
        raise UserError(f"Cannot read {path} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                        "check that it is a valid, readable file.") from exc
    raise UserError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}.")


def list_datasets(input_dir: str | Path) -> list[DatasetFile]:
    """The datasets in an input folder, sorted by name (file stem, or sub-folder name for shards)."""
    root = Path(input_dir)
    if root.is_file():  # a single dataset file
        return [DatasetFile(_dataset_name(root), root)]
    if not root.is_dir():
        raise UserError(f"Input {root} does not exist; pass a folder of dataset files (or one file).")
    found: dict[str, DatasetFile] = {}
    for path in sorted(root.iterdir()):
        if path.name.startswith((".", "_")) or path.name in METADATA_FILES:
            continue
        if path.is_dir():
            # a folder of parquet shards is one dataset; `prepare` output (e.g. --output inside --input) is not
            if not any(path.glob("*.parquet")) or any((path / m).exists() for m in METADATA_FILES):
                continue
        elif path.suffix not in TABLE_SUFFIXES:
            logger.info("skipping %s (not a %s file)", path, "/".join(TABLE_SUFFIXES))
            continue
        name = _dataset_name(path)
        if name in found:
            raise UserError(f"Two inputs give dataset name {name!r}: {found[name].path} and {path}; "
                            "rename or remove one.")
        found[name] = DatasetFile(name, path)
    if not found:
        raise UserError(f"No dataset files in {root}; expected {', '.join(TABLE_SUFFIXES)} files "
                        "(one per dataset) or folders of parquet shards.")
    return list(found.values())


def _dataset_name(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


# ---------------------------------------------------------------------------------------------- checking

def negative_columns(columns: Iterable[str], source: str) -> list[str]:
    """`negative_1..k` in order; a UserError when the numbering has a gap."""
    numbers = sorted(int(m.group(1)) for c in columns if (m := NEGATIVE_RE.match(str(c))))
    expected = list(range(1, len(numbers) + 1))
    if numbers != expected:
        missing = next(i for i in range(1, max(numbers) + 2) if i not in numbers)
        raise UserError(f"{source}: negative columns must be numbered negative_1..negative_k without gaps, "
                        f"but negative_{missing} is missing (found {', '.join(f'negative_{n}' for n in numbers)}).")
    return [f"negative_{n}" for n in numbers]


def check_text_column(values: pd.Series, source: str, column: str, row_label: Callable[[int], str] | None = None,
                      ) -> None:
    """Every value a string: the first null or non-string raises a UserError naming file, column and row."""
    label = row_label or (lambda i: f"row {i}")
    if isinstance(values.dtype, pd.StringDtype) or pd.api.types.is_string_dtype(values.dtype):
        null = values.isna().to_numpy()
        if null.any():
            i = int(null.argmax())
            raise UserError(f"{source}, column {column!r}, {label(i)}: missing text (null); "
                            "every text must be a string.")
        if isinstance(values.dtype, pd.StringDtype):
            return
    bad = ~values.map(lambda v: isinstance(v, str)).to_numpy(dtype=bool)
    if bad.any():
        i = int(bad.argmax())
        value = values.iloc[i]
        what = "missing text (null)" if value is None or (isinstance(value, float) and value != value) \
            else f"a {type(value).__name__} ({str(value)[:40]!r})"
        raise UserError(f"{source}, column {column!r}, {label(i)}: {what} where text is expected; "
                        "every text must be a string.")


def validate_frame(frame: pd.DataFrame, source: str) -> None:
    """The canonical layout: query, passage, gap-free negatives, string values, at least one row."""
    for column in TEXT_COLUMNS:
        if column not in frame.columns:
            raise UserError(f"{source} has no {column!r} column (columns: {', '.join(map(str, frame.columns))}); "
                            "the F2LLM layout needs 'query', 'passage' and optionally negative_1..negative_k."
                            f"{did_you_mean(column, map(str, frame.columns))}")
    if len(frame) == 0:
        raise UserError(f"{source} has no rows; remove the empty dataset or add data.")
    for column in ["query", "passage", *negative_columns(frame.columns, source)]:
        check_text_column(frame[column], source, column)


# --------------------------------------------------------------------------------------------- formats

@dataclass(frozen=True)
class Format:
    """A raw data layout: how to recognise it from column names and convert it to the canonical one."""

    name: str
    detect: Callable[[Sequence[str]], bool]
    convert: Callable[[pd.DataFrame, "DatasetFile", str], RawDataset]
    required: tuple[str, ...]
    description: str


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


def _canonical(frame: pd.DataFrame, negatives: Sequence[str], query: str = "query", passage: str = "passage",
               ) -> pd.DataFrame:
    """Select (query, passage, negatives) by their source names and give them the canonical names."""
    out = frame[[query, passage, *negatives]].copy()
    out.columns = ["query", "passage", *[f"negative_{i}" for i in range(1, len(negatives) + 1)]]
    return out.reset_index(drop=True)


def _convert_f2llm(frame: pd.DataFrame, file: DatasetFile, prompt_template: str) -> RawDataset:
    source = str(file.path)
    if any(str(c).endswith("_input_ids") for c in frame.columns):
        raise UserError(f"{source} already holds token ids (columns *_input_ids): it is prepared data, not raw "
                        "text; point --input at the raw parquet files.")
    negatives = negative_columns(frame.columns, source)
    validate_frame(frame, source)
    return RawDataset(file.name, file.path, "f2llm", _canonical(frame, negatives))


def _convert_sentence_transformers(frame: pd.DataFrame, file: DatasetFile, prompt_template: str) -> RawDataset:
    source = str(file.path)
    numbered = negative_columns(frame.columns, source)
    if "negative" in frame.columns and numbered:
        raise UserError(f"{source} has both a 'negative' column and numbered negative_i columns; keep one style.")
    negatives = ["negative"] if "negative" in frame.columns else numbered
    canonical = _canonical(frame, negatives, query="anchor", passage="positive")
    for old, new in zip(["anchor", "positive", *negatives], canonical.columns):
        check_text_column(canonical[new], source, old)
    if len(canonical) == 0:
        raise UserError(f"{source} has no rows; remove the empty dataset or add data.")
    return RawDataset(file.name, file.path, "sentence-transformers", canonical)


# FlagEmbedding `type` values -> llm2emb task types. Unknown values fall back to retrieval.
BGE_TYPES: dict[str, str] = {
    "normal": "retrieval",
    "only_1neg": "retrieval",
    "symmetric_sts": "sts",
    "symmetric_class": "classification",
    "symmetric_clustering": "clustering",
}


def _as_text_list(value: object, source: str, line: int, field_name: str, allow_empty: bool) -> list[str]:
    if value is None or (isinstance(value, float) and value != value):
        value = []
    if isinstance(value, str):
        value = [value]
    if hasattr(value, "tolist") and not isinstance(value, list):  # numpy arrays from parquet
        value = value.tolist()
    if not isinstance(value, list):
        raise UserError(f"{source}, line {line}: field {field_name!r} must be a list of strings, "
                        f"got {type(value).__name__}.")
    for item in value:
        if not isinstance(item, str):
            raise UserError(f"{source}, line {line}: field {field_name!r} holds a {type(item).__name__} "
                            f"({str(item)[:40]!r}); every text must be a string.")
    if not value and not allow_empty:
        raise UserError(f"{source}, line {line}: field {field_name!r} is empty; every row needs at least one "
                        "positive.")
    return value


def _convert_bge(frame: pd.DataFrame, file: DatasetFile, prompt_template: str) -> RawDataset:
    source = str(file.path)
    if len(frame) == 0:
        raise UserError(f"{source} has no rows; remove the empty dataset or add data.")
    has_prompt = "prompt" in frame.columns
    prompts = frame["prompt"].tolist() if has_prompt else [None] * len(frame)
    rows: list[tuple[str, str, list[str], str | None, int]] = []  # query, pos, negs, prompt, line
    for i, (query, pos, neg, prompt) in enumerate(zip(frame["query"].tolist(), frame["pos"].tolist(),
                                                      frame["neg"].tolist() if "neg" in frame.columns
                                                      else [None] * len(frame), prompts)):
        line = i + 1
        if not isinstance(query, str):
            what = "null" if query is None or query != query else type(query).__name__
            raise UserError(f"{source}, line {line}: field 'query' is {what}; every text must be a string.")
        if not (prompt is None or isinstance(prompt, str) or (isinstance(prompt, float) and prompt != prompt)):
            raise UserError(f"{source}, line {line}: field 'prompt' must be a string.")
        positives = _as_text_list(pos, source, line, "pos", allow_empty=False)
        negatives = _as_text_list(neg, source, line, "neg", allow_empty=True)
        for p in positives:
            rows.append((query, p, negatives, prompt if isinstance(prompt, str) and prompt else None, line))
    k = max(len(r[2]) for r in rows)
    notes: list[str] = []
    if k:
        short = [r for r in rows if len(r[2]) < k]
        empty = next((r for r in short if not r[2]), None)
        if empty is not None:
            raise UserError(f"{source}, line {empty[4]}: field 'neg' is empty while other rows have up to {k} "
                            "negatives; give every row at least one negative, or none to any row.")
        if short:
            notes.append(f"{len(short)} of {len(rows)} rows had fewer than {k} negatives; theirs were repeated "
                         "cyclically")
    distinct_prompts = {r[3] for r in rows}
    defaults_instruction = ""
    if len(distinct_prompts) == 1:
        prompt = next(iter(distinct_prompts))
        defaults_instruction = prompt_template.format(prompt=prompt) if prompt else ""
        queries = [r[0] for r in rows]
    else:  # per-row prompts: bake each row's instruction into its query
        queries = [(prompt_template.format(prompt=r[3]) if r[3] else "") + r[0] for r in rows]
        notes.append("rows carry different prompts: each was prepended to its query")
    data: dict[str, list[str]] = {"query": queries, "passage": [r[1] for r in rows]}
    for j in range(k):
        data[f"negative_{j + 1}"] = [r[2][j % len(r[2])] for r in rows]
    type_name = "retrieval"
    if "type" in frame.columns:
        types = {t for t in frame["type"].tolist() if isinstance(t, str)}
        mapped = {BGE_TYPES.get(t, "retrieval") for t in types}
        if len(mapped) > 1:
            raise UserError(f"{source} mixes row types {sorted(types)}; put each type in its own file so each "
                            "dataset trains with one loss.")
        type_name = mapped.pop() if mapped else "retrieval"
    return RawDataset(file.name, file.path, "bge", pd.DataFrame(data),
                      DatasetSpec(type=type_name, instruction=defaults_instruction), notes)


register_format(Format("f2llm", lambda cols: "query" in cols and "passage" in cols, _convert_f2llm,
                       ("query", "passage"), "F2LLM raw parquet: query, passage, negative_1..k"))
register_format(Format("bge", lambda cols: "query" in cols and "pos" in cols, _convert_bge,
                       ("query", "pos"), "FlagEmbedding jsonl: query, pos [list], neg [list], prompt, type"))
register_format(Format("sentence-transformers", lambda cols: "anchor" in cols and "positive" in cols,
                       _convert_sentence_transformers, ("anchor", "positive"),
                       "sentence-transformers columns: anchor, positive, negative / negative_1..k"))


def detect_format(columns: Sequence[str], source: str) -> str:
    """The registered format whose columns `columns` has; a UserError naming what is expected."""
    columns = [str(c) for c in columns]
    for fmt in FORMATS.values():
        if fmt.detect(columns):
            return fmt.name
    expected = "; ".join(f"{f.name}: {f.description}" for f in FORMATS.values())
    missing = "passage" if "query" in columns else "query"
    raise UserError(f"{source} has columns [{', '.join(columns)}] but no {missing!r} column, which no known "
                    f"format allows ({expected}); rename the columns or pass --format."
                    f"{did_you_mean(missing, columns)}")


def load_dataset(file: DatasetFile, format: str | None = None,
                 prompt_template: str = DEFAULT_PROMPT_TEMPLATE) -> RawDataset:
    """Read, convert and validate one dataset. `format=None` detects it from the columns."""
    frame = read_table(file.path)
    source = str(file.path)
    if format is None:
        if len(frame.columns) == 0:
            raise UserError(f"{source} has no columns (empty file); remove the empty dataset or add data.")
        format = detect_format(frame.columns, source)
    elif format not in FORMATS:
        raise UserError(f"Unknown format {format!r}; use one of: {', '.join(FORMATS)}.{did_you_mean(format, FORMATS)}")
    fmt = FORMATS[format]
    for column in fmt.required:
        if column not in frame.columns:
            raise UserError(f"{source} has no {column!r} column, which format {format!r} needs "
                            f"({fmt.description}).{did_you_mean(column, map(str, frame.columns))}")
    dataset = fmt.convert(frame, file, prompt_template)
    for note in dataset.notes:
        logger.info("%s: %s", source, note)
    return dataset


# ------------------------------------------------------------------------------------------- writing

def atomic_write_table(table, path: Path) -> None:
    """Write a pyarrow Table or DataFrame as parquet via a temp file + rename: never half-written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def atomic_write_json(data: object, path: Path) -> None:
    write_json_atomic(path, data)


def write_raw(dataset: RawDataset, path: Path) -> None:
    """Write a canonical dataset as F2LLM raw parquet, atomically."""
    atomic_write_table(dataset.frame.reset_index(drop=True), path)
