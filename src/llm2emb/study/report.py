"""A study's results: `study.json` (every cell, the per-recipe summary and the paired comparisons),
`report.md` (the seed-style table with mean +- std over seeds and cost columns, then each recipe minus the
baseline with a 95% paired-bootstrap interval) and `report.png` / `curves.png`.

Comparisons resample items (queries, or pairs) with their scores under every seed of both recipes; on each
resample the statistic is averaged over seeds (`llm2emb.study.stats.paired_bootstrap_seeds`). A difference
is marked significant when its interval excludes 0. Both sides use the seeds they both finished (a recipe
still missing a seed is compared on the seeds it has); an untrained (`train_steps: 0`) recipe has one cell,
which no seed changes, so it is paired with every finished seed of the other side.

A score over one cell (an untrained recipe, or a recipe with one finished seed) is shown without a ± (its
spread is unknown, not 0): `score_text`, shared with the pipeline reports.
"""
from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

from llm2emb.atomic import atomic_path, write_json_atomic, write_text_atomic
from llm2emb.study.spec import Study
from llm2emb.study.stats import align_seeds, mean_std, paired_bootstrap_seeds

STUDY_FILE = "study.json"
REPORT_MD = "report.md"
REPORT_PNG = "report.png"
CURVES_PNG = "curves.png"
N_RESAMPLES = 2000
#: statistic of the paired bootstrap per task kind (retrieval kinds: the mean of per-query scores)
KIND_STATISTIC = {"sts": "spearman", "pairs": "ap"}
#: the metric a kind's interval is computed on where it is not the row's shown main metric: pair classification
#: shows max_ap (the best AP over cosine / dot / euclidean / manhattan scores), but per-pair files keep cosine
#: scores only, so its interval is the difference in cosine AP
INTERVAL_METRIC = {"pairs": "cosine_ap"}


def score_text(mean: float, std: float, n: int, expected: int | None = None, untrained: bool = False) -> str:
    """A score over `n` cells: `mean ± std` (with `(n=…)` when fewer than `expected`), or for one cell the plain
    score with `(n=1)` (`(n=1, untrained)` for an untrained recipe): one value has no spread to show."""
    if n <= 1:
        return f"{mean:.4f} (n=1{', untrained' if untrained else ''})"
    return f"{mean:.4f} ± {std:.4f}" + (f" (n={n})" if expected is not None and n != expected else "")


def seed_free(cells: list[dict[str, Any]]) -> bool:
    """True for the cells of an untrained recipe: the base model, which no seed changes (one cell)."""
    return bool(cells) and all(c.get("steps") == 0 for c in cells)


def paired_cells(a_cells: list[dict[str, Any]], b_cells: list[dict[str, Any]]
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The cells of two recipes a comparison pairs: those of the seeds both finished, or, where one side is
    untrained (seed-free), its one cell against every cell of the other side."""
    if seed_free(a_cells) or seed_free(b_cells):
        return a_cells, b_cells
    common = {c["seed"] for c in a_cells} & {c["seed"] for c in b_cells}
    return [c for c in a_cells if c["seed"] in common], [c for c in b_cells if c["seed"] in common]


def interval_metric(kind: str | None, metric: str) -> str:
    """The metric a row's paired-bootstrap interval measures (`metric`, the row's main metric, unless the
    kind's interval is computed on another one; see INTERVAL_METRIC)."""
    return INTERVAL_METRIC.get(kind or "", metric)


def interval_label(kind: str | None, metric: str) -> str:
    """'' when a row's interval measures its shown metric, else ' (Δ <metric the interval measures>)'; column
    headers of intervals carry it so a difference is never read as one of the shown metric."""
    shown = interval_metric(kind, metric)
    return "" if shown == metric else f" (Δ {shown})"


def machine() -> dict[str, Any]:
    """CPU model and the flags that decide its speed (results are only comparable on one machine)."""
    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.processor()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["cpu_flags"] = sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx2", "avx512f")))
                break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover
        pass
    return info


def rows_of(cells: list[dict[str, Any]]) -> list[str]:
    rows: list[str] = []
    for cell in cells:
        for row in cell.get("main", {}):
            if row not in rows:
                rows.append(row)
    return rows


def summarize(study: Study, cells: list[dict[str, Any]]) -> dict[str, Any]:
    done = [c for c in cells if c.get("status") == "done"]
    rows = rows_of(done)
    summary: dict[str, Any] = {}
    for recipe in [r.name for r in study.recipes]:
        mine = [c for c in done if c["recipe"] == recipe]
        if not mine:
            continue
        entry: dict[str, Any] = {"seeds": [c["seed"] for c in mine], "tasks": {}}
        for row in rows:
            values = [c["main"][row]["value"] for c in mine if row in c.get("main", {})]
            if values:
                mean, std = mean_std(values)
                entry["tasks"][row] = {"metric": mine[0]["main"][row]["metric"], "mean": mean, "std": std,
                                       "n": len(values), "values": values}
        for key in ("train_seconds", "samples_per_second", "peak_rss_mib", "final_loss", "eval_seconds"):
            values = [c[key] for c in mine if c.get(key) is not None]
            if values:
                entry[key] = mean_std(values)[0]
        entry["steps"] = mine[0].get("steps")
        entry["untrained"] = seed_free(mine)
        summary[recipe] = entry
    return summary


def compare(study: Study, cells: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """{recipe: {row: BootstrapResult dict}} of every recipe minus the baseline, per task row."""
    done = [c for c in cells if c.get("status") == "done"]
    baseline = [c for c in done if c["recipe"] == study.baseline]
    out: dict[str, Any] = {}
    if not baseline:
        return out
    for recipe in [r.name for r in study.recipes[1:]]:
        mine = [c for c in done if c["recipe"] == recipe]
        if not mine:
            continue
        out[recipe] = {}
        for row in rows_of(done):
            a_cells, b_cells = paired_cells([c for c in mine if row in c.get("per_item", {})],
                                            [c for c in baseline if row in c.get("per_item", {})])
            if not a_cells or not b_cells:
                continue   # no seed finished by both
            result = compare_row(a_cells, b_cells, row, seed)
            if result is not None:
                if not (seed_free(a_cells) and seed_free(b_cells)):   # the seeds the interval averages over
                    result["seeds"] = sorted({c["seed"] for c in (b_cells if seed_free(a_cells) else a_cells)})
                out[recipe][row] = result
    return out


def compare_row(a_cells, b_cells, row: str, seed: int = 0) -> dict[str, Any] | None:
    """Paired bootstrap of one task row, cells a minus cells b (seeds averaged); each cell needs
    main[row]["kind"] and per_item[row] (`study.cell.compact_per_item`). None without per-item results."""
    kind = a_cells[0]["main"][row]["kind"]
    statistic = KIND_STATISTIC.get(kind, "mean")
    if statistic == "mean":
        seeds_a = [c["per_item"][row].get("scores", {}) for c in a_cells]
        seeds_b = [c["per_item"][row].get("scores", {}) for c in b_cells]
        if not all(seeds_a) or not all(seeds_b):
            return None
        ids, a, b = align_seeds(seeds_a, seeds_b)
        result = paired_bootstrap_seeds(a, b, "mean", n_resamples=N_RESAMPLES, seed=seed)
    else:
        reference_key = "gold" if kind == "sts" else "label"
        reference = a_cells[0]["per_item"][row].get(reference_key)
        if not reference:
            return None
        a = [c["per_item"][row]["cosine"] for c in a_cells]
        b = [c["per_item"][row]["cosine"] for c in b_cells]
        result = paired_bootstrap_seeds(a, b, statistic, reference=reference, n_resamples=N_RESAMPLES, seed=seed)
    return {**result.as_dict(), "statistic": statistic if statistic != "ap" else "cosine_ap"}


# ---------------------------------------------------------------------- writing

def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown(study: Study, summary: dict[str, Any], comparisons: dict[str, Any], cells: list[dict[str, Any]],
             info: dict[str, Any]) -> str:
    rows = rows_of([c for c in cells if c.get("status") == "done"])
    lines = [f"# Study `{study.name}`", ""]
    if study.description:
        lines += [study.description, ""]
    seeds = ", ".join(map(str, study.seeds))
    lines += [f"Recipes x seeds ({seeds}); baseline: `{study.baseline}`. Each cell is mean +- sample std over "
              "seeds of the task's main score (n: cells, where fewer than the seeds); a recipe with one cell (an "
              "untrained one: the base model, which no seed changes) shows its score without ±; cost columns are "
              "means over seeds.", ""]
    metric_of = {row: next((c["main"][row]["metric"] for c in cells if row in c.get("main", {})), "") for row in rows}
    header = ["recipe", *[f"{row} ({metric_of[row]})" for row in rows], "train s", "samples/s", "peak RSS GiB",
              "steps"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for recipe in [r.name for r in study.recipes]:
        entry = summary.get(recipe)
        if entry is None:
            lines.append(f"| {recipe} | " + " | ".join(["(no finished cell)"] + [""] * (len(header) - 2)) + " |")
            continue
        values = []
        for row in rows:
            t = entry["tasks"].get(row)
            values.append("" if t is None else score_text(t["mean"], t["std"], t["n"], len(study.seeds),
                                                          untrained=entry.get("untrained", False)))
        rss = entry.get("peak_rss_mib")
        lines.append(f"| {recipe} | " + " | ".join(values) + f" | {_fmt(entry.get('train_seconds'), 0)} | "
                     f"{_fmt(entry.get('samples_per_second'), 2)} | {'' if rss is None else f'{rss / 1024:.1f}'} | "
                     f"{entry.get('steps', '')} |")
    if comparisons:
        lines += ["", f"Difference to the baseline `{study.baseline}` (recipe minus baseline) with a 95% "
                  f"paired-bootstrap interval over queries / pairs ({N_RESAMPLES} resamples, seeds averaged per "
                  "resample) on the seeds both finished (`seeds …` where fewer than all); an untrained recipe's "
                  "one cell is paired with every seed of the other side; **bold** = the interval excludes 0.", ""]
        kind_of = {row: next((c["main"][row].get("kind") for c in cells if row in c.get("main", {})), None)
                   for row in rows}
        header = ["recipe", *[row + interval_label(kind_of[row], metric_of[row]) for row in rows]]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * len(rows)) + "|")
        for recipe, by_row in comparisons.items():
            values = []
            for row in rows:
                r = by_row.get(row)
                if r is None:
                    values.append("")
                    continue
                text = f"{r['diff']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]"
                text = f"**{text}**" if r["significant"] else text
                used = r.get("seeds")
                if used is not None and len(used) < len(study.seeds):
                    text += f" (seeds {', '.join(map(str, used))})"
                values.append(text)
            lines.append(f"| {recipe} | " + " | ".join(values) + " |")
    failed = [c for c in cells if c.get("status") == "failed"]
    if failed:
        lines += ["", "Failed cells (run the study again to retry them):", ""]
        lines += [f"- `{c['cell']}`: {c.get('error', '')}" for c in failed]
    best = _best_steps(summary, cells)
    if best:
        lines += ["", "Best step of the periodic evaluation (mean over seeds): " + "; ".join(best)]
    cpu = info.get("cpu") or info.get("processor") or "unknown CPU"
    lines += ["", f"Machine: {cpu} ({', '.join(info.get('cpu_flags', []))}), torch {info.get('torch', '?')}"
              + (f", GPU {info['gpu']}" if info.get("gpu") else "") + f"; written {time.strftime('%Y-%m-%d %H:%M')}."]
    return "\n".join(lines) + "\n"


def _curves(cells: list[dict[str, Any]]) -> dict[str, dict[str, dict[int, list[float]]]]:
    """{recipe: {metric key: {step: [values over seeds]}}} from the cells' periodic evaluations."""
    out: dict[str, dict[str, dict[int, list[float]]]] = {}
    for cell in cells:
        for entry in cell.get("curve", []) or []:
            for key, value in entry.items():
                if key in ("type", "step", "time") or not isinstance(value, (int, float)):
                    continue
                out.setdefault(cell["recipe"], {}).setdefault(key, {}).setdefault(int(entry["step"]), []).append(
                    float(value))
    return out


def _best_steps(summary: dict[str, Any], cells: list[dict[str, Any]]) -> list[str]:
    best = []
    for recipe, metrics in _curves([c for c in cells if c.get("status") == "done"]).items():
        for key, by_step in metrics.items():
            means = {step: sum(v) / len(v) for step, v in by_step.items()}
            step = max(means, key=means.get)
            best.append(f"{recipe} {key}: step {step} ({means[step]:.4f})")
    return best


def plot(study: Study, summary: dict[str, Any], cells: list[dict[str, Any]], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = rows_of([c for c in cells if c.get("status") == "done"])
    recipes = [r.name for r in study.recipes if r.name in summary]
    if not rows or not recipes:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows) * max(1, len(recipes)) / 2), 4))
    x = np.arange(len(rows))
    width = 0.8 / len(recipes)
    for i, recipe in enumerate(recipes):
        tasks = summary[recipe]["tasks"]
        means = [tasks.get(row, {}).get("mean", 0.0) for row in rows]
        stds = [tasks.get(row, {}).get("std", 0.0) for row in rows]
        ax.bar(x + (i - (len(recipes) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=recipe)
    ax.set_xticks(x, rows, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("main score (mean ± std over seeds)")
    ax.set_title(f"study {study.name}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def plot_curves(cells: list[dict[str, Any]], path: Path) -> Path | None:
    curves = _curves([c for c in cells if c.get("status") == "done"])
    keys = sorted({k for metrics in curves.values() for k in metrics})
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for recipe, metrics in curves.items():
            by_step = metrics.get(key, {})
            steps = sorted(by_step)
            ax.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], marker=".", label=recipe)
        ax.set(xlabel="step", title=key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def write_reports(study: Study, output: Path, cells: list[dict[str, Any]]) -> dict[str, Any]:
    info = machine()
    summary = summarize(study, cells)
    comparisons = compare(study, cells)
    result = {"name": study.name, "study_file": str(study.path), "baseline": study.baseline, "seeds": study.seeds,
              "recipes": [r.name for r in study.recipes], "machine": info, "summary": summary,
              "comparisons": comparisons, "cells": cells}
    write_json_atomic(output / STUDY_FILE, result)
    write_text_atomic(output / REPORT_MD, markdown(study, summary, comparisons, cells, info))
    plot(study, summary, cells, output / REPORT_PNG)
    plot_curves(cells, output / CURVES_PNG)
    return result
