"""`synthesize`: one synth run from corpus and spec to filtered training data (see `llm2emb.synth`)."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm2emb.data.manifest import DatasetSpec
from llm2emb.errors import UserError
from llm2emb.synth.contamination import build_index
from llm2emb.synth.corpus import Corpus, load_corpus
from llm2emb.synth.filters import FilterContext, SynthRow, apply_filters, parse_filter_list
from llm2emb.synth.generate import finished_records, run_generation
from llm2emb.synth.generators import Generator, build_generator
from llm2emb.synth.negatives import check_corpus_size
from llm2emb.synth.output import report_table, write_dataset, write_dropped, write_report
from llm2emb.synth.spec import SynthSpec, load_spec
from llm2emb.synth.store import DROPPED_FILE, REPORT_FILE, STATE_VERSION, RunStore

logger = logging.getLogger(__name__)


@dataclass
class SynthOptions:
    corpus: str
    spec: str
    model: str
    output: str
    seed: int = 0
    limit: int | None = None
    batch_size: int = 8
    generator: str = "transformers"
    device: str | None = None
    dtype: str | None = None
    filters: str | None = None               # comma-separated names, "none", or None = all
    contamination: tuple[str, ...] = ()      # added to the spec's filters.contamination
    consistency_scorer: str | None = None    # replaces the spec's filters.consistency_scorer
    top_k: int | None = None                 # replaces the spec's filters.consistency_top_k
    text_field: str | None = None
    id_field: str | None = None
    progress: bool = True


def _check(opts: SynthOptions) -> None:
    if opts.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {opts.batch_size}.")
    if opts.limit is not None and opts.limit < 1:
        raise UserError(f"--limit must be at least 1 passage, got {opts.limit}.")
    if opts.top_k is not None and opts.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {opts.top_k}.")


def _with_cli_filters(spec: SynthSpec, opts: SynthOptions) -> SynthSpec:
    f = spec.filters
    f = dataclasses.replace(
        f, contamination=tuple(dict.fromkeys([*f.contamination, *opts.contamination])),
        consistency_scorer=opts.consistency_scorer or f.consistency_scorer,
        consistency_top_k=opts.top_k or f.consistency_top_k)
    return dataclasses.replace(spec, filters=f)


def build_rows(spec: SynthSpec, corpus: Corpus, records: list[dict[str, Any]]) -> list[SynthRow]:
    """Training rows of the parsed records, in record order."""
    rows = []
    text_of = {p.id: p.text for p in corpus.passages}
    for r in records:
        if r["status"] != "ok":
            continue
        positive = r.get("positive", r["id"])
        query, passage = spec.task.make_pair(text_of[positive], r["fields"])
        negatives = r.get("negative_texts") or [text_of[d] for d in r.get("negatives", [])]
        generated = spec.task.name != "classification"
        rows.append(SynthRow(r["id"], positive if generated else "", query, passage, list(negatives), generated))
    return rows


def generation_stats(records: list[dict[str, Any]], store: RunStore, plan_chunks: int) -> dict[str, Any]:
    parsed = sum(r["status"] == "ok" for r in records)
    final_reasons: dict[str, int] = {}
    attempt_reasons: dict[str, int] = {}
    for r in records:
        for reason in r["reasons"]:
            attempt_reasons[reason] = attempt_reasons.get(reason, 0) + 1
        if r["status"] != "ok" and r["reasons"]:
            final_reasons[r["reasons"][-1]] = final_reasons.get(r["reasons"][-1], 0) + 1
    judged = [r["judge"] for r in records if "judge" in r]
    timing: dict[int, dict[str, Any]] = {}
    for t in store.timings():
        if t.get("chunk", plan_chunks) < plan_chunks:
            timing[int(t["chunk"])] = t
    seconds = sum(float(t["seconds"]) for t in timing.values())
    timed_passages = sum(int(t["passages"]) for t in timing.values())
    minutes = seconds / 60 if seconds else None
    stats: dict[str, Any] = {
        "passages": len(records), "parsed": parsed, "failed": len(records) - parsed,
        "parse_rate": round(parsed / len(records), 4) if records else None,
        "first_attempt_parsed": sum(r["status"] == "ok" and r["attempts"] == 1 for r in records),
        "generator_calls_per_passage": round(sum(r["attempts"] for r in records) / len(records), 3) if records else None,
        "failure_reasons": dict(sorted(final_reasons.items())),
        "reasons_over_all_attempts": dict(sorted(attempt_reasons.items())),
        "random_fill": sum(r.get("random_fill", 0) for r in records),
        "seconds": round(seconds, 1),
        # from the chunks' recorded times (over every invocation of the run)
        "passages_per_minute": round(timed_passages / minutes, 2) if minutes else None,
        "queries_per_minute": round(parsed * timed_passages / len(records) / minutes, 2) if minutes else None,
    }
    if judged:
        stats["judge"] = {"judged": len(judged), "parsed": sum(j["status"] == "ok" for j in judged),
                          "failed_fell_back_to_unjudged": sum(j["status"] != "ok" for j in judged),
                          "positive_changed": sum(1 for r in records if r.get("positive", r["id"]) != r["id"]),
                          "relevant_marked": sum(len(j.get("relevant", [])) for j in judged)}
    return stats


@dataclass
class SynthPlan:
    """Everything `synthesize` decides before generating (`llm2emb synth --dry-run` prints it). `generator` and
    `key` are None when the plan was made without fetching a model that is not on this machine."""

    spec: SynthSpec
    filters: list[str]
    corpus: Corpus
    index: Any                       # contamination n-gram index, or None
    generator: Generator | None
    key: dict[str, Any] | None       # the run's identity in DIR/_synth/run.json
    output: Path
    store: RunStore


def plan_synth(opts: SynthOptions, generator: Generator | None = None, fetch: bool = True) -> SynthPlan:
    """`synthesize`'s checks before generating: options, spec, filters, corpus (loaded and sized), the
    contamination sets (indexed), the consistency scorer and generator references, and the output folder's run
    (`RunStore.check`: another run there is refused); writes nothing. `fetch=False` builds the generator (its
    config only; weights load on first use) only when its model is on this machine."""
    from llm2emb.model.loading import check_model_reference, model_is_local, resolve_model_path

    _check(opts)
    spec = _with_cli_filters(load_spec(opts.spec), opts)
    names = parse_filter_list(opts.filters)
    corpus = load_corpus(opts.corpus, opts.text_field, opts.id_field)
    check_corpus_size(spec, corpus)
    index = None
    if "contamination" in names and spec.filters.contamination:
        index = build_index(spec.filters.contamination, spec.filters.ngram, spec.filters.min_ngram)
    if "consistency" in names and spec.filters.consistency_scorer != "bm25":
        scorer = spec.filters.consistency_scorer
        if fetch or model_is_local(scorer):
            resolve_model_path(scorer)  # a bad scorer path fails now, not after generating
        else:
            check_model_reference(scorer, "--consistency-scorer")
    if generator is None and (fetch or model_is_local(opts.model)):
        generator = build_generator(opts.generator, opts.model, device=opts.device, dtype=opts.dtype)
    elif generator is None:   # not fetched: the backend's name and the model reference are checked
        from llm2emb.synth.generators import GENERATORS

        if opts.generator not in GENERATORS:
            build_generator(opts.generator, opts.model)   # raises build_generator's one-sentence refusal
        check_model_reference(opts.model, "--model")
    key = None if generator is None else {
        "version": STATE_VERSION, "spec": spec.generation_key(), "model": generator.identity(),
        "corpus": {"sha256": corpus.fingerprint(), "passages": len(corpus)}, "seed": opts.seed,
        "batch_size": opts.batch_size, "generator": generator.name}
    output = Path(opts.output).expanduser()
    store = RunStore(output)
    store.check(key, spec.dataset)
    return SynthPlan(spec, names, corpus, index, generator, key, output, store)


def synthesize(opts: SynthOptions, generator: Generator | None = None) -> dict[str, Any]:
    """Generate (resuming), filter and write; returns the report (also DIR/_synth/report.json)."""
    plan = plan_synth(opts, generator)
    spec, names, corpus, index, generator, key, output, store = (plan.spec, plan.filters, plan.corpus, plan.index,
                                                                  plan.generator, plan.key, plan.output, plan.store)
    assert generator is not None and key is not None
    resumed = store.open(key, spec.dataset)
    summary = run_generation(spec, corpus, generator, store, opts.seed, opts.batch_size, opts.limit, opts.progress)
    records = finished_records(store, corpus, opts.seed, opts.batch_size, opts.limit)

    rows = build_rows(spec, corpus, records)
    ctx = FilterContext(corpus, spec.filters, spec.instruction, index)
    kept, dropped, filter_report = apply_filters(rows, names, ctx)
    entry = DatasetSpec(type=spec.task.name, instruction=spec.instruction, weight=spec.weight)
    report: dict[str, Any] = {
        "dataset": spec.dataset, "task_type": spec.task.name, "spec": spec.source, "corpus": corpus.name,
        "corpus_passages": len(corpus), "corpus_notes": corpus.notes, "model": generator.identity(),
        "seed": opts.seed, "batch_size": opts.batch_size, "limit": opts.limit,
        "negatives": {"mode": spec.negatives.mode, "per_row": spec.num_negatives},
        "this_invocation": {"resumed": resumed, "chunks_already_done": summary.chunks_done_before,
                            "chunks_generated": summary.chunks_generated,
                            "passages_generated": summary.passages_generated, "seconds": summary.seconds},
        "generation": generation_stats(records, store, summary.chunks_total),
        "filters": filter_report,
        "rows": {"generated": len(rows), "kept": len(kept),
                 "filter_pass_rate": round(len(kept) / len(rows), 4) if rows else None,
                 "yield_per_passage": round(len(kept) / len(records), 4) if records else None},
        "manifest_entry": {spec.dataset: entry.to_dict()},
    }
    write_dropped(store.dir / DROPPED_FILE, dropped)
    write_report(store.dir / REPORT_FILE, report)
    if not kept:
        raise UserError(f"No generated row survived (see {store.dir / REPORT_FILE}); nothing was written to "
                        f"{output / (spec.dataset + '.parquet')}.")
    report["output"] = str(write_dataset(output, spec.dataset, kept, spec.num_negatives, entry))
    write_report(store.dir / REPORT_FILE, report)
    return report


__all__ = ["SynthOptions", "build_rows", "report_table", "synthesize"]
