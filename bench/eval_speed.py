"""Evaluation speed: `llm2emb eval` (local retrieval evaluator) vs `mteb.evaluate` with a
sentence-transformers wrapper of the same model, on the same BEIR folder (scifact_mini by default).

Both sides use the same model (smollm2-135m), pooling, batch size, max length, precision and threads, and
are fed the same token ids (sentence-transformers' chat template switched off, EOS appended as llm2emb
does; checked). Each side runs in its own process, alternately (A B B A ...). Reported per side: the
evaluation time after the model is loaded (corpus + query encoding, search, scoring; llm2emb starting
from an empty embedding cache), the end-to-end process time (imports, model and data loading included), nDCG@10 (the
two must agree), and llm2emb's re-evaluation time with a warm corpus cache.

    python bench/eval_speed.py                          # all 300 queries, 1,000 docs: ~15 min on 2 CPU cores
    python bench/eval_speed.py --limits 20 --docs 120   # smoke run, ~2 min
    python bench/eval_speed.py --device cuda --threads 0 --rounds 2
"""
from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

# bench/tokenize.py shadows the standard library's `tokenize`: keep the bench folder off the front of sys.path
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.append(str(_BENCH))

import _common as C  # noqa: E402

SCRIPT = "eval_speed"
SCRIPT_PATH = Path(__file__).resolve()


def subset_folder(task: Path, docs: int, limits: int | None, seed: int, out: Path) -> Path:
    """A copy of the BEIR folder with `docs` documents: the relevant documents of the queries `--limits`
    keeps, topped up with evenly spaced others (the same subset for both sides)."""
    from llm2emb.eval.data import load_beir, sample_queries

    data = load_beir(task)
    chosen = sample_queries(data.evaluable_query_ids(), limits, seed)
    relevant = {d for q in chosen for d in data.qrels[q]}
    keep = [i for i, d in enumerate(data.corpus_ids) if d in relevant]
    others = [i for i in range(len(data.corpus_ids)) if data.corpus_ids[i] not in relevant]
    room = max(0, docs - len(keep))
    if room and others:
        step = len(others) / min(room, len(others))
        keep += [others[int(j * step)] for j in range(min(room, len(others)))]
    keep.sort()
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for i in keep:
            fh.write(json.dumps({"_id": data.corpus_ids[i], "title": data.corpus_titles[i],
                                 "text": data.corpus_bodies[i]}, ensure_ascii=False) + "\n")
    with open(out / "queries.jsonl", "w", encoding="utf-8") as fh:
        for qid, text in zip(data.query_ids, data.query_texts):
            fh.write(json.dumps({"_id": qid, "text": text}, ensure_ascii=False) + "\n")
    with open(out / "qrels" / f"{data.split}.tsv", "w", encoding="utf-8") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for qid, docs_ in data.qrels.items():
            for did, score in docs_.items():
                fh.write(f"{qid}\t{did}\t{score}\n")
    return out


# ---------------------------------------------------------------------------------------------- workers
def worker(args: argparse.Namespace) -> int:
    """One timed evaluation by one side in this process; prints a JSON line."""
    C.set_threads(args.threads)
    model_dir = C.resolve_bench_model(args.model)
    if args.worker == "ours":
        from llm2emb.eval.loading import load_eval_model
        from llm2emb.eval.retrieval import run_retrieval

        model = load_eval_model(model_dir, pooling=args.pooling, max_length=args.max_length, dtype=args.dtype,
                                device=args.device).model
        with tempfile.TemporaryDirectory(prefix="llm2emb-bench-cache-") as cache:
            # the default `llm2emb eval` path: an empty cache, so the corpus is encoded and then stored
            start = time.perf_counter()
            run = run_retrieval(model, args.task, limits=args.limits, batch_size=args.batch_size, seed=args.seed,
                                cache=cache, show_progress=False)
            C.synchronize(args.device)
            seconds = time.perf_counter() - start
            end_to_end = time.perf_counter() - PROCESS_START
            assert not run.corpus_from_cache
            start = time.perf_counter()
            hit = run_retrieval(model, args.task, limits=args.limits, batch_size=args.batch_size, seed=args.seed,
                                cache=cache, show_progress=False)
            warm = time.perf_counter() - start
            assert hit.corpus_from_cache and hit.metrics == run.metrics
        metrics, n_queries, phases = run.metrics, run.n_queries, {"cold": run.seconds, "warm": hit.seconds}
    else:
        import mteb

        from llm2emb.eval.mteb_adapter import LocalRetrievalTask, scores_of
        from llm2emb.model.loading import load_tokenizer

        model = C.build_sentence_transformer(model_dir, args.pooling, args.max_length, args.dtype, args.device)
        task = LocalRetrievalTask(args.task, limits=args.limits, seed=args.seed)
        task.load_data()
        C.check_same_tokens(model, load_tokenizer(model_dir),
                            list(task.dataset["default"][task.source.split]["queries"]["text"])
                            + task.source.corpus_texts, args.max_length)
        start = time.perf_counter()
        result = mteb.evaluate(model, task, encode_kwargs={"batch_size": args.batch_size}, cache=None,
                               show_progress_bar=False, overwrite_strategy="always")
        C.synchronize(args.device)
        seconds = time.perf_counter() - start
        end_to_end = time.perf_counter() - PROCESS_START
        metrics, _ = scores_of(result, task.metadata.name)
        n_queries, warm, phases = len(task.dataset["default"][task.source.split]["queries"]), None, None
    print(json.dumps({"seconds": seconds, "end_to_end": end_to_end, "warm_cache_seconds": warm,
                      "ndcg_at_10": metrics["ndcg_at_10"], "recall_at_100": metrics["recall_at_100"],
                      "n_queries": n_queries, "phases": phases, "peak_rss_mib": C.peak_rss_mib()}))
    return 0


# ---------------------------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="built-in alias, HF folder or hub id")
    parser.add_argument("--task", default=str(C.SHARED_DATA / "eval" / "scifact_mini"), help="BEIR folder")
    parser.add_argument("--limits", type=int, default=None, help="queries to evaluate (seeded draw; default all)")
    parser.add_argument("--docs", type=int, default=0,
                        help="documents to keep (relevant ones of the kept queries first; 0 = all)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--pooling", default="mean", choices=["mean", "eos", "weighted_mean"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process; 0 = torch default")
    parser.add_argument("--rounds", type=int, default=1, help="A/B rounds (each side runs once per round)")
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/eval_speed.json)")
    parser.add_argument("--worker", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.limits is not None and args.limits < 1:
        parser.error("--limits must be a positive number of queries")
    if args.worker:
        return worker(args)
    if not Path(args.task).is_dir():
        raise SystemExit(f"task folder {args.task} not found; pass --task <BEIR folder> (the shared data lives at "
                         "../shared/data/eval/scifact_mini)")
    C.resolve_bench_model(args.model)  # download / convert once, outside the timed workers

    with tempfile.TemporaryDirectory(prefix="llm2emb-bench-eval-") as tmp:
        task = Path(args.task)
        if args.docs:
            task = subset_folder(task, args.docs, args.limits, args.seed, Path(tmp) / task.name)
        n_docs = sum(1 for _ in open(task / "corpus.jsonl", encoding="utf-8"))
        print(f"{SCRIPT}: {args.model} {args.pooling} pooling, {args.dtype} on {args.device}, {task.name} "
              f"({n_docs} docs, limits {args.limits}), batch {args.batch_size}, max length {args.max_length}, "
              f"threads {args.threads}, load {C.load_average()}", flush=True)
        passthrough = ["--model", args.model, "--task", str(task), "--seed", str(args.seed), "--pooling",
                       args.pooling, "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                       "--dtype", args.dtype, "--device", args.device, "--threads", str(args.threads)]
        passthrough += ["--limits", str(args.limits)] if args.limits else []
        load_before = C.load_average()
        runs = C.alternate({side: (lambda r, side=side: C.run_worker(SCRIPT_PATH, passthrough + ["--worker", side]))
                            for side in ("ours", "theirs")}, args.rounds)
        load_after = C.load_average()

    secs = {k: [r["seconds"] for r in v] for k, v in runs.items()}
    e2e = {k: [r["end_to_end"] for r in v] for k, v in runs.items()}
    ours, theirs = runs["ours"][0], runs["theirs"][0]
    records = [
        C.record("evaluation time (best run, model loaded)", "s", min(secs["ours"]), min(secs["theirs"]),
                 higher_is_better=False),
        C.record("speed-up, median of per-round pairs", "x",
                 C.paired_ratio(secs["ours"], secs["theirs"], higher_is_better=False), None),
        C.record("end-to-end process time (best run)", "s", min(e2e["ours"]), min(e2e["theirs"]),
                 higher_is_better=False),
        C.record("re-evaluation with warm corpus cache", "s", min(r["warm_cache_seconds"] for r in runs["ours"]),
                 min(secs["theirs"]), higher_is_better=False),
        C.record("nDCG@10", "score", ours["ndcg_at_10"], theirs["ndcg_at_10"], digits=5),
        C.record("Recall@100", "score", ours["recall_at_100"], theirs["recall_at_100"], digits=5),
        C.record("peak RSS", "MiB", max(r["peak_rss_mib"] for r in runs["ours"]),
                 max(r["peak_rss_mib"] for r in runs["theirs"]), higher_is_better=False, digits=0),
    ]
    records.append(C.meta_record(
        script=SCRIPT, model=args.model, task=Path(args.task).name, docs=n_docs, queries=ours["n_queries"],
        limits=args.limits, pooling=args.pooling, batch_size=args.batch_size, max_length=args.max_length,
        dtype=args.dtype, device=args.device, threads=args.threads, rounds=args.rounds, seconds=secs,
        end_to_end=e2e, llm2emb_phases=[r["phases"] for r in runs["ours"]], load_average_before=load_before,
        load_average_after=load_after, identical_tokens=True))
    path = C.save_results(SCRIPT, records, args.output)
    print()
    print(C.markdown_table(records, theirs_label="mteb + sentence-transformers"))
    print(f"\nseconds per run: {secs}; load average before {load_before}, after {load_after}")
    print(f"wrote {path}")
    if abs(ours["ndcg_at_10"] - theirs["ndcg_at_10"]) > 0.01:
        print(f"ERROR: nDCG@10 differs ({ours['ndcg_at_10']} vs {theirs['ndcg_at_10']}): not the same model",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
