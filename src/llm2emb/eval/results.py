"""Result files: one JSON per (model, task) evaluation, written atomically, read back by `llm2emb compare`.

    {"format": "llm2emb-eval/1", "label": "smollm2-135m [mean]",
     "model": {"source": ..., "kind": "llm2emb", "fingerprint": ..., "pooling": ..., ...},
     "config": "configs/config.f2llm.json" | null,
     "task": {"name": "scifact_mini", "kind": "retrieval", "target": ".../scifact_mini", "split": "test"},
     "main_score": "ndcg_at_10", "metrics": {"ndcg_at_10": 0.22, ...},
     "limits": 100, "seed": 42, "query_instruction": null, "batch_size": 32, "max_length": null, "dim": null,
     "info": {"n_queries": 100, "n_docs": 1000, ...}, "seconds": {...},
     "time": "2025-01-01T12:00:00+00:00", "versions": {"llm2emb": ..., "torch": ..., ...},
     "per_item": {"ndcg_at_10": {"q1": 0.63093, ...}, "mrr_at_10": {...}, ...}}

"per_item" (floats to 6 significant digits) holds the values behind the metrics, for paired statistics:
retrieval {metric: {query id: value}} for ndcg_at_10, mrr_at_10, map_at_10, recall_at_10, recall_at_100,
precision_at_10; sts {"cosine": [...], "gold": [...]}; pairs {"cosine": [...], "label": [...]} (lists in
file order); {} for mteb tasks. Records written before it existed have no "per_item"; readers use
`record.get("per_item", {})`.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
from pathlib import Path
from typing import Any, Iterable

from llm2emb.atomic import write_json_atomic
from llm2emb.errors import UserError

FORMAT = "llm2emb-eval/1"
VERSIONED_PACKAGES = ("torch", "transformers", "peft", "mteb", "sentence-transformers", "pytrec-eval-terrier",
                      "numpy")


def versions() -> dict[str, str]:
    """Versions of llm2emb, Python and the libraries that can change a score."""
    from importlib.metadata import PackageNotFoundError, version

    import llm2emb

    out = {"llm2emb": llm2emb.__version__, "python": platform.python_version(), "platform": platform.platform()}
    for package in VERSIONED_PACKAGES:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            continue
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


PER_ITEM_DIGITS = 6


def round_floats(value: Any, digits: int = PER_ITEM_DIGITS) -> Any:
    """`value` with every float (in nested dicts / lists) rounded to `digits` significant digits; ints,
    bools and strings unchanged. Keeps per-item lists small in JSON (0.6309297535714575 -> 0.63093)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {key: round_floats(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [round_floats(item, digits) for item in value]
    return value


def make_record(*, label: str, model: dict[str, Any], config: str | None, task, outcome, limits: int | None,
                seed: int, query_instruction: str | None, batch_size: int, max_length: int | None,
                dim: int | None, started: str, seconds: float, versions: dict[str, str]) -> dict[str, Any]:
    """The result record of one (model, task) evaluation (layout in the module docstring). `task` is a
    `tasks.Task`, `outcome` its `tasks.TaskOutcome`; `limits` is kept only where it applied (retrieval)."""
    return {
        "format": FORMAT, "label": label, "model": model, "config": config,
        "task": {"name": task.name, "kind": task.kind.name, "target": task.target, "split": outcome.split},
        "main_score": outcome.main_score, "metrics": outcome.metrics,
        "limits": limits if outcome.info.get("n_queries") is not None else None,
        "seed": seed, "query_instruction": query_instruction, "batch_size": batch_size, "max_length": max_length,
        "dim": dim, "info": outcome.info, "seconds": {**outcome.seconds, "total": seconds}, "time": started,
        "versions": versions, "per_item": round_floats(getattr(outcome, "per_item", None) or {}),
    }


def slug(text: str, limit: int = 60) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return cleaned[:limit] or "x"


def record_filename(record: dict[str, Any]) -> str:
    return f"{slug(record['task']['name'])}__{slug(record['label'])}.json"


def write_record(record: dict[str, Any], output_dir: str | os.PathLike[str]) -> Path:
    """Write `record` as `<output_dir>/<task>__<label>.json` (replacing an earlier run of the same pair)."""
    return write_json_atomic(Path(output_dir).expanduser() / record_filename(record), record)


def _is_record(data: Any) -> bool:
    return isinstance(data, dict) and data.get("format") == FORMAT


def load_records(paths: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Result records from files and folders (searched recursively for *.json); at least one is required."""
    records: list[dict[str, Any]] = []
    for given in paths:
        path = Path(given).expanduser()
        if not path.exists():
            raise UserError(f"Result path {path} does not exist.")
        files = sorted(path.rglob("*.json")) if path.is_dir() else [path]
        for file in files:
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                if path.is_dir():
                    continue  # other JSON files beside results are fine
                raise UserError(f"Result file {file} is not valid JSON ({exc}).") from exc
            if _is_record(data):
                data["_file"] = str(file)
                records.append(data)
            elif not path.is_dir():
                raise UserError(f"{file} is not an llm2emb eval result (no \"format\": \"{FORMAT}\"); pass files "
                                "written by `llm2emb eval`.")
    if not records:
        raise UserError(f"No llm2emb eval result files found in {', '.join(str(p) for p in paths)}.")
    return records
