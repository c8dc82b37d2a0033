"""What a synth run writes for training: the F2LLM raw table, its manifest entry, the report.

    DIR/<dataset>.parquet       query, passage, negative_1..k   (what `llm2emb prepare` reads)
    DIR/manifest.json           {<dataset>: {"type", "instruction"[, "weight"]}}, other entries kept
    DIR/_synth/report.json      generation and filter counts, throughput
    DIR/_synth/dropped.jsonl    every dropped row with its reason

All written atomically. Other datasets may share DIR (e.g. real data copied in): their manifest entries
are kept, so one `llm2emb prepare --input DIR` tokenises real and synthetic data for one training run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from llm2emb.atomic import write_json_atomic, write_text_atomic
from llm2emb.data.manifest import MANIFEST_NAME, DatasetSpec, parse_manifest
from llm2emb.errors import UserError
from llm2emb.synth.filters import SynthRow


def rows_frame(rows: Sequence[SynthRow], k: int) -> pd.DataFrame:
    data: dict[str, list[str]] = {"query": [r.query for r in rows], "passage": [r.passage for r in rows]}
    for j in range(k):
        data[f"negative_{j + 1}"] = [r.negatives[j] for r in rows]
    return pd.DataFrame(data)


def write_dataset(output: Path, dataset: str, rows: Sequence[SynthRow], k: int, entry: DatasetSpec) -> Path:
    from llm2emb.data.formats import atomic_write_table

    path = output / f"{dataset}.parquet"
    atomic_write_table(rows_frame(rows, k), path)
    manifest_path = output / MANIFEST_NAME
    manifest: dict[str, Any] = {}
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"Cannot read {manifest_path} ({exc}); fix or remove it.") from exc
        parse_manifest(manifest, str(manifest_path))  # the entries we keep must be valid
    manifest[dataset] = entry.to_dict()
    write_json_atomic(manifest_path, manifest)
    return path


def write_dropped(path: Path, dropped: Sequence[tuple[SynthRow, str]]) -> None:
    lines = [json.dumps({"reason": reason, "passage_id": row.passage_id, "query": row.query}, ensure_ascii=False)
             for row, reason in dropped]
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def report_table(report: dict[str, Any]) -> str:
    """The stages of a run as a fixed-width table: rows in, dropped, kept, why."""
    gen = report["generation"]
    lines = [(f"generation ({gen['passages']} passages)", gen["passages"], gen["failed"], gen["parsed"],
              ", ".join(f"{k} {v}" for k, v in gen["failure_reasons"].items()) or "-")]
    for f in report["filters"]:
        lines.append((f["filter"], f["input"], f["dropped"], f["kept"],
                      ", ".join(f"{k} {v}" for k, v in f["reasons"].items()) or "-"))
    header = ("stage", "in", "dropped", "kept", "why (replies or rows)")
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(4)]
    out = []
    for row in [header, *lines]:
        out.append("  ".join([str(row[0]).ljust(widths[0]), *[str(row[i]).rjust(widths[i]) for i in (1, 2, 3)],
                              str(row[4])]))
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def write_report(path: Path, report: dict[str, Any]) -> None:
    write_json_atomic(path, report)
