"""`llm2emb prepare`: raw training data (any supported format) -> token ids for one tokenizer.

The generalisation of F2LLM's `tokenize_data_qwen.py` (codefuse-ai/CodeFuse-Embeddings) to any tokenizer.
Output folder, one entry per dataset:

    <dataset>.parquet   query_input_ids, passage_input_ids, negative_1_input_ids .. negative_k_input_ids
                        (list<int32>, EOS appended, EOS kept last when truncated), query_prefix_length (int32:
                        instruction tokens, for skip-instruction pooling); with an input strategy that pools a
                        span (echo: the second copy) also passage_prefix_length and negative_<j>_prefix_length,
                        so every text's pooled span is known (query_prefix_length is then its span too)
    manifest.json       every dataset -> {"type", "instruction"} (resolved)
    data_stats.json     rows, k, unique texts, truncation counts, token-length percentiles per dataset
    prepare_info.json   tokenizer, its fingerprint, eos/pad ids, max_seq_length, instruction_separator,
                        input_strategy, format_version (PREPARED_FORMAT; absent: 1, written before the span
                        columns existed, which the batcher refuses for a span strategy)

All tokenisation goes through `llm2emb.model.tokenization.encode_texts`, the rule `Embedder.encode` uses too, so
training and inference see identical tokens. Faster than F2LLM's per-row `tokenizer(text)` because every
distinct text of a dataset (over all its columns) is tokenised once, in batched fast-tokenizer calls spread
over worker processes, and the id lists are assembled column-wise with numpy instead of per-row objects.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from llm2emb.model.tokenization import encode_texts, instruction_prefix_end, resolve_end_tokens
from llm2emb.data.formats import (DEFAULT_PROMPT_TEMPLATE, DatasetFile, RawDataset, atomic_write_json,
                                  atomic_write_table, check_readable, list_datasets, load_dataset)
from llm2emb.data.manifest import (MANIFEST_NAME, DatasetSpec, manifest_to_json, read_manifest,
                                   resolve_manifest, resolve_spec)
from llm2emb.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LENGTH = 1024  # total tokens incl. EOS: F2LLM's 1023 text tokens + EOS
DEFAULT_SEPARATOR = "Query:"
INFO_NAME = "prepare_info.json"
STATS_NAME = "data_stats.json"
CHUNK_SIZE = 2048  # at most this many texts per batched tokenizer call / per task sent to a worker
MIN_CHUNK_CHARS, MAX_CHUNK_CHARS = 20_000, 2_000_000  # characters per task: balance vs per-task overhead
PERCENTILES = (50, 90, 99)
#: 2: a span strategy's prepared data has a <column>_prefix_length column for every text column
PREPARED_FORMAT = 2


def prefix_column(text_column: str) -> str:
    """The column holding the pooled span's start (tokens before it) of `<text_column>_input_ids`."""
    return f"{text_column.removesuffix('_input_ids')}_prefix_length"


# ------------------------------------------------------------------------------------------ fingerprint

def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 over what decides the token ids: the fast tokenizer's full definition (vocab, merges,
    normaliser, pre-tokeniser, post-processor, added tokens) and the special-token ids. Stable across
    loads and machines; runtime settings (padding side, truncation) are left out."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # tokenizer.json with fields in a fixed order and vocab/merges ordered by id/rank. Its header
        # (version, truncation, padding) holds runtime settings only: hash from "added_tokens" on.
        text = backend.to_str()
        start = text.find('"added_tokens"')
        digest.update(text[start if start >= 0 else 0:].encode("utf-8"))
    else:  # a slow (python) tokenizer: its vocabulary is what we can see
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")}
    blob = json.dumps({"special_ids": special}, sort_keys=True)
    digest.update(blob.encode("utf-8"))
    return digest.hexdigest()


# ------------------------------------------------------------------------------------- batched encoding

@dataclass
class TokenizedTexts:
    """Token ids of n texts, flat: text i is values[offsets[i]:offsets[i+1]]."""

    values: np.ndarray      # int32
    offsets: np.ndarray     # int64, n + 1
    prefix: np.ndarray      # int32, instruction-prefix token count
    truncated: np.ndarray   # bool

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def concat(cls, parts: Sequence["TokenizedTexts"]) -> "TokenizedTexts":
        if not parts:
            return cls(np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, bool))
        lengths = np.concatenate([p.lengths for p in parts])
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(np.concatenate([p.values for p in parts]), offsets,
                   np.concatenate([p.prefix for p in parts]), np.concatenate([p.truncated for p in parts]))

    def take(self, order: np.ndarray) -> "TokenizedTexts":
        """Texts in `order` (indices into this set), as a new flat set."""
        lengths = self.lengths[order]
        offsets = np.zeros(len(order) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return TokenizedTexts(gather_values(self.values, self.offsets, order, offsets), offsets,
                              self.prefix[order], self.truncated[order])


def gather_values(values: np.ndarray, offsets: np.ndarray, order: np.ndarray, new_offsets: np.ndarray,
                  ) -> np.ndarray:
    """Concatenate values[offsets[i]:offsets[i+1]] for i in order, vectorised."""
    lengths = np.diff(new_offsets)
    total = int(new_offsets[-1])
    if total == 0:
        return np.zeros(0, values.dtype)
    # position j of output row r reads values[offsets[order[r]] + j]
    shift = np.repeat(offsets[order] - new_offsets[:-1], lengths)
    return values[np.arange(total, dtype=np.int64) + shift]


def _encode_chunk(tokenizer, texts: Sequence[str], max_length: int, prefix_end: int,
                  end_token: str, input_strategy: str = "plain", instruction_length: int = 0,
                  summary: tuple[str, str] | None = None) -> TokenizedTexts:
    summary_token, summary_position = summary or (None, "end")
    enc = encode_texts(tokenizer, texts, max_length, prefix_end, end_token, input_strategy, instruction_length,
                       summary_token=summary_token, summary_position=summary_position)
    lengths = np.fromiter((len(ids) for ids in enc.input_ids), np.int64, len(enc.input_ids))
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter((t for ids in enc.input_ids for t in ids), np.int32, int(offsets[-1]))
    return TokenizedTexts(values, offsets, np.asarray(enc.prefix_lengths, np.int32),
                          np.asarray(enc.truncated_mask, bool))


_WORKER_TOKENIZER = None


def _init_worker(tokenizer) -> None:
    global _WORKER_TOKENIZER
    # Parallelism comes from the processes; a rayon pool in each would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOKENIZER = tokenizer


def _worker_encode(args: tuple[list[str], int, int, str, str, int]) -> TokenizedTexts:
    return _encode_chunk(_WORKER_TOKENIZER, *args)


class BatchEncoder:
    """Encodes text lists in chunks, in this process (workers <= 1) or in a pool of worker processes that
    inherit the tokenizer (fork) or receive it pickled (spawn platforms)."""

    def __init__(self, tokenizer, max_length: int, workers: int = 1, chunk_size: int = CHUNK_SIZE,
                 end_token: str = "auto", input_strategy: str = "plain",
                 summary: tuple[str, str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.summary = summary  # (summary token, start | end) for pooling cls, else None
        self.end_token = end_token
        self.input_strategy = input_strategy
        self.max_length = max_length
        self.workers = max(1, int(workers))
        self.chunk_size = chunk_size
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> "BatchEncoder":
        if self.workers > 1:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods and sys.platform != "darwin" else "spawn")
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                             initargs=(self.tokenizer,))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _chunks(self, texts: Sequence[str]) -> list[tuple[int, int]]:
        """[start, end) ranges holding about equal numbers of characters, several per worker, so that a few
        long documents do not leave the other workers idle at the end."""
        if not texts:
            return []
        chars = np.fromiter((len(t) for t in texts), np.int64, len(texts))
        target = min(max(int(chars.sum()) // (self.workers * 8), MIN_CHUNK_CHARS), MAX_CHUNK_CHARS)
        bounds, start, acc = [], 0, 0
        for i, c in enumerate(chars.tolist()):
            acc += c
            if acc >= target or i + 1 - start >= self.chunk_size:
                bounds.append((start, i + 1))
                start, acc = i + 1, 0
        if start < len(texts):
            bounds.append((start, len(texts)))
        return bounds

    def encode_groups(self, groups: Sequence[tuple[Sequence[str], int] | tuple[Sequence[str], int, int]],
                      progress=None) -> list[TokenizedTexts]:
        """Token ids for each (texts, instruction prefix end in characters[, instruction length]) group, all
        groups' chunks sent to the pool at once; `progress` (a tqdm bar) advances per text."""
        tasks, owner = [], []
        for g, group in enumerate(groups):
            texts, prefix_end = group[0], group[1]
            instruction_length = group[2] if len(group) > 2 else 0
            for a, b in self._chunks(texts):
                tasks.append((list(texts[a:b]), self.max_length, prefix_end, self.end_token, self.input_strategy,
                              instruction_length, self.summary))
                owner.append(g)
        if self._pool is None:
            results: Iterator[TokenizedTexts] = (_encode_chunk(self.tokenizer, *task) for task in tasks)
        else:
            results = self._pool.map(_worker_encode, tasks)
        parts: list[list[TokenizedTexts]] = [[] for _ in groups]
        for g, part in zip(owner, results):
            parts[g].append(part)
            if progress is not None:
                progress.update(len(part.prefix))
        return [TokenizedTexts.concat(p) for p in parts]

    def encode(self, texts: Sequence[str], prefix_end: int = 0, progress=None) -> TokenizedTexts:
        """Token ids for `texts`, in order."""
        return self.encode_groups([(texts, prefix_end)], progress)[0]


# -------------------------------------------------------------------------------------- one dataset

def _length_stats(lengths: np.ndarray) -> dict[str, float]:
    if len(lengths) == 0:
        return {}
    stats = {f"p{p}": float(np.percentile(lengths, p)) for p in PERCENTILES}
    stats.update(mean=round(float(lengths.mean()), 2), max=int(lengths.max()), min=int(lengths.min()))
    return stats


def _list_array(tokens: TokenizedTexts):
    import pyarrow as pa

    values = pa.array(tokens.values, pa.int32())
    if tokens.offsets[-1] < np.iinfo(np.int32).max:
        return pa.ListArray.from_arrays(pa.array(tokens.offsets.astype(np.int32)), values)
    return pa.LargeListArray.from_arrays(pa.array(tokens.offsets), values)  # > 2^31 tokens in one column


def tokenize_dataset(dataset: RawDataset, spec: DatasetSpec, encoder: BatchEncoder, separator: str | None,
                     progress: bool = False):
    """Tokenise one canonical dataset. Returns (pyarrow Table in the tokenised layout, stats dict).

    Every distinct text over all columns is encoded once. Queries get the dataset's instruction prepended,
    and their prefix length covers that instruction up to and including `separator` (never text found in the
    query itself); only they need the (slower) offset mapping."""
    import pyarrow as pa

    frame = dataset.frame
    n = len(frame)
    columns = dataset.text_columns
    queries = frame["query"].astype(object)
    if spec.instruction:
        queries = spec.instruction + queries
    all_texts = pd.concat([queries, *[frame[c].astype(object) for c in columns[1:]]], ignore_index=True)
    codes, uniques = pd.factorize(all_texts)
    uniques = np.asarray(uniques, dtype=object)
    codes = codes.reshape(len(columns), n)

    # Split distinct texts into instructed queries (prefix lengths needed) and the rest.
    prefix_end = instruction_prefix_end(spec.instruction, separator) if separator else 0
    needs_prefix = np.zeros(len(uniques), bool)
    if prefix_end or (spec.instruction and encoder.input_strategy != "plain"):
        needs_prefix[np.unique(codes[0])] = True
    with_sep = np.flatnonzero(needs_prefix)
    without_sep = np.flatnonzero(~needs_prefix)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(uniques), desc=dataset.name, unit="text", leave=False)
    try:
        part_a, part_b = encoder.encode_groups([(uniques[with_sep].tolist(), prefix_end, len(spec.instruction or "")),
                                                (uniques[without_sep].tolist(), 0, 0)], bar)
    finally:
        if bar is not None:
            bar.close()
    # position[u] = where distinct text u sits in `merged`.
    merged = TokenizedTexts.concat([part_a, part_b])
    position = np.empty(len(uniques), np.int64)
    position[np.concatenate([with_sep, without_sep])] = np.arange(len(uniques))

    from llm2emb.model.input_strategies import get_input_strategy

    # a span strategy's pooled positions differ for every text, not only for instructed queries
    every_span = get_input_strategy(encoder.input_strategy).pool_last_copy
    arrays, names = [], []
    stats: dict[str, object] = {
        "rows": n, "hard_negatives": len(columns) - 2, "type": spec.type, "instruction": spec.instruction,
        "format": dataset.format, "source": str(dataset.source), "unique_texts": int(len(uniques)),
    }
    lengths_by_role: dict[str, list[np.ndarray]] = {"query": [], "passage": [], "negatives": []}
    truncated_by_role = {"query": 0, "passage": 0, "negatives": 0}
    for j, column in enumerate(columns):
        column_tokens = merged.take(position[codes[j]])
        arrays.append(_list_array(column_tokens))
        names.append(f"{column}_input_ids")
        role = column if column in ("query", "passage") else "negatives"
        lengths_by_role[role].append(column_tokens.lengths)
        truncated_by_role[role] += int(column_tokens.truncated.sum())
        if column == "query":
            prefix = column_tokens.prefix
        elif every_span:
            arrays.append(pa.array(column_tokens.prefix, pa.int32()))
            names.append(prefix_column(column))
    arrays.append(pa.array(prefix, pa.int32()))
    names.append(prefix_column("query"))
    table = pa.Table.from_arrays(arrays, names=names)
    stats["tokens"] = int(sum(int(np.sum(x)) for v in lengths_by_role.values() for x in v))
    stats["truncated"] = truncated_by_role
    stats["token_length"] = {role: _length_stats(np.concatenate(v)) for role, v in lengths_by_role.items() if v}
    if every_span:   # the queries' prefix is everything before the pooled span, not the instruction alone
        stats["query_tokens_before_span"] = _length_stats(prefix)
    else:
        stats["instruction_tokens"] = _length_stats(prefix) if spec.instruction else {}
    return table, stats


# ------------------------------------------------------------------------------------------ the folder

def _source_key(file: DatasetFile, fmt: str | None, spec: DatasetSpec) -> str:
    """Changes when the input file or its manifest entry changes: a re-run redoes exactly those datasets."""
    paths = sorted(file.path.glob("*.parquet")) if file.path.is_dir() else [file.path]
    sig = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    blob = json.dumps([str(file.path.resolve()), sig, fmt, spec.to_dict()], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"Cannot read {path} ({exc}); delete it or re-run with --overwrite.") from exc


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _recorded_summary_id(model: str, token: str) -> int | None:
    """The id a saved Embedder folder `model` records for its summary token `token` (its tokenizer holds it
    already), else None."""
    from llm2emb.layout import EMBEDDER_CONFIG

    try:
        saved = json.loads((Path(model) / EMBEDDER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved.get("summary_token_id") if saved.get("summary_token") == token else None


@dataclass
class PreparePlan:
    """What `prepare` will do, decided before any text is tokenised (`llm2emb prepare --dry-run` prints it).

    `tokenizer` and `info` are None when the plan was made without fetching a tokenizer that is not on this
    machine (`fetch=False`): then whether existing output is reused is unknown (`skip` is empty)."""

    input_dir: Path
    output_dir: Path
    files: list[DatasetFile]
    manifest: dict
    manifest_dir: Path
    tokenizer: object | None
    summary: tuple[str, str] | None
    separator: str | None
    info: dict | None
    old_stats: dict
    skip: dict[str, DatasetSpec]     # dataset name -> its spec: already prepared with the same source and settings


def plan_prepare(model: str, input_dir: str | Path, output_dir: str | Path,
                 max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH, format: str | None = None,
                 instruction_separator: str | None = DEFAULT_SEPARATOR, overwrite: bool = False, tokenizer=None,
                 end_token: str = "auto", input_strategy: str = "plain", summary_token: str | None = None,
                 summary_token_position: str = "end", fetch: bool = True) -> PreparePlan:
    """Every check `prepare` makes before tokenising (arguments, inputs and their parquet footers, the manifest,
    the settings of data already in `output_dir`) and which datasets it would skip; writes nothing.
    `fetch=False` loads a tokenizer only when it is on this machine (`model.loading.model_is_local`)."""
    from llm2emb import __version__
    from llm2emb.model.loading import load_tokenizer, resolve_model_path

    if max_seq_length < 2:
        raise UserError(f"--max-length (max_seq_length) must be at least 2 (one token plus EOS), got {max_seq_length}.")
    from llm2emb.model.input_strategies import get_input_strategy

    get_input_strategy(input_strategy, "--input-strategy")  # a typo: one sentence before any work
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if output_dir.resolve() == (input_dir.resolve() if input_dir.is_dir() else input_dir.resolve().parent):
        raise UserError(f"--output {output_dir} is the input folder; choose a separate folder for tokenised data.")
    files = list_datasets(input_dir)
    check_readable(files)
    manifest_dir = input_dir if input_dir.is_dir() else input_dir.parent
    manifest = read_manifest(manifest_dir)
    from llm2emb.model.loading import model_is_local

    if tokenizer is None and (fetch or model_is_local(model)):
        tokenizer = load_tokenizer(resolve_model_path(model))
    elif tokenizer is None:   # a missing or damaged local path is refused all the same
        from llm2emb.model.loading import check_model_reference

        check_model_reference(model, "--model")
    if summary_token and summary_token_position not in ("start", "end"):
        raise UserError(f"--summary-token-position must be start or end, got {summary_token_position!r}.")
    summary = (summary_token, summary_token_position) if summary_token else None
    separator = instruction_separator or None
    info = None
    stats_path = output_dir / STATS_NAME
    old_stats = _read_json(stats_path) if stats_path.exists() and not overwrite else {}
    if tokenizer is not None:
        if summary_token:
            from llm2emb.model.summary_token import add_to_tokenizer

            add_to_tokenizer(tokenizer, summary_token, _recorded_summary_id(model, summary_token),
                             source="--summary-token")
        info = {
            "tokenizer": str(model),
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "end_token": end_token,
            "end_token_ids": list(resolve_end_tokens(tokenizer, end_token)),
            "pad_token_id": tokenizer.pad_token_id,
            "max_seq_length": int(max_seq_length),
            "instruction_separator": separator,
            "input_strategy": input_strategy,
            "summary_token": {"token": summary[0], "position": summary[1]} if summary else None,
            "format_version": PREPARED_FORMAT,
            "llm2emb_version": __version__,
        }
    old_info = _read_json(output_dir / INFO_NAME) if (output_dir / INFO_NAME).exists() else None
    if old_info is not None and not overwrite:
        if info is not None:
            settings = ("tokenizer_fingerprint", "max_seq_length", "instruction_separator", "end_token_ids",
                        "input_strategy", "summary_token")
            # data prepared before end tokens were configurable ended every text with EOS
            old_info.setdefault("end_token_ids", [old_info.get("eos_token_id")])
            old_info.setdefault("input_strategy", "plain")
            old_info.setdefault("summary_token", None)
            if get_input_strategy(input_strategy).pool_last_copy:
                # data written before format 2 lacks the span columns of passages and negatives
                settings += ("format_version",)
                old_info.setdefault("format_version", 1)
            changed = [k for k in settings if old_info.get(k) != info[k]]
            if changed:
                raise UserError(f"{output_dir} holds data prepared with a different {', '.join(changed)} "
                                f"(tokenizer {old_info.get('tokenizer')!r}); pass --overwrite to re-tokenise "
                                "everything, or choose another --output.")
    elif old_info is None and output_dir.is_dir() and any(output_dir.glob("*.parquet")) and not overwrite:
        raise UserError(f"{output_dir} already holds parquet files but no {INFO_NAME}; choose an empty --output "
                        "folder or pass --overwrite.")
    # Check every input's columns before spending time on any of them (cheap compared to tokenising).
    resolve_manifest(manifest, [f.name for f in files], str(manifest_dir / MANIFEST_NAME))  # typo check
    skip: dict[str, DatasetSpec] = {}
    for file in files if info is not None else []:
        previous = old_stats.get(file.name)
        if previous and (output_dir / f"{file.name}.parquet").exists() and previous.get("key") and not overwrite:
            spec_guess = resolve_spec(manifest, file.name, DatasetSpec(**previous.get("defaults", {})))
            if previous["key"] == _source_key(file, format, spec_guess):
                skip[file.name] = spec_guess
    return PreparePlan(input_dir, output_dir, files, manifest, manifest_dir, tokenizer, summary, separator, info,
                       old_stats, skip)


def prepare(model: str, input_dir: str | Path, output_dir: str | Path,
            max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH, workers: int | None = None, format: str | None = None,
            instruction_separator: str | None = DEFAULT_SEPARATOR, overwrite: bool = False,
            progress: bool = True, tokenizer=None, end_token: str = "auto", input_strategy: str = "plain",
            summary_token: str | None = None, summary_token_position: str = "end") -> dict:
    """Tokenise every dataset in `input_dir` into `output_dir` (see module docstring).

    `summary_token` (pooling cls): that token is added to the tokenizer (as `Embedder` adds it) and inserted
    into every text at `summary_token_position` (start | end), by the rule `Embedder.encode` uses.
    A dataset whose output exists and whose source file and manifest entry are unchanged is skipped unless
    `overwrite`. Returns {"datasets": {name: stats}, "skipped": [...], "info": prepare_info}."""
    plan = plan_prepare(model, input_dir, output_dir, max_seq_length=max_seq_length, format=format,
                        instruction_separator=instruction_separator, overwrite=overwrite, tokenizer=tokenizer,
                        end_token=end_token, input_strategy=input_strategy, summary_token=summary_token,
                        summary_token_position=summary_token_position)
    output_dir, files, manifest, separator, info = plan.output_dir, plan.files, plan.manifest, plan.separator, plan.info
    old_stats = plan.old_stats
    prompt_template = DEFAULT_PROMPT_TEMPLATE.replace("Query:", separator) if separator else DEFAULT_PROMPT_TEMPLATE
    output_dir.mkdir(parents=True, exist_ok=True)
    new_stats: dict[str, dict] = {}
    resolved: dict[str, DatasetSpec] = {}
    skipped: list[str] = []
    with BatchEncoder(plan.tokenizer, max_seq_length, workers or default_workers(), end_token=end_token,
                      input_strategy=input_strategy, summary=plan.summary) as encoder:
        for file in files:
            out_path = output_dir / f"{file.name}.parquet"
            if file.name in plan.skip:
                logger.info("%s: already prepared, skipping (--overwrite to redo)", file.name)
                new_stats[file.name] = old_stats[file.name]
                resolved[file.name] = plan.skip[file.name]
                skipped.append(file.name)
                continue
            started = time.perf_counter()
            dataset = load_dataset(file, format, prompt_template)
            spec = resolve_spec(manifest, dataset.name, dataset.defaults)
            if spec.instruction and separator and separator not in spec.instruction:
                logger.warning("%s: instruction %r does not contain the separator %r, so skip-instruction pooling "
                               "will not exclude it", file.name, spec.instruction, separator)
            table, stats = tokenize_dataset(dataset, spec, encoder, separator, progress)
            stats["key"] = _source_key(file, format, spec)
            stats["defaults"] = dataset.defaults.to_dict() if dataset.defaults else {}
            atomic_write_table(table, out_path)
            stats["seconds"] = round(time.perf_counter() - started, 3)
            new_stats[file.name] = stats
            resolved[file.name] = spec
            # Metadata after every dataset, so an interrupted run resumes where it stopped.
            _write_metadata(output_dir, info, new_stats, resolved, old_stats)
            logger.info("%s: %d rows, k=%d, %d distinct texts, %d truncated", file.name, stats["rows"],
                        stats["hard_negatives"], stats["unique_texts"], sum(stats["truncated"].values()))
    _write_metadata(output_dir, info, new_stats, resolved, {})
    stale = sorted(p.stem for p in output_dir.glob("*.parquet") if p.stem not in new_stats)
    if stale:
        logger.warning("%s also holds %s, which are not in the input; they are not listed in %s and will not be "
                       "used for training", output_dir, ", ".join(stale), MANIFEST_NAME)
    return {"datasets": new_stats, "skipped": skipped, "info": info}


def _write_metadata(output_dir: Path, info: dict, stats: dict, resolved: dict[str, DatasetSpec],
                    keep_stats: dict) -> None:
    # While a run is in progress, entries of datasets not redone yet stay so their skip check still works;
    # they are not in the manifest until done.
    all_stats = {**keep_stats, **stats}
    atomic_write_json(all_stats, output_dir / STATS_NAME)
    atomic_write_json(manifest_to_json(resolved), output_dir / MANIFEST_NAME)
    atomic_write_json(info, output_dir / INFO_NAME)


# ------------------------------------------------------------------------------------------ reading back

def read_prepared(data_dir: str | Path) -> dict:
    """Describe a folder written by `llm2emb prepare`: the prepare_info.json fields at top level ("tokenizer",
    "tokenizer_fingerprint", "eos_token_id", "pad_token_id", "max_seq_length", "instruction_separator",
    "llm2emb_version") plus "dir" (Path), "manifest" ({name: {"type", "instruction"}}), "stats" (data_stats
    per dataset) and "datasets" ({name: Path to its parquet}). A UserError when it is not prepared data."""
    root = Path(data_dir)
    hint = "run `llm2emb prepare --model MODEL --input RAW_DIR --output TOKENISED_DIR` and train on its output"
    if not root.is_dir():
        raise UserError(f"Training data folder {root} does not exist; {hint}.")
    info_path = root / INFO_NAME
    if not info_path.exists():
        raw = next((p for p in sorted(root.glob("*.parquet"))), None)
        what = "raw text (not tokenised)" if raw is not None else "not tokenised data"
        raise UserError(f"{root} is {what}: it has no {INFO_NAME}; {hint}.")
    info = _read_json(info_path)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.exists():
        raise UserError(f"{root} has {INFO_NAME} but no {MANIFEST_NAME} (an interrupted prepare?); {hint}.")
    manifest = _read_json(manifest_path)
    stats = _read_json(root / STATS_NAME) if (root / STATS_NAME).exists() else {}
    datasets: dict[str, Path] = {}
    for name in manifest:
        path = root / f"{name}.parquet"
        if not path.exists():
            raise UserError(f"{root}/{MANIFEST_NAME} lists dataset {name!r} but {path.name} is missing; {hint}.")
        datasets[name] = path
    if not datasets:
        raise UserError(f"{root} has no prepared datasets; {hint}.")
    return {**info, "dir": root, "manifest": manifest, "stats": {k: stats.get(k, {}) for k in datasets},
            "datasets": datasets}
