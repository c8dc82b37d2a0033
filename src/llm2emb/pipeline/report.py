"""A pipeline's results: `pipeline.json` (every stage's record), `report.md` (one row per stage: its main
score on every eval task, the change from the row before and from the start, steps and training time) and
`report.png` (each task's main score along the stages). Rewritten after every stage.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from llm2emb.atomic import atomic_path, write_json_atomic, write_text_atomic

PIPELINE_FILE = "pipeline.json"
REPORT_MD = "report.md"
REPORT_PNG = "report.png"


def _rows(records: list[dict[str, Any]]) -> list[str]:
    rows: list[str] = []
    for record in records:
        for row in record.get("eval") or {}:
            if row not in rows:
                rows.append(row)
    return rows


def _value(record: dict[str, Any], row: str) -> float | None:
    value = ((record.get("eval") or {}).get(row) or {}).get("value")
    return float(value) if isinstance(value, (int, float)) else None


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def markdown(name: str, records: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    rows = _rows(records)
    metrics = {row: next(((r.get("eval") or {}).get(row) or {}).get("metric", "") for r in records
                         if row in (r.get("eval") or {})) for row in rows}
    lines = [f"# Pipeline {name}", "",
             "One row per stage, in order (`start`: the model the first stage starts from). Scores are each task's "
             "main metric; Δ prev: change from the row above, Δ start: from the start row.", ""]
    header = ["stage", "kind"] + [f"{row} ({metrics[row]})" for row in rows]
    header += [f"Δ prev {row}" for row in rows] + [f"Δ start {row}" for row in rows] + ["steps", "train s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    start = next((r for r in records if r.get("kind") == "start"), None)
    previous = None
    for record in records:
        cells = [record["name"], record.get("kind", "")]
        cells += [_fmt(_value(record, row)) for row in rows]
        for ref in (previous, start):
            for row in rows:
                a, b = _value(record, row), _value(ref, row) if ref is not None and ref is not record else None
                cells.append(_fmt(a - b, signed=True) if a is not None and b is not None else "-")
        cells += [str(record.get("steps") or 0), f"{record.get('train_seconds') or 0:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
        previous = record
    lines += ["", f"Machine: {machine.get('cpu') or machine.get('processor') or machine.get('platform')}"
              + (f", GPU {machine['gpu']}" if machine.get("gpu") else "") + f"; torch {machine.get('torch', '?')}.", ""]
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path) -> Path | None:
    rows = _rows(records)
    if not rows or len(records) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(records)), 3.6))
    x = list(range(len(records)))
    for row in rows:
        ys = [_value(r, row) for r in records]
        ax.plot([i for i, y in zip(x, ys) if y is not None], [y for y in ys if y is not None], marker="o", label=row)
    ax.set_xticks(x, [r["name"] for r in records], rotation=20)
    ax.set_ylabel("main score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def write_reports(runner) -> dict[str, Any]:
    from llm2emb.study.report import machine

    pipeline = runner.pipeline
    order = ["start"] + [s.name for s in pipeline.stages]
    records = [runner.records[name] for name in order if name in runner.records]
    info = machine()
    result = {"name": pipeline.name, "file": str(pipeline.path), "model": pipeline.model, "machine": info,
              "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": records,
              "pending": [s.name for s in pipeline.stages if s.name not in runner.records]}
    write_json_atomic(runner.output / PIPELINE_FILE, result)
    write_text_atomic(runner.output / REPORT_MD, markdown(pipeline.name, records, info))
    plot(records, runner.output / REPORT_PNG)
    return result
