"""A pipeline's results: `pipeline.json` (every stage's record, and the comparisons with the baseline),
`report.md` (one row per stage: its main score on every eval task, the change from the row before and from
the start, with a `baseline:` stage also the change from it with a paired-bootstrap 95% interval over the
task's queries / pairs, steps and training time) and `report.png` (each task's main score along the stages).
Rewritten after every stage. A seeds pipeline (`llm2emb.pipeline.seeds`) writes the same three files over its
seeds: every score as mean +- std, the change from the baseline with a paired bootstrap whose statistic is
averaged over the seeds (the study's), and in how many seeds the stage beat the baseline.
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


def _interval_labels(rows: list[str], evals: list[dict[str, Any]]) -> dict[str, str]:
    """{row: '' or ' (Δ cosine_ap)'}: what a row's interval measures where it is not the shown metric."""
    from llm2emb.study.report import interval_label

    out = {}
    for row in rows:
        entry = next((e[row] for e in evals if row in e), {})
        out[row] = interval_label(entry.get("kind"), entry.get("metric", ""))
    return out


def markdown(name: str, records: list[dict[str, Any]], machine: dict[str, Any], baseline: str | None = None,
             compared: dict[str, dict[str, Any]] | None = None) -> str:
    rows = _rows(records)
    metrics = {row: next(((r.get("eval") or {}).get(row) or {}).get("metric", "") for r in records
                         if row in (r.get("eval") or {})) for row in rows}
    labels = _interval_labels(rows, [r.get("eval") or {} for r in records])
    lines = [f"# Pipeline {name}", "",
             "One row per stage, in order (`start`: the model the first stage starts from). Scores are each task's "
             "main metric; Δ prev: change from the row above, Δ start: from the start row"
             + (f"; Δ {baseline}: from stage {baseline}, with a paired-bootstrap 95% interval over the task's queries "
                "(pairs for STS)" if baseline else "") + ".", ""]
    header = ["stage", "kind"] + [f"{row} ({metrics[row]})" for row in rows]
    header += [f"Δ prev {row}" for row in rows] + [f"Δ start {row}" for row in rows]
    header += [f"Δ {baseline} {row} [95% CI]{labels[row]}" for row in rows] if baseline else []
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


def _plot_stages(names: list[str], series: dict[str, list[tuple[int, float, float]]], ylabel: str,
                 path: Path) -> Path:
    """Each task row's score along the stages: series {row: [(stage index, score, error bar)]}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(names)), 3.6))
    for row, points in series.items():
        xs, ys, errors = ([p[i] for p in points] for i in range(3))
        if any(errors):
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=row)
        else:
            ax.plot(xs, ys, marker="o", label=row)
    ax.set_xticks(list(range(len(names))), names, rotation=20)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def plot(records: list[dict[str, Any]], path: Path) -> Path | None:
    rows = _rows(records)
    if not rows or len(records) < 2:
        return None
    series = {row: [(i, y, 0.0) for i, y in enumerate(_value(r, row) for r in records) if y is not None]
              for row in rows}
    return _plot_stages([r["name"] for r in records], series, "main score", path)


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


# ------------------------------------------------------------------------------------------ over seeds

def seed_summary(stage_names: list[str], by_seed: dict[int, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per stage (in order, those finished in at least one seed): kind, seeds, steps, mean training seconds and
    per task row {metric, mean, std, n, values} over the seeds."""
    from llm2emb.study.stats import mean_std

    out = []
    for name in stage_names:
        records = {seed: found[name] for seed, found in by_seed.items() if name in found}
        if not records:
            continue
        rows: dict[str, dict[str, Any]] = {}
        for row in _rows(list(records.values())):
            values = {seed: _value(r, row) for seed, r in records.items()}
            values = {seed: v for seed, v in values.items() if v is not None}
            if values:
                mean, std = mean_std(list(values.values()))
                entry = next(r["eval"][row] for r in records.values() if row in (r.get("eval") or {}))
                rows[row] = {"metric": entry.get("metric", ""), "kind": entry.get("kind"), "mean": mean, "std": std,
                             "n": len(values),
                             "values": {str(seed): v for seed, v in values.items()}}
        first = next(iter(records.values()))
        train = [r.get("train_seconds") or 0.0 for r in records.values()]
        out.append({"name": name, "kind": first.get("kind", ""), "seeds": sorted(records), "steps": first.get("steps"),
                    "train_seconds": sum(train) / len(train), "eval": rows})
    return out


def seed_comparisons(stage_names: list[str], by_seed: dict[int, dict[str, dict[str, Any]]], baseline: str,
                     cache: dict[tuple, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """{stage: {row: stage minus baseline}} over the seeds where both are done: the study's paired bootstrap
    (items resampled, statistic averaged over seeds) plus `better_seeds` / `seeds` (seeds where the stage's
    score is above the baseline's)."""
    from llm2emb.study.report import compare_row

    cache = {} if cache is None else cache
    out: dict[str, dict[str, Any]] = {}
    for name in stage_names:
        if name == baseline:
            continue
        seeds = [seed for seed, found in by_seed.items() if name in found and baseline in found]
        if not seeds:
            continue
        pairs = [(by_seed[seed][name], by_seed[seed][baseline]) for seed in seeds]
        key = tuple((seed, *(r.get(k) for r in pair for k in ("name", "key", "eval_key")))
                    for seed, pair in zip(seeds, pairs))
        found = cache.get(key)
        if found is None:
            a_cells, b_cells = [_cell(a) for a, _ in pairs], [_cell(b) for _, b in pairs]
            found = {}
            for row in a_cells[0]["per_item"]:
                if all(row in c["per_item"] for c in a_cells + b_cells):
                    result = compare_row(a_cells, b_cells, row)
                    if result is not None:
                        better = sum(1 for a, b in pairs if (_value(a, row) or 0.0) > (_value(b, row) or 0.0))
                        found[row] = {**result, "better_seeds": better, "seeds": len(seeds)}
            if found:
                cache[key] = found
        out[name] = found
    return out


def seeds_markdown(name: str, seeds: list[int], summary: list[dict[str, Any]], machine: dict[str, Any],
                   baseline: str | None = None, compared: dict[str, dict[str, Any]] | None = None) -> str:
    from llm2emb.study.report import score_text

    rows: list[str] = []
    for stage in summary:
        rows += [row for row in stage["eval"] if row not in rows]
    metrics = {row: next(s["eval"][row]["metric"] for s in summary if row in s["eval"]) for row in rows}
    labels = _interval_labels(rows, [s["eval"] for s in summary])
    lines = [f"# Pipeline {name} over seeds {', '.join(map(str, seeds))}", "",
             "One row per stage, in order. Scores are each task's main metric as mean ± standard deviation over the "
             "seeds (n: seeds done; a score of one seed is shown without ±)"
             + (f"; Δ {baseline}: change from stage {baseline}, with a paired-bootstrap 95% interval over the task's "
                "queries (pairs for STS) averaged over the seeds, and the seeds in which the stage scored higher"
                if baseline else "") + ". Each seed's own report: seed-<n>/report.md.", ""]
    header = ["stage", "kind", "n"] + [f"{row} ({metrics[row]})" for row in rows]
    header += [f"Δ {baseline} {row} [95% CI]{labels[row]} (higher in)" for row in rows] if baseline else []
    header += ["steps", "train s (mean)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for stage in summary:
        cells = [stage["name"], stage["kind"], str(len(stage["seeds"]))]
        for row in rows:
            value = stage["eval"].get(row)
            cells.append(score_text(value["mean"], value["std"], value["n"]) if value else "-")
        if baseline:
            for row in rows:
                result = (compared or {}).get(stage["name"], {}).get(row)
                cells.append(f"{_interval(result)} ({result['better_seeds']}/{result['seeds']})" if result else "-")
        cells += [str(stage.get("steps") or 0), f"{stage.get('train_seconds') or 0:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Machine: {machine.get('cpu') or machine.get('processor') or machine.get('platform')}"
              + (f", GPU {machine['gpu']}" if machine.get("gpu") else "") + f"; torch {machine.get('torch', '?')}.", ""]
    return "\n".join(lines)


def plot_seeds(summary: list[dict[str, Any]], path: Path) -> Path | None:
    rows: list[str] = []
    for stage in summary:
        rows += [row for row in stage["eval"] if row not in rows]
    if not rows or len(summary) < 2:
        return None
    series = {row: [(i, s["eval"][row]["mean"], s["eval"][row]["std"]) for i, s in enumerate(summary)
                    if row in s["eval"]] for row in rows}
    return _plot_stages([s["name"] for s in summary], series, "main score (mean ± std over seeds)", path)


def write_seed_reports(runner) -> dict[str, Any]:
    """pipeline.json / report.md / report.png of a seeds run (`llm2emb.pipeline.seeds.SeedsRunner`)."""
    from llm2emb.study.report import machine

    pipeline = runner.pipeline
    names = ["start"] + [s.name for s in pipeline.stages]
    by_seed = runner.records()
    summary = seed_summary(names, by_seed)
    compared = seed_comparisons(names, by_seed, pipeline.baseline, runner.compared) if pipeline.baseline else {}
    info = machine()
    result = {"name": pipeline.name, "file": str(pipeline.path), "model": pipeline.model, "machine": info,
              "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seeds": pipeline.seeds,
              "seeds_done": sorted(seed for seed, found in by_seed.items()
                                   if all(s.name in found for s in pipeline.stages)),
              "stages": summary, "baseline": pipeline.baseline, "comparisons": compared}
    write_json_atomic(runner.output / PIPELINE_FILE, result)
    write_text_atomic(runner.output / REPORT_MD, seeds_markdown(pipeline.name, pipeline.seeds, summary, info,
                                                                pipeline.baseline, compared))
    plot_seeds(summary, runner.output / REPORT_PNG)
    return result
