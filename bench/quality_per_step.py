"""Quality per step: after the same number of steps on the same data with the same seed, how good is the
model that llm2emb's recipe trains (F2LLM InfoNCE loss: in-batch negatives + hard negatives, length-grouped
single-dataset batches) vs sentence-transformers' MultipleNegativesRankingLoss? Plus the untrained base
model and BM25 as reference points.

Both sides: SmolLM2-135M, mean pooling, LoRA r=8 on q,k,v,o, scifact_en (1 hard negative) + stsb_pairs_en,
batch 16, max length 256, AdamW lr 3e-4, 10% warmup then linear decay, temperature 0.05 (MNRL scale 20),
seed 42, identical token ids (see bench/_training.py). Evaluation: nDCG@10 on scifact_mini (300 queries,
1,000 docs) and Spearman on STS-B en dev (1,500 pairs), both with llm2emb's MTEB-equal evaluators, texts cut
at 256 tokens.

    python bench/quality_per_step.py                  # 20 steps: ~25 min on 2 CPU cores (eval included)
    python bench/quality_per_step.py --steps 76       # the reference prototype (docs/contracts.md)'s budget
    python bench/quality_per_step.py --compare-precisions fp32,bf16 --eval-precision fp32,bf16
        # llm2emb's recipe trained in fp32 and in bf16 (autocast on fp32 weights), each evaluated with fp32
        # and bf16 encoding: quality at equal steps, step time and encode time (no ST side, no base model)

`--precision` (fp32 default | bf16 | fp16 | auto) is the training precision of both sides; `--eval-precision`
the encode precision(s) of llm2emb models (the sentence-transformers side always encodes in fp32). The meta
record names the CPU and its bf16 flags (avx512_bf16 / amx_bf16): without them bf16 is emulated and slow.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# bench/tokenize.py is named like the standard library's `tokenize` (imported by linecache / inspect): keep
# the bench folder off the front of sys.path so they get the real one.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.append(str(_BENCH))

import _common as C  # noqa: E402
import _training as T  # noqa: E402

SCRIPT = "quality_per_step"
SCRIPT_PATH = Path(__file__).resolve()
DATASETS = ("scifact_en", "stsb_pairs_en")


def evaluate(model, args: argparse.Namespace, precision: str = "fp32") -> dict[str, float]:
    """nDCG@10 on the retrieval set and Spearman on the STS file (no embedding cache: weights are new), with
    an llm2emb model encoding in `precision`."""
    from llm2emb.eval.retrieval import run_retrieval
    from llm2emb.eval.sts import evaluate_sts
    from llm2emb.model.embedder import Embedder

    if isinstance(model, Embedder):
        model.config.precision = precision
        model.encode(["warm-up text"] * 4, batch_size=4)  # one-time kernel setup stays out of the timing
    start = time.perf_counter()
    retrieval = run_retrieval(model, args.retrieval, batch_size=32, max_length=args.max_length, cache=False,
                              show_progress=False)
    sts = evaluate_sts(model, args.sts, batch_size=32, max_length=args.max_length, show_progress=False)
    return {"ndcg_at_10": retrieval.metrics["ndcg_at_10"], "recall_at_100": retrieval.metrics["recall_at_100"],
            "spearman": sts["cosine_spearman"], "eval_seconds": time.perf_counter() - start}


def bm25_ndcg(task_dir: str, limits: int | None = None, seed: int = 42) -> float:
    """BM25 (bm25s, English stopwords) nDCG@10 on a BEIR folder, scored with the same metric code; `limits`
    draws the same queries as `llm2emb eval --limits` with that seed."""
    import bm25s

    from llm2emb.eval.data import load_beir, sample_queries
    from llm2emb.eval.metrics import retrieval_metrics

    data = load_beir(task_dir)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(data.corpus_texts, stopwords="en", show_progress=False), show_progress=False)
    queries = sample_queries(data.evaluable_query_ids(), limits, seed)
    position = {q: i for i, q in enumerate(data.query_ids)}
    texts = [data.query_texts[position[q]] for q in queries]
    docs, scores = retriever.retrieve(bm25s.tokenize(texts, stopwords="en", show_progress=False),
                                      k=min(100, len(data.corpus_ids)), show_progress=False)
    run = {q: {data.corpus_ids[d]: float(s) for d, s in zip(docs[i], scores[i])} for i, q in enumerate(queries)}
    return retrieval_metrics({q: data.qrels[q] for q in queries}, run, (10,))["ndcg_at_10"]


def lora_b_abs_sum(model) -> float | None:
    """Sum of |LoRA B| (initialised to zero): > 0 proves the adapter was trained."""
    values = [p.detach().abs().sum().item() for n, p in model.named_parameters() if "lora_B" in n]
    return float(sum(values)) if values else None


def merge_lora(model) -> None:
    """Fold the adapter into the base weights of an Embedder or a SentenceTransformer."""
    from llm2emb.model.embedder import Embedder

    if isinstance(model, Embedder):
        model.merge_lora()
    elif hasattr(model[0].model, "merge_and_unload"):
        model[0].model = model[0].model.merge_and_unload()


# ---------------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> int:
    model_dir = C.resolve_bench_model(args.model)
    settings = T.TrainSettings(model_dir=model_dir, variant="lora", batch_size=args.batch_size, num_hard_neg=1,
                               max_length=args.max_length, pooling="mean", lora_r=8, lora_alpha=16,
                               learning_rate=args.learning_rate, warmup_steps=max(1, args.steps // 10),
                               steps=args.steps, seed=args.seed, threads=args.threads, device=args.device,
                               gradient_checkpointing=not args.no_checkpointing,
                               dtype=C.DTYPE_OF_PRECISION[args.precision])
    raw_files = [Path(args.train_dir) / f"{d}.parquet" for d in DATASETS]
    train_seconds = step_seconds = None
    with tempfile.TemporaryDirectory(prefix="llm2emb-bench-quality-") as tmp:
        if args.worker == "base":
            C.set_threads(args.threads)
            from llm2emb.model.embedder import Embedder

            model = Embedder.from_pretrained(model_dir, pooling="mean", max_length=args.max_length,
                                             device=args.device)
        elif args.worker == "ours":
            log, model = T.train_ours(settings, Path(args.data_dir), Path(tmp), keep_model=True)
            train_seconds = log.step_end[-1] - log.started
            step_seconds = mean_step_seconds(log.step_end)
        else:
            log, model = T.train_theirs(settings, raw_files, Path(tmp))
            train_seconds = log.step_end[-1] - log.started
            step_seconds = mean_step_seconds(log.step_end)
        lora_b_norm = lora_b_abs_sum(model)
        merge_lora(model)  # same vectors, faster evaluation
        # sentence-transformers' side encodes in fp32 only (its encode has no autocast switch here)
        eval_precisions = eval_precision_list(args) if args.worker != "theirs" else ["fp32"]
        by_precision = {p: evaluate(model, args, p) for p in eval_precisions}
    result = dict(by_precision[eval_precisions[0]])  # the first eval precision's metrics at the top level
    result.update(train_seconds=train_seconds, step_seconds=step_seconds, peak_rss_mib=C.peak_rss_mib(), lora_b_abs_sum=lora_b_norm,
                  train_precision=args.precision, by_eval_precision=by_precision)
    print(json.dumps(result))
    return 0


def eval_subset(args: argparse.Namespace, out: Path) -> None:
    """--eval-subset Q,D,S: the first Q queries of --retrieval that have relevance judgements, their relevant
    documents plus the first other documents in corpus order up to D documents, and the first S pairs of --sts
    (deterministic, written under `out`; args.retrieval / args.sts then point there)."""
    import csv

    n_queries, n_docs, n_pairs = (int(x) for x in args.eval_subset.split(","))
    source = Path(args.retrieval)
    qrels_file = sorted((source / "qrels").glob("*.tsv"))[0]
    with open(qrels_file, encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    header, rows = rows[0], rows[1:]
    queries = [json.loads(line) for line in (source / "queries.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    judged = {r[0] for r in rows}
    keep_q = [q for q in queries if q["_id"] in judged][:n_queries]
    ids = {q["_id"] for q in keep_q}
    relevant = {r[1] for r in rows if r[0] in ids}
    corpus = [json.loads(line) for line in (source / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
              if line.strip()]
    docs = [d for d in corpus if d["_id"] in relevant]
    docs += [d for d in corpus if d["_id"] not in relevant][:max(0, n_docs - len(docs))]
    target = out / f"{source.name}_subset"
    (target / "qrels").mkdir(parents=True, exist_ok=True)
    (target / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in keep_q), encoding="utf-8")
    (target / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    (target / "qrels" / qrels_file.name).write_text(
        "\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows if r[0] in ids), encoding="utf-8")
    lines = Path(args.sts).read_text(encoding="utf-8").splitlines()
    sts = out / f"sts_subset{Path(args.sts).suffix}"
    sts.write_text("\n".join(lines[:n_pairs + 1]) + "\n", encoding="utf-8")
    args.subset_description = (f"first {len(keep_q)} judged queries of {source}, their {len(relevant)} relevant "
                               f"docs + first others in corpus order = {len(docs)} docs; first {n_pairs} pairs of "
                               f"{args.sts}")
    args.retrieval, args.sts = str(target), str(sts)


def mean_step_seconds(step_end: list[float]) -> float | None:
    """Mean time of steps 2..n (the first one carries one-time setup: allocator, kernel selection)."""
    return (step_end[-1] - step_end[0]) / (len(step_end) - 1) if len(step_end) > 1 else None


def eval_precision_list(args: argparse.Namespace) -> list[str]:
    return [p.strip() for p in args.eval_precision.split(",") if p.strip()]


def concrete_precision(setting: str, device: str) -> str:
    """auto -> fp32 / bf16 on this machine, resolved once in the driver so every worker and record agrees."""
    from llm2emb.model.precision import resolve_precision

    return resolve_precision(setting, device).name


# ---------------------------------------------------------------------------------------------- precision study
def precision_study(args: argparse.Namespace, prepared: Path, common: list[str]) -> list[dict]:
    """llm2emb's recipe trained once per precision of --compare-precisions, each model evaluated with every
    --eval-precision. Records: ours = the second precision listed (e.g. bf16), theirs = the first (fp32)."""
    base, other = args.compare_precisions
    evals = eval_precision_list(args)
    runs: dict[str, dict] = {}
    for precision in (base, other):
        C.wait_for_quiet(args.quiet_load)
        started = time.perf_counter()
        runs[precision] = C.run_worker(SCRIPT_PATH, common + ["--precision", precision, "--worker", "ours",
                                                              "--data-dir", str(prepared)])
        shown = {p: {k: round(v, 4) for k, v in m.items()} for p, m in runs[precision]["by_eval_precision"].items()}
        print(f"  ours trained in {precision}: train {runs[precision]['train_seconds']:.0f}s, "
              f"{json.dumps(shown)} ({time.perf_counter() - started:.0f}s)", flush=True)
    n = args.steps
    metrics = (("ndcg_at_10", "scifact_mini nDCG@10", "nDCG@10"), ("recall_at_100", "scifact_mini Recall@100",
               "Recall@100"), ("spearman", "STS-B en dev Spearman", "Spearman"))
    records = []
    for e in evals:  # training precision compared at equal steps, same encode precision
        for key, label, unit in metrics:
            records.append(C.record(f"{label} after {n} steps, trained {other} vs {base} (encode {e})", unit,
                                    runs[other]["by_eval_precision"][e][key],
                                    runs[base]["by_eval_precision"][e][key]))
    records.append(C.record(f"training time for {n} steps (model load included), {other} vs {base}", "s",
                            runs[other]["train_seconds"], runs[base]["train_seconds"], higher_is_better=False,
                            digits=1))
    records.append(C.record(f"mean step time, steps 2-{n}, {other} vs {base}", "s", runs[other]["step_seconds"],
                            runs[base]["step_seconds"], higher_is_better=False, digits=2))
    differences = {}
    if len(evals) > 1:  # encode precision compared on the same trained model
        e_base, e_other = evals[0], evals[1]
        for trained in (base, other):
            by = runs[trained]["by_eval_precision"]
            for key, label, unit in metrics:
                records.append(C.record(f"{label}, model trained {trained}: encode {e_other} vs {e_base}", unit,
                                        by[e_other][key], by[e_base][key]))
                differences[f"trained {trained}: {key}"] = abs(by[e_other][key] - by[e_base][key])
            records.append(C.record(f"evaluation time (encode {len(evals)} sets), model trained {trained}: "
                                    f"encode {e_other} vs {e_base}", "s", by[e_other]["eval_seconds"],
                                    by[e_base]["eval_seconds"], higher_is_better=False, digits=1))
        records.append(C.record(f"max abs metric difference, encode {e_other} vs {e_base}", "abs",
                                max(differences.values()), digits=5))
    records.append(C.meta_record(
        script=SCRIPT, mode="precision study", model=args.model, steps=n, batch_size=args.batch_size,
        max_length=args.max_length, learning_rate=args.learning_rate, warmup_steps=max(1, n // 10),
        schedule="linear", seed=args.seed, lora="r=8 alpha=16 dropout=0 on q,k,v,o", pooling="mean",
        temperature=0.05, datasets=list(DATASETS), gradient_checkpointing=not args.no_checkpointing,
        num_hard_neg=1, retrieval=args.retrieval, sts=args.sts, threads=args.threads,
        training_precisions=[base, other], eval_precisions=evals, metric_differences=differences,
        eval_subset=getattr(args, "subset_description", None), load_average_after=C.load_average(),
        precision_note="bf16 = torch autocast on float32 weights (llm2emb's precision setting); losses in fp32",
        workers=runs))
    return records


# ---------------------------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps on each side")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--train-dir", default=str(C.SHARED_DATA / "train"))
    parser.add_argument("--retrieval", default=str(C.SHARED_DATA / "eval" / "scifact_mini"))
    parser.add_argument("--sts", default=str(C.SHARED_DATA / "eval" / "stsb_en" / "dev.tsv"))
    parser.add_argument("--skip-base", action="store_true", help="do not evaluate the untrained model")
    parser.add_argument("--no-checkpointing", action="store_true",
                        help="train without gradient checkpointing (faster; a batch-16 SciFact step then needs "
                             "~14-17 GiB). Checkpointing recomputes exactly, so it does not change the results")
    parser.add_argument("--quiet-load", type=float, default=None,
                        help="before each run, wait until the 1-minute load average is below this")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "auto"],
                        help="training precision of both sides (bf16/fp16: autocast on float32 weights; auto: bf16 "
                             "where the device computes it natively)")
    parser.add_argument("--eval-precision", default="fp32",
                        help="comma-separated encode precision(s) for evaluating llm2emb models, e.g. fp32,bf16")
    parser.add_argument("--compare-precisions", default=None,
                        help="A,B (e.g. fp32,bf16): train only llm2emb's side, once in each, and compare B against A "
                             "(default output bench/results/quality_per_step_precision.json)")
    parser.add_argument("--eval-subset", default=None, metavar="Q,D,S",
                        help="evaluate on a deterministic subset: Q queries (with their relevant docs) and D docs of "
                             "--retrieval, S pairs of --sts (a reduced run on a slow machine; recorded in meta)")
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/quality_per_step.json)")
    parser.add_argument("--worker", choices=["ours", "theirs", "base"], help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    from llm2emb.model.precision import canonical_precision

    args.precision = concrete_precision(args.precision, args.device)
    args.eval_precision = ",".join(concrete_precision(p, args.device) for p in eval_precision_list(args))
    if args.compare_precisions:
        pair = [canonical_precision(p.strip(), "--compare-precisions") for p in args.compare_precisions.split(",")]
        if len(pair) != 2 or pair[0] == pair[1]:
            raise SystemExit("--compare-precisions takes two different precisions, e.g. fp32,bf16")
        args.compare_precisions = [concrete_precision(p, args.device) for p in pair]

    for path in [Path(args.train_dir) / f"{d}.parquet" for d in DATASETS] + [Path(args.retrieval), Path(args.sts)]:
        if not path.exists():
            raise SystemExit(f"{path} not found; pass --train-dir / --retrieval / --sts "
                             "(the shared data lives at ../shared/data)")
    model_dir = C.resolve_bench_model(args.model)
    print(f"{SCRIPT}: {args.model}, {args.steps} steps per side, batch {args.batch_size}, max length "
          f"{args.max_length}, lr {args.learning_rate}, seed {args.seed}, load {C.load_average()}", flush=True)
    load_before = C.load_average()
    common = ["--model", args.model, "--device", args.device, "--threads", str(args.threads),
              "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
              "--learning-rate", str(args.learning_rate), "--seed", str(args.seed), "--train-dir", args.train_dir,
              "--retrieval", args.retrieval, "--sts", args.sts, "--eval-precision", args.eval_precision]
    common += ["--no-checkpointing"] if args.no_checkpointing else []
    results = {}
    with tempfile.TemporaryDirectory(prefix="llm2emb-bench-quality-") as tmp:
        prepared = T.prepare_data(model_dir, [Path(args.train_dir) / f"{d}.parquet" for d in DATASETS],
                                  Path(tmp) / "prepared", args.max_length)
        if args.eval_subset:
            eval_subset(args, Path(tmp))
            common[common.index("--retrieval") + 1], common[common.index("--sts") + 1] = args.retrieval, args.sts
        if args.compare_precisions:
            records = precision_study(args, prepared, common)
            path = C.save_results(SCRIPT, records, args.output or str(C.RESULTS_DIR / f"{SCRIPT}_precision.json"))
            base, other = args.compare_precisions
            print()
            print(C.markdown_table(records, f"trained/encoded {other}", f"trained/encoded {base}"))
            print(f"\nwrote {path}")
            return 0
        common += ["--precision", args.precision]
        sides = ["ours", "theirs"] + ([] if args.skip_base else ["base"])
        for side in sides:
            C.wait_for_quiet(args.quiet_load)
            started = time.perf_counter()
            results[side] = C.run_worker(SCRIPT_PATH, common + ["--worker", side, "--data-dir", str(prepared)])
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in results[side].items()}
            print(f"  {side}: {json.dumps(shown)} ({time.perf_counter() - started:.0f}s)", flush=True)
    bm25 = bm25_ndcg(args.retrieval)
    ours, theirs = results["ours"], results["theirs"]
    n = args.steps
    records = [
        C.record(f"scifact_mini nDCG@10 after {n} steps", "nDCG@10", ours["ndcg_at_10"], theirs["ndcg_at_10"]),
        C.record(f"scifact_mini Recall@100 after {n} steps", "Recall@100", ours["recall_at_100"],
                 theirs["recall_at_100"]),
        C.record(f"STS-B en dev Spearman after {n} steps", "Spearman", ours["spearman"], theirs["spearman"]),
        C.record(f"training time for {n} steps", "s", ours["train_seconds"], theirs["train_seconds"],
                 higher_is_better=False, digits=1),
    ]
    if "base" in results:
        records += [C.record("scifact_mini nDCG@10, untrained base (mean pooling)", "nDCG@10",
                             results["base"]["ndcg_at_10"]),
                    C.record("STS-B en dev Spearman, untrained base (mean pooling)", "Spearman",
                             results["base"]["spearman"])]
    records.append(C.record("scifact_mini nDCG@10, BM25 (bm25s)", "nDCG@10", bm25))
    records.append(C.meta_record(
        script=SCRIPT, model=args.model, steps=n, batch_size=args.batch_size, max_length=args.max_length,
        learning_rate=args.learning_rate, warmup_steps=max(1, n // 10), schedule="linear", seed=args.seed,
        lora="r=8 alpha=16 dropout=0 on q,k,v,o", pooling="mean", temperature=0.05, datasets=list(DATASETS),
        gradient_checkpointing=not args.no_checkpointing,
        num_hard_neg=1, retrieval=args.retrieval, sts=args.sts, threads=args.threads,
        training_precision=args.precision, eval_precisions=eval_precision_list(args),
        eval_subset=getattr(args, "subset_description", None), load_average_before=load_before, load_average_after=C.load_average(), workers=results))
    path = C.save_results(SCRIPT, records, args.output)
    print()
    print(C.markdown_table(records, "llm2emb recipe", "sentence-transformers MNRL"))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
