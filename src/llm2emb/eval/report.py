"""Comparison reports from result files: one markdown table (rows = models/configs, columns = task x
metric, like the seed's T2Retrieval tables) and a grouped bar chart.

Default columns per task kind: retrieval nDCG@10, MRR@10, MAP@10, Recall@10, Recall@100, P@10 (the seed's
tables); STS Spearman and Pearson; pair classification max AP and Spearman; other MTEB tasks their main
score. `metrics=[...]` picks columns explicitly (a metric missing for a task is left out for it).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from llm2emb.atomic import atomic_path
from llm2emb.errors import UserError

DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "retrieval": ("ndcg_at_10", "mrr_at_10", "map_at_10", "recall_at_10", "recall_at_100", "precision_at_10"),
    "mteb-local": ("ndcg_at_10", "mrr_at_10", "map_at_10", "recall_at_10", "recall_at_100", "precision_at_10"),
    "sts": ("cosine_spearman", "cosine_pearson"),
    "pairs": ("max_ap", "cosine_spearman"),
}
PRETTY: dict[str, str] = {"ndcg": "nDCG", "mrr": "MRR", "map": "MAP", "recall": "Recall", "precision": "P",
                          "hit_rate": "HitRate", "cosine_spearman": "Spearman", "cosine_pearson": "Pearson",
                          "max_ap": "max AP", "spearman": "Spearman", "pearson": "Pearson"}


def pretty_metric(name: str) -> str:
    if name in PRETTY:
        return PRETTY[name]
    head, sep, k = name.rpartition("_at_")
    if sep and head in PRETTY:
        return f"{PRETTY[head]}@{k}"
    return name


def _row_label(record: dict[str, Any]) -> str:
    return str(record.get("label") or record.get("model", {}).get("source") or "model")


def _task_key(record: dict[str, Any]) -> str:
    task = record["task"]
    name = task["name"]
    if record.get("limits"):
        name += f" (limits={record['limits']})"
    return name


def _columns(records: Sequence[dict[str, Any]], metrics: Sequence[str] | None) -> list[tuple[str, str]]:
    """(task key, metric) in first-seen task order."""
    columns: list[tuple[str, str]] = []
    for record in records:
        key = _task_key(record)
        if any(col[0] == key for col in columns):
            continue
        kind = record["task"].get("kind", "")
        wanted = list(metrics) if metrics else list(DEFAULT_METRICS.get(kind, (record.get("main_score"),)))
        if not metrics and kind == "mteb" and str(record.get("main_score", "")).startswith("ndcg"):
            wanted = list(DEFAULT_METRICS["retrieval"])
        present = [m for m in wanted if m and any(m in r["metrics"] for r in records if _task_key(r) == key)]
        columns.extend((key, m) for m in present)
    return columns


def comparison_table(records: Sequence[dict[str, Any]], metrics: Sequence[str] | None = None
                     ) -> tuple[list[str], list[list[str]], dict[str, dict[tuple[str, str], float]]]:
    """(header, rows of cells, {row label: {(task, metric): value}}); the last result wins on repeats."""
    columns = _columns(records, metrics)
    if not columns:
        wanted = ", ".join(metrics) if metrics else "the default metrics"
        raise UserError(f"None of the result files has {wanted}; pick metrics present in them with --metrics.")
    values: dict[str, dict[tuple[str, str], float]] = {}
    for record in records:
        row = values.setdefault(_row_label(record), {})
        for metric, value in record["metrics"].items():
            row[(_task_key(record), metric)] = value
    cells = {label: [f"{row[col]:.5f}" if col in row else "" for col in columns] for label, row in values.items()}
    tasks = list(dict.fromkeys(task for task, _ in columns))
    if len(tasks) == 1:  # the seed's layout: a task column, metrics as headers
        header = ["model", "task"] + [pretty_metric(metric) for _, metric in columns]
        rows = [[label, tasks[0]] + row for label, row in cells.items()]
    else:
        header = ["model"] + [f"{task} {pretty_metric(metric)}" for task, metric in columns]
        rows = [[label] + row for label, row in cells.items()]
    return header, rows, values


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    def numeric(column: int) -> bool:
        try:
            [float(row[column]) for row in rows if row[column] != ""]
        except ValueError:
            return False
        return any(row[column] != "" for row in rows)

    align = ["---:" if numeric(i) else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_report(records: Sequence[dict[str, Any]], metrics: Sequence[str] | None = None) -> str:
    """The markdown table plus one line per result saying what exactly was run."""
    header, rows, _ = comparison_table(records, metrics)
    notes = []
    for record in records:
        task = record["task"]
        bits = [f"split {task.get('split')}" if task.get("split") else None,
                f"{record['info']['n_queries']} queries" if record.get("info", {}).get("n_queries") else None,
                f"instruction {record['query_instruction']!r}" if record.get("query_instruction") else None,
                f"max length {record['max_length']}" if record.get("max_length") else None,
                f"dim {record['dim']}" if record.get("dim") else None]
        notes.append(f"- {_row_label(record)} on {task['name']}: " + ", ".join(b for b in bits if b)
                     + f" ({Path(record.get('_file', '')).name})")
    return markdown_table(header, rows) + "\n\n" + "\n".join(notes) + "\n"


def plot_report(records: Sequence[dict[str, Any]], path: str | os.PathLike[str], metrics: Sequence[str] | None = None
                ) -> Path:
    """Grouped bar chart (one group per task x metric column, one bar per model), written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    _, _, values = comparison_table(records, metrics)
    columns = _columns(records, metrics)
    labels = list(values)
    width = 0.8 / max(1, len(labels))
    x = np.arange(len(columns))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(columns) * max(1, len(labels)) ** 0.5 + 2), 4.5))
    for i, label in enumerate(labels):
        heights = [values[label].get(col, 0.0) for col in columns]
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, heights, width, label=label)
    ax.set_xticks(x, [f"{task} {pretty_metric(metric)}" for task, metric in columns], rotation=30, ha="right",
                  fontsize=8)
    ax.set_ylabel("score")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    target = Path(path).expanduser()
    try:
        with atomic_path(target) as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return target
