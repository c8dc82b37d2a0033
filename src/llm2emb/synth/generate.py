"""The generation loop: passages in a seeded order, in fixed chunks, each finished chunk appended to the log.

Per chunk of `batch_size` passages:
  1. one prompt per passage from the spec's template, placeholders drawn with a seed of (run seed, passage
     id), so a passage gets the same prompt whatever else is in the run;
  2. one batched generator call; replies that do not parse (`llm2emb.synth.replies`) are asked again, up to
     `generation.retries` times, sampling with a seed of (run seed, chunk, stage, attempt); a reply that never
     parses is recorded as failed, counted, and skipped;
  3. hard negatives (`llm2emb.synth.negatives`): BM25 candidates, judged by the LLM when relabelling (Gecko),
     or the reply's own generated negative (e5-mistral), or another label (classification);
  4. the chunk's records are appended to the log as one line.
A chunk is the unit of resumption and of determinism: the same chunk (same passages, seed, model, spec)
gives the same records, so a run killed and continued writes what an uninterrupted run writes.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Sequence

from llm2emb.synth.corpus import Corpus
from llm2emb.synth.generators import Generator
from llm2emb.synth.negatives import CandidateRetriever, assign_negatives
from llm2emb.synth.replies import parse_fields
from llm2emb.synth.retry import cut, generate_with_retries, stable_int
from llm2emb.synth.spec import SynthSpec
from llm2emb.synth.store import RunStore

MAX_STORED_REPLY = 2000  # characters of a raw reply kept in the log (for reading failures)


def passage_order(corpus: Corpus, seed: int) -> list[int]:
    """Corpus indices in a seeded order that depends only on each passage's id: --limit N takes a sample
    spread over the corpus, and growing the corpus does not reorder the passages already there."""
    return sorted(range(len(corpus)), key=lambda i: (stable_int(seed, corpus.passages[i].id), i))


def plan_chunks(corpus: Corpus, seed: int, batch_size: int, limit: int | None) -> list[list[int]]:
    order = passage_order(corpus, seed)[:limit]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def sample_placeholders(spec: SynthSpec, seed: int, passage_id: str) -> dict[str, str]:
    rng = random.Random(f"{seed}\0{passage_id}")
    return {name: rng.choice(values) for name, values in sorted(spec.placeholders.items())}


def generate_chunk(spec: SynthSpec, corpus: Corpus, generator: Generator, indices: Sequence[int], seed: int,
                   chunk: int, retriever: CandidateRetriever | None) -> list[dict[str, Any]]:
    passages = [corpus.passages[i] for i in indices]
    placeholders = [sample_placeholders(spec, seed, p.id) for p in passages]
    labels = ", ".join(spec.labels)
    prompts = [spec.template.render({**ph, "passage": cut(p.text, spec.generation.max_passage_chars),
                                     "labels": labels}) for p, ph in zip(passages, placeholders)]
    fields = spec.task.reply_fields(spec.negatives.mode)
    outcomes = generate_with_retries(generator, prompts, lambda i, text: parse_fields(text, fields, spec.labels),
                                     spec, (seed, chunk, "generate"))
    records: list[dict[str, Any]] = []
    for p, ph, out in zip(passages, placeholders, outcomes):
        record: dict[str, Any] = {"id": p.id, "status": "ok" if out.parsed is not None else "failed",
                                  "attempts": out.attempts, "reasons": out.reasons, "placeholders": ph,
                                  "reply": out.reply[:MAX_STORED_REPLY]}
        if out.parsed is not None:
            record["fields"] = out.parsed
            record["positive"] = p.id
        records.append(record)
    assign_negatives(spec, corpus, generator, records, seed, chunk, retriever)
    return records


@dataclass
class GenerationSummary:
    chunks_total: int
    chunks_done_before: int
    chunks_generated: int
    passages_generated: int
    seconds: float


def run_generation(spec: SynthSpec, corpus: Corpus, generator: Generator, store: RunStore, seed: int,
                   batch_size: int, limit: int | None, progress: bool = True) -> GenerationSummary:
    """Generate every planned chunk that the log does not hold yet (see module docstring)."""
    plan = plan_chunks(corpus, seed, batch_size, limit)
    done = store.chunks()
    ids_of = [[corpus.passages[i].id for i in chunk] for chunk in plan]
    todo = [c for c in range(len(plan)) if done.get(c, {}).get("ids") != ids_of[c]]
    retriever = CandidateRetriever(corpus) if spec.negatives.mode == "retrieved" and todo else None
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(len(c) for c in plan), initial=sum(len(plan[c]) for c in range(len(plan)) if c not in todo),
                   desc="synth", unit="passage")
    started, generated = time.perf_counter(), 0
    ok = failed = 0
    try:
        for c in todo:
            t0 = time.perf_counter()
            records = generate_chunk(spec, corpus, generator, plan[c], seed, c, retriever)
            store.append({"chunk": c, "ids": ids_of[c], "records": records})
            store.append_timing({"chunk": c, "passages": len(records), "seconds": round(time.perf_counter() - t0, 3)})
            generated += len(records)
            ok += sum(r["status"] == "ok" for r in records)
            failed += sum(r["status"] != "ok" for r in records)
            if bar is not None:
                bar.update(len(records))
                bar.set_postfix(ok=ok, failed=failed)
    finally:
        if bar is not None:
            bar.close()
    return GenerationSummary(len(plan), len(plan) - len(todo), len(todo), generated,
                             round(time.perf_counter() - started, 3))


def finished_records(store: RunStore, corpus: Corpus, seed: int, batch_size: int, limit: int | None,
                     ) -> list[dict[str, Any]]:
    """The records of the planned chunks, in plan order (chunks outside the plan, e.g. of a larger earlier
    --limit, are left out)."""
    plan = plan_chunks(corpus, seed, batch_size, limit)
    done = store.chunks()
    out: list[dict[str, Any]] = []
    for c, chunk in enumerate(plan):
        record = done.get(c)
        if record is None or record.get("ids") != [corpus.passages[i].id for i in chunk]:
            raise RuntimeError(f"chunk {c} is not finished")  # run_generation ran first: cannot happen
        out.extend(record["records"])
    return out
