"""A training stage's data: its raw input (folder, files, builtin:stdlib), turned into SimCSE rows when the
stage is unsupervised, tokenised with `llm2emb prepare` for the stage's model, and given teacher columns
when the stage distils.

Unsupervised SimCSE (Gao et al. 2021, "SimCSE: Simple Contrastive Learning of Sentence Embeddings"; the
first of LLM2Vec's steps, BehnamGhader et al. 2024): every distinct text of the data (queries without
instruction, and passages) becomes a row (text, text); in-batch InfoNCE then pulls a text's two encodings,
which differ only by dropout (the trainer encodes queries and passages in separate forward passes), together
and pushes the other texts away. The stage's `dropout` puts dropout into the model config for that.

Everything lands in `data/<stage>/` of the pipeline output: `raw/` (SimCSE rows, or links to the listed
files), `prepared/` (tokenised; re-running skips what is unchanged, as `llm2emb prepare` does).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from llm2emb.atomic import write_json_atomic
from llm2emb.data.formats import METADATA_FILES
from llm2emb.data.manifest import MANIFEST_NAME as MANIFEST, read_manifest
from llm2emb.errors import UserError

logger = logging.getLogger(__name__)


def builtin_train_dir(name: str) -> str:
    from llm2emb.data.builtin import builtin_train_dir as build
    from llm2emb.model.loading import llm2emb_home

    return str(build(name, llm2emb_home()))


def data_fingerprint(data: str | list[str]) -> list[str]:
    """What identifies a stage's raw data: built-in names with the Python version (the stdlib is the data),
    file paths with size and modification time."""
    import sys

    out = []
    for item in data if isinstance(data, list) else [data]:
        if item.startswith("builtin:"):
            out.append(f"{item}@{sys.version_info[0]}.{sys.version_info[1]}")
            continue
        path = Path(item)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            stat = file.stat()
            out.append(f"{file}:{stat.st_size}:{stat.st_mtime_ns}")
    return out


def raw_input(data: str | list[str], folder: Path) -> str:
    """One folder or file `prepare` reads for the stage's data. A list (folders, dataset files, built-in data)
    is linked into `folder`, the folders' manifest entries merged into one manifest.json."""
    if isinstance(data, str):
        return builtin_train_dir(data) if data.startswith("builtin:") else data
    folder.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {}
    for item in data:
        source = Path(builtin_train_dir(item) if item.startswith("builtin:") else item)
        if source.is_dir():
            entries = read_manifest(source)
            for name, entry in entries.items():
                if name in manifest and manifest[name] != entry:
                    raise UserError(f"Two data folders of one stage describe dataset {name!r} differently in their "
                                    "manifest.json; rename one dataset.")
            manifest.update(entries)
        for path in [p for p in sorted(source.iterdir()) if p.is_file()] if source.is_dir() else [source]:
            if path.name in METADATA_FILES or path.name.startswith(("_", ".")):
                continue
            link = folder / path.name
            if link.is_symlink() or link.exists():
                if link.resolve() == path.resolve():
                    continue
                raise UserError(f"Two data files of one stage are both named {path.name!r}; rename one.")
            link.symlink_to(path.resolve())
    target = folder / MANIFEST
    if manifest and read_manifest(folder) != manifest:
        write_json_atomic(target, manifest)
    return str(folder)


def simcse_rows(raw: str, folder: Path) -> str:
    """Raw data of (text, text) rows from every distinct query and passage of `raw`, one dataset per input
    dataset, no instruction; rewritten only when the rows change (so prepare can skip it)."""
    import pandas as pd

    from llm2emb.data.formats import list_datasets, load_dataset

    folder.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {}
    for file in list_datasets(raw):
        frame = load_dataset(file).frame
        texts = list(dict.fromkeys(t for t in list(frame["query"]) + list(frame["passage"]) if t.strip()))
        if len(texts) < 2:
            raise UserError(f"Dataset {file.name!r} of {raw} has fewer than 2 distinct texts; SimCSE needs more.")
        digest = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()
        info_path = folder / f"_{file.name}.simcse.json"     # the leading "_" keeps prepare off it
        target = folder / f"{file.name}.parquet"
        try:
            same = json.loads(info_path.read_text(encoding="utf-8")).get("sha256") == digest and target.exists()
        except (OSError, ValueError):
            same = False
        if not same:
            from llm2emb.data.formats import atomic_write_table

            atomic_write_table(pd.DataFrame({"query": texts, "passage": texts}), target)
            write_json_atomic(info_path, {"sha256": digest, "rows": len(texts), "source": str(file.path)})
        manifest[file.name] = {"type": "retrieval", "instruction": ""}
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists() or json.loads(manifest_path.read_text(encoding="utf-8")) != manifest:
        write_json_atomic(manifest_path, manifest)
    return str(folder)


def prepare_stage_data(stage, model_path: str, config: dict[str, Any], data_settings: dict[str, Any],
                       folder: Path) -> tuple[str, str]:
    """(raw input, prepared folder) of a training stage, prepared for `model_path`'s tokenizer."""
    from llm2emb.data.tokenize import prepare

    raw = raw_input(stage.data, folder / "files")
    if stage.simcse:
        raw = simcse_rows(raw, folder / "simcse")
    prepared = folder / "prepared"
    kwargs: dict[str, Any] = {"max_seq_length": data_settings.get("max_seq_length") or int(config.get(
        "max_seq_length", 2048)), "workers": data_settings.get("workers") or 1, "progress": False,
        "end_token": data_settings.get("end_token") or config.get("end_token", "auto"),
        # a stage with an input strategy (echo, PromptEOL) trains on data prepared for it
        "input_strategy": config.get("input_strategy") or "plain"}
    from llm2emb.model.summary_token import data_setting

    summary = data_setting(config)  # pooling cls: its summary token goes into the prepared texts
    if summary is not None:
        kwargs["summary_token"], kwargs["summary_token_position"] = summary
    separator = data_settings.get("instruction_separator", config.get("instruction_separator"))
    if separator is not None:
        kwargs["instruction_separator"] = separator
    try:
        prepare(model_path, raw, prepared, **kwargs)
    except UserError as exc:
        if "--overwrite" not in str(exc):
            raise
        logger.info("stage %s: the data was prepared with other settings; preparing it again", stage.name)
        prepare(model_path, raw, prepared, overwrite=True, **kwargs)
    if stage.teacher is not None and not stage.teacher.on_the_fly:
        from llm2emb.pipeline.teacher import add_teacher_columns

        t = stage.teacher
        add_teacher_columns(prepared, raw, t.model, instructions=t.instructions, batch_size=t.batch_size,
                            max_length=t.max_length, precision=t.precision)
    return raw, str(prepared)
