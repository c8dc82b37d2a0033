"""Teacher embeddings added to prepared training data, for the distillation losses (distill_kl, margin_mse,
embedding_mse): computed once, before training, instead of a teacher forward pass at every step.

For every dataset of a prepared folder (`llm2emb prepare` output) the teacher embeds the raw texts behind
each row: the query with the dataset's instruction (as the student sees it; `instructions=False` for a
teacher that wants none), the positive and every hard-negative column. The instruction is handed to the
teacher's `encode(..., instruction=...)` apart from the query, so a skip-instruction teacher excludes it. Columns added to `<dataset>.parquet`
(L2-normalised float32 vectors, read by `llm2emb.data.batching` and handed to the losses):

    teacher_query, teacher_passage, teacher_negative_1 .. teacher_negative_K

The raw data is read again with the same reader as prepare (rows correspond one to one; a changed row count
is refused). Each distinct text is embedded once. A dataset is rewritten atomically and recorded in
`teacher_info.json` (teacher, its fingerprint, settings): a re-run skips datasets done with the same teacher
and settings, so an interrupted run resumes at dataset granularity; a changed teacher redoes them.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from llm2emb.atomic import write_json_atomic
from llm2emb.errors import UserError
from llm2emb.pipeline.models import model_fingerprint

logger = logging.getLogger(__name__)

TEACHER_INFO = "teacher_info.json"


def _read_info(data_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((data_dir / TEACHER_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _vectors_column(vectors: np.ndarray):
    import pyarrow as pa

    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])


def add_teacher_columns(data_dir: str | os.PathLike[str], raw_input: str | os.PathLike[str], teacher: str, *,
                        instructions: bool = True, batch_size: int = 32, max_length: int | None = None,
                        overwrite: bool = False, embedder=None, precision: str | None = None) -> dict[str, Any]:
    """Add teacher_* columns to every dataset of the prepared folder `data_dir` (see the module docstring).

    `raw_input` is what was prepared (folder or file of raw datasets). Returns {"done": [...], "skipped":
    [...], "dim": teacher dimension}. `embedder` may pass an already loaded teacher; `precision` is its encode
    precision (auto | fp32 | bf16 | fp16; None: auto, `model.precision.ENCODE_DEFAULT`)."""
    import pyarrow.parquet as pq

    from llm2emb.data.batching import TEACHER_PASSAGE, TEACHER_QUERY, teacher_negative_column
    from llm2emb.data.formats import DEFAULT_PROMPT_TEMPLATE, atomic_write_table, list_datasets, load_dataset
    from llm2emb.data.tokenize import read_prepared

    data_dir = Path(data_dir)
    info = read_prepared(data_dir)
    files = {f.name: f for f in list_datasets(raw_input)}
    separator = info.get("instruction_separator")
    template = DEFAULT_PROMPT_TEMPLATE.replace("Query:", separator) if separator else DEFAULT_PROMPT_TEMPLATE
    from llm2emb.model.precision import encode_setting, resolved_encode_precision

    # the resolved precision is part of the columns' identity: columns written in fp32 are not reused for bf16
    settings = {"teacher": str(teacher), "fingerprint": model_fingerprint(teacher), "instructions": instructions,
                "instruction_apart": True, "max_length": max_length, "precision": encode_setting(precision),
                "resolved_precision": resolved_encode_precision(precision)}
    state = _read_info(data_dir)
    done_before = state.get("datasets", {}) if state.get("settings") == settings else {}
    result: dict[str, Any] = {"done": [], "skipped": [], "dim": state.get("dim")}
    for name, path in sorted(info["datasets"].items()):
        table = pq.read_table(path)
        if not overwrite and name in done_before and TEACHER_QUERY in table.column_names and \
                done_before[name] == table.num_rows:
            result["skipped"].append(name)
            continue
        if name not in files:
            raise UserError(f"Raw input {raw_input} has no dataset {name!r}, which {data_dir} holds; pass the raw "
                            "data that folder was prepared from.")
        frame = load_dataset(files[name], None, template).frame
        if len(frame) != table.num_rows:
            raise UserError(f"Dataset {name!r} has {len(frame)} rows in {files[name].path} but {table.num_rows} in "
                            f"{path}; the raw data changed since it was prepared, prepare it again.")
        negatives = 0
        while f"negative_{negatives + 1}_input_ids" in table.column_names:
            negatives += 1
        instruction = (info["manifest"].get(name) or {}).get("instruction") or "" if instructions else ""
        queries = frame["query"].astype(str).tolist()
        columns = {TEACHER_PASSAGE: frame["passage"].astype(str).tolist()}
        for j in range(1, negatives + 1):
            columns[teacher_negative_column(j)] = frame[f"negative_{j}"].astype(str).tolist()
        if embedder is None:
            from llm2emb.model.embedder import Embedder

            logger.info("loading teacher %s", teacher)
            embedder = Embedder.from_pretrained(teacher, precision=encode_setting(precision))
        # the instruction goes to encode() on its own, so a skip-instruction teacher does not pool over it
        distinct_queries = list(dict.fromkeys(queries))
        distinct = list(dict.fromkeys(text for texts in columns.values() for text in texts))
        logger.info("teacher: embedding %d distinct texts of %s", len(distinct_queries) + len(distinct), name)
        query_vectors = embedder.encode(distinct_queries, instruction=instruction or None, batch_size=batch_size,
                                        max_length=max_length, normalize=True)
        vectors = embedder.encode(distinct, batch_size=batch_size, max_length=max_length, normalize=True)
        query_row = {text: i for i, text in enumerate(distinct_queries)}
        row_of = {text: i for i, text in enumerate(distinct)}
        keep = [c for c in table.column_names if not c.startswith("teacher_")]
        table = table.select(keep)
        table = table.append_column(TEACHER_QUERY, _vectors_column(query_vectors[[query_row[t] for t in queries]]))
        for column, texts in columns.items():
            table = table.append_column(column, _vectors_column(vectors[[row_of[t] for t in texts]]))
        atomic_write_table(table, path)
        done_before = {**done_before, name: table.num_rows}
        result["dim"] = int(vectors.shape[1])
        write_json_atomic(data_dir / TEACHER_INFO, {"settings": settings, "datasets": done_before,
                                                    "dim": result["dim"]})
        result["done"].append(name)
    return result
