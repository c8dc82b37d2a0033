"""What a report's interval measures: pair-classification rows show max_ap, but their paired bootstrap runs on
cosine AP (per-pair files keep cosine scores only), so the interval columns say `Δ cosine_ap` in study and
pipeline reports; rows whose interval is the shown metric carry no label."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from llm2emb.pipeline import report as pipeline_report
from llm2emb.study import report as study_report


def _pairs_eval(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    labels = [1, 0] * 10
    cosine = (np.array(labels) * 0.3 + rng.random(20)).tolist()
    scores = {f"q{i}": float(v) for i, v in enumerate(rng.random(8))}
    return {"pairs": {"metric": "max_ap", "kind": "pairs", "value": 0.7 + seed / 100,
                      "per_item": {"cosine": cosine, "label": labels}},
            "beir": {"metric": "ndcg_at_10", "kind": "retrieval", "value": float(np.mean(list(scores.values()))),
                     "per_item": {"scores": scores}}}


def _cell(recipe: str, seed: int) -> dict:
    found = _pairs_eval(seed * 7 + len(recipe))
    return {"cell": f"{recipe}.seed{seed}", "recipe": recipe, "seed": seed, "status": "done", "steps": 2,
            "main": {row: {k: v for k, v in e.items() if k != "per_item"} for row, e in found.items()},
            "per_item": {row: e["per_item"] for row, e in found.items()}}


def test_study_report_labels_the_pairs_interval_as_cosine_ap():
    study = SimpleNamespace(name="s", description="", seeds=[1, 2], baseline="base",
                            recipes=[SimpleNamespace(name="base"), SimpleNamespace(name="other")])
    cells = [_cell(r, s) for s in (1, 2) for r in ("base", "other")]
    summary = study_report.summarize(study, cells)
    comparisons = study_report.compare(study, cells)
    assert comparisons["other"]["pairs"]["statistic"] == "cosine_ap"
    text = study_report.markdown(study, summary, comparisons, cells, {})
    header = next(line for line in text.splitlines() if line.startswith("| recipe | pairs (Δ"))
    assert "pairs (Δ cosine_ap)" in header and "| beir |" in header + "|"
    assert study_report.interval_metric("pairs", "max_ap") == "cosine_ap"
    assert study_report.interval_metric("retrieval", "ndcg_at_10") == "ndcg_at_10"


def test_pipeline_reports_label_the_pairs_interval_as_cosine_ap():
    records = [{"name": name, "kind": "contrastive", "steps": 2, "train_seconds": 1.0, "key": name, "eval_key": "e",
                "eval": _pairs_eval(i)} for i, name in enumerate(["start", "a", "b"])]
    compared = pipeline_report.comparisons(records, "a")
    text = pipeline_report.markdown("p", records, {}, "a", compared)
    header = text.splitlines()[4]
    assert "Δ a pairs [95% CI] (Δ cosine_ap)" in header and "Δ a beir [95% CI] |" in header

    by_seed = {seed: {r["name"]: {**r, "eval": _pairs_eval(seed * 3 + i)} for i, r in enumerate(records)}
               for seed in (1, 2)}
    summary = pipeline_report.seed_summary(["start", "a", "b"], by_seed)
    compared = pipeline_report.seed_comparisons(["start", "a", "b"], by_seed, "a")
    text = pipeline_report.seeds_markdown("p", [1, 2], summary, {}, "a", compared)
    assert "Δ a pairs [95% CI] (Δ cosine_ap) (higher in)" in text and "Δ a beir [95% CI] (higher in)" in text


def _row(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {name} |"))


def test_one_cell_scores_show_no_interval_and_comparisons_pair_the_seeds_both_sides_have():
    """An untrained recipe (train_steps 0: one cell, which no seed changes) and a recipe with one finished seed
    show their score without `± 0.0000`. The untrained cell is paired with every seed of the baseline; a
    trained recipe with one seed is compared on that seed only, and the report says which."""
    from llm2emb.study.report import compare_row

    study = SimpleNamespace(name="s", description="", seeds=[1, 2], baseline="base",
                            recipes=[SimpleNamespace(name=n) for n in ("base", "untrained", "partial", "other")])
    base = [_cell("base", s) for s in (1, 2)]
    untrained = {**_cell("untrained", 1), "steps": 0}
    partial = _cell("partial", 2)
    other = [_cell("other", s) for s in (1, 2)]
    cells = [*base, untrained, partial, *other]
    summary = study_report.summarize(study, cells)
    comparisons = study_report.compare(study, cells)
    text = study_report.markdown(study, summary, comparisons, cells, {})

    assert summary["untrained"]["untrained"] and not summary["partial"]["untrained"]
    first = summary["untrained"]["tasks"]["beir"]["mean"]
    assert f" {first:.4f} (n=1, untrained) |" in _row(text, "untrained") and "±" not in _row(text, "untrained")
    assert f" {summary['partial']['tasks']['beir']['mean']:.4f} (n=1) |" in _row(text, "partial")
    assert "±" not in _row(text, "partial") and "±" in _row(text, "other") and "(n=" not in _row(text, "other")

    # the untrained cell against both baseline seeds; the one-seed recipe against the baseline's seed 2 only
    want = compare_row([untrained], base, "beir")
    got = comparisons["untrained"]["beir"]
    assert got["diff"] == want["diff"] and got["seeds"] == [1, 2]
    want = compare_row([partial], [base[1]], "beir")
    got = comparisons["partial"]["beir"]
    assert (got["diff"], got["low"], got["high"], got["seeds"]) == (want["diff"], want["low"], want["high"], [2])
    assert got["diff"] != compare_row([partial], base, "beir")["diff"]   # not averaged over a seed it lacks
    assert "(seeds 2)" in _row(text.split("Difference to the baseline")[1], "partial")
    assert "(seeds" not in _row(text.split("Difference to the baseline")[1], "other")

    # a recipe that shares no seed with the baseline gets no comparison rather than a mismatched one
    lonely = study_report.compare(SimpleNamespace(**{**vars(study), "seeds": [1, 2, 3]}),
                                  [*base, {**_cell("partial", 3)}])
    assert lonely.get("partial") == {}


def test_pipeline_seed_report_shows_a_one_seed_score_without_interval():
    records = [{"name": name, "kind": "contrastive", "steps": 2, "train_seconds": 1.0, "key": name, "eval_key": "e"}
               for name in ("start", "a", "b")]
    by_seed = {1: {r["name"]: {**r, "eval": _pairs_eval(3 + i)} for i, r in enumerate(records)},
               2: {r["name"]: {**r, "eval": _pairs_eval(9 + i)} for i, r in enumerate(records[:2])}}
    summary = pipeline_report.seed_summary(["start", "a", "b"], by_seed)
    text = pipeline_report.seeds_markdown("p", [1, 2], summary, {}, "a", {})
    b = next(s for s in summary if s["name"] == "b")["eval"]["beir"]["mean"]
    assert f"{b:.4f} (n=1)" in _row(text, "b") and "±" not in _row(text, "b") and "±" in _row(text, "a")
