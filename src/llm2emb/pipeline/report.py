"""A pipeline's results: `pipeline.json` (every stage's record, and the comparisons with the baseline),
`report.md` (one row per stage: its main score on every eval task, the change from the row before and from
the start, with a `baseline:` stage also the change from it with a paired-bootstrap 95% interval over the
task's queries / pairs, steps and training time) and `report.png` (each task's main score along the stages).
Rewritten after every stage.
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


def _cell(record: dict[str, Any]) -> dict[str, Any]:
    """A stage record in the shape the study's paired bootstrap reads (one seed)."""
    rows = record.get("eval") or {}
    return {"main": {row: {"kind": v.get("kind")} for row, v in rows.items()},
            "per_item": {row: v["per_item"] for row, v in rows.items() if v.get("per_item")}}


def comparisons(records: list[dict[str, Any]], baseline: str | None,
                cache: dict[tuple, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """{stage: {row: paired-bootstrap result of stage minus baseline}} for rows with per-item results.
    `cache` keeps results by the two records' stage and evaluation keys: the reports are rewritten after every
    stage, and each bootstrap is only computed once."""
    from llm2emb.study.report import compare_row

    base = next((r for r in records if r["name"] == baseline), None)
    out: dict[str, dict[str, Any]] = {}
    if base is None:
        return out
    cache = {} if cache is None else cache
    b = _cell(base)
    for record in records:
        if record is base:
            continue
        key = tuple(r.get(k) for r in (record, base) for k in ("name", "key", "eval_key"))
        found = cache.get(key)
        if found is None:
            a = _cell(record)
            rows = {row: compare_row([a], [b], row) for row in a["per_item"] if row in b["per_item"]}
            found = {row: result for row, result in rows.items() if result is not None}
            if found:              # a record without per-item results yet is not remembered
                cache[key] = found
        out[record["name"]] = found
    return out


def _interval(result: dict[str, Any] | None) -> str:
    if not result:
        return "-"
    return f"{result['diff']:+.4f} [{result['low']:+.4f}, {result['high']:+.4f}]"


def markdown(name: str, records: list[dict[str, Any]], machine: dict[str, Any], baseline: str | None = None,
             compared: dict[str, dict[str, Any]] | None = None) -> str:
    rows = _rows(records)
    metrics = {row: next(((r.get("eval") or {}).get(row) or {}).get("metric", "") for r in records
                         if row in (r.get("eval") or {})) for row in rows}
    lines = [f"# Pipeline {name}", "",
             "One row per stage, in order (`start`: the model the first stage starts from). Scores are each task's "
             "main metric; Δ prev: change from the row above, Δ start: from the start row"
             + (f"; Δ {baseline}: from stage {baseline}, with a paired-bootstrap 95% interval over the task's queries "
                "(pairs for STS)" if baseline else "") + ".", ""]
    header = ["stage", "kind"] + [f"{row} ({metrics[row]})" for row in rows]
    header += [f"Δ prev {row}" for row in rows] + [f"Δ start {row}" for row in rows]
    header += [f"Δ {baseline} {row} [95% CI]" for row in rows] if baseline else []
    header += ["steps", "train s"]
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
        if baseline:
            cells += [_interval((compared or {}).get(record["name"], {}).get(row)) for row in rows]
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
    compared = comparisons(records, pipeline.baseline, runner.compared) if pipeline.baseline else {}
    lean = [{**r, "eval": {row: {k: v for k, v in value.items() if k != "per_item"}
                           for row, value in (r.get("eval") or {}).items()}} for r in records]
    result = {"name": pipeline.name, "file": str(pipeline.path), "model": pipeline.model, "machine": info,
              "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": lean, "baseline": pipeline.baseline,
              "comparisons": compared, "pending": [s.name for s in pipeline.stages if s.name not in runner.records]}
    write_json_atomic(runner.output / PIPELINE_FILE, result)
    write_text_atomic(runner.output / REPORT_MD, markdown(pipeline.name, records, info, pipeline.baseline, compared))
    plot(records, runner.output / REPORT_PNG)
    return result
